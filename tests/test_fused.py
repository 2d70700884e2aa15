"""The fast sLSTM backends ("fused" pure PyTorch, "compiled" C++) against the reference op: values and gradients wrt
every input, masks, initial states, chunked calls, odd shapes, float64 gradcheck, bfloat16, and the whole model."""

import copy
import logging

import pytest
import torch

from modeling_slstm import slstm_cpu, slstm_op
from modeling_slstm.slstm_fused import SLSTMFusedFunction
from modeling_slstm.slstm_op import slstm_scan, slstm_scan_reference, use_backend

from conftest import (MASK_KINDS, assert_rel_close, mask_of_kind, random_model, scan_inputs,
                      scan_values_and_grads, state_of, with_cache)


FAST = ["fused", "compiled"]


@pytest.fixture(params=FAST)
def backend(request):
    if request.param == "compiled" and not slstm_cpu.compiled_available():
        pytest.skip("the C++ kernel cannot be built here")
    return request.param


def check(backend, B, S, NH, DH, mask=None, forget_gate="sigmoid", tol=1e-5, **kw):
    gates, R, b, state = scan_inputs(B, S, NH, DH, **kw)

    def fast(*args):
        with use_backend(backend):
            return slstm_scan(*args)

    ref_vals, ref_grads = scan_values_and_grads(slstm_scan_reference, gates, R, b, state, mask, forget_gate)
    vals, grads = scan_values_and_grads(fast, gates, R, b, state, mask, forget_gate)
    assert_rel_close(vals, ref_vals, tol, "values")
    assert_rel_close(grads, ref_grads, tol, "grads")


SHAPES = [  # (B, S, NH, DH): every B in 1..5, S in {0, 1, 7, 33}, NH in {1, 2, 4}, DH in {1, 4, 16}
    (1, 1, 1, 1), (1, 7, 2, 4), (2, 33, 4, 16), (3, 0, 2, 4), (4, 1, 4, 16), (5, 7, 1, 16), (5, 33, 2, 1),
    (2, 7, 4, 1), (3, 33, 1, 4),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_reference(backend, shape, with_state):
    check(backend, *shape, with_state=with_state)


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masks(backend, kind, forget_gate):
    B, S = 4, 33
    mask = mask_of_kind(kind, B, S, starts=[0, 5, 17, 32])
    check(backend, B, S, 2, 4, mask=mask, forget_gate=forget_gate)
    check(backend, B, S, 2, 4, mask=mask, forget_gate=forget_gate, with_state=False)


def test_exp_forget_gate_and_large_preactivations(backend):
    check(backend, 3, 33, 2, 16, forget_gate="exp")
    check(backend, 3, 33, 2, 4, scale=30.0)  # saturated gates, the stabiliser far from zero
    check(backend, 3, 33, 2, 4, scale=30.0, forget_gate="exp")


@pytest.mark.parametrize("cuts", [(1, 7), (13, 20), (5, 6, 11, 29)])
def test_chunked_calls_carry_state_and_gradients(backend, cuts):
    """Chunks that hand the state on give the full sequence's outputs and gradients (through the state)."""
    B, S, NH, DH = 3, 33, 2, 4
    gates, R, b, state = scan_inputs(B, S, NH, DH)
    mask = torch.rand(B, S, generator=torch.Generator().manual_seed(4)) > 0.3

    def chunked(g, r, bias, st, m, forget_gate):
        outs, bounds = [], [0, *cuts, S]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            with use_backend(backend):
                out, st = slstm_scan(g[:, lo:hi], r, bias, st, m[:, lo:hi], forget_gate)
            outs.append(out)
        return torch.cat(outs, 1), st

    ref_vals, ref_grads = scan_values_and_grads(slstm_scan_reference, gates, R, b, state, mask, "sigmoid")
    vals, grads = scan_values_and_grads(chunked, gates, R, b, state, mask, "sigmoid")
    assert_rel_close(vals, ref_vals, 1e-5, "values")
    assert_rel_close(grads, ref_grads, 1e-5, "grads")


def test_gradient_wrt_initial_m_is_not_zero(backend):
    gates, R, b, state = scan_inputs(2, 7, 2, 4, fresh=False)
    _, grads = scan_values_and_grads(lambda *a: _on(backend, *a), gates, R, b, state, None, "sigmoid")
    assert grads[6].abs().max() > 1e-3  # c and n held fixed, m rescales them


def _on(backend, *args):
    with use_backend(backend):
        return slstm_scan(*args)


def test_fused_function_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    B, S, NH, DH = 2, 4, 2, 2
    inputs = [
        torch.randn(B, S, NH, 4 * DH, generator=gen, dtype=torch.float64),
        torch.randn(NH, DH, 4 * DH, generator=gen, dtype=torch.float64) * 0.5,
        torch.randn(NH, 4 * DH, generator=gen, dtype=torch.float64),
        torch.randn(B, NH, DH, generator=gen, dtype=torch.float64),
        torch.randn(B, NH, DH, generator=gen, dtype=torch.float64),
        torch.rand(B, NH, DH, generator=gen, dtype=torch.float64) + 0.5,
        torch.randn(B, NH, DH, generator=gen, dtype=torch.float64),
    ]
    inputs = [t.requires_grad_() for t in inputs]
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    for forget_exp in (False, True):
        assert torch.autograd.gradcheck(
            lambda *a: SLSTMFusedFunction.apply(*a, mask, forget_exp), inputs, eps=1e-6, atol=1e-6
        )


# bfloat16 has an 8-bit mantissa (relative rounding 2^-9 = 0.2 %). With float32 state math, bf16 gates, R and outputs
# stay within 1 % of float32 (max error over max |h|; 0.3 % measured), and a bf16 model's logits within 5 % of
# max |logit| (1.8 % measured under autocast, 2.6 % with bf16 weights, the same on every backend).
BF16_TOL = 1e-2
BF16_MODEL_TOL = 5e-2


def test_bfloat16_inputs_with_float32_state(backend):
    gates, R, b, state = scan_inputs(3, 33, 2, 16)
    ref_out, ref_state = slstm_scan_reference(gates, R, b, state)
    with use_backend(backend):
        out, final = slstm_scan(gates.bfloat16(), R.bfloat16(), b.bfloat16(), state)
    assert out.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in final)
    assert_rel_close([out.float(), final[0]], [ref_out, ref_state[0]], BF16_TOL, "bf16")
    gates_bf, R_bf = gates.bfloat16().requires_grad_(), R.bfloat16().requires_grad_()
    with use_backend(backend):
        out, _ = slstm_scan(gates_bf, R_bf, b, state)
    out.float().sum().backward()
    assert gates_bf.grad.dtype == torch.bfloat16 and R_bf.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("how", ["autocast", "bf16_weights"])
def test_bfloat16_model_logits(backend, how):
    model = random_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        with use_backend(backend):
            if how == "autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(ids).logits
            else:
                logits = model.to(torch.bfloat16)(ids).logits
    assert torch.isfinite(logits).all()
    assert_rel_close([logits.float()], [expected], BF16_MODEL_TOL, how)


def test_autocast_keeps_the_recurrence_in_float32(backend):
    gates, R, b, state = scan_inputs(2, 7, 2, 16)
    with use_backend("reference"):
        expected, _ = slstm_scan(gates, R, b, state)
    with torch.autocast("cpu", dtype=torch.bfloat16), use_backend(backend):
        out, final = slstm_scan(gates, R, b, state)
    assert out.dtype == torch.float32 and final[2].dtype == torch.float32
    assert_rel_close([out], [expected], 1e-5, "autocast")


@pytest.mark.parametrize("masked", [False, True])
def test_model_logits_and_grads_match_across_backends(backend, masked):
    model = random_model()
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    if masked:
        attention_mask[1, :4] = 0
        attention_mask[2, :11] = 0

    def logits_and_grads(name):
        model.zero_grad()
        with use_backend(name):
            out = model(ids, attention_mask=attention_mask, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ref_logits, ref_grads = logits_and_grads("reference")
    logits, grads = logits_and_grads(backend)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_backend_selection(monkeypatch):
    monkeypatch.setenv("SLSTM_BACKEND", "reference")
    assert slstm_op.get_backend() == "reference"
    with use_backend("fused"):
        assert slstm_op.get_backend() == "fused"
        assert slstm_op.resolve_backend(torch.zeros(1, 1, 1, 4)) == "fused"
    assert slstm_op.get_backend() == "reference"
    slstm_op.set_backend("auto")
    try:
        assert slstm_op.resolve_backend(torch.zeros(1, 1, 1, 4, dtype=torch.float64)) == "fused"
    finally:
        slstm_op.set_backend(None)
    monkeypatch.setenv("SLSTM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SLSTM_BACKEND"):
        slstm_op.get_backend()
    with pytest.raises(ValueError, match="Unknown sLSTM backend"):
        slstm_op.set_backend("cuda-magic")


def _failing_compiler(tmp_path):
    compiler = tmp_path / "fake-c++"
    compiler.write_text("#!/bin/sh\necho 'slstm_cpu.cpp:1:1: error: no such luck' >&2\nexit 1\n")
    compiler.chmod(0o755)
    return str(compiler)


def test_failed_build_falls_back_with_one_warning_under_auto(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(slstm_cpu, "_lib", None)
    monkeypatch.setenv("CXX", _failing_compiler(tmp_path))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    gates, R, b, state = scan_inputs(2, 3, 2, 4)
    logger = logging.getLogger("modeling_slstm.slstm_op")
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.WARNING, logger="modeling_slstm.slstm_op"), use_backend("auto"):
        assert slstm_op.resolve_backend(gates) == "fused"
        out, _ = slstm_scan(gates, R, b, state)
    expected, _ = slstm_scan_reference(gates, R, b, state)
    assert_rel_close([out], [expected], 1e-5)
    assert slstm_cpu._lib is False
    assert "could not be built" in caplog.text and "no such luck" in caplog.text


def test_a_forced_compiled_backend_that_cannot_build_raises_with_the_compilers_message(monkeypatch, tmp_path):
    monkeypatch.setattr(slstm_cpu, "_lib", None)
    monkeypatch.setenv("CXX", _failing_compiler(tmp_path))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    gates, R, b, state = scan_inputs(2, 3, 2, 4)
    with use_backend("compiled"), pytest.raises(RuntimeError, match="forced.*error: no such luck"):
        slstm_scan(gates, R, b, state)
    monkeypatch.setenv("SLSTM_BACKEND", "compiled")
    with pytest.raises(RuntimeError, match="no such luck"):
        random_model()(torch.zeros(1, 2, dtype=torch.long))


def test_one_call_block_decoding_is_as_precise_as_the_op_by_op_path_far_from_zero():
    """A residual stream far from zero (offset 300): the kernel's norms sum in double, so its error against a float64
    run stays within the float32 op-by-op path's (with sequential float sums it was 1.5x worse here). A step without a
    cache: from the zero state, on the kernel (a first token into an empty cache runs on the modules, as a prompt)."""
    if not slstm_cpu.compiled_available():
        pytest.skip("the C++ kernel cannot be built here")
    sizes = dict(hidden_size=512, num_heads=4, ffn_proj_factor=1.0)
    block = random_model(**sizes).model.layers[0]
    exact = random_model(**sizes).double().model.layers[0]
    x = torch.randn(2, 1, 512, generator=torch.Generator().manual_seed(4)) * 0.5 + 300.0
    with torch.no_grad():
        with use_backend("compiled"):
            assert block._decodes_in_one_call(x)
            fast = block(x, None, None)
        with use_backend("fused"):
            slow = block(x, None, None)
        with use_backend("reference"):
            reference = exact(x.double(), None, None)
    fast_error = (fast.double() - reference).abs().max().item()
    slow_error = (slow.double() - reference).abs().max().item()
    assert fast_error <= slow_error, (fast_error, slow_error)


def test_one_call_block_decoding_steps_aside_for_adapters_and_hooks():
    """The one-call step reads weights itself: a LoRA-style replaced linear or a forward hook must still take effect."""
    if not slstm_cpu.compiled_available():
        pytest.skip("the C++ kernel cannot be built here")

    class LowRankAdapted(torch.nn.Linear):  # what an adapter library puts in place of a linear layer
        def forward(self, x):
            return super().forward(x) + 0.5 * x.sum(-1, keepdim=True)

    x = torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), use_backend("compiled"):
        plain = random_model().model.layers[0](x, None, None)
        adapted_model = random_model()
        block = adapted_model.model.layers[0]
        old = block.ffn.gate_up_proj
        block.ffn.gate_up_proj = LowRankAdapted(old.in_features, old.out_features, bias=False)
        block.ffn.gate_up_proj.weight.copy_(old.weight)
        assert not block._decodes_in_one_call(x)
        adapted = block(x, None, None)
        assert not torch.allclose(adapted, plain)

        hooked_block = random_model().model.layers[0]
        hooked_block.ffn.down_proj.register_forward_hook(lambda module, args, out: out * 0.0)
        assert not hooked_block._decodes_in_one_call(x)
        hooked = hooked_block(x, None, None)
        residual_only = hooked_block.slstm(hooked_block.slstm_norm(x), None, None) + x
        torch.testing.assert_close(hooked, residual_only)

        block = random_model().model.layers[0]
        assert block._decodes_in_one_call(x)
        handle = block.slstm.dropout.register_forward_hook(lambda module, args, out: out * 0.0)  # ablate the cell
        assert not block._decodes_in_one_call(x)
        handle.remove()
        block.ffn.act = torch.tanh  # a swapped activation function: the kernel only knows the configured one
        assert not block._decodes_in_one_call(x)
        block = random_model().model.layers[0]
        block.slstm.dropout = torch.nn.Identity()
        assert not block.train()._decodes_in_one_call(x)  # no AttributeError on the replaced module
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the prefill ran the maps in bf16: decoding does too
            assert not random_model().model.layers[0]._decodes_in_one_call(x)


@pytest.mark.parametrize("patched", ["MultiHeadNorm", "Linear", "SLSTMBlock"])
def test_a_forward_replaced_on_the_class_is_what_runs(patched, monkeypatch):
    """Patching a class's forward (as some libraries do to every nn.Linear) turns the one-call step off, also for
    the LM head: the model computes what the patched modules compute."""
    if not slstm_cpu.compiled_available():
        pytest.skip("the C++ kernel cannot be built here")
    from modeling_slstm import layers_slstm, modeling_slstm

    cls = {"MultiHeadNorm": layers_slstm.MultiHeadNorm, "Linear": torch.nn.Linear,
           "SLSTMBlock": modeling_slstm.SLSTMBlock}[patched]
    original = cls.forward
    model = random_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(cls, "forward", lambda self, *args, **kwargs: original(self, *args, **kwargs) * 0.5)
    with torch.no_grad():
        cache = state_of(model(ids[:, :4], use_cache=True))
        with use_backend("compiled"):
            assert not model.model.layers[0]._decodes_in_one_call(torch.zeros(2, 1, 32))
            ours = model(ids[:, 4:], **with_cache(copy.deepcopy(cache))).logits
        with use_backend("reference"):
            expected = model(ids[:, 4:], **with_cache(cache)).logits
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_headwise_projection_keeps_the_checkpoint_layout():
    """weight (4, NH, DH_out, DH_in), gates i, f from xc and z, o from u, output per head ordered i, f, z, o."""
    from modeling_slstm.layers_slstm import HeadwiseGateProjection

    proj = HeadwiseGateProjection(3, 5)
    torch.nn.init.normal_(proj.weight)
    xc, u = torch.randn(2, 4, 15), torch.randn(2, 4, 15)
    sources = [xc, xc, u, u]
    expected = torch.stack(
        [torch.einsum("bshd,hed->bshe", sources[g].unflatten(-1, (3, 5)), proj.weight[g]) for g in range(4)], dim=3
    ).flatten(-2)  # (B, S, NH, 4*DH)
    torch.testing.assert_close(proj(xc, u), expected)


def _transposed(batch, seq, dim):
    """A non-contiguous (batch, seq, dim) float64 leaf: a sequence-first tensor seen batch first."""
    return torch.randn(seq, batch, dim, dtype=torch.float64).transpose(0, 1).requires_grad_()


def test_headwise_projection_gradients_and_autocast():
    """The gate maps' hand-written backward: float64 gradcheck, gradients equal autograd through a plain einsum
    (also for non-contiguous inputs), and under CPU autocast they run in bfloat16 as a matmul would."""
    from modeling_slstm.layers_slstm import HeadwiseGateProjection, _HeadwiseGateMaps

    proj = HeadwiseGateProjection(3, 5).double()
    torch.nn.init.normal_(proj.weight)
    xc, u = (torch.randn(2, 4, 15, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(_HeadwiseGateMaps.apply, (xc, u, proj.weight))

    def plain(a, b, w):
        sources = [a, a, b, b]
        return torch.stack([torch.einsum("bshd,hed->bshe", sources[g].unflatten(-1, (3, 5)), w[g]) for g in range(4)],
                           dim=3).flatten(-2)

    grad = torch.randn(2, 4, 3, 20, dtype=torch.float64)
    for a_in, b_in in [(xc, u), (_transposed(2, 4, 15), u), (xc, _transposed(2, 4, 15))]:  # non-contiguous inputs
        ours = torch.autograd.grad(proj(a_in, b_in), (a_in, b_in, proj.weight), grad)
        expected = torch.autograd.grad(plain(a_in, b_in, proj.weight), (a_in, b_in, proj.weight), grad)
        for a, b in zip(ours, expected):
            torch.testing.assert_close(a, b)

    proj = proj.float()
    x32 = torch.randn(2, 4, 15, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gates = proj(x32, x32)
    assert gates.dtype == torch.bfloat16
    gates.float().sum().backward()
    assert x32.grad.dtype == torch.float32 and proj.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("name", ["reference", *FAST])
def test_layer_decoding_step_by_step_equals_the_full_sequence(name):
    """S = 1 calls through the cache (the decoding fast paths of conv, projection and op) equal one full call."""
    from modeling_slstm.cache_slstm import SLSTMCacheLayer

    if name == "compiled" and not slstm_cpu.compiled_available():
        pytest.skip("the C++ kernel cannot be built here")
    from modeling_slstm.layers_slstm import SLSTMLayer

    model = random_model()
    layer = next(m for m in model.modules() if isinstance(m, SLSTMLayer))
    u = torch.randn(2, 9, model.config.hidden_size)
    with torch.no_grad(), use_backend(name):
        full = layer(u)
        cache = SLSTMCacheLayer()
        steps = [layer(u[:, :3], None, cache)] + [layer(u[:, t : t + 1], None, cache) for t in range(3, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_heads", [1, 3])
def test_compiled_threads_split_heads_and_batch(num_heads):
    """Large enough calls run (head, batch rows) units on a thread pool; the result does not depend on the split."""
    if not slstm_cpu.compiled_available():
        pytest.skip("the C++ kernel cannot be built here")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        mask = torch.rand(5, 40, generator=torch.Generator().manual_seed(5)) > 0.2
        check("compiled", 5, 40, num_heads, 64, mask=mask)
    finally:
        torch.set_num_threads(threads)


def test_denormals_are_flushed_during_the_op_and_the_mode_restored(backend):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero mode")
    tiny = torch.tensor([1e-39])
    gates, R, b, state = scan_inputs(1, 3, 2, 4)
    gates[..., :4] = -200.0  # i' = exp(ĩ - m) underflows: denormal territory
    with use_backend(backend):
        out, final = slstm_scan(gates, R, b, state)
    assert (tiny * 1.0).item() != 0.0  # the caller's mode is back (denormals kept)
    for t in (out, *final):
        assert not ((t != 0) & (t.abs() < torch.finfo(torch.float32).tiny)).any()
    torch.set_flush_denormal(True)
    try:
        with slstm_op.flush_denormals():
            pass
        assert (tiny * 1.0).item() == 0.0  # a mode the caller chose is left alone
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("overrides", [{}, {"conv1d_kernel_size": 0}, {"conv1d_kernel_size": 1},
                                       {"conv1d_kernel_size": 2, "forget_gate": "exp"}, {"num_heads": 1},
                                       {"ffn_proj_factor": 0}, {"ffn_act": "silu", "ffn_bias": True},
                                       {"ffn_act": "relu2"}, {"ffn_act": "sigmoid"}, {"ffn_act": "selu"},
                                       # sizes that are no multiple of the kernel's 4 x 4 tiles: DH 9, D 18
                                       {"hidden_size": 18, "num_heads": 2, "ffn_round_to": 1}])
def test_one_call_block_decoding_matches_the_op_by_op_path(overrides):
    """The compiled whole-block decoding step (no autograd) against the same block run op by op (with autograd),
    with some rows' steps masked (they keep window and state), across conv sizes, FFN shapes and activations."""
    from modeling_slstm.cache_slstm import SLSTMCacheLayer

    if not slstm_cpu.compiled_available():
        pytest.skip("the C++ kernel cannot be built here")
    model = random_model(**overrides)
    block = model.model.layers[0]
    x = torch.randn(5, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 6, [0, 1, 0, 0, 1, 1], [1, 0, 1, 1, 0, 1], [1] * 6, [1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    fast_cache, slow_cache = SLSTMCacheLayer(), SLSTMCacheLayer()
    with use_backend("compiled"):
        for t in range(6):
            step_mask = None if t == 0 else mask[:, t : t + 1]
            with torch.no_grad():
                assert block._decodes_in_one_call(x)
                fast = block(x[:, t : t + 1], step_mask, fast_cache)
            assert not block._decodes_in_one_call(x)  # autograd on: the op-by-op path
            slow = block(x[:, t : t + 1], step_mask, slow_cache)
            torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_cache._tensors(), slow_cache._tensors()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)
    assert fast_cache.seen_tokens == slow_cache.seen_tokens == 6
