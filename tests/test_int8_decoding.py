"""Int8 weight-only decoding: the FFN's and the LM head's weights as int8 rows with a float32 scale per row (torchao's
`Int8WeightOnlyConfig`), read as int8 by the decoding kernels. The oracle is the module path, torchao's own F.linear:
(x q^T) scale + bias. The kernels compute the same with float32 sums: equal to rounding in float32, and within
bfloat16's roundings (which the module makes and the kernels do not) in bfloat16."""

import pytest
import torch
import torch.nn.functional as F

from modeling_slstm import slstm_cpu, slstm_op
from modeling_slstm import modeling_slstm as modeling
from modeling_slstm.slstm_op import use_backend

from conftest import random_model, state_of, with_cache


pytestmark = pytest.mark.skipif(not slstm_cpu.compiled_available(), reason="the C++ kernel cannot be built here")


@pytest.fixture
def torchao():
    return pytest.importorskip("torchao.quantization")


def quantised(weight: torch.Tensor) -> tuple:
    """Symmetric int8 rows of a float weight (O, I) and their scale (O, 1): weight ~ scale * q."""
    scale = weight.float().abs().amax(1, keepdim=True).clamp(min=1e-6) / 127
    return torch.round(weight.float() / scale).clamp(-127, 127).to(torch.int8), scale


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tolerance, atol=tolerance)


# ------------------------------------------------------------------------------------------------------ the ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("out_features, in_features", [(5, 3), (130, 64), (4099, 100)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_decode_reads_int8_rows_times_their_scales(threads, dtype, rows, out_features, in_features, bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, in_features, generator=gen).to(dtype)
    q, scale = quantised(torch.randn(out_features, in_features, generator=gen))
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    expected = F.linear(x.float(), q.float() * scale, None if b is None else b.float())
    outs = []
    for count in (1, 2):
        threads(count)
        with torch.no_grad():
            outs.append(slstm_op.linear_decode_step(x, q, b, scale))
    assert outs[0].dtype == dtype and outs[0].shape == (rows, 1, out_features)
    assert torch.equal(outs[0], outs[1])  # each output is summed by one thread, in one order
    close(outs[0], expected, dtype)


def test_an_int8_head_streaming_from_memory_off_a_line_decodes_as_f_linear(threads):
    """17 MB of int8 rows, more than the kernels expect to stay in cache (prefetched as they stream), starting one byte
    off a 64-byte line, read by a batch of 3 on two threads."""
    threads(2)
    out_features, in_features = 16500, 1040
    gen = torch.Generator().manual_seed(0)
    q, scale = quantised(torch.randn(out_features, in_features, generator=gen))
    shifted = torch.empty(q.numel() + 1, dtype=torch.int8)[1:].view(out_features, in_features).copy_(q)
    x = torch.randn(3, in_features, generator=gen)
    with torch.no_grad():
        out = torch.ops.slstm.linear_decode(x, shifted, None, scale)
    torch.testing.assert_close(out, F.linear(x, q.float() * scale), rtol=1e-5, atol=1e-4)


def test_no_int8_rows_make_an_empty_product():
    x = torch.randn(2, 8)
    with torch.no_grad():
        out = torch.ops.slstm.linear_decode(x, torch.empty(0, 8, dtype=torch.int8), None, torch.empty(0, 1))
    assert out.shape == (2, 0)


def _resized_away(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.untyped_storage().resize_(0)
    return t


@pytest.mark.parametrize("replace, message", [
    (dict(scale=None), r"`weight` is int8: its float32 scale per row, shape \(5, 1\), goes in `scale`"),
    (dict(weight=torch.zeros(5, 8)), "`weight` must be a contiguous torch.int8"),  # a scale for float weights
    (dict(scale=torch.ones(5)), r"`scale` must be a contiguous torch.float32 tensor of shape \(5, 1\)"),
    (dict(scale=torch.ones(5, 1, dtype=torch.bfloat16)), "`scale` must be a contiguous torch.float32"),
    (dict(scale=torch.ones(5, 2)[:, :1]), "`scale` must be .* got a non-contiguous"),
    (dict(scale=_resized_away(torch.ones(5, 1))), "`scale` must be a plain dense CPU tensor; its storage holds 0"),
    (dict(scale=torch.ones(5, 1, device="meta")), "on meta beside CPU tensors"),
    (dict(weight=torch.zeros(5, 7, dtype=torch.int8)), r"`weight` must be .* of shape \(5, 8\)"),
])
def test_int8_rows_and_their_scales_are_checked_before_the_kernel_reads_them(replace, message):
    args = dict(x=torch.zeros(2, 8), weight=torch.zeros(5, 8, dtype=torch.int8), bias=None, scale=torch.ones(5, 1))
    args.update(replace)
    with pytest.raises(ValueError, match=message):
        torch.ops.slstm.linear_decode(**args)


def _block_args(model, x: torch.Tensor) -> list:
    """slstm::block_decode's arguments for x through every block of `model` from zero states."""
    with use_backend("compiled"):
        weights = [block._one_call_weights(x) for block in model.model.layers]
    flat = [torch.empty(0) if t is None else t for w in weights for t in w.tensors()]
    batch, heads = x.shape[0], model.config.num_heads
    zeros = [torch.zeros(batch, heads, x.shape[-1] // heads) for _ in range(4 * len(weights))]
    windows = [x.new_zeros(batch, model.config.conv1d_kernel_size - 1, x.shape[-1])] * len(weights)
    return [x, None, windows, zeros, flat, [e for w in weights for e in w.eps], [0] * len(weights),
            [0] * len(weights)]


def _with_int8_ffn(flat: list) -> list:
    """The flat weights of one block with its FFN's weights as int8 rows and their scales."""
    names = slstm_cpu.WEIGHT_NAMES
    flat = list(flat)
    for weight, scale in (("gate_up_weight", "gate_up_scale"), ("down_weight", "down_scale")):
        flat[names.index(weight)], flat[names.index(scale)] = quantised(flat[names.index(weight)])
    return flat


def test_the_block_decode_op_checks_the_ffns_int8_rows_and_scales():
    model = random_model(num_hidden_layers=1)
    x = torch.randn(2, 1, 32)
    names = slstm_cpu.WEIGHT_NAMES
    with torch.no_grad():
        args = _block_args(model, x)
        int8 = _with_int8_ffn(args[4])
        torch.ops.slstm.block_decode(*args[:4], int8, *args[5:])  # as given: fine
        for k, value, message in (
                (names.index("gate_up_weight"), args[4][names.index("gate_up_weight")],
                 r"`gate_up_weight \(block 0\)` must be a contiguous torch.int8"),
                (names.index("down_scale"), torch.ones(32), r"`down_scale \(block 0\)` must be .* shape \(32, 1\)"),
                (names.index("down_scale"), torch.ones(32, 1, dtype=torch.float64), r"`down_scale \(block 0\)`"),
                (names.index("gate_up_scale"), torch.empty(0),
                 r"`gate_up_weight \(block 0\)` is int8: its float32 scale per row goes in `gate_up_scale`")):
            bad = list(int8)
            bad[k] = value
            with pytest.raises(ValueError, match=message):
                torch.ops.slstm.block_decode(*args[:4], bad, *args[5:])
        no_ffn = list(args[4])
        for name in ("norm2_weight", "gate_up_weight", "down_weight"):
            no_ffn[names.index(name)] = torch.empty(0)
        no_ffn[names.index("down_scale")] = torch.ones(32, 1)
        with pytest.raises(ValueError, match="FFN weights without `down_weight`"):
            torch.ops.slstm.block_decode(*args[:4], no_ffn, *args[5:])
        with pytest.raises(ValueError, match="`head_bias` or `head_scale` without `head_weight`"):
            torch.ops.slstm.block_decode(*args, False, None, 0.0, None, None, torch.ones(61, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_block_step_on_int8_rows_equals_the_step_on_their_values(threads, dtype):
    """Blocks at the team's sizes (two threads share the products) whose FFN weights are int8 rows, against the same
    blocks holding the values those rows stand for (scale * q, in float32, then in the model's dtype)."""
    threads(2)
    model = random_model(hidden_size=76, num_heads=2, ffn_round_to=1, num_hidden_layers=2).to(dtype)
    x = torch.randn(8, 1, 76).to(dtype)
    names, per_block = slstm_cpu.WEIGHT_NAMES, slstm_cpu.BLOCK_WEIGHTS
    with torch.no_grad():
        args = _block_args(model, x)
        int8, values = [], []
        for l in range(2):
            block = _with_int8_ffn(args[4][l * per_block : (l + 1) * per_block])
            int8 += block
            for weight, scale in (("gate_up_weight", "gate_up_scale"), ("down_weight", "down_scale")):
                q, s = block[names.index(weight)], block[names.index(scale)]
                block[names.index(weight)], block[names.index(scale)] = (q.float() * s).to(dtype), torch.empty(0)
            values += block
        out = torch.ops.slstm.block_decode(*args[:4], int8, *args[5:])
        expected = torch.ops.slstm.block_decode(*args[:4], values, *args[5:])
    for got, want in zip((out[0], *out[2]), (expected[0], *expected[2])):
        if dtype == torch.float32:  # (x q) s against x (q s): the same products, rounded at other places
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:  # and the values rounded to bf16 (outputs up to ~80 here: a bf16 step of 0.5)
            assert (got.float() - want.float()).norm() <= 1e-2 * want.float().norm()


# ------------------------------------------------------------------------------------------------- torchao models
def _int8_model(torchao, dtype=torch.float32, config=None, **overrides):
    model = random_model(hidden_size=64, num_heads=2, ffn_proj_factor=2.0, vocab_size=97, **overrides).to(dtype)
    torchao.quantize_(model, config or torchao.Int8WeightOnlyConfig())
    return model


def _step_logits(model, ids: torch.Tensor, mask: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """Logits (B, steps, V) of `steps` greedy decoding steps after a prompt, each step a forward with the state."""
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        logits, cache = [], state_of(out)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out = model(token, attention_mask=mask, use_cache=True, **with_cache(cache))
            cache, token = state_of(out), out.logits[:, -1:].argmax(-1)
            logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torchao_int8_weights_decode_on_the_kernels_as_their_modules(monkeypatch, torchao, dtype):
    """Decoding steps of a left-padded batch: the blocks, the final norm and the int8 head in one kernel call, against
    torchao's modules ("fused": the op-by-op path)."""
    model = _int8_model(torchao, dtype)
    assert type(model.lm_head.weight).__name__ == "Int8Tensor"
    calls = []
    one_call = modeling.block_decode_step

    def spy(*args, **kwargs):
        calls.append(args[7] if len(args) > 7 else kwargs.get("head"))  # the head: (weight, bias, scale)
        return one_call(*args, **kwargs)

    monkeypatch.setattr(modeling, "block_decode_step", spy)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kernel = _step_logits(model, ids, mask)
    assert len(calls) == 4 and all(head is not None and head[0].dtype == torch.int8 and head[2] is not None
                                   for head in calls)
    with use_backend("fused"):
        modules = _step_logits(model, ids, mask)
    assert len(calls) == 4
    if dtype == torch.float32:
        torch.testing.assert_close(kernel, modules, rtol=1e-5, atol=1e-5)
    else:  # the module rounds products and sums to bf16 on the way; the kernel sums in float32
        assert (kernel - modules).norm() / modules.norm() < 0.02


def test_int8_weights_the_kernels_would_misread_run_through_their_modules(torchao):
    """Per-group scales, quantised activations, activation pre-scaling and a non-zero zero point (found after a step
    that read it as zeros: its version changed) are torchao's to compute: the modules run."""
    x = torch.zeros(1, 1, 64)
    models = {"per-group": _int8_model(torchao, config=torchao.Int8WeightOnlyConfig(granularity=torchao.PerGroup(16))),
              "activations": _int8_model(torchao, config=torchao.Int8DynamicActivationInt8WeightConfig())}
    scaled = _int8_model(torchao)
    for block in scaled.model.layers:
        block.ffn.down_proj.weight.act_pre_scale = torch.ones(block.ffn.down_proj.weight.qdata.shape[1])
    models["pre-scaled"] = scaled
    with torch.no_grad():
        for name, model in models.items():
            assert not model.model.layers[0]._decodes_in_one_call(x), name
        model = _int8_model(torchao)
        block, head = model.model.layers[0], model.lm_head
        assert block._decodes_in_one_call(x) and modeling._kernel_head(head, x)[2] is not None
        block.ffn.gate_up_proj.weight.zero_point[3] = 1
        head.weight.zero_point[0] = -2
        assert not block._decodes_in_one_call(x) and modeling._kernel_head(head, x) is None
        block.ffn.gate_up_proj.weight.zero_point.zero_()
        assert block._decodes_in_one_call(x)


def test_a_model_quantised_under_inference_mode_decodes_on_the_kernels(torchao):
    """Quantised under torch.inference_mode() (as `from_pretrained(..., quantization_config=...)` inside one does), the
    zero points are inference tensors, which have no version counter: read every step, not remembered."""
    with torch.inference_mode():
        model = _int8_model(torchao)
    x = torch.zeros(1, 1, 64)
    head = model.lm_head.weight
    assert head.zero_point.is_inference()
    with torch.no_grad():
        assert model.model.layers[0]._decodes_in_one_call(x) and modeling._kernel_head(model.lm_head, x) is not None
        ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        kernel = _step_logits(model, ids, mask)
        with use_backend("fused"):
            torch.testing.assert_close(kernel, _step_logits(model, ids, mask), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        head.zero_point[0] = 1  # inside inference mode, in place, with no version to tell
    assert modeling._kernel_head(model.lm_head, x) is None


def test_a_scale_the_kernels_cannot_read_as_it_is_runs_the_modules(torchao):
    """A non-contiguous scale (an expanded or strided one): torchao's module computes with it; the kernels, which read
    weights as they are held, leave it to the module rather than refuse the step."""
    model = _int8_model(torchao)
    x = torch.zeros(1, 1, 64)
    head = model.lm_head.weight
    head.scale = torch.cat([head.scale, head.scale], 1)[:, :1]  # the same values, every other float
    with torch.no_grad():
        assert modeling._kernel_head(model.lm_head, x) is None
        ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(3))
        kernel = _step_logits(model, ids, torch.ones_like(ids))
        with use_backend("fused"):
            torch.testing.assert_close(kernel, _step_logits(model, ids, torch.ones_like(ids)), rtol=1e-5, atol=1e-5)


def test_a_mode_that_sees_each_op_runs_the_modules(torchao):
    """A torch function mode (here one that doubles every F.linear) or a dispatch mode (a FLOP counter) sees the ops
    the modules run; one kernel call would hide them. torch.device's mode, which only places new tensors, does not."""
    from torch.overrides import TorchFunctionMode
    from torch.utils.flop_counter import FlopCounterMode

    class DoubledLinears(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            return out * 2 if func is F.linear else out

    for model in (random_model(hidden_size=64, num_heads=2), _int8_model(torchao)):
        ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(4))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            with DoubledLinears():
                doubled = _step_logits(model, ids, mask)
            with use_backend("fused"), DoubledLinears():
                torch.testing.assert_close(doubled, _step_logits(model, ids, mask), rtol=1e-5, atol=1e-5)
            with torch.device("cpu"):
                assert model.model.layers[0]._decodes_in_one_call(torch.zeros(1, 1, 64))
            with FlopCounterMode(display=False) as flops:
                assert not model.model.layers[0]._decodes_in_one_call(torch.zeros(1, 1, 64))
                _step_logits(model, ids, mask, steps=1)
        assert flops.get_total_flops() > 0


def test_speculative_decoding_on_int8_weights_gives_greedys_tokens(torchao):
    """Prompt-lookup drafts verified in one kernel call and rolled back with `crop`: the tokens of plain greedy."""
    model = _int8_model(torchao)
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, eos_token_id=96)
    with torch.no_grad():
        plain = model.generate(ids, **settings)
        drafted = model.generate(ids, **settings, prompt_lookup_num_tokens=4)
    assert torch.equal(plain, drafted)
