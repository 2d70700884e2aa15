"""The sLSTM recurrence as pure tensor math (xLSTM paper, Beck et al. 2024, eqs. 8-17; DESIGN §1).

Layout, shared by every backend:
    gates             (B, S, NH, 4*DH)  input pre-activations W·x, per head ordered [i | f | z | o], each DH wide
    recurrent_kernel  (NH, DH, 4*DH)    R[h, d_in, g*DH + d_out]: block-diagonal memory mixing, h_{t-1} @ R
    bias              (NH, 4*DH)        same order as the columns of R
    state             (h, c, n, m)      each (B, NH, DH), float32; h is the raw cell output fed back through R
    mask              (B, S) bool       False: the step is skipped and every piece of state stays as it was

`slstm_scan_reference` is the readable oracle. `slstm_scan` picks the backend at run time (never from the config):
    "reference"  the oracle above
    "fused"      pure PyTorch, preallocated buffers, hand-written backward (`slstm_fused`); works on every device
    "compiled"   the whole time loop in C++ (`slstm_cpu`), CPU float32 only, built on first use with the system C++
                 compiler and cached; falls back to "fused" with one warning when it cannot be built
    "auto"       (default) "compiled" on CPU when it builds, else "fused"
Choose with the environment variable SLSTM_BACKEND, `set_backend(name)` or `with use_backend(name): ...`.
"""

import contextlib
import os
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.utils import logging


logger = logging.get_logger(__name__)


SLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
FORGET_GATES = ("sigmoid", "exp")
BACKENDS = ("auto", "reference", "fused", "compiled")
_SMALLEST_NORMAL = 2.2250738585072014e-308  # Python floats use the same FPU control bits as torch's CPU kernels
_backend: Optional[str] = None  # set_backend(); None: SLSTM_BACKEND or "auto"


def zero_state(batch_size: int, num_heads: int, head_dim: int, device=None) -> SLSTMState:
    """The initial state (h, c, n, m), all zeros, float32, each (B, NH, DH). n == 0 marks "no step taken yet"."""
    return tuple(torch.zeros(batch_size, num_heads, head_dim, device=device, dtype=torch.float32) for _ in range(4))


def slstm_cell_step(
    raw: torch.Tensor, state: SLSTMState, forget_gate: str = "sigmoid"
) -> SLSTMState:
    """One stabilised sLSTM step from the full pre-activations raw = W·x + R·h + b, (B, NH, 4*DH) float32.

    Elements whose normaliser is still zero take their first step (m = ĩ), decided per element, so fresh and running
    rows can share a batch without 0/0.
    """
    _, c, n, m = state
    i, f, z, o = raw.unflatten(-1, (4, -1)).unbind(-2)  # each (B, NH, DH)
    log_f = F.logsigmoid(f) if forget_gate == "sigmoid" else f
    first = n == 0
    m_running = torch.maximum(log_f + m, i)
    m_new = torch.where(first, i, m_running)
    i_gate = torch.exp(i - m_new)  # <= 1
    f_gate = torch.where(first, torch.zeros_like(f), torch.exp(log_f + m - m_running))  # <= 1
    c_new = f_gate * c + i_gate * torch.tanh(z)
    n_new = f_gate * n + i_gate
    h_new = torch.sigmoid(o) * c_new / n_new
    return h_new, c_new, n_new, m_new


def slstm_scan_reference(
    gates: torch.Tensor,
    recurrent_kernel: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    state: Optional[SLSTMState] = None,
    mask: Optional[torch.Tensor] = None,
    forget_gate: str = "sigmoid",
) -> tuple[torch.Tensor, SLSTMState]:
    """Run the sLSTM over a sequence, one step at a time, in float32 (float64 if the gates are float64).

    Returns the outputs h_t as (B, S, NH, DH) in the dtype of `gates` and the final state (h, c, n, m), float32.
    """
    batch_size, seq_len, num_heads, four_dh = gates.shape
    head_dim = four_dh // 4
    dtype = torch.promote_types(gates.dtype, torch.float32)
    if state is None:
        state = zero_state(batch_size, num_heads, head_dim, gates.device)
    state = tuple(s.to(dtype) for s in state)
    r = recurrent_kernel.to(dtype)
    b = bias.to(dtype) if bias is not None else 0.0
    outputs = []
    for t in range(seq_len):
        # (B, NH, DH) @ (NH, DH, 4*DH) per head -> (B, NH, 4*DH)
        raw = gates[:, t].to(dtype) + torch.einsum("bhd,hde->bhe", state[0], r) + b
        new_state = slstm_cell_step(raw, state, forget_gate)
        if mask is not None:
            keep = mask[:, t, None, None]  # (B, 1, 1)
            new_state = tuple(torch.where(keep, new, old) for new, old in zip(new_state, state))
        state = new_state
        outputs.append(state[0])
    out = torch.stack(outputs, dim=1) if outputs else gates.new_zeros(batch_size, 0, num_heads, head_dim)
    return out.to(gates.dtype), state


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every later call ("auto", "reference", "fused", "compiled"); None: back to SLSTM_BACKEND."""
    global _backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"Unknown sLSTM backend {name!r}; choose one of {BACKENDS}.")
    _backend = name


def get_backend() -> str:
    """The backend name in force (before "auto" is resolved): set_backend(), else SLSTM_BACKEND, else "auto"."""
    name = _backend if _backend is not None else os.environ.get("SLSTM_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"SLSTM_BACKEND={name!r} is not a backend; choose one of {BACKENDS}.")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """`with use_backend("reference"): ...` runs the block on that backend, then restores the previous choice."""
    global _backend
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        _backend = previous


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


def resolve_backend(gates: torch.Tensor) -> str:
    """The backend a call with these gates runs on: "reference", "fused" or "compiled"."""
    name = get_backend()
    if name == "reference":
        return name
    compiled_ok = gates.device.type == "cpu" and gates.dtype != torch.float64
    if name == "auto" and compiled_ok or name == "compiled":
        if compiled_ok:
            from .slstm_cpu import compiled_available

            if compiled_available():
                return "compiled"
        elif name == "compiled":
            logger.warning_once("The compiled sLSTM backend runs on CPU below float64 only; using 'fused'.")
    return "fused"


def slstm_scan(
    gates: torch.Tensor,
    recurrent_kernel: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    state: Optional[SLSTMState] = None,
    mask: Optional[torch.Tensor] = None,
    forget_gate: str = "sigmoid",
) -> tuple[torch.Tensor, SLSTMState]:
    """The sLSTM recurrence on the backend chosen at run time (see `slstm_scan_reference` for the contract).

    Runs with autocast disabled (the recurrence is float32 math whatever the activation dtype) and, on CPU, with
    denormals flushed to zero (`flush_denormals`).
    """
    if gates.dim() != 4 or gates.shape[-1] % 4 or tuple(recurrent_kernel.shape) != (
        gates.shape[2], gates.shape[3] // 4, gates.shape[3]
    ):
        raise ValueError(
            f"slstm_scan expects gates (B, S, NH, 4*DH) and recurrent_kernel (NH, DH, 4*DH); got "
            f"{tuple(gates.shape)} and {tuple(recurrent_kernel.shape)}."
        )
    if forget_gate not in FORGET_GATES:
        raise ValueError(f"forget_gate must be one of {FORGET_GATES}, got {forget_gate!r}.")
    device = gates.device.type
    backend = resolve_backend(gates) if gates.numel() else "reference"
    # The C++ kernel flushes denormals itself; the contexts cost microseconds, which count when decoding.
    flush = flush_denormals() if device == "cpu" and backend != "compiled" else contextlib.nullcontext()
    autocast_on = torch.is_autocast_enabled(device)
    no_autocast = torch.autocast(device, enabled=False) if autocast_on else contextlib.nullcontext()
    with no_autocast, flush:
        if backend == "reference":
            return slstm_scan_reference(gates, recurrent_kernel, bias, state, mask, forget_gate)
        if backend == "compiled":
            from .slstm_cpu import slstm_compiled_scan

            return slstm_compiled_scan(gates, recurrent_kernel, bias, state, mask, forget_gate)
        from .slstm_fused import slstm_fused_scan

        return slstm_fused_scan(gates, recurrent_kernel, bias, state, mask, forget_gate)
