"""The sLSTM recurrence in pure PyTorch with a hand-written backward (BPTT): the "fused" backend of `slstm_op`.

Same contract as `slstm_op.slstm_scan_reference`. Internally time-major and head-major, so that each step is one
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
from torch.autograd.function import once_differentiable
import torch.nn.functional as F

from .slstm_op import slstm_scan_reference


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
        prev = s0
        for t in range(seq_len):
            raw_t = raw[t].baddbmm_(prev[0], r)  # (NH, B, 4*DH) += h_{t-1} @ R
            i, f, z, o = raw_t.unflatten(-1, (4, head_dim)).unbind(-2)
            h, c, n, m = st[t].unbind(0)
            if exp_forget:
                torch.add(f, prev[3], out=lf)  # a = log f + m_{t-1}
            else:
                torch.add(F.logsigmoid(f), prev[3], out=lf)
            torch.maximum(lf, i, out=m)
            torch.sub(i, m, out=ig)
            torch.sub(lf, m, out=fg)
            if_gates.exp_()
            torch.tanh(z, out=zt)
            torch.mul(ig, zt, out=c).addcmul_(fg, prev[1])
            torch.addcmul(ig, fg, prev[2], out=n)
            torch.sigmoid(o, out=og)
            torch.div(c, n, out=h).mul_(og)
            if keep is not None:
                torch.where(keep[t], st[t], prev, out=st[t])
            prev = st[t]

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

        def state_grad(g):  # (B, NH, DH) or None -> (NH, B, DH)
            return torch.zeros_like(s0[0]) if g is None else g.to(dtype).transpose(0, 1).contiguous()

        dh, dc, dn, dm = (state_grad(g) for g in (dh_t, dc_t, dn_t, dm_t))
        never = st[-1, 2] == 0
        dm_given = dm
        dm = dm.masked_fill(never, 0.0)  # those elements return the given m, not the internal -inf
        d_out = (
            torch.zeros(seq_len, num_heads, batch_size, head_dim, dtype=dtype, device=device)
            if d_out is None
            else d_out.to(dtype).permute(1, 2, 0, 3)  # (S, NH, B, DH)
        )

        # Gate activations of every step at once (bit-identical to the forward's).
        prev = torch.cat([s0[None], st[:-1]])  # (S, 4, NH, B, DH) state before each step
        i, f, z, o = raw.unflatten(-1, (4, head_dim)).unbind(-2)
        h, c, n, m = st.unbind(1)
        c_prev, n_prev, m_prev = prev[:, 1], prev[:, 2], prev[:, 3]
        a = (f if ctx.exp_forget else F.logsigmoid(f)) + m_prev
        ig, fg = torch.exp(i - m), torch.exp(a - m)
        zt, og = torch.tanh(z), torch.sigmoid(o)
        d_lf = torch.ones_like(f) if ctx.exp_forget else torch.sigmoid(-f)
        w_a = (a > i).to(dtype) + 0.5 * (a == i).to(dtype)  # torch.maximum splits ties evenly
        inv_n = 1.0 / n
        coef = {
            "dh_c": og * inv_n,  # dc += dh * og/n
            "dh_n": h * inv_n,  # dn -= dh * h/n
            "carry": fg,  # dc_{t-1} = dc * f', dn_{t-1} = dn * f'
            "fa_c": c_prev * fg, "fa_n": n_prev * fg,  # d(a) from f' = exp(a - m)
            "ig_c": zt * ig, "ig_n": ig,  # d(ĩ) from i' = exp(ĩ - m)
            "w_a": w_a, "d_lf": d_lf,
            "z": ig * (1 - zt * zt), "o": h * (1 - og),
        }
        if mask is not None:  # a masked step is the identity on the state
            skip = ~mask.t().reshape(seq_len, 1, batch_size, 1)
            ident = {"carry": 1.0, "w_a": 1.0}
            coef = {k: torch.where(skip, ident.get(k, 0.0), v) for k, v in coef.items()}
        coef = {k: v.contiguous() for k, v in coef.items()}

        draw = torch.empty_like(raw)  # (S, NH, B, 4*DH): dL/d(pre-activation) = dL/d(gates)
        rt = r.transpose(1, 2).contiguous()  # (NH, 4*DH, DH)
        g_a, g_i, dm_step = (torch.empty_like(dh) for _ in range(3))
        for t in range(seq_len - 1, -1, -1):
            k = {name: v[t] for name, v in coef.items()}
            d_i, d_f, d_z, d_o = draw[t].unflatten(-1, (4, head_dim)).unbind(-2)
            dh = dh + d_out[t]
            dc = torch.addcmul(dc, dh, k["dh_c"])
            dn = torch.addcmul(dn, dh, k["dh_n"], value=-1.0)
            torch.mul(dc, k["fa_c"], out=g_a).addcmul_(dn, k["fa_n"])
            torch.mul(dc, k["ig_c"], out=g_i).addcmul_(dn, k["ig_n"])
            torch.sub(dm, g_a, out=dm_step).sub_(g_i)  # dL/dm_t
            da = torch.addcmul(g_a, k["w_a"], dm_step)  # dL/da = dL/dm_{t-1}
            torch.sub(dm, da, out=d_i)  # = g_i + (1 - w_a) * dm_t
            torch.mul(da, k["d_lf"], out=d_f)
            torch.mul(dc, k["z"], out=d_z)
            torch.mul(dh, k["o"], out=d_o)
            dc, dn, dm = dc * k["carry"], dn * k["carry"], da
            if mask is None:
                dh = torch.bmm(draw[t], rt)
            else:
                dh = torch.baddbmm(dh * skip[t], draw[t], rt)

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
    for float64 gates). A single step without autograd (decoding) takes the reference's step, which is cheaper than
    setting up the buffers."""
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
