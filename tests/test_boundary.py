"""The checked boundary in front of the kernels: bad inputs to `slstm_scan` and to the registered ops are ValueErrors,
foreign caches are refused on every backend, outputs keep the model's dtype under another default dtype, backend
overrides are per thread. The checks in front of every backend run on the test device (`--device`; the C++ `compiled`
backend, CPU tensors only, is skipped elsewhere); the registered C++ ops and the compiled backend's own tests stay on
the CPU, the only device their kernels take."""

import threading

import pytest
import torch

from modeling_slstm import SLSTMCache, slstm_cpu, slstm_op
from modeling_slstm.slstm_op import slstm_scan, use_backend
from modeling_slstm.slstm_reference import slstm_scan_reference

from conftest import random_model, state_of, with_cache


BACKENDS = ["reference", "fused", "compiled"]


@pytest.fixture(params=BACKENDS)
def backend(request, device):
    if request.param == "compiled" and device.type != "cpu":
        pytest.skip("the compiled backend's C++ kernel takes CPU tensors only")
    if request.param == "compiled" and not slstm_cpu.compiled_available():
        pytest.skip("the C++ kernel cannot be built here")
    return request.param


def inputs(B=3, S=7, NH=2, DH=4, device="cpu"):
    """Drawn on the CPU (the same values on every device), then moved to `device`."""
    gen = torch.Generator().manual_seed(0)
    gates = torch.randn(B, S, NH, 4 * DH, generator=gen).to(device)
    R = (torch.randn(NH, DH, 4 * DH, generator=gen) * 0.3).to(device)
    b = torch.randn(NH, 4 * DH, generator=gen).to(device)
    state = tuple((torch.rand(B, NH, DH, generator=gen) + 0.5).to(device) for _ in range(4))
    return gates, R, b, state


BAD_SCANS = {
    "state for 1 sequence, gates for 3": (lambda g, R, b, s: (g, R, b, tuple(t[:1] for t in s), None), "h has shape"),
    "R on meta": (lambda g, R, b, s: (g, R.to("meta"), b, s, None), "recurrent_kernel is on meta"),
    "bias (NH, 4*DH - 4)": (lambda g, R, b, s: (g, R, b[:, :-4], s, None), "bias has shape"),
    "mask (B, S - 3)": (lambda g, R, b, s: (g, R, b, s, torch.ones(3, 4, dtype=torch.bool, device=g.device)),
                          "mask has shape"),
    "R of another head dim": (lambda g, R, b, s: (g, R[:, :2], b, s, None), "recurrent_kernel has shape"),
    "3 state tensors": (lambda g, R, b, s: (g, R, b, s[:3], None), "4 tensors"),
    "integer gates": (lambda g, R, b, s: (g, R.long(), b, s, None), "floating point"),
}


@pytest.mark.parametrize("case", BAD_SCANS)
def test_bad_scan_inputs_are_value_errors_on_every_backend(backend, case, device):
    make, message = BAD_SCANS[case]
    with use_backend(backend), pytest.raises(ValueError, match=message):
        slstm_scan(*make(*inputs(device=device)))


def _op_args(**replace):
    gates, R, b, state = inputs()
    args = dict(gates=gates, recurrent_kernel=R, bias=b, state=torch.stack(state), mask=None, exp_forget=False,
                save=False)
    args.update(replace)
    return args


class _Wrapped(torch.Tensor):  # a tensor subclass, as quantisation libraries make them
    pass


@pytest.mark.parametrize("replace, message", [
    (dict(state=torch.zeros(4, 1, 2, 4)), "`state` must be .* shape \\(4, 3, 2, 4\\)"),
    (dict(bias=torch.zeros(2, 12)), "`bias` must be"),
    (dict(mask=torch.ones(3, 4, dtype=torch.bool)), "`mask` must be"),
    (dict(mask=torch.ones(3, 7)), "`mask` must be a contiguous torch.bool"),
    (dict(recurrent_kernel=torch.zeros(2, 16, 4).transpose(1, 2)), "non-contiguous"),
    (dict(recurrent_kernel=torch.zeros(2, 4, 16, dtype=torch.float64)), "torch.float32"),
    (dict(recurrent_kernel=torch.zeros(2, 4, 16).as_subclass(_Wrapped)), "plain dense CPU tensor, got _Wrapped"),
])
def test_the_registered_ops_check_every_tensor_before_the_kernel(replace, message):
    """CPU only: the registered ops are the C++ kernels' boundary, which takes plain dense CPU tensors."""
    if not slstm_cpu.compiled_available():
        pytest.skip("the C++ kernel cannot be built here")
    with pytest.raises(ValueError, match=message):
        torch.ops.slstm.scan(**_op_args(**replace))


def test_the_decode_op_refuses_unknown_activations_and_autograd():
    """CPU only: `block_decode` is a C++ kernel of the compiled backend (CPU tensors only)."""
    if not slstm_cpu.compiled_available():
        pytest.skip("the C++ kernel cannot be built here")
    block = random_model().model.layers[0]
    x = torch.randn(2, 1, 32)
    with torch.no_grad(), use_backend("compiled"):
        weights = block._one_call_weights(x)
        assert weights is not None
        with pytest.raises(ValueError, match="unknown FFN activation 'tanh'"):
            slstm_op.block_decode_step(x, None, [None], [None], [weights._replace(activation="tanh")])
        args = [x, None, [torch.zeros(2, 3, 32)], [torch.zeros(2, 4, 8) for _ in range(4)],
                [torch.empty(0) if t is None else t for t in weights.tensors()], list(weights.eps), [0]]
        with pytest.raises(ValueError, match="activation code 6"):
            torch.ops.slstm.block_decode(*args, [6])
        torch.ops.slstm.block_decode(*args, [5])  # selu, the last code
        with pytest.raises(ValueError, match="1 windows \\(one per block\\) but 8 states \\(4 per block\\), 14 weights"):
            torch.ops.slstm.block_decode(x, None, args[2], args[3] * 2, *args[4:], [5])
    with pytest.raises(RuntimeError, match="no backward"):
        slstm_op.block_decode_step(x, None, [None], [None], [weights])
    with pytest.raises(RuntimeError, match="slstm::block_decode has no backward"):  # the raw op too: no silent None grads
        torch.ops.slstm.block_decode(*args, [5])
    with pytest.raises(RuntimeError, match="slstm::linear_decode has no backward"):
        torch.ops.slstm.linear_decode(x[:, 0], block.ffn.down_proj.weight.T.contiguous(), None)


FOREIGN = {  # a cache filled by a model with these overrides, used with the default tiny model (D 32, NH 4, K 4)
    "width 8, no conv": dict(hidden_size=8, num_heads=2, conv1d_kernel_size=0),
    "same width, other heads": dict(num_heads=2),
    "other conv kernel": dict(conv1d_kernel_size=2),
    "no conv": dict(conv1d_kernel_size=0),
    "more layers": dict(num_hidden_layers=3),
}


@pytest.mark.parametrize("case", FOREIGN)
@pytest.mark.parametrize("seq_len", [1, 5])  # decoding step and prefill
def test_a_foreign_cache_is_a_value_error_on_every_backend(backend, case, seq_len, device):
    other = random_model(**FOREIGN[case]).to(device)
    model = random_model().to(device)
    ids = torch.randint(0, 61, (2, 4), device=device)
    with torch.no_grad(), use_backend(backend):
        cache = state_of(other(ids, use_cache=True))
        with pytest.raises(ValueError, match="SLSTMCache"):
            model(torch.randint(0, 61, (2, seq_len), device=device), **with_cache(cache))


def test_a_cache_of_another_batch_or_dtype_is_a_value_error(device):
    model = random_model().to(device)
    ids = torch.randint(0, 61, (2, 4), device=device)
    with torch.no_grad():
        cache = state_of(model(ids, use_cache=True))
        with pytest.raises(ValueError, match="batch of 2"):
            model(torch.randint(0, 61, (3, 1), device=device), **with_cache(cache))
        cache.layers[1].cell_state = tuple(t.double() for t in cache.layers[1].cell_state)
        with pytest.raises(ValueError, match=f"torch.float64 on {ids.device}, the model needs torch.float32"):
            model(torch.randint(0, 61, (2, 1), device=device), **with_cache(cache))
        empty = SLSTMCache(model.config)
        model(ids, **with_cache(empty))  # an empty cache fits any model of its config


def test_default_dtype_float64_with_a_float32_model(backend, device):
    """Outputs are allocated with explicit dtypes: a float64 default changes nothing for float32 inputs."""
    gates, R, b, state = inputs(device=device)
    model = random_model().to(device)
    ids = torch.randint(0, 61, (2, 6), device=device)
    with torch.no_grad(), use_backend("reference"):
        expected_op, _ = slstm_scan_reference(gates, R, b, state)
        expected_logits = model(ids).logits
        expected_tokens = model.generate(ids[:, :3], max_new_tokens=4, do_sample=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad(), use_backend(backend):
            out, final = slstm_scan(gates, R, b, state)
            logits = model(ids).logits
            tokens = model.generate(ids[:, :3], max_new_tokens=4, do_sample=False)
    finally:
        torch.set_default_dtype(previous)
    assert out.dtype == logits.dtype == final[0].dtype == torch.float32
    torch.testing.assert_close(out, expected_op, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)


def test_backend_overrides_are_per_thread():
    """Two threads inside overlapping use_backend blocks each see their own choice, and neither leaks out (no tensors:
    nothing here depends on a device)."""
    entered, leave = threading.Barrier(2), threading.Barrier(2)
    seen = {}

    def worker(name):
        with use_backend(name):
            entered.wait(timeout=30)  # both blocks are open now
            seen[name] = slstm_op.get_backend()
            leave.wait(timeout=30)
        seen[name + " after"] = slstm_op.get_backend()

    default = slstm_op.get_backend()
    threads = [threading.Thread(target=worker, args=(name,)) for name in ("reference", "fused")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"reference": "reference", "fused": "fused", "reference after": default, "fused after": default}
    assert slstm_op.get_backend() == default


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_the_compiled_backend_runs_under_no_grad_and_inference_mode(mode):
    """CPU only: forces the compiled backend, whose C++ kernels take CPU tensors only."""
    if not slstm_cpu.compiled_available():
        pytest.skip("the C++ kernel cannot be built here")
    model = random_model()
    ids = torch.randint(0, 61, (2, 6))
    with torch.no_grad(), use_backend("reference"):
        expected_logits = model(ids).logits
        expected_tokens = model.generate(ids[:, :3], max_new_tokens=4, do_sample=False)
    with mode(), use_backend("compiled"):
        assert model.model.layers[0]._decodes_in_one_call(torch.zeros(2, 1, 32))
        torch.testing.assert_close(model(ids).logits, expected_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(ids[:, :3], max_new_tokens=4, do_sample=False), expected_tokens)
