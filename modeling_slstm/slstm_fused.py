"""The sLSTM recurrence in pure PyTorch with a hand-written backward (BPTT): the "fused" backend of `slstm_op`.

Same contract as `slstm_reference.slstm_scan_reference`. Internally time-major and head-major, so that each step is one
in-place `baddbmm` on contiguous slices plus a few pointwise ops into preallocated buffers:

    raw   (S, NH, B, 4*DH)     W·x + b, overwritten step by step with the full pre-activation W·x + R·h + b
    st    (S, 4, NH, B, DH)    the state (h, c, n, m) after every step (masked steps repeat the previous one)

First steps are decided per element without a per-step test: an element whose initial normaliser is zero starts from
m = -inf, which yields exactly the reference's first step (m = ĩ, f' = 0). The backward recomputes the gate
activations for all steps at once, then runs one reverse loop of pointwise ops and one `bmm` per step; dR and db
are single reductions over all steps afterwards.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .slstm_reference import slstm_scan_reference


class SLSTMFusedFunction(torch.autograd.Function):
    """autograd Function over (gates, R, bias, h0, c0, n0, m0); see `slstm_fused_scan` for the shapes."""

    @staticmethod
    def forward(ctx, gates, recurrent_kernel, bias, h0, c0, n0, m0, mask, exp_forget):
        batch_size, seq_len, num_heads, four_dh = gates.shape
        head_dim = four_dh // 4
        dtype = torch.promote_types(gates.dtype, torch.float32)
        r = recurrent_kernel.to(dtype)  # (NH, DH, 4*DH)
        raw = torch.empty(seq_len, num_heads, batch_size, four_dh, dtype=dtype, device=gates.device)
        raw.copy_(gates.permute(1, 2, 0, 3))  # (S, NH, B, 4*DH)
        if bias is not None:
            raw += bias.to(dtype)[:, None, :]
        s0 = torch.stack([h0, c0, n0, m0]).to(dtype).transpose(1, 2)  # (4, NH, B, DH)
        fresh0 = s0[2] == 0
        s0[3].masked_fill_(fresh0, float("-inf"))  # first step of these elements: m = ĩ, f' = 0
        keep = None if mask is None else mask.t().reshape(seq_len, 1, 1, batch_size, 1)  # (S, 1, 1, B, 1)

        st = torch.empty(seq_len, 4, num_heads, batch_size, head_dim, dtype=dtype, device=gates.device)
        lf = torch.empty(num_heads, batch_size, head_dim, dtype=dtype, device=gates.device)
        if_gates = torch.empty(num_heads, batch_size, 2, head_dim, dtype=dtype, device=gates.device)
        tmp = torch.empty(num_heads, batch_size, 2, head_dim, dtype=dtype, device=gates.device)
        ig, fg = if_gates.unbind(2)
        zt, og = tmp.unbind(2)
        # Per-step views, made once: the loop body is only kernels writing into preallocated memory.
        raw_t = raw.unbind(0)
        i_t, f_t, z_t, o_t = (v.unbind(0) for v in raw.unflatten(-1, (4, head_dim)).unbind(-2))
        st_t = st.unbind(0)
        h_t, c_t, n_t, m_t = (v.unbind(0) for v in st.unbind(1))
        prev = s0
        for t in range(seq_len):
            raw_t[t].baddbmm_(prev[0], r)  # (NH, B, 4*DH) += h_{t-1} @ R
            if exp_forget:
                torch.add(f_t[t], prev[3], out=lf)  # a = log f + m_{t-1}
            else:
                torch.add(F.logsigmoid(f_t[t]), prev[3], out=lf)
            torch.maximum(lf, i_t[t], out=m_t[t])
            torch.sub(i_t[t], m_t[t], out=ig)
            torch.sub(lf, m_t[t], out=fg)
            if_gates.exp_()
            torch.tanh(z_t[t], out=zt)
            torch.mul(ig, zt, out=c_t[t]).addcmul_(fg, prev[1])
            torch.addcmul(ig, fg, prev[2], out=n_t[t])
            torch.sigmoid(o_t[t], out=og)
            torch.div(c_t[t], n_t[t], out=h_t[t]).mul_(og)
            if keep is not None:
                torch.where(keep[t], st_t[t], prev, out=st_t[t])
            prev = st_t[t]

        out = torch.empty(batch_size, seq_len, num_heads, head_dim, dtype=gates.dtype, device=gates.device)
        out.copy_(st[:, 0].permute(2, 0, 1, 3))  # (S, NH, B, DH) -> (B, S, NH, DH)
        h_f, c_f, n_f, m_f = st[-1].transpose(1, 2)  # each (B, NH, DH)
        m_f = torch.where(n_f == 0, m0.to(dtype), m_f)  # never stepped: the state is returned as given, m included
        ctx.save_for_backward(raw, st, s0, r, mask)
        ctx.exp_forget, ctx.has_bias, ctx.gates_dtype = exp_forget, bias is not None, gates.dtype
        ctx.mark_non_differentiable(*([] if mask is None else [mask]))
        final = (x.clone(memory_format=torch.contiguous_format) for x in (h_f, c_f, n_f, m_f))
        return out, *final

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, dh_t, dc_t, dn_t, dm_t):
        raw, st, s0, r, mask = ctx.saved_tensors
        seq_len, num_heads, batch_size, four_dh = raw.shape
        head_dim = four_dh // 4
        dtype, device = raw.dtype, raw.device

        # autograd materialises missing gradients as zeros; (B, NH, DH) -> (NH, B, DH)
        dh, dc, dn, dm = (g.to(dtype).transpose(0, 1).contiguous() for g in (dh_t, dc_t, dn_t, dm_t))
        never = st[-1, 2] == 0
        dm_given = dm
        dm = dm.masked_fill(never, 0.0)  # those elements return the given m, not the internal -inf
        d_out = d_out.to(dtype).permute(1, 2, 0, 3)  # (S, NH, B, DH)

        # Gate activations of every step at once (bit-identical to the forward's), then the per-step coefficients of
        # the reverse recurrence. The carried gradients live in y = [dn, dc, dh] (3, NH, B, DH).
        prev = torch.cat([s0[None], st[:-1]])  # (S, 4, NH, B, DH) state before each step
        i, f, z, o = raw.unflatten(-1, (4, head_dim)).unbind(-2)
        h, c, n, m = st.unbind(1)
        c_prev, n_prev, m_prev = prev[:, 1], prev[:, 2], prev[:, 3]
        a = (f if ctx.exp_forget else F.logsigmoid(f)) + m_prev
        fg = torch.exp(a - m)
        zt, og = torch.tanh(z), torch.sigmoid(o)
        inv_n = 1.0 / n
        shape = (seq_len, num_heads, batch_size, head_dim)
        dcn = torch.empty(seq_len, 2, *shape[1:], dtype=dtype, device=device)  # [dn, dc] += dh * [-h/n, og/n]
        torch.mul(h, inv_n, out=dcn[:, 0]).neg_()
        torch.mul(og, inv_n, out=dcn[:, 1])
        ga_gi = torch.empty(seq_len, 2, 2, *shape[1:], dtype=dtype, device=device)
        torch.mul(n_prev, fg, out=ga_gi[:, 0, 0])  # g_a = dL/da via f' = exp(a - m): [dn, dc] . [n_prev f', c_prev f']
        torch.mul(c_prev, fg, out=ga_gi[:, 0, 1])
        ig = torch.exp(i - m, out=ga_gi[:, 1, 0])  # g_i = dL/dĩ via i' = exp(ĩ - m): [dn, dc] . [i', tanh(z) i']
        torch.mul(zt, ig, out=ga_gi[:, 1, 1])
        zo = torch.empty(seq_len, 2, *shape[1:], dtype=dtype, device=device)  # d_z = dc * ., d_o = dh * .
        torch.mul(zt, zt, out=zo[:, 0]).neg_().add_(1.0).mul_(ig)
        torch.sub(1.0, og, out=zo[:, 1]).mul_(h)
        coef = {
            "dcn": dcn, "ga_gi": ga_gi, "zo": zo,
            "w_a": (a > i).to(dtype).add_((a == i).to(dtype), alpha=0.5),  # torch.maximum splits ties evenly
            "d_lf": torch.ones_like(f) if ctx.exp_forget else torch.sigmoid(-f),
            "carry": fg.unsqueeze(1),  # [dn, dc]_{t-1} = [dn, dc] * f'
        }
        if mask is not None:  # a masked step is the identity on the state
            skip = ~mask.t().reshape(seq_len, 1, batch_size, 1)
            for k, v in coef.items():
                v.masked_fill_(skip.view((seq_len,) + (1,) * (v.dim() - 4) + (1, batch_size, 1)),
                               1.0 if k in ("carry", "w_a") else 0.0)
            skip_dh = skip.to(dtype).expand(shape).unbind(0)
        steps = {k: v.unbind(0) for k, v in coef.items()}

        draw = torch.empty_like(raw)  # (S, NH, B, 4*DH): dL/d(pre-activation) = dL/d(gates)
        draw4 = draw.view(seq_len, num_heads, batch_size, 4, head_dim)
        d_i, d_f = draw4[:, :, :, 0].unbind(0), draw4[:, :, :, 1].unbind(0)
        d_zo = draw4[:, :, :, 2:].permute(0, 3, 1, 2, 4).unbind(0)  # each (2, NH, B, DH), views into draw
        draw_t = draw.unbind(0)
        rt = r.transpose(1, 2).contiguous()  # (NH, 4*DH, DH)
        y = torch.stack([dn, dc, dh + d_out[-1]])
        y_next, dm_next = torch.empty_like(y), torch.empty_like(dm)
        prod = torch.empty((2,) + y[:2].shape, dtype=dtype, device=device)
        g_ai, g_sum, dm_step = torch.empty_like(y[:2]), torch.empty_like(dm), torch.empty_like(dm)
        for t in range(seq_len - 1, -1, -1):
            y[:2].addcmul_(y[2].unsqueeze(0), steps["dcn"][t])  # dn_t, dc_t
            torch.mul(y[:2].unsqueeze(0), steps["ga_gi"][t], out=prod)
            torch.sum(prod, 1, out=g_ai)  # [g_a, g_i]
            torch.sum(g_ai, 0, out=g_sum)
            torch.sub(dm, g_sum, out=dm_step)  # dL/dm_t
            torch.addcmul(g_ai[0], steps["w_a"][t], dm_step, out=dm_next)  # dL/da = dL/dm_{t-1}
            torch.sub(dm, dm_next, out=d_i[t])  # = g_i + (1 - w_a) * dm_t
            torch.mul(dm_next, steps["d_lf"][t], out=d_f[t])
            torch.mul(y[1:], steps["zo"][t], out=d_zo[t])
            torch.mul(y[:2], steps["carry"][t], out=y_next[:2])
            dh_in = d_out[t - 1] if t else torch.zeros_like(dh)  # the output gradient of step t-1 joins dh there
            if mask is None:
                torch.baddbmm(dh_in, draw_t[t], rt, out=y_next[2])
            else:
                torch.addcmul(dh_in, y[2], skip_dh[t], out=y_next[2]).baddbmm_(draw_t[t], rt)
            y, y_next, dm, dm_next = y_next, y, dm_next, dm
        dn, dc, dh = y.unbind(0)

        fresh0 = s0[2] == 0
        dm0 = torch.where(fresh0, torch.where(never, dm_given, 0.0), dm)
        d_state = [g.transpose(0, 1) for g in (dh, dc, dn, dm0)]  # each (B, NH, DH)
        d_gates = draw.permute(2, 0, 1, 3).to(ctx.gates_dtype)  # (B, S, NH, 4*DH)
        d_bias = draw.sum((0, 2)) if ctx.has_bias else None  # (NH, 4*DH)
        # dR[h] = sum over steps and batch of h_{t-1}^T draw_t
        h_prev = prev[:, 0].permute(1, 3, 0, 2).reshape(num_heads, head_dim, seq_len * batch_size)
        d_r = torch.bmm(h_prev, draw.transpose(0, 1).reshape(num_heads, seq_len * batch_size, four_dh))
        return d_gates, d_r, d_bias, *d_state, None, None


def slstm_fused_scan(
    gates: torch.Tensor,
    recurrent_kernel: torch.Tensor,
    bias: Optional[torch.Tensor],
    state,
    mask: Optional[torch.Tensor],
    forget_gate: str,
):
    """gates (B, S, NH, 4*DH), R (NH, DH, 4*DH), bias (NH, 4*DH) or None, state (h, c, n, m) of (B, NH, DH) or None,
    mask (B, S) bool or None -> outputs (B, S, NH, DH) in gates.dtype, final state (h, c, n, m) in float32 (float64
    for float64 gates); S >= 1. A single step without autograd (decoding) takes the reference's step, which is
    cheaper than setting up the buffers."""
    batch_size, seq_len, num_heads, four_dh = gates.shape
    tensors = (gates, recurrent_kernel, bias, *(state or ()))
    if seq_len == 1 and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return slstm_scan_reference(gates, recurrent_kernel, bias, state, mask, forget_gate)
    if state is None:
        zeros = torch.zeros(batch_size, num_heads, four_dh // 4, dtype=torch.float32, device=gates.device)
        state = (zeros,) * 4
    out, *final = SLSTMFusedFunction.apply(
        gates, recurrent_kernel, bias, *state, None if mask is None else mask.bool(), forget_gate == "exp"
    )
    return out, tuple(final)
