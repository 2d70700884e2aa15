"""Layers of the sLSTM LM: norms, the causal conv, the head-wise gate maps, the sLSTM layer and the gated FFN.

The sLSTM layer owns projections, conv, masking and the cache read/write; the recurrence itself is `slstm_op`.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cache_slstm import SLSTMCacheLayer
from .configuration_slstm import SLSTMConfig
from .slstm_op import slstm_scan


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


FFN_ACTIVATION_FNS = {
    "gelu": F.gelu,  # exact erf GELU, as the official code
    "relu": F.relu,
    "relu2": _relu2,
    "silu": F.silu,
    "swish": F.silu,
    "sigmoid": torch.sigmoid,
    "selu": F.selu,
}


class OffsetLayerNorm(nn.Module):
    """LayerNorm without bias whose stored weight is an offset: scale = 1 + weight (weight starts at 0)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), 1.0 + self.weight, None, self.eps)


class MultiHeadNorm(nn.Module):
    """Per-head LayerNorm (a group norm with one group per head), offset weight, no bias: (B, S, NH, DH) -> (B, S, D)."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads * head_dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (x.shape[-1],), None, None, self.eps)  # normalise each head's DH units
        x = x.flatten(-2)  # (B, S, NH, DH) -> (B, S, D), head-major
        return x * (1.0 + self.weight)


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time with a carried window: y_t = b + sum_k W[:, 0, k] * u_{t-K+1+k}.

    Masked steps are skipped: they neither enter the window nor shift it, so each real token sees the K-1 real tokens
    before it (zeros before the first), whatever padding sits in between.
    """

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, bias=True)  # weight (D, 1, K)

    def forward(
        self, u: torch.Tensor, window: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """u (B, S, D), window (B, K-1, D) or None (zeros), mask (B, S) bool -> y (B, S, D), new window (B, K-1, D)."""
        batch_size, seq_len, dim = u.shape
        past = self.kernel_size - 1
        if past == 0:
            return F.conv1d(u.transpose(1, 2), self.conv.weight, self.conv.bias, groups=dim).transpose(1, 2), None
        if window is None:
            window = u.new_zeros(batch_size, past, dim)
        ext = torch.cat([window.to(u.dtype), u], dim=1)  # (B, K-1+S, D)
        if seq_len == 1:  # decoding: a K-tap dot product is far cheaper than a conv primitive
            y = (ext * self.conv.weight[:, 0, :].t()).sum(1, keepdim=True) + self.conv.bias  # (B, 1, D)
            if mask is None:
                return y, ext[:, 1:]
            # a masked row keeps its window (its y feeds a step the op skips); no data-dependent branch
            return y, torch.where(mask[:, :, None], ext[:, 1:], window.to(u.dtype))
        if mask is None:
            y = F.conv1d(ext.transpose(1, 2), self.conv.weight, self.conv.bias, groups=dim)  # (B, D, S)
            return y.transpose(1, 2), ext[:, -past:].clone()  # a copy: a view would pin all of ext in the cache
        # Gather, per output step, the K most recent *valid* positions of ext (the window's entries always are).
        valid = torch.cat([mask.new_ones(batch_size, past), mask.bool()], dim=1)  # (B, K-1+S)
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # valid positions first, in time order
        rank = valid.long().cumsum(1) - 1  # rank of the latest valid position at or before each step
        taps = torch.arange(-past, 1, device=u.device)  # (K,) oldest first
        step_ranks = (rank[:, past:, None] + taps).clamp(min=0)  # (B, S, K)
        idx = order.gather(1, step_ranks.flatten(1))  # (B, S*K) positions in ext
        gathered = ext.gather(1, idx[..., None].expand(-1, -1, dim)).view(batch_size, seq_len, self.kernel_size, dim)
        y = torch.einsum("bskd,dk->bsd", gathered, self.conv.weight[:, 0, :]) + self.conv.bias
        last = rank[:, -1:] + taps[:-1] + 1  # (B, K-1): ranks of the K-1 latest valid positions
        new_window = ext.gather(1, order.gather(1, last)[..., None].expand(-1, -1, dim))
        return y, new_window


class HeadwiseGateProjection(nn.Module):
    """The four block-diagonal input maps of the sLSTM gates, one DH x DH block per head and gate.

    weight (4, NH, DH_out, DH_in), gates ordered i, f, z, o. The input and forget gates read the conv features xc, the
    cell input z and the output gate read the normed layer input u (as the official model does).
    """

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.weight = nn.Parameter(torch.empty(4, num_heads, head_dim, head_dim))

    def forward(self, xc: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """xc, u (B, S, D) -> gate pre-activations (B, S, NH, 4*DH)."""
        nh, dh = self.num_heads, self.head_dim
        batch_size, seq_len, _ = u.shape
        rows = batch_size * seq_len
        # One bmm over (gate, head) with the weight used in place (transposed view, no per-call weight copy).
        xh, uh = (t.reshape(rows, nh, dh).transpose(0, 1) for t in (xc, u))  # (NH, B*S, DH) each
        x = torch.stack([xh, xh, uh, uh]).view(4 * nh, rows, dh)  # gates i, f read xc; z, o read u
        w = self.weight.view(4 * nh, dh, dh).transpose(1, 2)  # (4*NH, DH_in, DH_out)
        gates = torch.bmm(x, w).view(4, nh, batch_size, seq_len, dh)  # (gate, NH, B, S, DH)
        return gates.permute(2, 3, 1, 0, 4).reshape(batch_size, seq_len, nh, 4 * dh)  # i, f, z, o per head


class SLSTMLayer(nn.Module):
    """conv + SiLU -> head-wise gate maps -> sLSTM recurrence -> dropout -> per-head norm. (B, S, D) -> (B, S, D)."""

    def __init__(self, config: SLSTMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.forget_gate = config.forget_gate
        self.conv = CausalConv1d(config.hidden_size, config.conv1d_kernel_size) if config.conv1d_kernel_size else None
        self.gate_proj = HeadwiseGateProjection(config.num_heads, config.head_dim)
        # R[h, d_in, g*DH + d_out] and b[h, g*DH + d_out], gates i, f, z, o (see slstm_op)
        self.recurrent_kernel = nn.Parameter(torch.empty(config.num_heads, config.head_dim, 4 * config.head_dim))
        self.gate_bias = nn.Parameter(torch.empty(config.num_heads, 4 * config.head_dim))
        self.dropout = nn.Dropout(config.dropout)
        self.out_norm = MultiHeadNorm(config.num_heads, config.head_dim, config.layer_norm_eps)

    def forward(
        self,
        u: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        cache_layer: Optional[SLSTMCacheLayer] = None,
    ) -> torch.Tensor:
        window, state = (cache_layer.conv_window, cache_layer.cell_state) if cache_layer is not None else (None, None)
        if self.conv is not None:
            xc, window = self.conv(u, window, mask)
            xc = F.silu(xc)
        else:
            xc = u
        gates = self.gate_proj(xc, u)  # (B, S, NH, 4*DH)
        y, state = slstm_scan(gates, self.recurrent_kernel, self.gate_bias, state, mask, self.forget_gate)
        if cache_layer is not None:
            cache_layer.write(window, state, u.shape[1])
        return self.out_norm(self.dropout(y))  # (B, S, NH, DH) -> (B, S, D)


class GatedFeedForward(nn.Module):
    """act(x W_gate) * (x W_up), then W_down. gate_up_proj holds [gate; up] stacked: rows 0..F-1 gate, F..2F-1 up."""

    def __init__(self, config: SLSTMConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.ffn_dim, bias=config.ffn_bias)
        self.down_proj = nn.Linear(config.ffn_dim, config.hidden_size, bias=config.ffn_bias)
        self.down_proj.writes_residual = True  # initialised with wang_init, scaled by depth
        self.activation = config.ffn_act
        self.act = FFN_ACTIVATION_FNS[config.ffn_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, S, F) each
        return self.down_proj(self.act(gate) * up)


__all__ = ["OffsetLayerNorm", "MultiHeadNorm", "CausalConv1d", "HeadwiseGateProjection", "SLSTMLayer", "GatedFeedForward"]
