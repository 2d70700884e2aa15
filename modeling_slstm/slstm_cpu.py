"""The C++ CPU kernels of the sLSTM (`csrc/slstm_cpu.cpp`) built on first use, loaded with ctypes and registered as
PyTorch ops: the "compiled" backend. `slstm_op` is their only caller; the modeling files never import this module, so
a model saved with `save_pretrained` ships pure PyTorch.

Build: the system C++ compiler (`$CXX`, else `c++`/`g++`) makes a plain shared library (no Python or torch headers, so
it builds in seconds; `-march=native` first, portable flags if the compiler refuses that; OpenMP when the compiler has
it, so the decoding kernels share each step's products among torch's own intra-op threads), within a timeout, into
`$TORCH_EXTENSIONS_DIR/modeling_slstm` (default `~/.cache/torch_extensions/modeling_slstm`), keyed by a hash of the
source, the flags, the compiler and the CPU. The directory is created private (0o700). A library is loaded only when
it and its directory belong to this user and nobody else may write them, and when its sha256 equals the one recorded
after its build; a truncated or replaced library is rebuilt.

Ops (namespace `slstm`), each with a fake implementation, so torch.compile, torch.export and torch.jit.trace record
them as single nodes:
    slstm::scan(gates, R, bias?, state, mask?, exp_forget, save) -> out, final state, saved_g, saved_a   (autograd)
    slstm::scan_backward(R^T, state0, mask?, saved_g, saved_a, d_out, d_state) -> d_gates, d_state0
    slstm::block_decode(x, mask?, windows, states, weights of L blocks, eps, exp_forget, activation, record)
        -> every block's output, windows, states, and the windows and states after each step (record)
    slstm::linear_decode(x, weight, bias?) -> x weight^T + bias, for a decoding step's few rows
The scan ops' CUDA implementation is the Triton kernels' (`slstm_triton`, registered when that module is imported);
the fake implementations, the autograd formula (`scan_setup_context`, `scan_gradients`), the boundary check
(`check_tensor`) and `scan` are shared by both devices. Every implementation passes every tensor through the check (a
plain dense contiguous tensor on its device of the exact shape and dtype, else a ValueError naming it) before a
pointer goes to a kernel, and allocates its outputs with explicit dtype and device. Heads are independent over the
whole sequence, so a large scan runs as blocks (heads x batch rows) on a small thread pool (ctypes releases the GIL);
a small call (decoding) is one call on the calling thread.
"""

import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from transformers.utils import logging


logger = logging.get_logger(__name__)

KERNEL_API = 1  # slstm_op uses this module only at the API it was written for (a Hub copy next to another release)
ACTIVATION_CODES = {"gelu": 0, "relu": 1, "relu2": 2, "silu": 3, "swish": 3, "sigmoid": 4, "selu": 5}  # csrc ffn_act
_SOURCE = Path(__file__).with_name("csrc") / "slstm_cpu.cpp"
_FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-std=c++17"]
_NATIVE = "-march=native"  # tried first; dropped when the compiler rejects it
_OPENMP = "-fopenmp"  # links libgomp.so.1: torch's loaded copy, its thread pool; dropped when the compiler lacks it
_VARIANTS = ([_NATIVE, _OPENMP], [_OPENMP], [_NATIVE], [])  # tried in this order; the first that compiles is used
_BUILD_TIMEOUT = 300  # seconds for one compiler run
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # no subclasses: their data pointer may not hold plain floats
_F32, _CPU, _STRIDED = torch.float32, torch.device("cpu"), torch.strided
DECODE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # what the decoding kernels read (csrc dtype codes)
_lock = threading.Lock()
_lib = None  # ctypes.CDLL once loaded; False when building or loading failed (why: _error)
_error = ""
_pools: dict = {}  # (process id, thread count) -> ThreadPoolExecutor; a forked child never reuses its parent's


class _BlockDecodeArgs(ctypes.Structure):
    """The C++ `BlockDecodeArgs`: pointers (null for an absent tensor), then eps, sizes and flags."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in (
            "x", "mask", "window_in", "state_in", "window", "state", "norm1_w", "conv_w", "conv_b", "proj_w", "R", "bias", "out_norm_w",
            "norm2_w", "gate_up_w", "gate_up_b", "down_w", "down_b", "out", "step_windows", "step_states")),
        *((name, ctypes.c_float) for name in ("eps1", "eps_out", "eps2")),
        *((name, ctypes.c_int64) for name in ("B", "S", "NH", "DH", "K", "F")),
        *((name, ctypes.c_int32) for name in ("exp_forget", "act", "threads", "dtype")),
        ("stream", ctypes.c_bool),  # set by the library
    ]


class KernelBuildError(RuntimeError):
    """The C++ kernel library could not be built or loaded."""


class _CompilerRejected(KernelBuildError):
    """The compiler ran and failed (e.g. on -march=native)."""


# ------------------------------------------------------------------------------------------------------------ build
def _cache_dir() -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch_extensions"
    )
    return os.path.join(root, "modeling_slstm")


def _cpu_key() -> str:
    """The CPU the library is built for (-march=native): machine and instruction-set flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return platform.machine() + flags


def _private(path: str) -> None:
    """Refuse a file or directory that another user owns or may write: a library there could be swapped."""
    info = os.stat(path)
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise KernelBuildError(
            f"{path} is owned by another user or writable by group/others; not loading a kernel library from it "
            f"(point TORCH_EXTENSIONS_DIR at a private directory)"
        )


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _verified(path: str) -> bool:
    """Whether the library at `path` is the one its build recorded in `path.sha256`."""
    try:
        with open(path + ".sha256") as f:
            return f.read().strip() == _sha256(path)
    except FileNotFoundError:
        return False


def _compile(compiler: str, flags: list) -> str:
    """The verified library for these flags in the cache, compiled (atomically, hash recorded) when missing or bad."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\n".join([source, " ".join([*flags, _cpu_key(), compiler]).encode()])).hexdigest()[:16]
    directory = _cache_dir()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    _private(directory)
    path = os.path.join(directory, f"slstm_cpu_{key}.so")
    if os.path.exists(path):
        _private(path)
        if _verified(path):
            return path
        logger.warning_once(f"sLSTM: {path} does not match its recorded sha256 (truncated or replaced); rebuilding it.")
    name = os.path.basename(compiler)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        lib = os.path.join(tmp, "slstm_cpu.so")
        try:
            result = subprocess.run(
                [compiler, *flags, str(_SOURCE), "-o", lib], capture_output=True, text=True, timeout=_BUILD_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            raise KernelBuildError(f"{name} did not finish within {_BUILD_TIMEOUT} s") from None
        except OSError as err:
            raise KernelBuildError(f"cannot run {compiler}: {err}") from None
        if result.returncode != 0:
            lines = result.stderr.splitlines()
            first_error = next((line for line in lines if "error" in line), lines[0] if lines else "")
            raise _CompilerRejected(f"{name} failed: {first_error.strip()[:300] or f'exit code {result.returncode}'}")
        digest = _sha256(lib)
        os.replace(lib, path)  # atomic: concurrent builders never see a half-written library
        with open(os.path.join(tmp, "sha256"), "w") as f:
            f.write(digest)
        os.replace(os.path.join(tmp, "sha256"), path + ".sha256")  # recorded after the library is in place
    return path


def _build_compiler() -> str:
    """$CXX, else c++ or g++ on the PATH."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise KernelBuildError("no C++ compiler found (set CXX)")
    return compiler


def _build() -> ctypes.CDLL:
    compiler = _build_compiler()
    for k, variant in enumerate(_VARIANTS):
        try:
            path = _compile(compiler, [*variant, *_FLAGS])
            break
        except _CompilerRejected:
            if k == len(_VARIANTS) - 1:
                raise
    lib = ctypes.CDLL(path)
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.slstm_forward.argtypes = [ptr] * 8 + [i64] * 4 + [ctypes.c_int] + [i64] * 4
    lib.slstm_backward.argtypes = [ptr] * 8 + [i64] * 8
    lib.slstm_block_decode.argtypes = [ctypes.POINTER(_BlockDecodeArgs), i64]
    lib.slstm_linear_decode.argtypes = [ptr] * 4 + [i64] * 3 + [ctypes.c_int] * 2
    lib.slstm_forward.restype = lib.slstm_backward.restype = None
    lib.slstm_block_decode.restype = lib.slstm_linear_decode.restype = ctypes.c_int
    return lib


def compiled_available() -> bool:
    """Build (once, on first use) and load the library; False when that failed (the reason: `build_error()`)."""
    global _lib, _error
    if _lib is None:
        with _lock:
            if _lib is None:
                try:
                    _lib = _build()
                    logger.info(f"sLSTM: using the compiled C++ kernel {_lib._name}.")
                except Exception as err:  # noqa: BLE001  (any build or load failure: the caller falls back or raises)
                    _lib, _error = False, f"{type(err).__name__}: {err}"
    return bool(_lib)


def build_error() -> str:
    """Why the library could not be built or loaded ("" if it was, or was not tried yet)."""
    return _error


def _library() -> ctypes.CDLL:
    if not compiled_available():
        raise KernelBuildError(f"the sLSTM C++ kernel could not be built: {_error}")
    return _lib


# --------------------------------------------------------------------------------------------------------- boundary
def check_tensor(name: str, t: Optional[Tensor], shape: tuple, dtype: torch.dtype = _F32, optional: bool = False,
                 device: torch.device = _CPU, block: Optional[int] = None) -> None:
    """The boundary in front of every kernel call: `t` must be a plain dense contiguous tensor on `device` of exactly
    this shape and dtype (None only when optional), else a ValueError naming it (`name (block k)` with a block).
    Nothing else reaches a raw pointer."""
    if t is None:
        if optional:
            return
        raise ValueError(f"sLSTM kernel: `{_named(name, block)}` is required.")
    on_device = t.is_cpu if device is _CPU else t.device == device
    if type(t) not in _PLAIN or t.layout is not torch.strided or not on_device:
        raise ValueError(
            f"sLSTM kernel: `{_named(name, block)}` must be a plain dense {'CPU' if device.type == 'cpu' else device} "
            f"tensor, got {type(t).__name__} ({t.layout}) on {t.device}."
        )
    if t.dtype is not dtype or t.shape != shape or not t.is_contiguous():
        name = _named(name, block)
        raise ValueError(
            f"sLSTM kernel: `{name}` must be a contiguous {dtype} tensor of shape {tuple(shape)}, got "
            f"{'a' if t.is_contiguous() else 'a non-contiguous'} {t.dtype} tensor of shape {tuple(t.shape)}."
        )


def _named(name: str, block: Optional[int]) -> str:
    return name if block is None else f"{name} (block {block})"  # formatted for an error only: checks run per token


_check = check_tensor  # the C++ kernels' calls: CPU tensors


def _dims(name: str, t: Tensor, ndim: int) -> tuple:
    if not isinstance(t, Tensor) or t.dim() != ndim:
        raise ValueError(f"sLSTM kernel: `{name}` must be a {ndim}-D tensor, got {getattr(t, 'shape', type(t))}.")
    return tuple(t.shape)


def _checked_ptr(name: str, t: Tensor, shape: tuple, dtype: torch.dtype, needed: bool,
                 block: Optional[int] = None) -> Optional[int]:
    """`check_tensor` of t, where an empty tensor stands for an absent one (allowed unless `needed`) -> its address,
    or None (a null pointer) when absent. What `check_tensor` asks of a present tensor is tested inline first: this
    runs for every weight of every block and token."""
    if (type(t) in _PLAIN and t.shape == shape and t.dtype is dtype and t.is_cpu and t.layout is _STRIDED
            and t.is_contiguous() and t.numel()):
        return t.data_ptr()
    if t.numel() or needed:  # the ValueError saying what is wrong
        check_tensor(name, t, shape, dtype, block=block)
    return None


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    """The address ctypes passes for a checked tensor; None (a null pointer: absent) for None or an empty tensor."""
    return None if t is None or t.numel() == 0 else t.data_ptr()


_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_forked = False  # this process is a child forked after this module was imported


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _team_size() -> int:
    """Threads for the decoding kernels' team: torch's thread count, at most the CPUs this process may run on (more
    would only take turns on the same cores); one in a forked child (torch's OpenMP pool does not survive a fork: a
    parallel region there can hang, even when the library is first loaded in the child)."""
    return 1 if _forked else max(1, min(torch.get_num_threads(), _CPUS))


def _empty(*shape: int) -> Tensor:
    return torch.empty(shape, dtype=_F32, device=_CPU)


def _run_units(fn, args, batch_size: int, num_heads: int, work: int) -> None:
    """Call fn(*args, h_begin, h_end, b0, b1) over blocks covering heads x batch rows: one call on one thread for small
    work (decoding), else one block per thread (whole heads when there are enough, else heads x batch chunks)."""
    if batch_size == 0 or num_heads == 0:
        return
    threads = min(max(1, torch.get_num_threads()), num_heads * batch_size) if work >= 32768 else 1
    if threads == 1:
        fn(*args, 0, num_heads, 0, batch_size)
        return
    if num_heads >= threads:
        bounds = [num_heads * k // threads for k in range(threads + 1)]
        blocks = [(lo, hi, 0, batch_size) for lo, hi in zip(bounds[:-1], bounds[1:])]
    else:
        chunks = -(-threads // num_heads)
        bounds = [batch_size * k // chunks for k in range(chunks + 1)]
        blocks = [(h, h + 1, lo, hi) for h in range(num_heads) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    with _lock:
        key = (os.getpid(), threads)
        pool = _pools.get(key) or _pools.setdefault(key, ThreadPoolExecutor(threads, "slstm"))
    list(pool.map(lambda block: fn(*args, *block), blocks))


# -------------------------------------------------------------------------------------------------------------- ops
@torch.library.custom_op("slstm::scan", mutates_args=(), device_types="cpu")
def _scan_op(
    gates: Tensor, recurrent_kernel: Tensor, bias: Optional[Tensor], state: Tensor, mask: Optional[Tensor],
    exp_forget: bool, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """gates (B, S, NH, 4*DH), R (NH, DH, 4*DH), bias (NH, 4*DH)?, state (4, B, NH, DH) [h, c, n, m], mask (B, S)
    bool?, all float32 -> out (B, S, NH, DH), final state (4, B, NH, DH), and for the backward (save) the activations
    saved_g, saved_a (B, S, NH, 4*DH) each ((0,) without save)."""
    batch_size, seq_len, num_heads, four_dh = _dims("gates", gates, 4)
    head_dim = four_dh // 4
    _check("gates", gates, (batch_size, seq_len, num_heads, 4 * head_dim))
    _check("recurrent_kernel", recurrent_kernel, (num_heads, head_dim, four_dh))
    _check("bias", bias, (num_heads, four_dh), optional=True)
    _check("state", state, (4, batch_size, num_heads, head_dim))
    _check("mask", mask, (batch_size, seq_len), torch.bool, optional=True)  # bool: one byte, 0 or 1
    out = _empty(batch_size, seq_len, num_heads, head_dim)
    final = _empty(4, batch_size, num_heads, head_dim).copy_(state)  # updated in place by the kernel
    saved = (batch_size, seq_len, num_heads, four_dh) if save else (0,)
    saved_g, saved_a = _empty(*saved), _empty(*saved)
    args = (_ptr(gates), _ptr(recurrent_kernel), _ptr(bias), _ptr(final), _ptr(mask), _ptr(out), _ptr(saved_g),
            _ptr(saved_a), batch_size, seq_len, num_heads, head_dim, int(exp_forget))
    _run_units(_library().slstm_forward, args, batch_size, num_heads, gates.numel())
    return out, final, saved_g, saved_a


@_scan_op.register_fake
def _scan_fake(gates, recurrent_kernel, bias, state, mask, exp_forget, save):
    batch_size, seq_len, num_heads, four_dh = gates.shape
    saved = (batch_size, seq_len, num_heads, four_dh) if save else (0,)
    out = gates.new_empty(batch_size, seq_len, num_heads, four_dh // 4)
    return out, state.new_empty(state.shape), gates.new_empty(saved), gates.new_empty(saved)


@torch.library.custom_op("slstm::scan_backward", mutates_args=(), device_types="cpu")
def _scan_backward_op(
    recurrent_kernel_t: Tensor, state0: Tensor, mask: Optional[Tensor], saved_g: Tensor, saved_a: Tensor,
    d_out: Tensor, d_state: Tensor,
) -> tuple[Tensor, Tensor]:
    """R^T (NH, 4*DH, DH), initial state (4, B, NH, DH), mask (B, S) bool?, saved_g and saved_a of the forward,
    d_out (B, S, NH, DH), d_state (4, B, NH, DH) the gradient of the final state -> d_gates (B, S, NH, 4*DH),
    the gradient of the initial state (4, B, NH, DH)."""
    batch_size, seq_len, num_heads, head_dim = _dims("d_out", d_out, 4)
    four_dh = 4 * head_dim
    _check("d_out", d_out, (batch_size, seq_len, num_heads, head_dim))
    _check("recurrent_kernel_t", recurrent_kernel_t, (num_heads, four_dh, head_dim))
    _check("state0", state0, (4, batch_size, num_heads, head_dim))
    _check("mask", mask, (batch_size, seq_len), torch.bool, optional=True)
    _check("saved_g", saved_g, (batch_size, seq_len, num_heads, four_dh))
    _check("saved_a", saved_a, (batch_size, seq_len, num_heads, four_dh))
    _check("d_state", d_state, (4, batch_size, num_heads, head_dim))
    d_state0 = _empty(4, batch_size, num_heads, head_dim).copy_(d_state)  # updated in place by the kernel
    d_gates = _empty(batch_size, seq_len, num_heads, four_dh)
    args = (_ptr(recurrent_kernel_t), _ptr(state0), _ptr(mask), _ptr(saved_g), _ptr(saved_a), _ptr(d_out),
            _ptr(d_state0), _ptr(d_gates), batch_size, seq_len, num_heads, head_dim)
    _run_units(_library().slstm_backward, args, batch_size, num_heads, saved_g.numel())
    return d_gates, d_state0


@_scan_backward_op.register_fake
def _scan_backward_fake(recurrent_kernel_t, state0, mask, saved_g, saved_a, d_out, d_state):
    return saved_g.new_empty(saved_g.shape), d_state.new_empty(d_state.shape)


def scan_setup_context(ctx, inputs, output) -> None:
    """What `slstm::scan`'s backward needs, whichever device ran it."""
    _, recurrent_kernel, bias, state, mask, _, save = inputs
    out, _, saved_g, saved_a = output
    ctx.save_for_backward(recurrent_kernel, state, mask, saved_g, saved_a, out)
    ctx.has_bias, ctx.saved = bias is not None, save


def scan_gradients(scan_backward, ctx, d_out, d_final) -> tuple:
    """The gradients of `slstm::scan`'s inputs, with `scan_backward` (the `slstm::scan_backward` op, or a direct
    implementation of it) for those of the gates and the initial state; dR and db are one reduction over all steps."""
    if not ctx.saved:
        raise RuntimeError("slstm::scan ran with save=False, which keeps nothing for a backward; pass save=True.")
    recurrent_kernel, state0, mask, saved_g, saved_a, out = ctx.saved_tensors
    d_gates, d_state0 = scan_backward(
        recurrent_kernel.transpose(1, 2).contiguous(), state0, mask, saved_g, saved_a, d_out.contiguous(),
        d_final.contiguous(),
    )
    h_prev = torch.cat([state0[0, :, None], out[:, :-1]], dim=1)  # (B, S, NH, DH): h_{t-1} of every step
    d_r = torch.einsum("bshd,bshe->hde", h_prev, d_gates)  # dR[h] = sum over batch and steps of h_{t-1}^T dgates_t
    d_bias = d_gates.sum((0, 1)) if ctx.has_bias else None
    return d_gates, d_r, d_bias, d_state0, None, None, None


def _scan_backward(ctx, d_out, d_final, _d_saved_g, _d_saved_a):
    return scan_gradients(torch.ops.slstm.scan_backward, ctx, d_out, d_final)


_scan_op.register_autograd(_scan_backward, setup_context=scan_setup_context)


_ACTIVATIONS = frozenset(ACTIVATION_CODES.values())
BLOCK_WEIGHTS = 12  # weights per block in `slstm::block_decode`'s flat list (slstm_op.BlockWeights.tensors() order)
_WEIGHT_NAMES = ("norm1_weight", "conv_weight", "conv_bias", "proj_weight", "recurrent_kernel", "gate_bias",
                 "out_norm_weight", "norm2_weight", "gate_up_weight", "gate_up_bias", "down_weight", "down_bias")


@functools.lru_cache(maxsize=64)
def _weight_layout(dim: int, num_heads: int, head_dim: int, kernel_size: int, ffn_size: int) -> tuple:
    """(shape, required) of each of a block's weights, in `_WEIGHT_NAMES` order (the same for every block and token
    of a model: computed once)."""
    shapes = ((dim,), (dim, 1, kernel_size), (dim,), (4, num_heads, head_dim, head_dim),
              (num_heads, head_dim, 4 * head_dim), (num_heads, 4 * head_dim), (dim,), (dim,), (2 * ffn_size, dim),
              (2 * ffn_size,), (dim, ffn_size), (dim,))
    required = (True, False, kernel_size > 0, True, True, False, True, ffn_size > 0, ffn_size > 0, False, False, False)
    return tuple(zip(shapes, required))


def _block_args(
    l: int, x: Tensor, x_ptr: int, out_ptr: int, mask: Optional[Tensor], window: Tensor, state: Tensor, weights: list,
    eps: list, exp_forget: int, activation: int, record: bool,
) -> tuple:
    """Check block l's tensors (ValueError naming what is wrong; an empty tensor stands for an absent one) and allocate
    its outputs -> (ctypes arguments, new window, new state, step windows, step states). x is the call's input: it
    gives the shapes and dtype; the block reads x_ptr (x, or the last block's output) and writes out_ptr."""
    batch_size, seq_len, dim = x.shape
    _, _, num_heads, head_dim = _dims(f"states[{l}]", state, 4)
    if num_heads * head_dim != dim:
        raise ValueError(f"sLSTM kernel: block {l}'s state has {num_heads} heads x {head_dim}, not the width {dim}.")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"sLSTM kernel: unknown FFN activation code {activation} (block {l}).")
    if exp_forget not in (0, 1):
        raise ValueError(f"sLSTM kernel: exp_forget[{l}] must be 0 or 1, got {exp_forget}.")
    conv_weight, conv_bias, down_weight = weights[1], weights[2], weights[10]
    # sizes read off the weights that have them (a 0-d weight then fails its shape check below)
    kernel_size = conv_weight.shape[-1] if conv_weight.numel() and conv_weight.dim() else 0
    ffn_size = down_weight.shape[-1] if down_weight.numel() and down_weight.dim() else 0
    if kernel_size <= 1 and window.numel():
        raise ValueError(f"sLSTM kernel: block {l} has no conv window (kernel size {kernel_size}), got windows[{l}].")
    if not conv_weight.numel() and conv_bias.numel():
        raise ValueError(f"sLSTM kernel: block {l} has a conv bias without a conv weight.")
    if not ffn_size and any(weights[k].numel() for k in (7, 8, 9, 11)):
        raise ValueError(f"sLSTM kernel: FFN weights without `down_weight` (block {l}).")
    window_shape = (batch_size, kernel_size - 1, dim) if kernel_size > 1 else (0,)
    window_ptr = _checked_ptr(f"windows[{l}]", window, window_shape, _F32, kernel_size > 1)
    state_ptr = _checked_ptr(f"states[{l}]", state, (4, batch_size, num_heads, head_dim), _F32, True)
    weight_ptrs = [_checked_ptr(name, t, shape, x.dtype, needed, l) for name, t, (shape, needed) in zip(
        _WEIGHT_NAMES, weights, _weight_layout(dim, num_heads, head_dim, kernel_size, ffn_size))]
    new_window = _empty(*window_shape)  # the kernel copies the window and state in, then updates them
    new_state = _empty(4, batch_size, num_heads, head_dim)
    steps = (_empty(*((seq_len, *window_shape) if kernel_size > 1 else (0,))),
             _empty(seq_len, 4, batch_size, num_heads, head_dim)) if record else (None, None)
    args = (x_ptr, _ptr(mask), window_ptr, state_ptr, _ptr(new_window), new_state.data_ptr(), *weight_ptrs, out_ptr,
            *(_ptr(t) for t in steps), *eps, batch_size, seq_len, num_heads, head_dim, kernel_size, ffn_size,
            exp_forget, activation, _team_size(), DECODE_DTYPES[x.dtype])
    return args, new_window, new_state, *steps


def _no_grad_needed(op: str, tensors) -> None:
    """RuntimeError when a tensor of `tensors` (an iterable, read only under grad mode) requires grad."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"slstm::{op} has no backward; call it under torch.no_grad() or inference_mode().")


def _block_decode_op(
    x: Tensor, mask: Optional[Tensor], windows: list[Tensor], states: list[Tensor], weights: list[Tensor],
    eps: list[float], exp_forget: list[int], activation: list[int], record: bool = False,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """S tokens through L whole SLSTMBlocks in a row, in one call (no autograd). x (B, S, D) the residual stream,
    float32 or bfloat16, and every weight in x's dtype (the math is float32 either way); mask (B, S) bool? (False: the
    step keeps window and state); per block l: windows[l] (B, K-1, D) float32 when K > 1, states[l] (4, B, NH, DH)
    float32, weights[12 l : 12 l + 12] as the modules hold them (norm1 (D,), conv (D, 1, K) and (D,), gate maps
    (4, NH, DH, DH), R (NH, DH, 4*DH), gate bias (NH, 4*DH)?, out norm (D,), norm2 (D,)?, FFN gate_up (2F, D) +
    (2F,)?, down (D, F) + (D,)?), eps[3 l : 3 l + 3] (norm1, out norm, norm2), exp_forget[l] (1: exponential),
    activation[l] (ACTIVATION_CODES) -> every block's output (L, B, S, D) in x's dtype, and per block the new window
    ((0,) when K <= 1), the new state and, with `record`, the window and state after each step, (S, B, K-1, D) ((0,)
    when K <= 1) and (S, 4, B, NH, DH) (without `record` these two lists are empty). The matrix products run on
    `_team_size()` threads when a block is large enough to gain from it. An absent window or weight (no conv, no FFN,
    no bias) is an empty tensor: the lists hold tensors only and flags are ints, as torch.jit.trace requires."""
    _no_grad_needed("block_decode", itertools.chain([x], windows, states, weights))
    batch_size, seq_len, dim = _dims("x", x, 3)
    num_blocks = len(states)
    if x.dtype not in DECODE_DTYPES:
        raise ValueError(f"sLSTM kernel: `x` must be float32 or bfloat16, got {x.dtype}.")
    if not (len(windows) == len(exp_forget) == len(activation) == num_blocks and len(eps) == 3 * num_blocks
            and len(weights) == BLOCK_WEIGHTS * num_blocks):
        raise ValueError(f"sLSTM kernel: {num_blocks} states but {len(windows)} windows, {len(weights)} weights (12 "
                         f"per block), {len(eps)} eps (3 per block), {len(exp_forget)} flags, {len(activation)} codes.")
    x_ptr = _checked_ptr("x", x, (batch_size, seq_len, dim), x.dtype, True)
    _check("mask", mask, (batch_size, seq_len), torch.bool, optional=True)
    hidden = torch.empty((num_blocks, batch_size, seq_len, dim), dtype=x.dtype, device=_CPU)
    block_bytes = batch_size * seq_len * dim * x.element_size()  # hidden[l] starts l blocks in
    args, outputs = [], ([], [], [], [])
    for l in range(num_blocks):
        out_ptr = hidden.data_ptr() + l * block_bytes
        block = _block_args(l, x, x_ptr if l == 0 else out_ptr - block_bytes, out_ptr, mask, windows[l], states[l],
                            weights[BLOCK_WEIGHTS * l : BLOCK_WEIGHTS * (l + 1)], eps[3 * l : 3 * l + 3],
                            exp_forget[l], activation[l], record)
        args.append(block[0])
        for kept, tensor in zip(outputs, block[1:] if record else block[1:3]):
            kept.append(tensor)
    if num_blocks and _library().slstm_block_decode((_BlockDecodeArgs * num_blocks)(*args), num_blocks):
        raise ValueError("sLSTM kernel: the library refused an FFN activation code or dtype.")
    return (hidden, *outputs)


def _refuse_meta_beside_real(op: str, tensors) -> None:
    """A call mixing real CPU tensors with meta ones reaches the fake implementation (the dispatcher picks Meta): that
    would hand back uninitialised memory, so it is the ValueError the CPU implementation would raise. All-meta calls
    (shape propagation) and tracing stand-ins pass."""
    present = [t for t in tensors if isinstance(t, Tensor)]
    meta = next((t for t in present if t.is_meta), None)
    if meta is not None and any(type(t) in _PLAIN and t.is_cpu for t in present):
        raise ValueError(f"sLSTM kernel: slstm::{op} got a tensor on meta beside CPU tensors; every tensor must be a "
                         f"plain dense CPU tensor (offloaded weights run through the modules).")


def _block_decode_fake(x, mask, windows, states, weights, eps, exp_forget, activation, record=False):
    _refuse_meta_beside_real("block_decode", [x, mask, *windows, *states, *weights])
    batch_size, seq_len, dim = x.shape
    outputs = ([], [], [], [])
    for l, state in enumerate(states):
        conv_weight = weights[BLOCK_WEIGHTS * l + 1]
        kernel_size = conv_weight.shape[-1] if conv_weight.numel() and conv_weight.dim() else 0
        window_shape = (batch_size, kernel_size - 1, dim) if kernel_size > 1 else (0,)
        outputs[0].append(state.new_empty(window_shape))
        outputs[1].append(state.new_empty(state.shape))
        if record:
            outputs[2].append(state.new_empty((seq_len, *window_shape) if kernel_size > 1 else (0,)))
            outputs[3].append(state.new_empty((seq_len, *state.shape)))
    return (x.new_empty((len(states), batch_size, seq_len, dim)), *outputs)


# Registered with torch.library's lower-level API rather than `custom_op`: the op has no autograd, and custom_op's
# Python autograd layer cost ~15 us per call, paid per block and token when decoding.
_LIBRARY = torch.library.Library("slstm", "FRAGMENT")
_LIBRARY.define(
    "block_decode(Tensor x, Tensor? mask, Tensor[] windows, Tensor[] states, Tensor[] weights, float[] eps, "
    "int[] exp_forget, int[] activation, bool record=False) -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[])"
)
_LIBRARY.impl("block_decode", _block_decode_op, "CPU")
torch.library.register_fake("slstm::block_decode", _block_decode_fake, lib=_LIBRARY)


def _linear_decode_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x (B, I) @ weight (O, I)^T + bias (O,)? for a decoding step's few rows (no autograd): all three float32 or all
    bfloat16, float32 sums -> (B, O) in x's dtype. Rows of the weight are shared over `_team_size()` threads:
    a matrix-vector product is bound by memory bandwidth, which one core cannot draw alone."""
    _no_grad_needed("linear_decode", [x, weight, bias])
    batch_size, in_features = _dims("x", x, 2)
    out_features, _ = _dims("weight", weight, 2)
    if x.dtype not in DECODE_DTYPES:
        raise ValueError(f"sLSTM kernel: `x` must be float32 or bfloat16, got {x.dtype}.")
    _check("x", x, (batch_size, in_features), x.dtype)
    _check("weight", weight, (out_features, in_features), x.dtype)
    _check("bias", bias, (out_features,), x.dtype, optional=True)
    out = torch.empty((batch_size, out_features), dtype=x.dtype, device=_CPU)
    _library().slstm_linear_decode(_ptr(x), _ptr(weight), _ptr(bias), _ptr(out), batch_size, out_features,
                                   in_features, _team_size(), DECODE_DTYPES[x.dtype])
    return out


def _linear_decode_fake(x, weight, bias):
    _refuse_meta_beside_real("linear_decode", [x, weight, bias])
    return x.new_empty((x.shape[0], weight.shape[0]))


_LIBRARY.define("linear_decode(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.impl("linear_decode", _linear_decode_op, "CPU")
torch.library.register_fake("slstm::linear_decode", _linear_decode_fake, lib=_LIBRARY)


# ------------------------------------------------------------------------------------------ what slstm_op calls
def _float32(t: Optional[Tensor]) -> Optional[Tensor]:
    # a no-op for float32 contiguous tensors; differentiable, so autograd returns gradients in the caller's dtype
    if t is None or (t.dtype == _F32 and t.is_contiguous()):
        return t
    return t.to(_F32).contiguous()


def scan(gates: Tensor, recurrent_kernel: Tensor, bias: Optional[Tensor], state, mask: Optional[Tensor],
         exp_forget: bool, op=None) -> tuple:
    """`slstm_op.slstm_scan` on a kernel of `slstm::scan` (default: the op, dispatched by device; `slstm_triton`
    passes its direct entry for CPU tensors under the Triton interpreter), inputs already checked by it: float32 math
    whatever the floating dtype; out in gates.dtype, the final state (h, c, n, m) float32. Saves activations only when
    autograd will need them."""
    batch_size, _, num_heads, four_dh = gates.shape
    tensors = (gates, recurrent_kernel, bias, *(state or ()))
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if state is None:
        stacked = torch.zeros((4, batch_size, num_heads, four_dh // 4), dtype=_F32, device=gates.device)
    else:
        stacked = torch.stack([s.to(_F32) for s in state])  # (4, B, NH, DH)
    out, final, _, _ = (op or torch.ops.slstm.scan)(
        _float32(gates), _float32(recurrent_kernel), _float32(bias), stacked,
        None if mask is None else mask.contiguous(), exp_forget, save,
    )
    return out.to(gates.dtype), tuple(final.unbind(0))


def _as(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or (t.dtype == dtype and t.is_contiguous()) else t.to(dtype).contiguous()


_ABSENT = torch.empty(0, dtype=_F32, device=_CPU)  # an absent window or weight in slstm::block_decode's lists (read-only)


def _stacked(state) -> Tensor:
    """(h, c, n, m) -> (4, B, NH, DH) float32: the tensor they are the rows of, when they are exactly that (as this
    module returns them, so a decoding step does not copy the state it gets back from the last); else a stacked copy."""
    whole = state[0]._base
    if (whole is not None and len(state) == 4 and type(whole) in _PLAIN and whole.dtype is _F32 and whole.dim() == 4
            and whole.shape[0] == 4 and whole.is_contiguous() and not whole.is_neg()):
        start, row_bytes, row_shape = whole.data_ptr(), whole.stride(0) * 4, whole.shape[1:]
        # each a contiguous float32 row of it, in order, still on its memory (not expanded, transposed, reset, negated)
        if all(t._base is whole and t.dtype is _F32 and t.shape == row_shape and t.is_contiguous() and not t.is_neg()
               and t.data_ptr() == start + k * row_bytes for k, t in enumerate(state)):
            return whole
    return torch.stack(tuple(state)).to(_F32)


def block_decode(x: Tensor, mask: Optional[Tensor], windows: list, states: list, weights: list,
                 record: bool = False) -> tuple:
    """S tokens through L blocks in a row in one call (see `slstm::block_decode`): windows[l] (B, K-1, D) or None,
    states[l] (h, c, n, m) or None (zeros), weights[l] an `slstm_op.BlockWeights`. Reads bfloat16 when x is bfloat16
    (weights of another dtype are converted), else float32 -> every block's output (L, B, S, D) in x's dtype, the new
    windows (x's dtype, None when K <= 1), the new states (float32) and, with `record`, per block the (window, state)
    after each step ((S, B, K-1, D) or None, (S, 4, B, NH, DH)), else None. No autograd: refused when a tensor
    requires grad under grad mode."""
    batch_size, seq_len, dim = x.shape
    dtype = x.dtype if x.dtype in DECODE_DTYPES else _F32
    flat, eps, windows_in, states_in = [], [], [], []
    for window, state, w in zip(windows, states, weights):
        if w.activation not in ACTIVATION_CODES:
            raise ValueError(f"sLSTM kernel: unknown FFN activation {w.activation!r}; known: {list(ACTIVATION_CODES)}.")
        kernel_size = w.conv_weight.shape[-1] if w.conv_weight is not None else 0
        if kernel_size <= 1:
            windows_in.append(_ABSENT)
        elif window is None:
            windows_in.append(torch.zeros((batch_size, kernel_size - 1, dim), dtype=_F32, device=_CPU))
        else:
            windows_in.append(_float32(window))
        if state is None:
            num_heads, head_dim = w.recurrent_kernel.shape[:2]
            states_in.append(torch.zeros((4, batch_size, num_heads, head_dim), dtype=_F32, device=_CPU))
        else:
            states_in.append(_stacked(state))
        flat += [_ABSENT if t is None else _as(t, dtype) for t in w.tensors()]
        eps += w.eps
    keep = None if mask is None else mask.reshape(batch_size, seq_len).contiguous()
    hidden, new_windows, new_states, step_windows, step_states = torch.ops.slstm.block_decode(
        _as(x, dtype), keep, windows_in, states_in, flat, eps, [int(w.exp_forget) for w in weights],
        [ACTIVATION_CODES[w.activation] for w in weights], record,
    )
    # the cache holds the window in x's dtype, the state as (h, c, n, m)
    new_windows = [t.to(x.dtype) if t.numel() else None for t in new_windows]
    steps = [(sw.to(x.dtype) if sw.numel() else None, ss) for sw, ss in zip(step_windows, step_states)]
    return hidden.to(x.dtype), new_windows, [tuple(t.unbind(0)) for t in new_states], steps if record else None


def linear_decode(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear(x, weight, bias) for x (..., I) of a few rows (see `slstm::linear_decode`), in x's dtype: bfloat16
    reads bfloat16, anything else float32. No autograd."""
    dtype = x.dtype if x.dtype in DECODE_DTYPES else _F32
    rows = x.reshape(-1, x.shape[-1])  # (..., I) -> (B, I)
    out = torch.ops.slstm.linear_decode(_as(rows, dtype), _as(weight, dtype), _as(bias, dtype))
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
