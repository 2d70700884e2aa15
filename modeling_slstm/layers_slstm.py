"""Layers of the sLSTM LM: norms, the causal conv, the head-wise gate maps, the sLSTM layer and the gated FFN.

The sLSTM layer owns projections, conv, masking and the cache read/write; the recurrence itself is `slstm_op`.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

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

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), 1.0 + self.weight, None, self.eps)


class MultiHeadNorm(nn.Module):
    """Per-head LayerNorm (a group norm with one group per head), offset weight, no bias: (B, S, NH, DH) -> (B, S, D)."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads * head_dim))
        self.eps = eps
        self.num_heads, self.head_dim = num_heads, head_dim

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, eps={self.eps}"

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

    def extra_repr(self) -> str:
        return f"{self.conv.in_channels}, kernel_size={self.kernel_size}, causal, depthwise"

    def forward(
        self, u: torch.Tensor, window: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """u (B, S, D), window (B, K-1, D) or None (zeros), mask (B, S) bool -> y (B, S, D), new window (B, K-1, D).

        Every path calls the child `self.conv` (its hooks, e.g. accelerate's offloading or an adapter's, run).
        """
        batch_size, seq_len, dim = u.shape
        past = self.kernel_size - 1
        if past == 0:
            return self.conv(u.transpose(1, 2)).transpose(1, 2), None  # (B, D, S) -> (B, S, D)
        if window is None:
            window = u.new_zeros(batch_size, past, dim)
        ext = torch.cat([window.to(u.dtype), u], dim=1)  # (B, K-1+S, D)
        if mask is None:
            y = self.conv(ext.transpose(1, 2)).transpose(1, 2)  # (B, D, S) -> (B, S, D)
            return y, ext[:, -past:].clone()  # a copy: a view would pin all of ext in the cache
        if seq_len == 1:
            y = self.conv(ext.transpose(1, 2)).transpose(1, 2)  # (B, 1, D)
            # a masked row keeps its window (its y feeds a step the op skips); no data-dependent branch
            return y, torch.where(mask[:, :, None], ext[:, 1:], ext[:, :-1])
        # Gather, per output step, the K most recent *valid* positions of ext (the window's entries always are).
        valid = torch.cat([mask.new_ones(batch_size, past), mask.bool()], dim=1)  # (B, K-1+S)
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # valid positions first, in time order
        rank = valid.long().cumsum(1) - 1  # rank of the latest valid position at or before each step
        taps = torch.arange(-past, 1, device=u.device)  # (K,) oldest first
        step_ranks = (rank[:, past:, None] + taps).clamp(min=0)  # (B, S, K)
        idx = order.gather(1, step_ranks.flatten(1))  # (B, S*K) positions in ext
        gathered = ext.gather(1, idx[..., None].expand(-1, -1, dim))  # (B, S*K, D)
        windows = gathered.view(batch_size * seq_len, self.kernel_size, dim).transpose(1, 2)  # (B*S, D, K)
        y = self.conv(windows).view(batch_size, seq_len, dim)  # (B*S, D, 1) -> (B, S, D)
        last = rank[:, -1:] + taps[:-1] + 1  # (B, K-1): ranks of the K-1 latest valid positions
        new_window = ext.gather(1, order.gather(1, last)[..., None].expand(-1, -1, dim))
        return y, new_window


class _HeadwiseGateMaps(torch.autograd.Function):
    """The gate maps as two batched matmuls each way, written straight into (and read straight from) the op's
    (B, S, NH, 4*DH) layout: autograd through stack + bmm + permute copied the gates twice more in each direction."""

    @staticmethod
    def forward(ctx, xc: torch.Tensor, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        nh, dh = weight.shape[1], weight.shape[2]
        batch_size, seq_len, _ = u.shape
        rows = batch_size * seq_len
        # (2, NH, DH_out, DH_in) -> (NH, DH_in, 2*DH_out): gates i, f read xc; z, o read u
        w_if, w_zo = (weight[g : g + 2].permute(1, 3, 0, 2).reshape(nh, dh, 2 * dh) for g in (0, 2))
        gates = u.new_empty(rows, nh, 4 * dh)
        per_head = gates.transpose(0, 1)  # (NH, B*S, 4*DH) view
        torch.bmm(_heads(xc, nh), w_if, out=per_head[..., : 2 * dh])
        torch.bmm(_heads(u, nh), w_zo, out=per_head[..., 2 * dh :])
        ctx.save_for_backward(xc, u, w_if, w_zo)
        return gates.view(batch_size, seq_len, nh, 4 * dh)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_gates: torch.Tensor) -> tuple:
        xc, u, w_if, w_zo = ctx.saved_tensors
        nh, dh = w_if.shape[0], w_if.shape[1]
        per_head = d_gates.reshape(-1, nh, 4 * dh).transpose(0, 1)  # (NH, B*S, 4*DH) view
        d_if, d_zo = per_head[..., : 2 * dh], per_head[..., 2 * dh :]
        d_xc, d_u = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (xc, u))  # _heads: views
        torch.bmm(d_if, w_if.transpose(1, 2), out=_heads(d_xc, nh))
        torch.bmm(d_zo, w_zo.transpose(1, 2), out=_heads(d_u, nh))
        d_w_if = torch.bmm(_heads(xc, nh).transpose(1, 2), d_if).view(nh, dh, 2, dh)  # (NH, DH_in, gate, DH_out)
        d_w_zo = torch.bmm(_heads(u, nh).transpose(1, 2), d_zo).view(nh, dh, 2, dh)
        d_weight = torch.cat([d_w_if, d_w_zo], dim=2).permute(2, 0, 3, 1)  # (4, NH, DH_out, DH_in)
        return d_xc, d_u, d_weight.contiguous()


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S, D) -> (NH, B*S, DH), a view when x is contiguous."""
    return x.reshape(-1, num_heads, x.shape[-1] // num_heads).transpose(0, 1)


def _gate_maps(xc: torch.Tensor, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What `_HeadwiseGateMaps` computes, with ordinary autograd: xc, u (B, S, D) -> (B, S, NH, 4*DH)."""
    nh, dh = weight.shape[1], weight.shape[2]
    w_if, w_zo = (weight[g : g + 2].permute(1, 3, 0, 2).reshape(nh, dh, 2 * dh) for g in (0, 2))
    per_head = torch.cat([torch.bmm(_heads(xc, nh), w_if), torch.bmm(_heads(u, nh), w_zo)], -1)  # (NH, B*S, 4*DH)
    return per_head.transpose(0, 1).reshape(*u.shape[:2], nh, 4 * dh)


class HeadwiseGateProjection(nn.Module):
    """The four block-diagonal input maps of the sLSTM gates, one DH x DH block per head and gate.

    weight (4, NH, DH_out, DH_in), gates ordered i, f, z, o. The input and forget gates read the conv features xc, the
    cell input z and the output gate read the normed layer input u (as the official model does).
    """

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.weight = nn.Parameter(torch.empty(4, num_heads, head_dim, head_dim))

    def extra_repr(self) -> str:
        return f"4 gates x {self.num_heads} heads of {self.head_dim}x{self.head_dim}"

    def forward(self, xc: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """xc, u (B, S, D) -> gate pre-activations (B, S, NH, 4*DH)."""
        if torch.compiler.is_compiling():  # torch.compile / torch.export trace no out= writes into views: plain ops
            return _gate_maps(xc, u, self.weight)
        device = u.device.type
        if device != "meta" and torch.is_autocast_enabled(device):  # as autocast runs a matmul: in its dtype (the Function writes with out=)
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return _HeadwiseGateMaps.apply(xc.to(dtype), u.to(dtype), self.weight.to(dtype))
        return _HeadwiseGateMaps.apply(xc, u, self.weight)


# The last tokens of a recorded forward (speculative decoding: a prompt followed by drafts) that `crop` undoes in at
# most this many replayed steps, however long the forward was.
CHEAP_UNDO_TOKENS = 64


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

    def extra_repr(self) -> str:
        return (f"hidden_size={self.num_heads * self.head_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"forget_gate={self.forget_gate!r}, layer_idx={self.layer_idx}")

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
        recording = cache_layer is not None and cache_layer.record_past
        split = u.shape[1] - CHEAP_UNDO_TOKENS if recording and u.shape[1] > CHEAP_UNDO_TOKENS else 0
        if split:  # the scan in two, keeping the state between: undoing the last tokens replays only the second part
            mid = slstm_scan(gates[:, :split], self.recurrent_kernel, self.gate_bias, state,
                             None if mask is None else mask[:, :split], self.forget_gate)
            last = slstm_scan(gates[:, split:], self.recurrent_kernel, self.gate_bias, mid[1],
                              None if mask is None else mask[:, split:], self.forget_gate)
            y, state, mid = torch.cat([mid[0], last[0]], 1), last[1], mid[1]
        else:
            y, state = slstm_scan(gates, self.recurrent_kernel, self.gate_bias, state, mask, self.forget_gate)
        if cache_layer is not None:
            replay = self._replay(u, gates, mask, split, mid if split else None) if recording else None
            cache_layer.write(window, state, u.shape[1], replay)
        return self.out_norm(self.dropout(y))  # (B, S, NH, DH) -> (B, S, D)

    def _replay(self, u: torch.Tensor, gates: torch.Tensor, mask: Optional[torch.Tensor], split: int = 0,
                mid: Optional[tuple] = None):
        """For a recorded forward: (p, window, state it started from) -> (conv window, cell state) after its first p
        tokens, from the same inputs and gates, so exactly what the forward computed at that point. A forward that
        scanned in two (`split` tokens, then the rest, `mid` the state between) replays from `mid` when p >= split:
        undoing a few drafted tokens after a long prompt costs a few steps, not the whole prompt again."""
        u, gates = u.detach(), gates.detach()
        past = self.conv.kernel_size - 1 if self.conv is not None else 0

        def replay(p: int, window: Optional[torch.Tensor], state: Optional[tuple]) -> tuple:
            if mask is None and 0 < past <= p:  # unmasked, the window after p tokens is their last K-1 inputs
                new_window = u[:, p - past : p].clone()
            else:
                new_window = self.conv(u[:, :p], window, None if mask is None else mask[:, :p])[1] if past else None
            start, state = (split, mid) if split and p >= split else (0, state)
            if p == start:
                return new_window, state
            step_mask = None if mask is None else mask[:, start:p]
            _, new_state = slstm_scan(gates[:, start:p], self.recurrent_kernel, self.gate_bias, state, step_mask,
                                      self.forget_gate)
            return new_window, new_state

        return replay


class GatedFeedForward(nn.Module):
    """act(x W_gate) * (x W_up), then W_down. gate_up_proj holds [gate; up] stacked: rows 0..F-1 gate, F..2F-1 up."""

    def __init__(self, config: SLSTMConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.ffn_dim, bias=config.ffn_bias)
        self.down_proj = nn.Linear(config.ffn_dim, config.hidden_size, bias=config.ffn_bias)
        self.down_proj.writes_residual = True  # initialised with wang_init, scaled by depth
        self.activation = config.ffn_act
        self.act = FFN_ACTIVATION_FNS[config.ffn_act]

    def extra_repr(self) -> str:
        return f"{self.down_proj.out_features} -> 2x{self.down_proj.in_features} -> {self.down_proj.out_features}, " \
               f"activation={self.activation!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, S, F) each
        return self.down_proj(self.act(gate) * up)


__all__ = ["OffsetLayerNorm", "MultiHeadNorm", "CausalConv1d", "HeadwiseGateProjection", "SLSTMLayer", "GatedFeedForward"]
