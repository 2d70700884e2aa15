"""The sLSTM recurrence as readable tensor math: the oracle every faster path is tested against (the paper's
equations as the README gives them).

Layout, shared by every backend (xLSTM paper, Beck et al. 2024, eqs. 8-17):
    gates             (B, S, NH, 4*DH)  input pre-activations W·x, per head ordered [i | f | z | o], each DH wide
    recurrent_kernel  (NH, DH, 4*DH)    R[h, d_in, g*DH + d_out]: block-diagonal memory mixing, h_{t-1} @ R
    bias              (NH, 4*DH)        same order as the columns of R
    state             (h, c, n, m)      each (B, NH, DH), float32; h is the raw cell output fed back through R
    mask              (B, S) bool       False: the step is skipped and every piece of state stays as it was

A leaf module: it imports torch only. Any change to the cell math must be made in the same way in `slstm_fused`
(forward and backward) and in `csrc/slstm_cpu.cpp` (`cell_step` and `slstm_backward`).
"""

from typing import Optional

import torch
import torch.nn.functional as F


SLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
FORGET_GATES = ("sigmoid", "exp")


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


__all__ = ["SLSTMState", "FORGET_GATES", "zero_state", "slstm_cell_step", "slstm_scan_reference"]
