"""The sLSTM recurrence as Triton kernels: the "triton" backend, registered as the CUDA implementation of the same
`slstm::scan` / `slstm::scan_backward` ops whose CPU implementation is the C++ kernel (`slstm_cpu`), so there is one
op, one fake implementation and one autograd formula. `slstm_op` imports this module only when the triton backend is
chosen or a call on CUDA tensors asks for it; importing the package never imports triton.

Design. One program per (head, block of BLOCK_B = 16 batch rows): heads are independent over the whole sequence,
so a program runs its rows through every time step alone, and the gate math of a step is fused into one pass over
the tile, in float32 whatever the input dtype. DP = max(16, next power of two >= DH): `tl.dot` wants at least 16
per dimension; padded units and rows are masked out of every load and store.
  - Head dims up to ON_CHIP_HEAD_DIM = 64: the head's R (DH x 4*DH) is loaded once, as four zero-padded (DP, DP)
    float32 tiles, and stays on chip (registers) across the time loop; each step is four `tl.dot`s of the rows'
    h_{t-1} (BLOCK_B, DP) with them. The backward keeps R^T on chip the same way and carries (dh, dc, dn, dm) in
    registers from the last step to the first. Four 64 x 64 float32 tiles are 64 KiB per program, about what a
    GPU's register file holds next to the state.
  - Larger heads, up to MAX_HEAD_DIM = 512 (the presets' 192-512; R would be 0.6-4 MiB): the "streamed" kernels
    read R in (32, 32) tiles from global memory (L2-resident) every step, and keep the state in a scratch of two
    halves (read one, write the other) with a barrier between steps, since every unit of h_{t-1} feeds every unit
    of step t. Beyond 512, "fused" runs (`slstm_op` warns once).
Both read and write exactly the tensors of the C++ kernel (saved_g = [i', f', tanh z̃, sigmoid õ],
saved_a = [c, n, w, d log f / d f̃]); dR and db are one reduction over all steps afterwards, in the op's shared
autograd formula (`slstm_cpu.scan_gradients`). GPU speed is unmeasured: no GPU was available when they were written.

Without a GPU: with TRITON_INTERPRET=1 set before this module is imported, Triton defines the kernels as
interpreted functions that run on CPU tensors (numpy). CPU tensors cannot reach the op's CUDA registration, so
`scan` gives them `InterpretedScan`: the same launch functions and the same autograd formula, applied directly.
"""

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from modeling_slstm import slstm_cpu
from modeling_slstm.slstm_cpu import check_tensor


KERNEL_API = 1  # slstm_op uses this module only at the API it was written for
ON_CHIP_HEAD_DIM = 64  # up to here R stays on chip; above it R is streamed from L2 in tiles every step
MAX_HEAD_DIM = 512  # the largest preset's head (1.3b: 2048 / 4) and the largest the tests run; above: "fused"
BLOCK_B = 16  # batch rows per program: the M dimension of the per-step tl.dot, at least 16
STREAM_TILE = 32  # (units, inputs) tile of R in the streamed kernels
# Warps, tiles and num_stages=1 (no multi-buffering of loop operands) are chosen so that every kernel, compiled for
# sm_80 and sm_90 with triton 3.9's ptxas, fits 99 KiB of shared memory (sm_86/89's limit) with at most a few dozen
# bytes of register spill (tests/test_triton.py compiles them; no GPU is needed). Speed is untuned: no GPU to measure.
INTERPRETED = bool(triton.knobs.runtime.interpret)  # fixed when the kernels below are defined
# The kernels call only Triton's builtins and this module's own helpers: triton.language's @jit helpers (tl.zeros,
# tl.sigmoid, ...) stay compiled-only when triton was imported (e.g. by torch) before TRITON_INTERPRET was set.
_F32 = torch.float32


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _keep(mask, rows, row_ok, S, t):
    """Whether step t is taken, per row: (BLOCK, 1)."""
    return (tl.load(mask + rows * S + t, mask=row_ok, other=0) != 0)[:, None]


@triton.jit
def _cell_step(raw_i, raw_f, raw_z, raw_o, h, c, n, m, keep, HAS_MASK: tl.constexpr, EXP_FORGET: tl.constexpr):
    """One step of the gate math on a tile of pre-activations -> the new (h, c, n, m) (a row whose step is not kept
    keeps its own), the gates i', f', tanh z, sigmoid o, and `first` and a = log f + m_{t-1} for `_save_step`."""
    if EXP_FORGET:
        log_f = raw_f
    else:
        log_f = _log_sigmoid(raw_f)
    first = n == 0.0  # per element: no step taken yet, m = ĩ
    a = log_f + m
    m_run = tl.maximum(a, raw_i)
    m_new = tl.where(first, raw_i, m_run)
    ig = tl.exp(raw_i - m_new)
    fg = tl.where(first, 0.0, tl.exp(a - m_run))
    zt = _tanh(raw_z)
    og = _sigmoid(raw_o)
    c_new = fg * c + ig * zt
    n_new = fg * n + ig
    h_new = og * c_new / n_new
    if HAS_MASK:
        h_new = tl.where(keep, h_new, h)
        c_new = tl.where(keep, c_new, c)
        n_new = tl.where(keep, n_new, n)
        m_new = tl.where(keep, m_new, m)
    return h_new, c_new, n_new, m_new, ig, fg, zt, og, first, a


@triton.jit
def _save_step(saved_g, saved_a, g_off, ok, ig, fg, zt, og, c, n, first, a, raw_i, raw_f, DH: tl.constexpr,
               EXP_FORGET: tl.constexpr):
    """What the backward reads of a step: saved_g [i', f', tanh z, sigmoid o], saved_a [c, n after the step (a
    masked step: the carried ones), the tie weight w of the stabiliser max, d log f / d f̃]."""
    tl.store(saved_g + g_off, ig, mask=ok)
    tl.store(saved_g + g_off + DH, fg, mask=ok)
    tl.store(saved_g + g_off + 2 * DH, zt, mask=ok)
    tl.store(saved_g + g_off + 3 * DH, og, mask=ok)
    tl.store(saved_a + g_off, c, mask=ok)
    tl.store(saved_a + g_off + DH, n, mask=ok)
    w = tl.where(first, 0.0, tl.where(a > raw_i, 1.0, tl.where(a == raw_i, 0.5, 0.0)))  # ties as torch.max
    tl.store(saved_a + g_off + 2 * DH, w, mask=ok)
    if EXP_FORGET:
        tl.store(saved_a + g_off + 3 * DH, tl.full(raw_f.shape, 1.0, tl.float32), mask=ok)
    else:
        ef = tl.exp(-tl.abs(raw_f))
        tl.store(saved_a + g_off + 3 * DH, tl.where(raw_f >= 0.0, ef, 1.0) / (1.0 + ef), mask=ok)


@triton.jit
def _cell_backward(saved_g, saved_a, state0, g_off, prev, s_off, slab, t, ok, go, dh, dc, dn, dm, keep,
                   DH: tl.constexpr, HAS_MASK: tl.constexpr):
    """One step of the backward on a tile, from what the forward saved: the carried gradients (dh, dc, dn, dm) of the
    state after step t -> the gate gradients (d_i, d_f, d_z, d_o) and the carries to step t - 1 (dh before its
    R^T term). A step not kept is the identity on the state: gradients pass through, none reach its gates."""
    ig = tl.load(saved_g + g_off, mask=ok, other=0.0)
    fg = tl.load(saved_g + g_off + DH, mask=ok, other=0.0)
    zt = tl.load(saved_g + g_off + 2 * DH, mask=ok, other=0.0)
    og = tl.load(saved_g + g_off + 3 * DH, mask=ok, other=0.0)
    c = tl.load(saved_a + g_off, mask=ok, other=0.0)
    n = tl.load(saved_a + g_off + DH, mask=ok, other=1.0)  # padding: 1, so 1/n stays finite
    w = tl.load(saved_a + g_off + 2 * DH, mask=ok, other=0.0)
    dlog_f = tl.load(saved_a + g_off + 3 * DH, mask=ok, other=0.0)
    # c, n before the step: saved_a of step t-1 (at `prev`), or the initial state
    c_prev = tl.where(t > 0, tl.load(saved_a + prev, mask=ok, other=0.0),
                      tl.load(state0 + slab + s_off, mask=ok, other=0.0))
    n_prev = tl.where(t > 0, tl.load(saved_a + prev + DH, mask=ok, other=0.0),
                      tl.load(state0 + 2 * slab + s_off, mask=ok, other=0.0))
    inv_n = 1.0 / tl.where(n == 0.0, 1.0, n)  # n = 0: never stepped, this step masked
    h = og * c * inv_n
    dht = dh + go
    dct = dc + dht * og * inv_n
    dnt = dn - dht * h * inv_n
    g_a = (dct * c_prev + dnt * n_prev) * fg  # dL/da through f' = exp(a - m), a = log f + m_{t-1}
    g_i = (dct * zt + dnt) * ig  # dL/dĩ through i' = exp(ĩ - m)
    dmt = dm - g_a - g_i  # dL/dm_t
    da = g_a + w * dmt  # = dL/dm_{t-1}
    d_i = dm - da
    d_f = da * dlog_f
    d_z = dct * ig * (1.0 - zt * zt)
    d_o = dht * h * (1.0 - og)
    if HAS_MASK:
        d_i = tl.where(keep, d_i, 0.0)
        d_f = tl.where(keep, d_f, 0.0)
        d_z = tl.where(keep, d_z, 0.0)
        d_o = tl.where(keep, d_o, 0.0)
        dc = tl.where(keep, dct * fg, dc)
        dn = tl.where(keep, dnt * fg, dn)
        dm = tl.where(keep, da, dm)
        dh = tl.where(keep, 0.0, dht)
    else:
        dc, dn, dm = dct * fg, dnt * fg, da
        dh = tl.full(dht.shape, 0.0, tl.float32)
    return d_i, d_f, d_z, d_o, dh, dc, dn, dm


@triton.jit
def _scan_forward_kernel(
    gates, R, bias, state, mask, out, saved_g, saved_a, B, S, NH,
    DH: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, EXP_FORGET: tl.constexpr, SAVE: tl.constexpr,
):
    """gates (B, S, NH, 4*DH), R (NH, DH, 4*DH), bias (NH, 4*DH), state (4, B, NH, DH) in: initial, out: final,
    mask (B, S), out (B, S, NH, DH), saved_g / saved_a (B, S, NH, 4*DH); all contiguous, float32 but the mask."""
    head = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    units = tl.arange(0, DP)  # (DP,)
    row_ok, unit_ok = rows < B, units < DH
    ok = row_ok[:, None] & unit_ok[None, :]  # (BLOCK, DP)
    rows = rows.to(tl.int64)

    # R[head, k, g*DH + j] as four (DP, DP) tiles [k, j], zero-padded: on chip for the whole sequence
    r_tile = R + head * DH * 4 * DH + units[:, None] * (4 * DH) + units[None, :]
    r_ok = unit_ok[:, None] & unit_ok[None, :]
    r_i = tl.load(r_tile, mask=r_ok, other=0.0)
    r_f = tl.load(r_tile + DH, mask=r_ok, other=0.0)
    r_z = tl.load(r_tile + 2 * DH, mask=r_ok, other=0.0)
    r_o = tl.load(r_tile + 3 * DH, mask=r_ok, other=0.0)
    b_i = tl.full((DP,), 0.0, tl.float32)
    b_f = tl.full((DP,), 0.0, tl.float32)
    b_z = tl.full((DP,), 0.0, tl.float32)
    b_o = tl.full((DP,), 0.0, tl.float32)
    if HAS_BIAS:
        b_i = tl.load(bias + head * 4 * DH + units, mask=unit_ok, other=0.0)
        b_f = tl.load(bias + head * 4 * DH + DH + units, mask=unit_ok, other=0.0)
        b_z = tl.load(bias + head * 4 * DH + 2 * DH + units, mask=unit_ok, other=0.0)
        b_o = tl.load(bias + head * 4 * DH + 3 * DH + units, mask=unit_ok, other=0.0)

    slab = B * NH * DH  # one of h, c, n, m in `state`
    s_off = rows[:, None] * (NH * DH) + head * DH + units[None, :]  # (BLOCK, DP)
    h = tl.load(state + s_off, mask=ok, other=0.0)
    c = tl.load(state + slab + s_off, mask=ok, other=0.0)
    n = tl.load(state + 2 * slab + s_off, mask=ok, other=0.0)
    m = tl.load(state + 3 * slab + s_off, mask=ok, other=0.0)
    for t in range(S):
        g_off = ((rows[:, None] * S + t) * NH + head) * (4 * DH) + units[None, :]  # (BLOCK, DP) into gates
        raw_i = tl.load(gates + g_off, mask=ok, other=0.0) + b_i[None, :]
        raw_f = tl.load(gates + g_off + DH, mask=ok, other=0.0) + b_f[None, :]
        raw_z = tl.load(gates + g_off + 2 * DH, mask=ok, other=0.0) + b_z[None, :]
        raw_o = tl.load(gates + g_off + 3 * DH, mask=ok, other=0.0) + b_o[None, :]
        raw_i += tl.dot(h, r_i, input_precision="ieee")  # + h_{t-1} @ R, float32 FMA (not TF32)
        raw_f += tl.dot(h, r_f, input_precision="ieee")
        raw_z += tl.dot(h, r_z, input_precision="ieee")
        raw_o += tl.dot(h, r_o, input_precision="ieee")
        keep = _keep(mask, rows, row_ok, S, t) if HAS_MASK else None
        h, c, n, m, ig, fg, zt, og, first, a = _cell_step(raw_i, raw_f, raw_z, raw_o, h, c, n, m, keep, HAS_MASK,
                                                          EXP_FORGET)
        tl.store(out + ((rows[:, None] * S + t) * NH + head) * DH + units[None, :], h, mask=ok)
        if SAVE:
            _save_step(saved_g, saved_a, g_off, ok, ig, fg, zt, og, c, n, first, a, raw_i, raw_f, DH, EXP_FORGET)
    tl.store(state + s_off, h, mask=ok)
    tl.store(state + slab + s_off, c, mask=ok)
    tl.store(state + 2 * slab + s_off, n, mask=ok)
    tl.store(state + 3 * slab + s_off, m, mask=ok)


@triton.jit
def _scan_backward_kernel(
    RT, state0, mask, saved_g, saved_a, d_out, d_state, d_gates, B, S, NH,
    DH: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """RT (NH, 4*DH, DH) = R transposed per head, state0 (4, B, NH, DH), mask (B, S), saved_g / saved_a of the
    forward, d_out (B, S, NH, DH), d_state (4, B, NH, DH) in: dL/d(final state), out: dL/d(initial state),
    d_gates (B, S, NH, 4*DH) out."""
    head = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    units = tl.arange(0, DP)  # (DP,)
    row_ok, unit_ok = rows < B, units < DH
    ok = row_ok[:, None] & unit_ok[None, :]  # (BLOCK, DP)
    rows = rows.to(tl.int64)

    # RT[head, g*DH + j, k] as four (DP, DP) tiles [j, k], zero-padded: on chip for the whole sequence
    rt_tile = RT + head * 4 * DH * DH + units[:, None] * DH + units[None, :]
    r_ok = unit_ok[:, None] & unit_ok[None, :]
    rt_i = tl.load(rt_tile, mask=r_ok, other=0.0)
    rt_f = tl.load(rt_tile + DH * DH, mask=r_ok, other=0.0)
    rt_z = tl.load(rt_tile + 2 * DH * DH, mask=r_ok, other=0.0)
    rt_o = tl.load(rt_tile + 3 * DH * DH, mask=r_ok, other=0.0)

    slab = B * NH * DH
    s_off = rows[:, None] * (NH * DH) + head * DH + units[None, :]  # (BLOCK, DP)
    dh = tl.load(d_state + s_off, mask=ok, other=0.0)
    dc = tl.load(d_state + slab + s_off, mask=ok, other=0.0)
    dn = tl.load(d_state + 2 * slab + s_off, mask=ok, other=0.0)
    dm = tl.load(d_state + 3 * slab + s_off, mask=ok, other=0.0)
    for k in range(S):
        t = S - 1 - k
        g_off = ((rows[:, None] * S + t) * NH + head) * (4 * DH) + units[None, :]  # (BLOCK, DP)
        prev = ((rows[:, None] * S + tl.maximum(t - 1, 0)) * NH + head) * (4 * DH) + units[None, :]  # step t-1
        go = tl.load(d_out + ((rows[:, None] * S + t) * NH + head) * DH + units[None, :], mask=ok, other=0.0)
        keep = _keep(mask, rows, row_ok, S, t) if HAS_MASK else None
        d_i, d_f, d_z, d_o, dh, dc, dn, dm = _cell_backward(saved_g, saved_a, state0, g_off, prev, s_off, slab, t, ok,
                                                            go, dh, dc, dn, dm, keep, DH, HAS_MASK)
        tl.store(d_gates + g_off, d_i, mask=ok)
        tl.store(d_gates + g_off + DH, d_f, mask=ok)
        tl.store(d_gates + g_off + 2 * DH, d_z, mask=ok)
        tl.store(d_gates + g_off + 3 * DH, d_o, mask=ok)
        # dh_{t-1} += d(pre-activations)_t @ R^T
        dh += tl.dot(d_i, rt_i, input_precision="ieee") + tl.dot(d_f, rt_f, input_precision="ieee")
        dh += tl.dot(d_z, rt_z, input_precision="ieee") + tl.dot(d_o, rt_o, input_precision="ieee")
    tl.store(d_state + s_off, dh, mask=ok)
    tl.store(d_state + slab + s_off, dc, mask=ok)
    tl.store(d_state + 2 * slab + s_off, dn, mask=ok)
    tl.store(d_state + 3 * slab + s_off, dm, mask=ok)


@triton.jit
def _scan_forward_streamed_kernel(
    gates, R, bias, state, mask, out, saved_g, saved_a, work, B, S, NH,
    DH: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, EXP_FORGET: tl.constexpr, SAVE: tl.constexpr,
):
    """`_scan_forward_kernel` for heads whose R does not fit on chip: R is read from global memory (L2) in
    (BN, BN) tiles every step, and the state goes through `work` (2, 4, B, NH, DH), read from one half and written to
    the other at each step, with a barrier between steps (every unit of h_{t-1} feeds every unit of step t)."""
    head = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    cols = tl.arange(0, BN)  # (BN,)
    row_ok = rows < B
    rows = rows.to(tl.int64)
    slab = B * NH * DH  # one of h, c, n, m
    base = rows[:, None] * (NH * DH) + head * DH  # (BLOCK, 1) into a slab
    for j0 in range(0, DP, BN):  # work[0] = the initial state
        ok = row_ok[:, None] & (j0 + cols < DH)[None, :]  # (BLOCK, BN)
        for q in tl.static_range(4):
            tl.store(work + q * slab + base + j0 + cols[None, :],
                     tl.load(state + q * slab + base + j0 + cols[None, :], mask=ok, other=0.0), mask=ok)
    tl.debug_barrier()
    for t in range(S):
        cur = work + (t % 2) * 4 * slab
        nxt = work + ((t + 1) % 2) * 4 * slab
        for j0 in range(0, DP, BN):  # a tile of BN units of step t
            units = j0 + cols
            unit_ok = units < DH
            ok = row_ok[:, None] & unit_ok[None, :]  # (BLOCK, BN)
            g_off = ((rows[:, None] * S + t) * NH + head) * (4 * DH) + units[None, :]  # (BLOCK, BN) into gates
            raw_i = tl.load(gates + g_off, mask=ok, other=0.0)
            raw_f = tl.load(gates + g_off + DH, mask=ok, other=0.0)
            raw_z = tl.load(gates + g_off + 2 * DH, mask=ok, other=0.0)
            raw_o = tl.load(gates + g_off + 3 * DH, mask=ok, other=0.0)
            if HAS_BIAS:
                raw_i += tl.load(bias + head * 4 * DH + units, mask=unit_ok, other=0.0)[None, :]
                raw_f += tl.load(bias + head * 4 * DH + DH + units, mask=unit_ok, other=0.0)[None, :]
                raw_z += tl.load(bias + head * 4 * DH + 2 * DH + units, mask=unit_ok, other=0.0)[None, :]
                raw_o += tl.load(bias + head * 4 * DH + 3 * DH + units, mask=unit_ok, other=0.0)[None, :]
            for k0 in range(0, DP, BN):  # + h_{t-1}[:, k-tile] @ R[head, k-tile, g*DH + units]
                inputs = k0 + cols
                input_ok = inputs < DH
                h_k = tl.load(cur + base + inputs[None, :], mask=row_ok[:, None] & input_ok[None, :], other=0.0)
                r_tile = R + head * DH * 4 * DH + inputs[:, None] * (4 * DH) + units[None, :]  # (BN, BN)
                r_ok = input_ok[:, None] & unit_ok[None, :]
                raw_i += tl.dot(h_k, tl.load(r_tile, mask=r_ok, other=0.0), input_precision="ieee")
                raw_f += tl.dot(h_k, tl.load(r_tile + DH, mask=r_ok, other=0.0), input_precision="ieee")
                raw_z += tl.dot(h_k, tl.load(r_tile + 2 * DH, mask=r_ok, other=0.0), input_precision="ieee")
                raw_o += tl.dot(h_k, tl.load(r_tile + 3 * DH, mask=r_ok, other=0.0), input_precision="ieee")
            s_off = base + units[None, :]  # (BLOCK, BN)
            h = tl.load(cur + s_off, mask=ok, other=0.0)
            c = tl.load(cur + slab + s_off, mask=ok, other=0.0)
            n = tl.load(cur + 2 * slab + s_off, mask=ok, other=0.0)
            m = tl.load(cur + 3 * slab + s_off, mask=ok, other=0.0)
            keep = _keep(mask, rows, row_ok, S, t) if HAS_MASK else None
            h, c, n, m, ig, fg, zt, og, first, a = _cell_step(raw_i, raw_f, raw_z, raw_o, h, c, n, m, keep, HAS_MASK,
                                                              EXP_FORGET)
            tl.store(nxt + s_off, h, mask=ok)
            tl.store(nxt + slab + s_off, c, mask=ok)
            tl.store(nxt + 2 * slab + s_off, n, mask=ok)
            tl.store(nxt + 3 * slab + s_off, m, mask=ok)
            tl.store(out + ((rows[:, None] * S + t) * NH + head) * DH + units[None, :], h, mask=ok)
            if SAVE:
                _save_step(saved_g, saved_a, g_off, ok, ig, fg, zt, og, c, n, first, a, raw_i, raw_f, DH, EXP_FORGET)
        tl.debug_barrier()  # step t's state complete before step t + 1 reads it
    last = work + (S % 2) * 4 * slab
    for j0 in range(0, DP, BN):
        ok = row_ok[:, None] & (j0 + cols < DH)[None, :]
        for q in tl.static_range(4):
            tl.store(state + q * slab + base + j0 + cols[None, :],
                     tl.load(last + q * slab + base + j0 + cols[None, :], mask=ok, other=0.0), mask=ok)


@triton.jit
def _scan_backward_streamed_kernel(
    RT, state0, mask, saved_g, saved_a, d_out, d_state, d_gates, work, B, S, NH,
    DH: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """`_scan_backward_kernel` for heads whose R does not fit on chip: the carried (dh, dc, dn, dm) go through
    `work` (2, 4, B, NH, DH) as the forward's state does; each step first writes d_gates and the carries of its
    units (phase 1), then, after a barrier, adds d_gates_t @ R^T (read in (BN, BN) tiles) into dh (phase 2)."""
    head = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    cols = tl.arange(0, BN)  # (BN,)
    row_ok = rows < B
    rows = rows.to(tl.int64)
    slab = B * NH * DH
    base = rows[:, None] * (NH * DH) + head * DH  # (BLOCK, 1) into a slab
    for j0 in range(0, DP, BN):  # work[0] = the gradient of the final state
        ok = row_ok[:, None] & (j0 + cols < DH)[None, :]
        for q in tl.static_range(4):
            tl.store(work + q * slab + base + j0 + cols[None, :],
                     tl.load(d_state + q * slab + base + j0 + cols[None, :], mask=ok, other=0.0), mask=ok)
    tl.debug_barrier()
    for k in range(S):
        t = S - 1 - k
        cur = work + (k % 2) * 4 * slab
        nxt = work + ((k + 1) % 2) * 4 * slab
        keep = _keep(mask, rows, row_ok, S, t) if HAS_MASK else None
        for j0 in range(0, DP, BN):  # phase 1: the gate gradients and carries of BN units
            units = j0 + cols
            ok = row_ok[:, None] & (units < DH)[None, :]  # (BLOCK, BN)
            g_off = ((rows[:, None] * S + t) * NH + head) * (4 * DH) + units[None, :]  # (BLOCK, BN)
            s_off = base + units[None, :]
            prev = ((rows[:, None] * S + tl.maximum(t - 1, 0)) * NH + head) * (4 * DH) + units[None, :]
            go = tl.load(d_out + ((rows[:, None] * S + t) * NH + head) * DH + units[None, :], mask=ok, other=0.0)
            dh = tl.load(cur + s_off, mask=ok, other=0.0)
            dc = tl.load(cur + slab + s_off, mask=ok, other=0.0)
            dn = tl.load(cur + 2 * slab + s_off, mask=ok, other=0.0)
            dm = tl.load(cur + 3 * slab + s_off, mask=ok, other=0.0)
            d_i, d_f, d_z, d_o, dh, dc, dn, dm = _cell_backward(saved_g, saved_a, state0, g_off, prev, s_off, slab, t,
                                                                ok, go, dh, dc, dn, dm, keep, DH, HAS_MASK)
            tl.store(d_gates + g_off, d_i, mask=ok)
            tl.store(d_gates + g_off + DH, d_f, mask=ok)
            tl.store(d_gates + g_off + 2 * DH, d_z, mask=ok)
            tl.store(d_gates + g_off + 3 * DH, d_o, mask=ok)
            tl.store(nxt + s_off, dh, mask=ok)
            tl.store(nxt + slab + s_off, dc, mask=ok)
            tl.store(nxt + 2 * slab + s_off, dn, mask=ok)
            tl.store(nxt + 3 * slab + s_off, dm, mask=ok)
        tl.debug_barrier()  # every unit's gate gradients of step t written
        for k0 in range(0, DP, BN):  # phase 2: dh_{t-1}[:, k-tile] += d_gates_t @ R^T[:, k-tile]
            inputs = k0 + cols
            input_ok = inputs < DH
            acc = tl.full((BLOCK, BN), 0.0, tl.float32)
            for j0 in range(0, DP, BN):
                units = j0 + cols
                unit_ok = units < DH
                d_ok = row_ok[:, None] & unit_ok[None, :]
                g_off = ((rows[:, None] * S + t) * NH + head) * (4 * DH) + units[None, :]
                rt_tile = RT + head * 4 * DH * DH + units[:, None] * DH + inputs[None, :]  # (BN, BN)
                rt_ok = unit_ok[:, None] & input_ok[None, :]
                for g in tl.static_range(4):
                    acc += tl.dot(tl.load(d_gates + g_off + g * DH, mask=d_ok, other=0.0),
                                  tl.load(rt_tile + g * DH * DH, mask=rt_ok, other=0.0), input_precision="ieee")
            ok = row_ok[:, None] & input_ok[None, :]
            dh_off = nxt + base + inputs[None, :]
            tl.store(dh_off, tl.load(dh_off, mask=ok, other=0.0) + acc, mask=ok)
        tl.debug_barrier()  # dh_{t-1} complete before step t - 1 reads it
    last = work + (S % 2) * 4 * slab
    for j0 in range(0, DP, BN):
        ok = row_ok[:, None] & (j0 + cols < DH)[None, :]
        for q in tl.static_range(4):
            tl.store(d_state + q * slab + base + j0 + cols[None, :],
                     tl.load(last + q * slab + base + j0 + cols[None, :], mask=ok, other=0.0), mask=ok)


# ------------------------------------------------------------------------------------------------------- launches
def launch_settings(head_dim: int) -> tuple[bool, dict, dict]:
    """(streamed, the kernels' tile constants, Triton's compile options) for this head dim."""
    padded = max(16, triton.next_power_of_2(head_dim))
    streamed = head_dim > ON_CHIP_HEAD_DIM
    tiles = dict(DH=head_dim, DP=padded, BLOCK=BLOCK_B, **(dict(BN=STREAM_TILE) if streamed else {}))
    options = dict(num_warps=8 if streamed or padded > 16 else 4, num_stages=1, enable_fp_fusion=True)
    return streamed, tiles, options


def _launch(kernels: tuple, device: torch.device, tensors: tuple, batch_size: int, seq_len: int, num_heads: int,
            head_dim: int, **flags) -> None:
    """Run the on-chip kernel of `kernels` (head dims up to ON_CHIP_HEAD_DIM) or the streamed one (up to
    MAX_HEAD_DIM, with its scratch) on the grid (heads, batch blocks)."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"sLSTM Triton kernel: head dim {head_dim} exceeds the supported {MAX_HEAD_DIM}.")
    streamed, tiles, options = launch_settings(head_dim)
    scratch = (torch.empty((2, 4, batch_size, num_heads, head_dim), dtype=_F32, device=device),) if streamed else ()
    grid = (num_heads, triton.cdiv(batch_size, BLOCK_B))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernels[streamed][grid](*tensors, *scratch, batch_size, seq_len, num_heads, **tiles, **options, **flags)


def _device(gates: Tensor) -> torch.device:
    """The device the kernels run on for these gates: CUDA, or CPU when the kernels are interpreted."""
    if not isinstance(gates, Tensor) or gates.dim() != 4:
        raise ValueError(f"sLSTM Triton kernel: `gates` must be a 4-D tensor, got {getattr(gates, 'shape', gates)}.")
    if gates.device.type != "cuda" and not (INTERPRETED and gates.device.type == "cpu"):
        raise ValueError(
            f"sLSTM Triton kernel: tensors on {gates.device} cannot run here; the kernels take CUDA tensors, or CPU "
            f"tensors when TRITON_INTERPRET=1 was set before {__name__} was imported."
        )
    return gates.device


def scan_forward(
    gates: Tensor, recurrent_kernel: Tensor, bias: Optional[Tensor], state: Tensor, mask: Optional[Tensor],
    exp_forget: bool, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`slstm::scan` on the Triton kernel (its CUDA implementation): the same arguments and results as the C++ one."""
    device = _device(gates)
    batch_size, seq_len, num_heads, four_dh = gates.shape
    head_dim = four_dh // 4
    check_tensor("gates", gates, (batch_size, seq_len, num_heads, 4 * head_dim), device=device)
    check_tensor("recurrent_kernel", recurrent_kernel, (num_heads, head_dim, four_dh), device=device)
    check_tensor("bias", bias, (num_heads, four_dh), optional=True, device=device)
    check_tensor("state", state, (4, batch_size, num_heads, head_dim), device=device)
    check_tensor("mask", mask, (batch_size, seq_len), torch.bool, optional=True, device=device)
    out = torch.empty((batch_size, seq_len, num_heads, head_dim), dtype=_F32, device=device)
    final = state.clone()  # updated in place by the kernel
    saved = (batch_size, seq_len, num_heads, four_dh) if save else (0,)
    saved_g, saved_a = (torch.empty(saved, dtype=_F32, device=device) for _ in range(2))
    if gates.numel():
        tensors = (gates, recurrent_kernel, out if bias is None else bias, final, out if mask is None else mask, out,
                   saved_g if save else out, saved_a if save else out)  # `out` stands in for what is absent
        _launch((_scan_forward_kernel, _scan_forward_streamed_kernel), device, tensors, batch_size, seq_len,
                num_heads, head_dim, HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
                EXP_FORGET=bool(exp_forget), SAVE=bool(save))
    return out, final, saved_g, saved_a


def scan_backward(
    recurrent_kernel_t: Tensor, state0: Tensor, mask: Optional[Tensor], saved_g: Tensor, saved_a: Tensor,
    d_out: Tensor, d_state: Tensor,
) -> tuple[Tensor, Tensor]:
    """`slstm::scan_backward` on the Triton kernel (its CUDA implementation): the same arguments and results as the
    C++ one."""
    device = _device(d_out)
    batch_size, seq_len, num_heads, head_dim = d_out.shape
    four_dh = 4 * head_dim
    check_tensor("d_out", d_out, (batch_size, seq_len, num_heads, head_dim), device=device)
    check_tensor("recurrent_kernel_t", recurrent_kernel_t, (num_heads, four_dh, head_dim), device=device)
    check_tensor("state0", state0, (4, batch_size, num_heads, head_dim), device=device)
    check_tensor("mask", mask, (batch_size, seq_len), torch.bool, optional=True, device=device)
    check_tensor("saved_g", saved_g, (batch_size, seq_len, num_heads, four_dh), device=device)
    check_tensor("saved_a", saved_a, (batch_size, seq_len, num_heads, four_dh), device=device)
    check_tensor("d_state", d_state, (4, batch_size, num_heads, head_dim), device=device)
    d_state0 = d_state.clone()  # updated in place by the kernel
    d_gates = torch.empty((batch_size, seq_len, num_heads, four_dh), dtype=_F32, device=device)
    if d_out.numel():
        tensors = (recurrent_kernel_t, state0, d_out if mask is None else mask, saved_g, saved_a, d_out, d_state0,
                   d_gates)
        _launch((_scan_backward_kernel, _scan_backward_streamed_kernel), device, tensors, batch_size, seq_len,
                num_heads, head_dim, HAS_MASK=mask is not None)
    return d_gates, d_state0


torch.library.register_kernel("slstm::scan", "cuda", scan_forward)
torch.library.register_kernel("slstm::scan_backward", "cuda", scan_backward)


class InterpretedScan(torch.autograd.Function):
    """`slstm::scan` for CPU tensors under TRITON_INTERPRET=1: the op's CUDA kernels (`scan_forward`,
    `scan_backward`) with the op's autograd formula, called directly (CPU tensors dispatch to the C++ kernel)."""

    forward = staticmethod(scan_forward)
    setup_context = staticmethod(slstm_cpu.scan_setup_context)

    @staticmethod
    def backward(ctx, d_out, d_final, d_saved_g, d_saved_a):
        return slstm_cpu.scan_gradients(scan_backward, ctx, d_out, d_final)


def scan(gates: Tensor, recurrent_kernel: Tensor, bias: Optional[Tensor], state, mask: Optional[Tensor],
         exp_forget: bool) -> tuple:
    """`slstm_op.slstm_scan` on the Triton kernels, inputs already checked by it (see `slstm_cpu.scan`)."""
    op = torch.ops.slstm.scan if gates.device.type == "cuda" else InterpretedScan.apply
    return slstm_cpu.scan(gates, recurrent_kernel, bias, state, mask, exp_forget, op=op)
