"""What transformers' common model and generation tests expect of any model, checked on ours.

test_model.py and test_generation.py cover the sLSTM's own contracts (state, padding, every decoding strategy); this
file covers the generic ones: output containers, config switches, loss plumbing, checkpointing, dtypes, loading
variants, embedding resizing, the attention features a recurrent model refuses, and the Hub copy of the code.
"""

import ast
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.generation import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from conftest import checkpointing, random_model, state_of, tiny_config, with_cache
from modeling_slstm import SLSTMCache, SLSTMConfig, SLSTMForCausalLM, SLSTMModel
from modeling_slstm.modeling_slstm import SLSTMBlock


V, L = 61, 2  # tiny_config: vocab 61, 2 blocks, width 32, 4 heads


def ids_batch(batch=2, length=6, seed=0):
    return torch.randint(1, V, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- output containers and config switches ----------------------------------------------------------------------------
def test_base_model_tuple_order_follows_the_output_fields():
    base = random_model().model
    ids = ids_batch()
    out = base(ids, output_hidden_states=True)
    as_tuple = base(ids, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    torch.testing.assert_close(as_tuple[0], out.last_hidden_state)
    assert isinstance(as_tuple[1], SLSTMCache)
    assert len(as_tuple[2]) == L + 1
    # fields that are None drop out of the tuple, as in every transformers output
    assert len(base(ids, use_cache=False, return_dict=False)) == 1


def test_causal_lm_tuple_puts_the_loss_first_and_config_return_dict_is_read():
    model = random_model()
    ids = ids_batch()
    out = model(ids, labels=ids)
    model.config.return_dict = False
    loss, logits, cache = model(ids, labels=ids)
    torch.testing.assert_close(loss, out.loss)
    torch.testing.assert_close(logits, out.logits)
    assert isinstance(cache, SLSTMCache)
    assert not isinstance(model(ids, return_dict=True), tuple)  # the keyword wins over the config


def test_hidden_states_are_embeddings_block_inputs_and_final_output():
    model = random_model()
    ids = ids_batch()
    out = model.model(ids, output_hidden_states=True)
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, 6, 32)] * (L + 1)
    torch.testing.assert_close(out.hidden_states[0], model.model.embeddings(ids))
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    assert model.model(ids).hidden_states is None


def test_hidden_states_keep_gradients():
    model = random_model().train()
    out = model(ids_batch(), output_hidden_states=True)
    first, middle = out.hidden_states[0], out.hidden_states[1]
    first.retain_grad()
    middle.retain_grad()
    out.logits.sum().backward()
    assert first.grad is not None and middle.grad is not None and middle.grad.abs().sum() > 0


def test_use_cache_defaults_to_the_config_in_eval_and_off_in_training():
    model = random_model()
    ids = ids_batch()
    assert isinstance(state_of(model(ids)), SLSTMCache)
    model.train()
    assert state_of(model(ids)) is None  # no state built for a training step unless asked
    assert isinstance(state_of(model(ids, use_cache=True)), SLSTMCache)
    model.eval()
    model.config.use_cache = False
    assert state_of(model(ids)) is None


def test_eval_forward_is_deterministic_even_with_dropout():
    model = random_model(dropout=0.3, embedding_dropout=0.3)
    ids = ids_batch()
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_generic_class_attributes():
    assert SLSTMForCausalLM.main_input_name == SLSTMModel.main_input_name == "input_ids"
    assert SLSTMForCausalLM.can_generate() and not SLSTMModel.can_generate()
    assert "SLSTMBlock" in SLSTMForCausalLM._no_split_modules
    model = random_model()
    assert model.config.is_encoder_decoder is False
    assert model.get_output_embeddings() is model.lm_head
    assert model.get_input_embeddings() is model.model.embeddings
    assert model.base_model is model.model


# --- config -----------------------------------------------------------------------------------------------------------
def test_config_answers_to_the_generic_head_count_name():
    config = tiny_config(num_attention_heads=2)
    assert config.num_heads == config.num_attention_heads == 2
    assert "num_attention_heads" not in config.to_dict()  # stored under our own name only
    config.num_attention_heads = 8
    assert config.num_heads == 8
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(hidden_size=30, num_attention_heads=4)  # the alias is validated like the field


def test_config_refuses_zero_width_and_a_blockless_model_runs():
    for width in (0, -1):
        with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
            SLSTMConfig(hidden_size=width)
    model = SLSTMForCausalLM(tiny_config(num_hidden_layers=0)).eval()
    assert model(ids_batch()).logits.shape == (2, 6, V)


# --- loss -------------------------------------------------------------------------------------------------------------
def test_loss_takes_shift_labels_and_num_items_in_batch():
    model = random_model()
    ids = ids_batch()
    logits = model(ids).logits.reshape(-1, V)
    targets = torch.randint(0, V, ids.shape, generator=torch.Generator().manual_seed(1))
    # pre-shifted targets (context parallelism) replace `labels` entirely
    loss = model(ids, labels=ids, shift_labels=targets).loss
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets.reshape(-1)))
    torch.testing.assert_close(model(ids, labels=torch.zeros_like(ids), shift_labels=targets).loss, loss)
    # the Trainer's token count turns the mean into sum / count (gradient accumulation)
    summed = F.cross_entropy(logits.view(2, 6, V)[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(model(ids, labels=ids, num_items_in_batch=torch.tensor(4)).loss, summed / 4)


# --- gradient checkpointing -------------------------------------------------------------------------------------------
def test_gradient_checkpointing_recomputes_blocks_and_toggles():
    model = random_model().train()
    blocks = [m for m in model.modules() if isinstance(m, SLSTMBlock)]
    assert len(blocks) == L and not checkpointing(model, "is")
    calls = []
    for block in blocks:
        block.slstm.register_forward_hook(lambda *_: calls.append(1))

    checkpointing(model, "enable", use_reentrant=False)
    assert checkpointing(model, "is") and all(b.gradient_checkpointing for b in blocks)
    out = model(ids_batch(), labels=ids_batch(), use_cache=True)
    assert state_of(out) is None  # a recomputed block would write the state twice
    out.loss.backward()
    assert len(calls) == 2 * L  # forward, then again in backward

    checkpointing(model, "disable")
    assert not checkpointing(model, "is") and not any(b.gradient_checkpointing for b in blocks)
    calls.clear()
    model(ids_batch(), labels=ids_batch()).loss.backward()
    assert len(calls) == L


# --- dtypes and loading variants --------------------------------------------------------------------------------------
def test_bfloat16_weights_give_bfloat16_logits_and_a_float32_state(tmp_path):
    model = random_model()
    ids = ids_batch()
    reference = model(ids).logits
    model.save_pretrained(tmp_path)
    for half in (SLSTMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16), random_model().to(torch.bfloat16)):
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
        out = half.eval()(ids)
        assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
        assert all(t.dtype == torch.float32 for t in state_of(out).layers[0].cell_state)
        torch.testing.assert_close(out.logits.float(), reference, atol=0.15, rtol=0.05)


@pytest.mark.parametrize(
    "save_kwargs, load_kwargs",
    [
        (dict(safe_serialization=False), {}),
        ({}, dict(device_map="cpu")),
        ({}, dict(low_cpu_mem_usage=True)),
    ],
)
def test_loading_variants_are_bit_exact(tmp_path, save_kwargs, load_kwargs):
    model = random_model(tie_word_embeddings=False)
    ids = ids_batch()
    model.save_pretrained(tmp_path, **save_kwargs)
    loaded = SLSTMForCausalLM.from_pretrained(tmp_path, **load_kwargs).eval()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_base_and_head_checkpoints_load_into_each_other(tmp_path):
    model = random_model()  # tied
    ids = ids_batch()
    model.save_pretrained(tmp_path / "lm")
    base = SLSTMModel.from_pretrained(tmp_path / "lm").eval()
    assert torch.equal(base(ids).last_hidden_state, model.model(ids).last_hidden_state)
    base.save_pretrained(tmp_path / "base")
    lm = SLSTMForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert lm.lm_head.weight.data_ptr() == lm.model.embeddings.weight.data_ptr()
    assert torch.equal(lm(ids).logits, model(ids).logits)


# --- embedding resizing -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings(tied):
    model = random_model(tie_word_embeddings=tied)
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(V + 5, mean_resizing=False)
    assert model.config.vocab_size == V + 5
    assert model.get_input_embeddings().weight.shape == model.lm_head.weight.shape == (V + 5, 32)
    assert (model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()) == tied
    assert torch.equal(model.get_input_embeddings().weight[:V], old)
    ids = torch.cat([ids_batch(), torch.full((2, 1), V + 4)], 1)  # a new token id works
    assert model(ids, labels=ids).logits.shape == (2, 7, V + 5)
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (2, 9)
    model.resize_token_embeddings(V - 1, pad_to_multiple_of=8)  # rounds up to 64
    assert model.config.vocab_size == 64 and model(ids_batch()).logits.shape[-1] == 64


# --- generate ---------------------------------------------------------------------------------------------------------
def test_generate_honours_use_cache_false_from_a_saved_config(tmp_path):
    random_model(use_cache=False).save_pretrained(tmp_path)
    model = SLSTMForCausalLM.from_pretrained(tmp_path).eval()
    assert model.generation_config.use_cache is False
    steps = []
    model.register_forward_pre_hook(lambda module, args, kwargs: steps.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    out = model.generate(ids_batch(length=5), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert state_of(out) is None
    assert steps == [5, 6, 7]  # every step re-reads the whole sequence


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_returns_hidden_states_scores_and_logits(use_cache):
    model = random_model()
    out = model.generate(
        ids_batch(length=5),
        max_new_tokens=3,
        do_sample=False,
        use_cache=use_cache,
        return_dict_in_generate=True,
        output_hidden_states=True,
        output_scores=True,
        output_logits=True,
    )
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert len(out.scores) == len(out.logits) == len(out.hidden_states) == 3
    for step, per_block in enumerate(out.hidden_states):
        length = 1 if use_cache and step else 5 + step  # the prompt first; then one token with a cache
        assert [tuple(h.shape) for h in per_block] == [(2, length, 32)] * (L + 1)
    assert isinstance(state_of(out), SLSTMCache) == use_cache
    assert state_of(out) is None or state_of(out).get_seq_length() == out.sequences.shape[1] - 1


def test_beam_search_outputs_cover_every_beam():
    model = random_model()
    out = model.generate(
        ids_batch(length=5),
        max_new_tokens=3,
        num_beams=2,
        do_sample=False,
        return_dict_in_generate=True,
        output_hidden_states=True,
        output_scores=True,
    )
    assert isinstance(out, GenerateBeamDecoderOnlyOutput)
    assert out.scores[0].shape == (4, V) and out.hidden_states[0][0].shape == (4, 5, 32)
    assert state_of(out).layers[0].batch_size == 4


def test_generate_from_bos_alone():
    model = random_model(bos_token_id=1)
    assert model.generate(max_new_tokens=3, do_sample=False).shape == (1, 4)


# --- what a recurrent model refuses -----------------------------------------------------------------------------------
def test_attention_only_features_are_refused_clearly(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="scaled_dot_product_attention|sdpa"):
        SLSTMForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="SLSTMCache"):
        model(ids_batch(), **with_cache(DynamicCache()))
    assert "attentions" not in model(ids_batch(), output_attentions=True)


# --- Hub copy of the code ---------------------------------------------------------------------------------------------
def test_modeling_file_imports_every_module_the_model_needs_directly():
    """transformers 4.57 copies only the modeling file's direct relative imports into a saved model (5.x follows
    them recursively), so any sibling module used at run time, even lazily, must be imported there by name."""
    package = Path(SLSTMForCausalLM.__module__.replace(".", "/")).parent
    root = Path(__import__("modeling_slstm").__file__).parent
    assert package.name == root.name

    def relative_imports(name):
        tree = ast.parse((root / f"{name}.py").read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}

    needed, todo = set(), ["modeling_slstm"]
    while todo:
        for module in relative_imports(todo.pop()) - needed:
            needed.add(module)
            todo.append(module)
    direct = {
        node.module
        for node in ast.parse((root / "modeling_slstm.py").read_text()).body  # top level only
        if isinstance(node, ast.ImportFrom) and node.level == 1
    }
    assert needed <= direct, f"import these in modeling_slstm.py: {sorted(needed - direct)}"
    assert not any(re.match(r"from \. import", line) for line in (root / "modeling_slstm.py").read_text().splitlines())
