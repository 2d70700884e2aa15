"""The C++ CPU kernels of the sLSTM (`csrc/slstm_cpu.cpp`) and their torch boundary (`csrc/slstm_ops.cpp`), built on
first use, loaded with ctypes and registered as PyTorch ops: the "compiled" backend. `slstm_op` is their only caller;
the modeling files never import this module, so a model saved with `save_pretrained` ships pure PyTorch.

Build: the system C++ compiler (`$CXX`, else `c++`/`g++`) makes one shared library of both files, linked against the
installed torch (~15 s; `-march=native` first, portable flags if the compiler refuses that; OpenMP when the compiler
has it, so the decoding kernels share each step's products among torch's own intra-op threads), within a timeout,
into `$TORCH_EXTENSIONS_DIR/modeling_slstm` (default `~/.cache/torch_extensions/modeling_slstm`), keyed by a hash of
the sources, the flags, torch's version, the compiler and the CPU. The directory is created private (0o700). A
library is loaded only when it and its directory belong to this user and nobody else may write them, and when its
sha256 equals the one recorded after its build; a truncated or replaced library is rebuilt.

Ops (namespace `slstm`), each with a fake implementation, so torch.compile, torch.export and torch.jit.trace record
them as single nodes:
    slstm::scan(gates, R, bias?, state, mask?, exp_forget, save) -> out, final state, saved_g, saved_a   (autograd)
    slstm::scan_backward(R^T, state0, mask?, saved_g, saved_a, d_out, d_state) -> d_gates, d_state0
    slstm::block_decode(x, mask?, windows, states, weights of L blocks, eps, exp_forget, activation, record, final
                        norm?, LM head?)
        -> every block's output, windows, states, the windows and states after each step (record), normed, logits
    slstm::linear_decode(x, weight, bias?, scale?) -> x weight^T + bias, for a decoding step's few rows
The scan ops are Python calling the kernels through ctypes; their CUDA implementation is the Triton kernels'
(`slstm_triton`, registered when that module is imported); the fake implementations, the autograd formula
(`scan_setup_context`, `scan_gradients`), the boundary check (`check_tensor`) and `scan` are shared by both devices.
The decoding ops, which run per token, are C++ from the call down (registered when the library loads), so a step
pays no Python per tensor. Every implementation checks every tensor (a plain dense tensor on its device of the exact
shape and dtype, its storage holding it; else a ValueError naming it) before a pointer goes to a kernel, and allocates
its outputs with explicit dtype and device. Heads are independent over the whole sequence, so a large scan runs as
blocks (heads x batch rows) on a small thread pool (ctypes releases the GIL); a small call is one call on the calling
thread.
"""

import ctypes
import hashlib
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

KERNEL_API = 2  # slstm_op uses this module only at the API it was written for (a Hub copy next to another release)
ACTIVATION_CODES = {"gelu": 0, "relu": 1, "relu2": 2, "silu": 3, "swish": 3, "sigmoid": 4, "selu": 5}  # csrc ffn_act
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = (_CSRC / "slstm_cpu.cpp", _CSRC / "slstm_ops.cpp", _CSRC / "huge_pages.cpp")  # kernels, boundary, pages
_HEADERS = (_CSRC / "slstm_cpu.h",)
_FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-std=c++20"]
_NATIVE = "-march=native"  # tried first; dropped when the compiler rejects it
_OPENMP = "-fopenmp"  # links libgomp.so.1: torch's loaded copy, its thread pool; dropped when the compiler lacks it
_VARIANTS = ([_NATIVE, _OPENMP], [_OPENMP], [_NATIVE], [])  # tried in this order; the first that compiles is used
_BUILD_TIMEOUT = 300  # seconds for one compiler run
_ERROR_WORDS = ("error", "cannot find", "undefined reference")  # lines of a failed build that say what failed
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # no subclasses: their data pointer may not hold plain floats
_F32, _CPU = torch.float32, torch.device("cpu")
_lock = threading.Lock()
_lib = None  # ctypes.CDLL once loaded; False when building or loading failed (why: _error)
_error = ""
_pools: dict = {}  # (process id, thread count) -> ThreadPoolExecutor; a forked child never reuses its parent's


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


def _torch_flags() -> list:
    """What the torch boundary (slstm_ops.cpp) compiles and links with: the installed torch's headers, its C++ ABI
    and its libraries (found again at load time through the rpath)."""
    root = Path(torch.__file__).parent
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))  # the new ABI, torch's only one since 2.7
    return [f"-I{root / 'include'}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-L{root / 'lib'}", f"-Wl,-rpath,{root / 'lib'}", "-ltorch_cpu", "-lc10"]


def _compile(compiler: str, flags: list) -> str:
    """The verified library for these flags in the cache, compiled (atomically, hash recorded) when missing or bad.
    The key covers the sources, the flags (the installed torch's paths among them), torch's version, the compiler and
    the CPU."""
    sources = [path.read_bytes() for path in (*_SOURCES, *_HEADERS)]
    flags = [*flags, *_torch_flags()]
    identity = " ".join([*flags, torch.__version__, _cpu_key(), compiler]).encode()
    key = hashlib.sha256(b"\n".join([*sources, identity])).hexdigest()[:16]
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
                [compiler, *(str(path) for path in _SOURCES), "-o", lib, *flags], capture_output=True, text=True,
                timeout=_BUILD_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise KernelBuildError(f"{name} did not finish within {_BUILD_TIMEOUT} s") from None
        except OSError as err:
            raise KernelBuildError(f"cannot run {compiler}: {err}") from None
        if result.returncode != 0:
            raise _CompilerRejected(f"{name} failed: {_what_failed(result.stderr) or f'exit code {result.returncode}'}")
        digest = _sha256(lib)
        os.replace(lib, path)  # atomic: concurrent builders never see a half-written library
        with open(os.path.join(tmp, "sha256"), "w") as f:
            f.write(digest)
        os.replace(os.path.join(tmp, "sha256"), path + ".sha256")  # recorded after the library is in place
    return path


def _what_failed(stderr: str) -> str:
    """The line of a failed build's output that says what failed (at most 300 characters): the compiler's or the
    assembler's error, or the linker's complaint (not collect2's "ld returned 1 exit status" after it)."""
    lines = stderr.splitlines()
    said = [line for line in lines if any(word in line.lower() for word in _ERROR_WORDS)]
    useful = [line for line in said if "ld returned" not in line] or said or lines[:1]
    return useful[0].strip()[:300] if useful else ""


def _build_compiler() -> str:
    """$CXX, else c++ or g++ on the PATH."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise KernelBuildError("no C++ compiler found (set CXX)")
    return compiler


def _build() -> ctypes.CDLL:
    compiler = _build_compiler()
    rejected = []  # why the variants before the one used failed
    for variant in _VARIANTS:
        try:
            path = _compile(compiler, [*variant, *_FLAGS])
            break
        except _CompilerRejected as err:
            if variant is _VARIANTS[-1]:
                raise
            rejected.append(str(err))
    if rejected:
        lost = " ".join(flag for flag in _VARIANTS[0] if flag not in variant)
        reasons = "; ".join(dict.fromkeys(rejected))  # each distinct reason once, in order
        logger.warning_once(f"sLSTM: the C++ kernel is built without {lost} and runs slower: {reasons}")
    lib = ctypes.CDLL(path)  # registers slstm::block_decode's and slstm::linear_decode's CPU implementations
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.slstm_forward.argtypes = [ptr] * 8 + [i64] * 4 + [ctypes.c_int] + [i64] * 4
    lib.slstm_backward.argtypes = [ptr] * 8 + [i64] * 8
    lib.slstm_team_size.argtypes = lib.slstm_mark_forked.argtypes = []
    lib.slstm_forward.restype = lib.slstm_backward.restype = lib.slstm_mark_forked.restype = None
    lib.slstm_team_size.restype = ctypes.c_int
    lib.slstm_huge_pages.argtypes, lib.slstm_huge_pages.restype = [ptr, i64, ctypes.c_int], i64
    if _forked:  # forked after this module was imported: the library's own fork handler came too late
        lib.slstm_mark_forked()
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
                 device: torch.device = _CPU) -> None:
    """The boundary in front of every kernel call from Python: `t` must be a plain dense contiguous tensor on `device`
    (its storage holding every element, no lazy negation) of exactly this shape and dtype (None only when optional),
    else a ValueError naming it. Nothing else reaches a raw pointer. (The decoding ops check theirs in C++, alike.)"""
    if t is None:
        if optional:
            return
        raise ValueError(f"sLSTM kernel: `{name}` is required.")
    on_device = t.is_cpu if device is _CPU else t.device == device
    if type(t) not in _PLAIN or t.layout is not torch.strided or not on_device:
        raise ValueError(
            f"sLSTM kernel: `{name}` must be a plain dense {'CPU' if device.type == 'cpu' else device} "
            f"tensor, got {type(t).__name__} ({t.layout}) on {t.device}."
        )
    if t.dtype is not dtype or t.shape != shape or not t.is_contiguous() or t.is_neg():
        raise ValueError(
            f"sLSTM kernel: `{name}` must be a contiguous {dtype} tensor of shape {tuple(shape)}, got "
            f"{'a non-contiguous' if not t.is_contiguous() else 'a lazily negated' if t.is_neg() else 'a'} {t.dtype} "
            f"tensor of shape {tuple(t.shape)}."
        )
    needed = (t.storage_offset() + t.numel()) * t.element_size() if t.numel() else 0
    if t.untyped_storage().nbytes() < needed:
        raise ValueError(f"sLSTM kernel: `{name}` must be a plain dense tensor; its storage holds "
                         f"{t.untyped_storage().nbytes()} bytes of the {needed} it needs (a storage resized away).")


_check = check_tensor  # the C++ kernels' calls: CPU tensors


def _dims(name: str, t: Tensor, ndim: int) -> tuple:
    if not isinstance(t, Tensor) or t.dim() != ndim:
        raise ValueError(f"sLSTM kernel: `{name}` must be a {ndim}-D tensor, got {getattr(t, 'shape', type(t))}.")
    return tuple(t.shape)


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    """The address ctypes passes for a checked tensor; None (a null pointer: absent) for None or an empty tensor."""
    return None if t is None or t.numel() == 0 else t.data_ptr()


_forked = False  # this process is a child forked after this module was imported (the library may load later)


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _team_size() -> int:
    """Threads the decoding kernels' team uses (the library decides: torch's thread count, at most the CPUs this
    process may run on; one in a forked child, where torch's OpenMP pool does not survive)."""
    return _library().slstm_team_size()


def advise_huge_pages(t: Tensor, wait: bool = False) -> None:
    """Ask for 2 MiB pages behind the memory of `t` (a plain dense contiguous CPU tensor), as the decoding kernels do
    for the weights they stream (csrc/huge_pages.cpp): on a background thread, again at most every 10 s, contents
    unchanged. With `wait`, return once every region asked for so far has been collapsed or refused (a streaming read
    to compare with the kernels then reads from the same kind of pages)."""
    if type(t) not in _PLAIN or t.layout is not torch.strided or not t.is_cpu or not t.is_contiguous():
        raise ValueError(f"advise_huge_pages takes a plain dense contiguous CPU tensor, got {type(t).__name__} "
                         f"({t.layout}) on {t.device}.")
    _library().slstm_huge_pages(_ptr(t), t.numel() * t.element_size(), int(wait))


def wait_for_huge_pages() -> None:
    """Return once every region asked for so far (by the kernels or `advise_huge_pages`) is collapsed or refused: a
    benchmark then times the pages that decoding settles on."""
    _library().slstm_huge_pages(None, 0, 1)


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


BLOCK_WEIGHTS = 14  # weights per block in `slstm::block_decode`'s flat list (slstm_op.BlockWeights.tensors() order)
WEIGHT_NAMES = ("norm1_weight", "conv_weight", "conv_bias", "proj_weight", "recurrent_kernel", "gate_bias",
                "out_norm_weight", "norm2_weight", "gate_up_weight", "gate_up_bias", "down_weight", "down_bias",
                "gate_up_scale", "down_scale")


def _refuse_meta_beside_real(op: str, tensors) -> None:
    """A call mixing real CPU tensors with meta ones reaches the fake implementation (the dispatcher picks Meta): that
    would hand back uninitialised memory, so it is the ValueError the CPU implementation would raise. All-meta calls
    (shape propagation) and tracing stand-ins pass."""
    present = [t for t in tensors if isinstance(t, Tensor)]
    meta = next((t for t in present if t.is_meta), None)
    if meta is not None and any(type(t) in _PLAIN and t.is_cpu for t in present):
        raise ValueError(f"sLSTM kernel: slstm::{op} got a tensor on meta beside CPU tensors; every tensor must be a "
                         f"plain dense CPU tensor (offloaded weights run through the modules).")


def _block_decode_fake(x, mask, windows, states, weights, eps, exp_forget, activation, record=False, norm_weight=None,
                       norm_eps=0.0, head_weight=None, head_bias=None, head_scale=None):
    _refuse_meta_beside_real("block_decode", [x, mask, *windows, *states, *weights, norm_weight, head_weight, head_bias,
                                              head_scale])
    batch_size, seq_len, dim = x.shape
    outputs = ([], [], [], [])
    for l in range(len(windows)):
        conv_weight, recurrent_kernel = weights[BLOCK_WEIGHTS * l + 1], weights[BLOCK_WEIGHTS * l + 4]
        kernel_size = conv_weight.shape[-1] if conv_weight.numel() and conv_weight.dim() else 0
        window_shape = (batch_size, kernel_size - 1, dim) if kernel_size > 1 else (0,)
        state_shape = (batch_size, *recurrent_kernel.shape[:2])  # (B, NH, DH)
        outputs[0].append(x.new_empty(window_shape))
        outputs[1].extend(x.new_empty(state_shape, dtype=_F32) for _ in range(4))
        if record:
            outputs[2].append(x.new_empty((seq_len, *window_shape) if kernel_size > 1 else (0,)))
            outputs[3].append(x.new_empty((seq_len, 4, *state_shape), dtype=_F32))
    normed = x.new_empty(x.shape if norm_weight is not None else (0,))
    logits = x.new_empty((batch_size, seq_len, head_weight.shape[0]) if head_weight is not None else (0,))
    return (x.new_empty((len(windows), batch_size, seq_len, dim)), *outputs, normed, logits)


def _linear_decode_fake(x, weight, bias, scale=None):
    _refuse_meta_beside_real("linear_decode", [x, weight, bias, scale])
    return x.new_empty((x.shape[0], weight.shape[0]))


def _load_then_call(op: str, names: tuple):
    """The decoding ops' kernel for every backend without one of its own: a call before the library is loaded (a
    fresh process, a loaded jit.trace program) builds and loads it, then runs on the C++ kernel; a tensor the C++
    kernel cannot take (sparse, mkldnn, quantized, nested, another device) is a ValueError naming it."""
    def kernel(*args):
        for name, value in zip(names, args):
            for k, t in enumerate(value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(t, Tensor) and (t.layout is not torch.strided or not t.is_cpu or t.is_quantized
                                              or t.is_nested):
                    kind = "quantized " if t.is_quantized else "nested " if t.is_nested else ""
                    where = name if isinstance(value, Tensor) else f"{name}[{k}]"
                    raise ValueError(f"sLSTM kernel: slstm::{op}'s `{where}` must be a plain dense CPU tensor, got a "
                                     f"{kind}{t.layout} tensor on {t.device}.")
        _library()
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"slstm::{op}", "CPU"):  # never loops back here
            raise KernelBuildError(f"the sLSTM library loaded without a CPU kernel for slstm::{op}")
        return getattr(torch.ops.slstm, op)(*args)
    return kernel


# The decoding ops' CPU implementations are C++ (csrc/slstm_ops.cpp: checks, allocation, the kernel call, no Python
# per tensor; an autograd kernel that refuses derivatives), registered when the library loads. Defined here with
# torch.library's lower-level API rather than `custom_op`, whose Python autograd layer would cost ~15 us per call.
_LIBRARY = torch.library.Library("slstm", "FRAGMENT")
_LIBRARY.define(
    "block_decode(Tensor x, Tensor? mask, Tensor[] windows, Tensor[] states, Tensor[] weights, float[] eps, "
    "int[] exp_forget, int[] activation, bool record=False, Tensor? norm_weight=None, float norm_eps=0.0, "
    "Tensor? head_weight=None, Tensor? head_bias=None, Tensor? head_scale=None) "
    "-> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[], Tensor, Tensor)"
)
torch.library.register_fake("slstm::block_decode", _block_decode_fake, lib=_LIBRARY)
_LIBRARY.define("linear_decode(Tensor x, Tensor weight, Tensor? bias, Tensor? scale=None) -> Tensor")
torch.library.register_fake("slstm::linear_decode", _linear_decode_fake, lib=_LIBRARY)
for _op, _names in (("block_decode", ("x", "mask", "windows", "states", "weights", "eps", "exp_forget", "activation",
                                      "record", "norm_weight", "norm_eps", "head_weight", "head_bias", "head_scale")),
                    ("linear_decode", ("x", "weight", "bias", "scale"))):
    for _key in ("CompositeExplicitAutograd", "NestedTensorCPU"):  # every backend but nested tensors', and theirs
        _LIBRARY.impl(_op, _load_then_call(_op, _names), _key)
# slstm::block_decode(x, mask?, windows, states, weights, eps, exp_forget, activation, record=False): S tokens through
# L whole SLSTMBlocks in a row, in one call (no autograd: refused when a tensor requires grad under grad mode).
#   x (B, S, D) the residual stream, float32 or bfloat16; every weight and window in x's dtype, the states float32
#   (the math is float32 either way); mask (B, S) bool? (False: the step keeps window and state). Per block l:
#   windows[l] (B, K-1, D) when K > 1; states[4 l : 4 l + 4] h, c, n, m (B, NH, DH); weights[14 l : 14 l + 14] in
#   WEIGHT_NAMES order (norm1 (D,), conv (D, 1, K) and (D,), gate maps (4, NH, DH, DH), R (NH, DH, 4*DH), gate bias
#   (NH, 4*DH)?, out norm (D,), norm2 (D,)?, FFN gate_up (2F, D) + (2F,)?, down (D, F) + (D,)?, then the FFN's scales
#   (2F, 1)? and (D, 1)?: float32, and given, their weight is int8, W = scale q); eps[3 l : 3 l + 3]
#   (norm1, out norm, norm2); exp_forget[l] (1: exponential); activation[l] (ACTIVATION_CODES). An empty tensor
#   stands for an absent weight, and for zeros as a window or state.
#   -> every block's output (L, B, S, D) in x's dtype; per block the new window ((0,) when K <= 1), the new h, c, n, m
#   (4 L tensors), and with `record` the window and state after each step, (S, B, K-1, D) ((0,) when K <= 1) and
#   (S, 4, B, NH, DH) (without `record` these two lists are empty), with `norm_weight` (D,) the model's final norm of
#   the last output (B, S, D) (offset LayerNorm, eps `norm_eps`; (0,) without), and with `head_weight` (V, D) (and
#   `head_bias` (V,)?, `head_scale` (V, 1)? as the FFN's) the LM head's logits (B, S, V) of the normed output (of the last
#   output without a norm; (0,) without a head).
# slstm::linear_decode(x, weight, bias?, scale?): x (B, I) @ weight (O, I)^T + bias (O,)? for a decoding step's few rows
#   (no autograd): all float32 or all bfloat16, or the weight int8 with a float32 scale (O, 1) per row; float32 sums
#   (of exact products of bfloat16 pairs, x rounded to bfloat16, for bfloat16 weights on CPUs with AVX512-BF16) ->
#   (B, O) in x's dtype.
# Both run their matrix products on `_team_size()` threads when a call is large enough to gain from it.


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


_ABSENT = torch.empty(0, dtype=_F32, device=_CPU)  # an absent window, state or weight in slstm::block_decode's lists
_NO_STATE = (_ABSENT,) * 4


def block_decode(x: Tensor, mask: Optional[Tensor], windows: list, states: list, weights: list,
                 record: bool = False, norm: Optional[tuple] = None, head: Optional[tuple] = None) -> tuple:
    """S tokens through L blocks in a row in one call (see `slstm::block_decode`): x (B, S, D) float32 or bfloat16,
    windows[l] (B, K-1, D) in x's dtype or None (zeros), states[l] (h, c, n, m) float32 or None (zeros), weights[l] an
    `slstm_op.BlockWeights` in x's dtype -> every block's output (L, B, S, D), the new windows (None when K <= 1), the
    new states and, with `record`, per block the (window, state) after each step ((S, B, K-1, D) or None,
    (S, 4, B, NH, DH)), else None, with `norm` (weight (D,), eps) the model's final norm of the last output
    (B, S, D), else None, and with `head` (weight (V, D), bias (V,) or None, scale (V, 1) or None: `linear_decode`)
    the logits of that (B, S, V), else None.
    No autograd: refused when a tensor requires grad under grad mode. The op checks every tensor; this only flattens
    the lists."""
    flat, eps, exp_forget, codes = [], [], [], []
    for w in weights:
        if w.activation not in ACTIVATION_CODES:
            raise ValueError(f"sLSTM kernel: unknown FFN activation {w.activation!r}; known: {list(ACTIVATION_CODES)}.")
        flat += [_ABSENT if t is None else t for t in w.tensors()]
        eps += w.eps
        exp_forget.append(int(w.exp_forget))
        codes.append(ACTIVATION_CODES[w.activation])
    hidden, new_windows, new_states, step_windows, step_states, normed, logits = torch.ops.slstm.block_decode(
        x, mask, [_ABSENT if t is None else t for t in windows],
        [t for state in states for t in (_NO_STATE if state is None else state)], flat, eps, exp_forget, codes, record,
        *(norm or (None, 0.0)), *(head or ()),
    )
    # the cache holds the window in x's dtype, the state as (h, c, n, m)
    new_windows = [None if t.dim() == 1 else t for t in new_windows]
    new_states = [tuple(new_states[k : k + 4]) for k in range(0, len(new_states), 4)]
    steps = [(None if sw.dim() == 1 else sw, ss) for sw, ss in zip(step_windows, step_states)] if record else None
    return hidden, new_windows, new_states, steps, normed if norm else None, logits if head else None


def linear_decode(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, weight, bias) for x (..., I) of a few rows (see `slstm::linear_decode`), all float32 or all
    bfloat16; with `scale` (O, 1) float32 the weight is int8 rows q and the map is F.linear(x, scale q, bias).
    No autograd."""
    if x.dim() == 0 or weight.dim() != 2:
        raise ValueError(f"sLSTM kernel: linear_decode takes x (..., I) and weight (O, I), got shapes "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}.")
    out = torch.ops.slstm.linear_decode(x.reshape(x.shape[:-1].numel(), x.shape[-1]), weight, bias, scale)  # (B, O)
    return out.view(*x.shape[:-1], weight.shape[0])
