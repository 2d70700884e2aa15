"""SLSTMConfig, SLSTMModel and SLSTMForCausalLM: the transformers contract, state, padding, init, save/load."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from conftest import checkpointing, random_model, state_of, tiny_config, with_cache
from modeling_slstm import SLSTMCache, SLSTMConfig, SLSTMForCausalLM, SLSTMModel
from modeling_slstm.slstm_op import use_backend


# --- config ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(hidden_size=30, num_heads=4), "divisible"),
        (dict(num_heads=0), "num_heads"),
        (dict(conv1d_kernel_size=-1), "conv1d_kernel_size"),
        (dict(forget_gate="tanh"), "forget_gate"),
        (dict(ffn_act="gelu_fast"), "ffn_act"),
        (dict(dropout=1.0), "dropout"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(recurrent_weight_init="orthogonal"), "recurrent_weight_init"),
        (dict(initializer_range=math.inf), "initializer_range must be a number > 0"),
        (dict(initializer_range=0.0), "initializer_range"),
        (dict(ffn_proj_factor=math.nan), "ffn_proj_factor must be a number >= 0"),
        (dict(ffn_proj_factor=math.inf), "ffn_proj_factor"),
        (dict(ffn_proj_factor=True), "ffn_proj_factor"),
        (dict(hidden_size=0, num_heads=1), "hidden_size must be a positive integer"),
        (dict(hidden_size=32.0), "hidden_size must be a positive integer"),
        (dict(layer_norm_eps="1e-5"), "layer_norm_eps .* without quotes"),
        (dict(layer_norm_eps=math.nan), "layer_norm_eps"),
        (dict(conv1d_kernel_size=True), "conv1d_kernel_size must be an integer >= 0"),
        (dict(num_hidden_layers=-1), "num_hidden_layers"),
        (dict(num_hidden_layers="2"), "num_hidden_layers .* without quotes"),
        (dict(ffn_round_to=0), "ffn_round_to"),
        (dict(vocab_size=10**30), "vocab_size must be a positive integer and at most 2147483647"),
        (dict(num_hidden_layers=2**31), "num_hidden_layers"),
        (dict(dropout=math.nan), "dropout must be a probability"),
        (dict(embedding_dropout=-0.1), "embedding_dropout"),
        (dict(ffn_bias="false"), "ffn_bias must be true or false"),
        (dict(use_cache=1), "use_cache must be true or false"),
        (dict(tie_word_embeddings=None), "tie_word_embeddings"),
        (dict(forget_bias_init=None), "forget_bias_init"),
        (dict(eos_token_id=61), "eos_token_id must be null, a token id in \\[0, vocab_size=61\\)"),
        (dict(pad_token_id=-1), "pad_token_id"),
        (dict(bos_token_id=1.0), "bos_token_id"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_config_accepts_edge_values():
    config = tiny_config(num_hidden_layers=0, conv1d_kernel_size=0, ffn_proj_factor=0, dropout=0, eos_token_id=[1, 2],
                         initializer_range=1, layer_norm_eps=1e-6)
    assert config.ffn_dim == 0 and config.eos_token_id == [1, 2]


@pytest.mark.parametrize("field, value", [("initializer_range", math.inf), ("hidden_size", 0),
                                          ("layer_norm_eps", "1e-5"), ("conv1d_kernel_size", True)])
def test_a_bad_config_json_fails_to_load(field, value, tmp_path):
    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    fields = json.loads(path.read_text())
    fields[field] = value
    path.write_text(json.dumps(fields))  # inf is written as Infinity, which json reads back
    with pytest.raises(ValueError, match=field):
        AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=field):
        SLSTMConfig.from_dict(fields)


def test_config_round_trip_and_derived_sizes(tmp_path):
    config = tiny_config(ffn_proj_factor=1.3, hidden_size=64)
    assert config.head_dim == 16 and config.ffn_dim == 128  # 64 * ceil(1.3 * 64 / 64)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SLSTMConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()


def test_presets():
    assert {"tiny", "125m", "350m", "760m", "1.3b"} <= set(SLSTMConfig.available_presets())
    tiny = SLSTMForCausalLM(SLSTMConfig.from_preset("tiny"))
    assert sum(p.numel() for p in tiny.parameters()) < 1_000_000
    assert SLSTMConfig.from_preset("125m", num_hidden_layers=2).hidden_size == 768
    with pytest.raises(ValueError, match="preset"):
        SLSTMConfig.from_preset("7b")


# --- forward contract -----------------------------------------------------------------------------------------------
def test_outputs_tuples_hidden_states_and_cache_flags(model):
    ids = torch.randint(0, 61, (2, 7), device=model.device)
    out = model(ids)
    assert out.logits.shape == (2, 7, 61)
    assert isinstance(state_of(out), SLSTMCache)  # config.use_cache defaults to True
    as_tuple = model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.logits)

    with_hidden = model(ids, output_hidden_states=True)
    assert len(with_hidden.hidden_states) == model.config.num_hidden_layers + 1
    model.config.output_hidden_states = True
    assert len(model(ids).hidden_states) == model.config.num_hidden_layers + 1
    model.config.output_hidden_states = False

    model.config.use_cache = False
    assert state_of(model(ids)) is None
    assert isinstance(state_of(model(ids, use_cache=True)), SLSTMCache)
    model.config.return_dict = False
    assert isinstance(model(ids), tuple)


def test_loss_ignores_minus_100_and_matches_cross_entropy(model):
    ids = torch.randint(0, 61, (2, 9), device=model.device)
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 61), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_inputs_embeds_and_logits_to_keep(model):
    ids = torch.randint(0, 61, (2, 6), device=model.device)
    out = model(ids)
    from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids))
    torch.testing.assert_close(from_embeds.logits, out.logits)
    last = model(ids, logits_to_keep=1)
    assert last.logits.shape == (2, 1, 61)
    torch.testing.assert_close(last.logits[:, 0], out.logits[:, -1])


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 7], [3, 1, 8], [11, 1]])
@pytest.mark.parametrize("conv", [0, 1, 4])
def test_chunked_forward_equals_full(chunks, conv, device):
    model = random_model(conv1d_kernel_size=conv).to(device)
    ids = torch.randint(0, 61, (3, 12), device=device)
    full = model(ids).logits
    cache, logits = SLSTMCache(model.config), []
    for part in ids.split(chunks, dim=1):
        logits.append(model(part, **with_cache(cache)).logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 12


def test_state_carries_information(model):
    ids = torch.randint(0, 61, (1, 30), device=model.device)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 61
    assert not torch.allclose(model(ids).logits[0, -1], model(changed).logits[0, -1])


def test_left_padding_equals_alone(model):
    rows = [torch.randint(0, 61, (n,), device=model.device) for n in (9, 4, 1)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(3, width, dtype=torch.long, device=model.device)
    mask = torch.zeros(3, width, dtype=torch.long, device=model.device)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        ids[i, : width - len(row)] = 7  # a real token id as padding: it must not matter
        mask[i, width - len(row) :] = 1
    out = model(ids, attention_mask=mask)
    for i, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        torch.testing.assert_close(out.logits[i, width - len(row) :], alone, rtol=1e-5, atol=1e-5)


def test_masked_hole_is_skipped_by_conv_and_cell(model):
    ids = torch.randint(0, 61, (1, 10), device=model.device)
    mask = torch.ones(1, 10, dtype=torch.long, device=model.device)
    mask[0, 3:6] = 0
    holed = model(ids, attention_mask=mask).logits[0]
    compact = model(torch.cat([ids[:, :3], ids[:, 6:]], 1)).logits[0]
    torch.testing.assert_close(holed[6:], compact[3:], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_same_gradients(device):
    model = random_model(dropout=0.0).to(device).train()
    ids = torch.randint(0, 61, (2, 8), device=device)
    model(ids, labels=ids).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    checkpointing(model, "enable")
    assert model.model.gradient_checkpointing
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_dropout_only_in_training(device):
    model = random_model(dropout=0.5, embedding_dropout=0.5).to(device)
    ids = torch.randint(0, 61, (1, 6), device=device)
    torch.testing.assert_close(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)


def test_bad_inputs_raise_value_errors(model):
    ids = torch.randint(0, 61, (2, 5), device=model.device)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=torch.zeros(2, 5, 32, device=model.device))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(2, 5, 31, device=model.device))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 3, device=model.device))
    with pytest.raises(ValueError, match="SLSTMCache"):
        model(ids, **with_cache(((torch.zeros(1),),)))
    cache = state_of(model(ids))
    with pytest.raises(ValueError, match="batch"):
        model(ids[:1], **with_cache(cache))


# --- empty inputs and zero blocks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "fused", "compiled"])
@pytest.mark.parametrize("conv", [0, 4])
@pytest.mark.parametrize("blocks", [2, 0])
def test_empty_sequence_gives_empty_outputs_and_keeps_the_state(backend, conv, blocks):
    model = random_model(conv1d_kernel_size=conv, num_hidden_layers=blocks)
    empty = torch.zeros(2, 0, dtype=torch.long)
    ids = torch.randint(0, 61, (2, 5))
    with use_backend(backend):
        out = model(empty, output_hidden_states=True)
        assert out.logits.shape == (2, 0, 61) and len(out.hidden_states) == blocks + 1
        assert SLSTMModel(model.config)(empty).last_hidden_state.shape == (2, 0, 32)
        for cache in (SLSTMCache(model.config), state_of(model(ids[:, :3]))):
            seen = cache.get_seq_length()
            after = model(empty, attention_mask=torch.ones(2, seen, dtype=torch.long), **with_cache(cache))
            assert after.logits.shape == (2, 0, 61) and cache.get_seq_length() == seen
        # the state is untouched: continuing after the empty step equals the plain run
        cache = state_of(model(ids[:, :3]))
        model(empty, **with_cache(cache))
        torch.testing.assert_close(model(ids[:, 3:], **with_cache(cache)).logits, model(ids).logits[:, 3:])
        model.train()
        loss = model(empty).logits.sum()
        loss.backward()  # an empty batch still backpropagates (zero gradients)
        model.eval()


def test_zero_block_model_runs_with_a_cache():
    model = random_model(num_hidden_layers=0)
    ids = torch.randint(0, 61, (2, 6))
    cache = state_of(model(ids[:, :4]))
    assert isinstance(cache, SLSTMCache) and len(cache.layers) == 0
    torch.testing.assert_close(model(ids[:, 4:], **with_cache(cache)).logits, model(ids).logits[:, 4:])
    torch.testing.assert_close(model(ids, **with_cache(SLSTMCache(model.config))).logits, model(ids).logits)


def test_print_shows_the_sizes_of_the_custom_modules():
    text = repr(random_model(hidden_size=32, num_heads=4, conv1d_kernel_size=4))
    for expected in ("OffsetLayerNorm(32, eps=1e-05)", "MultiHeadNorm(num_heads=4, head_dim=8, eps=1e-05)",
                     "CausalConv1d(\n", "32, kernel_size=4", "HeadwiseGateProjection(4 gates x 4 heads of 8x8)",
                     "hidden_size=32, num_heads=4, head_dim=8, forget_gate='sigmoid'",
                     "GatedFeedForward(\n", "32 -> 2x64 -> 32, activation='gelu'"):
        assert expected in text, expected


# --- initialisation ---------------------------------------------------------------------------------------------------
def test_official_initialisation():
    config = tiny_config(hidden_size=64, num_heads=4, num_hidden_layers=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = SLSTMForCausalLM(config)
    layer0 = model.model.layers[0].slstm
    assert torch.count_nonzero(layer0.recurrent_kernel) == 0
    bias = layer0.gate_bias.view(4, 4, 16)  # (NH, gate, DH)
    assert torch.count_nonzero(bias[:, [0, 2, 3]]) == 0
    forget = bias[0, 1]
    assert forget[0].item() == pytest.approx(5.0) and forget[-1].item() == pytest.approx(-7.0)
    assert forget[1].item() == pytest.approx(-(-5 + 12 * (1 / 15) ** 0.3), rel=1e-5)
    deeper = model.model.layers[2].slstm.gate_bias.view(4, 4, 16)[0, 1]
    assert deeper[1] > forget[1]  # exponent 0.3 + 1.3 in the last block: flatter, positive longer
    small = math.sqrt(2 / (5 * 64))
    assert model.model.embeddings.weight.std().item() == pytest.approx(small, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(small, rel=0.05)
    wang = 2 / (3 * math.sqrt(64))
    assert model.model.layers[0].ffn.down_proj.weight.std().item() == pytest.approx(wang, rel=0.1)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.count_nonzero(param) == 0, name


# --- saving and loading -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_save_load_bit_exact(tmp_path, tied):
    model = random_model(tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) != tied
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is SLSTMForCausalLM
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    if tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embeddings.weight.data_ptr()
    ids = torch.randint(0, 61, (2, 5))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_auto_model_and_auto_map(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is SLSTMModel
    import json

    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_slstm.SLSTMForCausalLM"
    assert auto_map["AutoModel"] == "modeling_slstm.SLSTMModel"
    assert auto_map["AutoConfig"] == "configuration_slstm.SLSTMConfig"
    for name in ("modeling_slstm.py", "configuration_slstm.py", "layers_slstm.py", "cache_slstm.py", "slstm_op.py"):
        assert (tmp_path / name).is_file(), name
