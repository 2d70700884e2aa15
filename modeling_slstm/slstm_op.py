"""The sLSTM recurrence on the backend chosen at run time: the only door to the kernels, decoding included.

The contract (shapes, dtypes, masks) is `slstm_reference`'s. Backends, never stored in the config:
    "reference"  `slstm_reference.slstm_scan_reference`, the readable oracle
    "fused"      pure PyTorch, preallocated buffers, hand-written backward (`slstm_fused`); works on every device
    "compiled"   the C++ kernels of the installed package (`modeling_slstm.slstm_cpu`, registered as `slstm::` ops), for
                 plain dense CPU tensors below float64; built on first use with the system C++ compiler and cached
    "triton"     the Triton kernels of the installed package (`modeling_slstm.slstm_triton`, the CUDA implementation of
                 the same ops), for CUDA tensors below float64 with head dims up to 512 (larger: "fused", one warning);
                 on CPU tensors only when TRITON_INTERPRET=1 was set before their first use (Triton's interpreter)
    "auto"       (default) "compiled" on CPU and "triton" on CUDA when the kernels can take the call, else "fused"
Choose with the environment variable SLSTM_BACKEND, `set_backend(name)` (process-wide) or `with use_backend(name):`
(this thread only). A forced "compiled" whose library cannot be built raises with the compiler's message; "auto" then
uses "fused" with one warning. Inputs the kernel cannot take (other devices, float64, tensor subclasses such as
quantised weights) run on "fused". A model saved with `save_pretrained` carries this file but not the kernels: it
uses them when `modeling_slstm` is installed, else "fused", and never starts a compiler. Triton is imported only
when the triton backend is forced or a call on CUDA tensors resolves "auto".

Under torch.compile / torch.export the backend is resolved once, at tracing time, the kernels appear as single op
nodes, and "fused" (its in-place writes into views do not trace) and "triton" on CPU tensors (the interpreter does
not trace) run as the reference loop.
"""

import contextlib
import os
import sys
import threading
import weakref
from typing import NamedTuple, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.utils._device import DeviceContext
from transformers.utils import logging

from .slstm_fused import slstm_fused_scan
from .slstm_reference import FORGET_GATES, SLSTMState, slstm_scan_reference


try:  # the installed package's kernels; absent from a copy saved with save_pretrained (skipped by its import check)
    from modeling_slstm import slstm_cpu as _kernels

    if getattr(_kernels, "KERNEL_API", None) != 2:
        _kernels = None
except ImportError:
    _kernels = None


logger = logging.get_logger(__name__)

BACKENDS = ("auto", "reference", "fused", "compiled", "triton")
_SMALLEST_NORMAL = 2.2250738585072014e-308  # Python floats use the same FPU control bits as torch's CPU kernels
_PLAIN = {torch.Tensor, torch.nn.Parameter}
DECODE_DTYPES = (torch.float32, torch.bfloat16)  # what the decoding kernels read; their math is float32 either way
_PLAIN_AND_STAND_INS = _PLAIN | {FakeTensor, FunctionalTensor}  # while torch.compile / torch.export trace
_default: Optional[str] = None  # set_backend(); None: SLSTM_BACKEND or "auto"
_local = threading.local()  # use_backend(): .name overrides for this thread only
_triton = None  # modeling_slstm.slstm_triton once imported; False when it cannot be (why: _triton_error)
_triton_error = ""


def set_backend(name: Optional[str]) -> None:
    """Choose the backend for every thread ("auto", "reference", "fused", "compiled", "triton"); None: back to
    SLSTM_BACKEND."""
    global _default
    if name is not None and name not in BACKENDS:
        raise ValueError(f"Unknown sLSTM backend {name!r}; choose one of {BACKENDS}.")
    _default = name


def get_backend() -> str:
    """The backend name in force on this thread (before "auto" is resolved): use_backend(), set_backend(),
    SLSTM_BACKEND, "auto"."""
    name = getattr(_local, "name", None) or _default
    if name is None:
        name = os.environ.get("SLSTM_BACKEND", "auto").strip().lower() or "auto"
        if name not in BACKENDS:
            raise ValueError(f"SLSTM_BACKEND={name!r} is not a backend; choose one of {BACKENDS}.")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """`with use_backend("reference"): ...` runs the block on that backend on this thread, then restores the previous
    choice; other threads are not affected."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"Unknown sLSTM backend {name!r}; choose one of {BACKENDS}.")
    previous = getattr(_local, "name", None)
    _local.name = name
    try:
        yield
    finally:
        _local.name = previous


@contextlib.contextmanager
def flush_denormals():
    """Flush denormals to zero (FTZ/DAZ) on the calling thread for the block, then restore the previous mode.

    Values below 1e-38 appear in the state (e.g. i' = exp(ĩ - m) for a very negative ĩ) and some CPUs run float math
    on them 10-100x slower (a microcode assist per operation), which would stall decoding. Already flushing: no-op.
    """
    if _SMALLEST_NORMAL * 0.5 == 0.0 or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _triton_kernels():
    """The Triton kernels module, imported (with triton) on first need; None when triton or the package is missing."""
    global _triton, _triton_error
    if _triton is None:
        try:
            from modeling_slstm import slstm_triton

            _triton = slstm_triton if getattr(slstm_triton, "KERNEL_API", None) == 1 else False
        except Exception as err:  # noqa: BLE001  (not installed, or a broken install: the caller falls back or raises)
            _triton, _triton_error = False, f"{type(err).__name__}: {err}"
    return _triton or None


def _resolve_triton(name: str, device_type: str, is_float64: bool, head_dim: int) -> str:
    """"triton" or "fused" for a forced "triton", or "auto" on CUDA."""
    triton_kernels = _triton_kernels()
    if triton_kernels is None:
        if name == "triton":
            raise RuntimeError(
                "The sLSTM backend 'triton' is forced, but needs the installed `modeling_slstm` package and `triton` "
                f"(pip install triton): {_triton_error or 'another kernel API'}"
            )
        logger.warning_once(f"sLSTM: Triton is unavailable ({_triton_error}); CUDA tensors run on 'fused'.")
        return "fused"
    runs_here = device_type == "cuda" or (device_type == "cpu" and triton_kernels.INTERPRETED)
    if not runs_here or is_float64:
        logger.warning_once(
            "The triton sLSTM backend runs on CUDA tensors below float64 (on CPU tensors only when TRITON_INTERPRET=1 "
            "was set before its first use); using 'fused' there."
        )
        return "fused"
    if head_dim > triton_kernels.MAX_HEAD_DIM:
        logger.warning_once(
            f"sLSTM: the Triton kernel takes head dims up to {triton_kernels.MAX_HEAD_DIM}; head dim {head_dim} runs "
            f"on 'fused'."
        )
        return "fused"
    return "triton"


@torch.compiler.assume_constant_result
def _resolve(device_type: str, is_float64: bool, head_dim: int) -> str:
    name = get_backend()
    if name == "reference":
        return name
    if name == "triton" or (name == "auto" and device_type == "cuda"):
        return _resolve_triton(name, device_type, is_float64, head_dim)
    if name == "compiled" and _kernels is None:
        raise RuntimeError("The sLSTM backend 'compiled' is forced, but needs the installed `modeling_slstm` package.")
    if name == "compiled" and not _kernels.compiled_available():
        raise RuntimeError(
            f"The sLSTM backend 'compiled' is forced, but its C++ kernel could not be built: {_kernels.build_error()}"
        )
    if device_type != "cpu" or is_float64 or _kernels is None:
        if name == "compiled":
            logger.warning_once("The compiled sLSTM backend runs on CPU below float64 only; using 'fused' there.")
        return "fused"
    if name == "auto" and not _kernels.compiled_available():
        logger.warning_once(f"sLSTM: the C++ kernel could not be built, using 'fused' ({_kernels.build_error()}).")
        return "fused"
    return "compiled" if name in ("auto", "compiled") else "fused"


def resolve_backend(gates: torch.Tensor) -> str:
    """The backend a call with these gates (B, S, NH, 4*DH) runs on: "reference", "fused", "compiled" or "triton"
    (before `kernel_takes`)."""
    return _resolve(gates.device.type, gates.dtype == torch.float64, gates.shape[-1] // 4)


def kernel_takes(*tensors: Optional[torch.Tensor], device_type: str = "cpu", dtype: Optional[torch.dtype] = None,
                 contiguous: bool = False) -> bool:
    """Whether the kernels can read these tensors (None allowed): plain dense tensors on `device_type` (the C++
    kernels: "cpu"), of `dtype` if given, contiguous if asked (the decoding kernels read weights as they are held: a
    channels_last or transposed weight runs through its module instead), no subclasses (quantised or wrapped weights),
    nothing on meta (offloaded parameters). While torch.compile / torch.export trace, the stand-ins of plain tensors
    count as plain (the ops' fake implementations run; the real tensors are checked when the graph runs). The kernels
    check every tensor again before reading it."""
    plain = _PLAIN_AND_STAND_INS if torch.compiler.is_compiling() else _PLAIN
    cpu = device_type == "cpu"
    for t in tensors:  # one pass, no generators: a decoding step checks ~300 per token
        if t is None:
            continue
        if (type(t) not in plain or t.layout is not torch.strided  # a subclass's properties are never read
                or not (t.is_cpu if cpu else t.device.type == device_type)
                or (dtype is not None and t.dtype is not dtype) or (contiguous and not t.is_contiguous())):
            return False
    return True


def _check_scan_inputs(gates, recurrent_kernel, bias, state, mask, forget_gate) -> None:
    """ValueError naming what does not fit the layout of `slstm_reference` (before any backend runs)."""
    def fail(what: str):
        raise ValueError(f"slstm_scan: {what} (gates (B, S, NH, 4*DH), recurrent_kernel (NH, DH, 4*DH), bias "
                         f"(NH, 4*DH), state 4 x (B, NH, DH), mask (B, S)).")

    if forget_gate not in FORGET_GATES:
        raise ValueError(f"forget_gate must be one of {FORGET_GATES}, got {forget_gate!r}.")
    if not isinstance(gates, torch.Tensor) or gates.dim() != 4 or gates.shape[-1] % 4:
        fail(f"gates must be 4-D with a last dimension divisible by 4, got {tuple(getattr(gates, 'shape', ()))}")
    batch_size, seq_len, num_heads, four_dh = gates.shape
    head_dim = four_dh // 4
    expected = {"recurrent_kernel": (recurrent_kernel, (num_heads, head_dim, four_dh)),
                "bias": (bias, (num_heads, four_dh)), "mask": (mask, (batch_size, seq_len))}
    if state is not None:
        if len(state) != 4:
            fail(f"state must be the 4 tensors (h, c, n, m), got {len(state)}")
        expected.update({name: (t, (batch_size, num_heads, head_dim)) for name, t in zip("hcnm", state)})
    for name, (t, shape) in expected.items():
        if t is None:
            if name == "recurrent_kernel":
                fail("recurrent_kernel is required")
            continue
        if tuple(t.shape) != shape:
            fail(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        if t.device != gates.device:
            fail(f"{name} is on {t.device}, gates on {gates.device}")
        if name != "mask" and not t.is_floating_point():
            fail(f"{name} must be floating point, got {t.dtype}")


def slstm_scan(
    gates: torch.Tensor,
    recurrent_kernel: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    state: Optional[SLSTMState] = None,
    mask: Optional[torch.Tensor] = None,
    forget_gate: str = "sigmoid",
) -> tuple[torch.Tensor, SLSTMState]:
    """The sLSTM recurrence on the backend in force (see `slstm_reference.slstm_scan_reference` for the contract).

    Shapes and devices are checked first (ValueError). Runs with autocast disabled (the recurrence is float32 math
    whatever the activation dtype) and, on CPU outside torch.compile, with denormals flushed (`flush_denormals`).
    """
    _check_scan_inputs(gates, recurrent_kernel, bias, state, mask, forget_gate)
    mask = None if mask is None else mask.bool()
    backend = resolve_backend(gates) if gates.numel() else "reference"
    device = gates.device.type
    if backend in ("compiled", "triton") and not kernel_takes(
        gates, recurrent_kernel, bias, *(state or ()), mask, device_type=device
    ):
        backend = "fused"
    # The C++ kernel flushes denormals itself; the contexts cost microseconds, which count when decoding.
    flushing = device == "cpu" and backend != "compiled" and not torch.compiler.is_compiling()
    flush = flush_denormals() if flushing else contextlib.nullcontext()
    autocast_on = device != "meta" and torch.is_autocast_enabled(device)  # meta has no autocast state
    no_autocast = torch.autocast(device, enabled=False) if autocast_on else contextlib.nullcontext()
    with no_autocast, flush:
        if backend == "reference":
            return slstm_scan_reference(gates, recurrent_kernel, bias, state, mask, forget_gate)
        if backend == "compiled":
            return _kernels.scan(gates, recurrent_kernel, bias, state, mask, forget_gate == "exp")
        if backend == "triton" and (device != "cpu" or not torch.compiler.is_compiling()):
            return _triton.scan(gates, recurrent_kernel, bias, state, mask, forget_gate == "exp")
        # Tracing refuses the fused Function (in-place writes into views) and the Triton interpreter (CPU tensors).
        if torch.compiler.is_compiling():
            return slstm_scan_reference(gates, recurrent_kernel, bias, state, mask, forget_gate)
        return slstm_fused_scan(gates, recurrent_kernel, bias, state, mask, forget_gate)


class BlockWeights(NamedTuple):
    """What one decoding step of a whole SLSTMBlock reads, as the modules hold it (None: absent)."""

    norm1_weight: torch.Tensor  # (D,) offset LayerNorm before the sLSTM layer
    conv_weight: Optional[torch.Tensor]  # (D, 1, K) depthwise causal conv
    conv_bias: Optional[torch.Tensor]  # (D,)
    proj_weight: torch.Tensor  # (4, NH, DH, DH) head-wise gate maps
    recurrent_kernel: torch.Tensor  # (NH, DH, 4*DH)
    gate_bias: Optional[torch.Tensor]  # (NH, 4*DH)
    out_norm_weight: torch.Tensor  # (D,) per-head norm
    norm2_weight: Optional[torch.Tensor]  # (D,) offset LayerNorm before the FFN
    gate_up_weight: Optional[torch.Tensor]  # (2F, D)
    gate_up_bias: Optional[torch.Tensor]  # (2F,)
    down_weight: Optional[torch.Tensor]  # (D, F)
    down_bias: Optional[torch.Tensor]  # (D,)
    gate_up_scale: Optional[torch.Tensor]  # (2F, 1) float32 when gate_up_weight is int8 rows (`int8_rows`)
    down_scale: Optional[torch.Tensor]  # (D, 1) float32 when down_weight is int8 rows
    eps: tuple  # (norm1, out norm, norm2)
    exp_forget: bool
    activation: str  # FFN activation name (layers_slstm.FFN_ACTIVATION_FNS)

    def tensors(self) -> tuple:
        return self[:14]


_zero_points: dict = {}  # id of a zero point found all zeros -> (a weak reference to it, its version then)


def int8_rows(weights: list) -> list:
    """For each weight, (q (O, I) int8, scale (O, 1) float32) when it is int8 weight-only with one scale per row that the
    decoding kernels read as W[o, :] = scale[o] q[o, :], else None: torchao's `Int8Tensor` (`Int8WeightOnlyConfig`,
    per-row granularity), whose F.linear computes (x q^T) scale + bias in x's dtype, as the kernels do with float32 sums.
    Refused (the module runs): activation quantisation or pre-scaling, per-group or per-tensor scales, a non-zero zero
    point, other subclasses or layouts, and anything while torch.compile traces. torchao is never imported here: its
    tensors exist only once it is."""
    int8_tensor = getattr(sys.modules.get("torchao.quantization"), "Int8Tensor", None)
    if int8_tensor is None or torch.compiler.is_compiling() or not any(type(w) is int8_tensor for w in weights):
        return [None] * len(weights)
    return [_int8_rows(w) if type(w) is int8_tensor else None for w in weights]


def _int8_rows(weight) -> Optional[tuple]:
    # the Int8Tensor's own attributes, read from its __dict__: what its F.linear reads (a property or a missing one
    # refuses); its shape and dtype are not asked (torch function dispatch: ~2 us each, per weight and token)
    attributes = weight.__dict__
    q, scale, zero_point = attributes.get("qdata"), attributes.get("scale"), attributes.get("zero_point")
    if (attributes.get("act_quant_kwargs") is not None or attributes.get("act_pre_scale") is not None
            or type(q) not in _PLAIN or type(scale) not in _PLAIN or q.dim() != 2):
        return None
    rows, columns = q.shape
    if (q.dtype is not torch.int8 or scale.dtype is not torch.float32 or scale.shape != (rows, 1)
            or attributes.get("block_size") != [1, columns] or q.layout is not torch.strided
            or scale.layout is not torch.strided or not (q.is_cpu and scale.is_cpu)
            or not (q.is_contiguous() and scale.is_contiguous())):
        return None
    return (q, scale) if zero_point is None or _zeros(zero_point, rows) else None


def _zeros(zero_point, rows: int) -> bool:
    """Whether an Int8Tensor's zero point is zeros (symmetric), which its weight-only F.linear leaves out, as the
    kernels do: checked once per version of it (an inference tensor, which has none, every time)."""
    if type(zero_point) not in _PLAIN or zero_point.numel() not in (1, rows):
        return False
    if zero_point.is_inference():  # made under torch.inference_mode(): no version counter
        return not zero_point.any()
    known = _zero_points.get(id(zero_point))
    if known is not None and known[0]() is zero_point and known[1] == zero_point._version:
        return True
    if zero_point.any():
        return False
    key = id(zero_point)
    _zero_points[key] = (weakref.ref(zero_point, lambda _: _zero_points.pop(key, None)), zero_point._version)
    return True


def decode_kernels_ready(x: torch.Tensor) -> bool:
    """Whether the one-call decoding kernels (`block_decode_step`, `linear_decode_step`) can take this input (the
    caller checks the weights with `kernel_takes`): the compiled backend in force, a float32 or bfloat16 CPU input, no
    autograd, no autocast, no mode that sees each op (`_modes_active`), at least one row."""
    return (
        x.dtype in DECODE_DTYPES
        and x.shape[0] > 0  # an empty batch: the modules return an empty result
        and kernel_takes(x)
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled(x.device.type)  # autocast runs the maps in its dtype, as the prefill did
        and (torch.compiler.is_compiling() or not _modes_active())  # (tracing runs under its own modes)
        and _resolve(x.device.type, False, 0) == "compiled"  # x is (B, 1, D): no head dim to read off it
    )


def _modes_active() -> bool:
    """Whether a torch function mode (but `torch.device`'s, which only places new tensors) or a dispatch mode is
    active: it sees, and may change, each op the modules run (F.linear, layer_norm, ...), which one kernel call would
    hide (a FLOP counter, a debugging mode)."""
    functions = torch._C._len_torch_function_stack()
    if functions and any(type(torch._C._get_function_stack_at(k)) is not DeviceContext for k in range(functions)):
        return True
    return torch._C._len_torch_dispatch_stack() > 0


def block_decode_step(
    x: torch.Tensor, mask: Optional[torch.Tensor], windows: list, states: list, weights: list, record: bool = False,
    norm: Optional[tuple] = None, head: Optional[tuple] = None,
) -> tuple[torch.Tensor, list, list, Optional[list], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """A decoding step of S tokens (one, or a speculative draft to verify) through L whole blocks in a row, in one
    kernel call (the caller checked `decode_kernels_ready` and `kernel_takes`).

    x (B, S, D), mask (B, S) bool or None; per block: windows[l] (B, K-1, D) or None (zeros), states[l] (h, c, n, m)
    of (B, NH, DH) or None (zeros), weights[l] a `BlockWeights`; norm: the model's final norm (weight (D,), eps) or
    None; head: the LM head (weight (V, D), bias (V,) or None, scale (V, 1) or None: int8 rows) or None -> every
    block's output (L, B, S, D), the new windows (None when K <= 1) and states, with `record` per block the window
    and state after each token ((S, B, K-1, D) or None, (S, 4, B, NH, DH)), else None, the final norm of the last
    output (B, S, D), else None, and the head's logits of that (B, S, V), else None. A masked step keeps window and
    state.
    """
    return _kernels.block_decode(x, mask, windows, states, weights, record, norm, head)


def linear_decode_step(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a decoding step's few rows on the kernel, its matrix-vector products shared over
    torch's threads (the caller checked `decode_kernels_ready` and `kernel_takes`, or `int8_rows` for an int8 weight
    with its `scale`): x (B, 1, I) -> (B, 1, O)."""
    return _kernels.linear_decode(x, weight, bias, scale)


__all__ = ["BACKENDS", "BlockWeights", "int8_rows", "slstm_scan", "set_backend", "get_backend", "use_backend",
           "resolve_backend"]
