"""The reference op against an independent, unstabilised float64 loop, and its contracts (first step, masks, dtypes),
on the test device (`--device`)."""

import pytest
import torch

from modeling_slstm.slstm_op import slstm_scan
from modeling_slstm.slstm_reference import slstm_scan_reference, zero_state


def naive_slstm(gates, R, b, forget_gate="sigmoid"):
    """The paper's equations without a stabiliser, in float64, one head and one gate at a time."""
    B, S, NH, four_dh = gates.shape
    DH = four_dh // 4
    gates, R, b = gates.double(), R.double(), b.double()
    h = torch.zeros(B, NH, DH, dtype=torch.float64, device=gates.device)
    c = torch.zeros_like(h)
    n = torch.zeros_like(h)
    outs = []
    for t in range(S):
        new_h = []
        for head in range(NH):
            pre = gates[:, t, head] + h[:, head] @ R[head] + b[head]  # (B, 4*DH)
            i_t = torch.exp(pre[:, 0:DH])
            f_t = torch.sigmoid(pre[:, DH : 2 * DH]) if forget_gate == "sigmoid" else torch.exp(pre[:, DH : 2 * DH])
            z_t = torch.tanh(pre[:, 2 * DH : 3 * DH])
            o_t = torch.sigmoid(pre[:, 3 * DH :])
            c_h = f_t * c[:, head] + i_t * z_t
            n_h = f_t * n[:, head] + i_t
            c = torch.cat([c[:, :head], c_h[:, None], c[:, head + 1 :]], 1)
            n = torch.cat([n[:, :head], n_h[:, None], n[:, head + 1 :]], 1)
            new_h.append(o_t * c_h / n_h)
        h = torch.stack(new_h, 1)
        outs.append(h)
    return torch.stack(outs, 1)


def random_inputs(B=3, S=9, NH=2, DH=4, scale=1.0, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    gates = (torch.randn(B, S, NH, 4 * DH, generator=gen) * scale).to(device, dtype)
    R = (torch.randn(NH, DH, 4 * DH, generator=gen) * 0.5).to(device, dtype)
    b = torch.randn(NH, 4 * DH, generator=gen).to(device, dtype)
    return gates, R, b


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 9, 2, 4), (2, 17, 4, 3)])
def test_reference_matches_naive_values_and_grads(shape, forget_gate, device):
    gates, R, b = random_inputs(*shape, device=device)
    leaves = [t.clone().requires_grad_() for t in (gates, R, b)]
    out, _ = slstm_scan_reference(*leaves, forget_gate=forget_gate)
    naive_leaves = [t.clone().double().requires_grad_() for t in (gates, R, b)]
    expected = naive_slstm(*naive_leaves, forget_gate=forget_gate)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(expected)
    (out.double() * weights).sum().backward()
    (expected * weights).sum().backward()
    for ours, theirs in zip(leaves, naive_leaves):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-5)


def test_reference_gradcheck_float64():
    gates, R, b = random_inputs(2, 4, 2, 2, dtype=torch.float64)
    state = tuple(torch.rand(2, 2, 2, dtype=torch.float64) + 0.5 for _ in range(4))
    inputs = [t.requires_grad_() for t in (gates, R, b, *state)]

    def fn(g, r, bias, h, c, n, m):
        out, final = slstm_scan_reference(g, r, bias, (h, c, n, m))
        return out, *final

    assert torch.autograd.gradcheck(fn, inputs)


def test_large_preactivations_stay_finite(device):
    gates, R, b = random_inputs(2, 50, 2, 4, scale=200.0, device=device)
    out, (h, c, n, m) = slstm_scan_reference(gates, R, b)
    for t in (out, h, c, n, m):
        assert torch.isfinite(t).all()
    assert (n >= 1 - 1e-6).all(), "after the first step the stabilised normaliser is at least 1"


def test_first_step_is_decided_per_element(device):
    """A fresh row next to a running row: the fresh one must act exactly as if it ran alone (no 0/0)."""
    gates, R, b = random_inputs(2, 6, 2, 4, device=device)
    gates[:, :, :, :4] = -150.0  # input gate far below the forget path: a batch-wide first-step test gives 0/0 here
    _, running = slstm_scan_reference(gates[:1], R, b)
    fresh = zero_state(1, 2, 4, device)
    mixed_state = tuple(torch.cat([r, f]) for r, f in zip(running, fresh))
    out, _ = slstm_scan_reference(gates, R, b, mixed_state)
    alone, _ = slstm_scan_reference(gates[1:], R, b)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1:], alone, rtol=0, atol=0)


def test_masked_steps_keep_state_bit_identical(device):
    gates, R, b = random_inputs(3, 8, 2, 4, device=device)
    mask = torch.ones(3, 8, dtype=torch.bool, device=device)
    mask[0, :3] = False  # left padding
    mask[1, 4:6] = False  # a hole
    mask[2] = False  # nothing at all
    out, final = slstm_scan_reference(gates, R, b, mask=mask)
    # row 1 skips steps 4 and 5: its state after them equals its state after step 3
    _, before = slstm_scan_reference(gates[1:2, :4], R, b)
    _, after_hole = slstm_scan_reference(gates[1:2, :6], R, b, mask=mask[1:2, :6])
    for x, y in zip(before, after_hole):
        assert torch.equal(x, y)
    # row 2 never steps: the final state is the initial (zero) state
    for t in final:
        assert torch.equal(t[2], torch.zeros_like(t[2]))
    # row 0 equals its unpadded run
    alone, _ = slstm_scan_reference(gates[:1, 3:], R, b)
    torch.testing.assert_close(out[0, 3:], alone[0], rtol=0, atol=0)


def test_chunked_scan_equals_full(device):
    gates, R, b = random_inputs(2, 12, 2, 4, device=device)
    full, full_state = slstm_scan(gates, R, b)
    state, outs = None, []
    for chunk in gates.split([5, 1, 6], dim=1):
        out, state = slstm_scan(chunk, R, b, state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full)
    for x, y in zip(state, full_state):
        torch.testing.assert_close(x, y)


def test_state_is_float32_for_bfloat16_inputs(device):
    gates, R, b = random_inputs(2, 5, 2, 4, device=device)
    out, state = slstm_scan(gates.bfloat16(), R.bfloat16(), b.bfloat16())
    assert out.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in state)
    ref, _ = slstm_scan(gates.bfloat16().float(), R.bfloat16().float(), b.bfloat16().float())
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.02)


def test_empty_sequence_returns_initial_state(device):
    gates, R, b = random_inputs(2, 0, 2, 4, device=device)
    out, state = slstm_scan(gates, R, b)
    assert out.shape == (2, 0, 2, 4)
    assert all(torch.equal(t, torch.zeros(2, 2, 4, device=device)) for t in state)
