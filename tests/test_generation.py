"""generate() carries the sLSTM state: every strategy equals its uncached run, padding is exact, the state is O(1).
The tests taking `lm_on_device` run on the test device (`--device`)."""

import copy
import threading

import pytest
import torch
import transformers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
    pipeline,
)

from conftest import random_model, state_of, with_cache
from modeling_slstm import SLSTMCache


V = 61


@pytest.fixture(scope="module")
def lm():
    model = random_model(seed=3)
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def lm_on_device(lm, device):
    return copy.deepcopy(lm).to(device)


def prompts(batch=2, length=5, seed=0, device="cpu"):
    return torch.randint(1, V, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def gen(model, ids, **kwargs):
    kwargs.setdefault("max_new_tokens", 8)
    kwargs.setdefault("do_sample", False)
    return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)


# --- cached == uncached, strategy by strategy -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(num_beams=3),
        dict(num_beams=3, num_return_sequences=2),
        dict(do_sample=True, top_k=10, temperature=0.7),
        dict(do_sample=True, top_p=0.8, temperature=1.3, num_return_sequences=2),
        dict(do_sample=True, num_beams=2),
    ],
    ids=["greedy", "beam", "beam-nrs", "top-k", "top-p-nrs", "beam-sample"],
)
def test_cached_generation_equals_uncached(lm_on_device, kwargs):
    lm = lm_on_device
    ids = prompts(device=lm.device)
    torch.manual_seed(0)
    cached = gen(lm, ids, use_cache=True, **kwargs)
    torch.manual_seed(0)
    uncached = gen(lm, ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == ids.shape[1] + 8


def test_greedy_matches_a_hand_written_loop(lm_on_device):
    lm = lm_on_device
    ids = prompts(batch=1, device=lm.device)
    out = gen(lm, ids)
    seq = ids
    for _ in range(8):
        seq = torch.cat([seq, lm(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_scores_min_new_tokens_and_stopping_criteria(lm):
    ids = prompts()
    out = gen(lm, ids, return_dict_in_generate=True, output_scores=True, output_logits=True)
    assert len(out.scores) == 8 and out.scores[0].shape == (2, V)
    first = lm(ids).logits[:, -1]
    torch.testing.assert_close(out.logits[0], first, rtol=1e-5, atol=1e-5)

    eos = int(out.sequences[0, ids.shape[1]])  # the first token greedy picks for row 0
    early = gen(lm, ids[:1], eos_token_id=eos, max_new_tokens=8)
    assert early.shape[1] == ids.shape[1] + 1
    held = gen(lm, ids[:1], eos_token_id=eos, min_new_tokens=4, max_new_tokens=8)
    assert held.shape[1] >= ids.shape[1] + 4

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 3, dtype=torch.bool)

    stopped = gen(lm, ids, stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert stopped.shape[1] == ids.shape[1] + 3


def test_inputs_embeds_prompt(lm):
    ids = prompts()
    from_ids = gen(lm, ids)
    embeds = lm.get_input_embeddings()(ids)
    from_embeds = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                              do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_prefill_chunk_size_with_explicit_cache(lm, chunk):
    ids = prompts(length=7)
    cache = SLSTMCache(lm.config)
    out = gen(lm, ids, prefill_chunk_size=chunk, **with_cache(cache))
    assert torch.equal(out, gen(lm, ids))


def test_continue_from_returned_cache(lm):
    ids = prompts()
    first = gen(lm, ids, max_new_tokens=5, return_dict_in_generate=True)
    cache = state_of(first)
    assert cache.get_seq_length() == first.sequences.shape[1] - 1  # the last token was never fed
    more = lm.generate(first.sequences, attention_mask=torch.ones_like(first.sequences), **with_cache(cache),
                       max_new_tokens=6, do_sample=False)
    assert torch.equal(more, gen(lm, ids, max_new_tokens=11))


def test_continue_with_only_the_new_tokens_and_a_full_attention_mask(lm):
    ids = prompts(length=7)
    cache = state_of(lm(ids[:, :5]))
    more = lm.generate(ids[:, 5:], attention_mask=torch.ones_like(ids), **with_cache(cache), max_new_tokens=4,
                       do_sample=False)
    assert torch.equal(more[:, 2:], gen(lm, ids, max_new_tokens=4)[:, 7:])


@pytest.mark.parametrize("how", ["same-ids", "new-ids-only", "after-generate", "same-embeds"])
def test_a_cache_that_already_holds_the_inputs_is_refused(lm, how):
    ids = prompts()
    cache = state_of(lm(ids))  # has consumed all 5 prompt tokens
    kwargs = dict(**with_cache(cache), max_new_tokens=3, do_sample=False)
    with pytest.raises(ValueError, match=r"already consumed (5|7) tokens.*whole sequence so far"):
        if how == "same-ids":
            lm.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        elif how == "new-ids-only":  # 2 new tokens without a mask spanning the 7 of the whole sequence
            lm.generate(prompts(length=2, seed=1), **kwargs)
        elif how == "after-generate":
            first = gen(lm, ids, max_new_tokens=3, return_dict_in_generate=True)
            lm.generate(ids, **with_cache(state_of(first)), max_new_tokens=3)
        else:
            lm.generate(inputs_embeds=lm.get_input_embeddings()(ids), **kwargs)
    assert cache.get_seq_length() == 5  # nothing was fed


def test_zero_block_model_generates_with_and_without_cache():
    model = random_model(num_hidden_layers=0)
    ids = prompts()
    cached = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    uncached = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached.sequences, uncached)
    more = model.generate(cached.sequences, **with_cache(state_of(cached)), max_new_tokens=2,
                          do_sample=False, pad_token_id=0)
    assert more.shape == (2, 11)


@pytest.mark.parametrize("implementation", ["paged", "static", "offloaded", "dynamic"])
def test_cache_implementations_are_refused(lm, implementation):
    with pytest.raises(ValueError, match=f"cache_implementation='{implementation}' is not supported"):
        gen(lm, prompts(), cache_implementation=implementation)
    with pytest.raises(ValueError, match="cache_implementation"):
        gen(lm, prompts(), generation_config=GenerationConfig(cache_implementation=implementation, max_new_tokens=2))


def test_continuous_batching_is_refused(lm):
    for method in ("generate_batch", "init_continuous_batching", "continuous_batching_context_manager"):
        with pytest.raises(ValueError, match="Continuous batching"):
            getattr(lm, method)([[1, 2, 3]])


# --- padding ---------------------------------------------------------------------------------------------------------------
def left_padded(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0].device)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=3)], ids=["greedy", "beam"])
def test_left_padded_batch_equals_each_row_alone(lm_on_device, kwargs):
    lm = lm_on_device
    rows = [torch.randint(1, V, (n,), device=lm.device) for n in (7, 3, 5)]
    ids, mask = left_padded(rows)
    batched = lm.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kwargs)
    logits = lm(ids, attention_mask=mask).logits
    for i, row in enumerate(rows):
        alone = gen(lm, row[None], max_new_tokens=6, **kwargs)
        assert torch.equal(batched[i, ids.shape[1]:], alone[0, len(row):]), i
        torch.testing.assert_close(logits[i, -len(row):], lm(row[None]).logits[0], rtol=1e-5, atol=1e-5)


def test_left_padded_batch_of_one(lm):
    row = torch.randint(1, V, (4,))
    ids, mask = left_padded([row, torch.randint(1, V, (6,))])
    padded_one = lm.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=6, do_sample=False)
    alone = gen(lm, row[None], max_new_tokens=6)
    assert torch.equal(padded_one[0, ids.shape[1]:], alone[0, len(row):])


def test_right_padding_leaves_the_loss_of_real_tokens_unchanged(lm):
    row = torch.randint(1, V, (1, 6))
    padded = torch.cat([row, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], 1).long()
    labels = padded.clone()
    labels[mask == 0] = -100
    loss_padded = lm(padded, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss_padded, lm(row, labels=row).loss)


# --- the cache itself -----------------------------------------------------------------------------------------------------
def test_cache_size_does_not_grow(lm):
    cache = state_of(lm(prompts(batch=2, length=1)))
    size_after_one = cache.nbytes()
    step = torch.randint(1, V, (2, 1))
    for _ in range(999):
        lm(step, **with_cache(cache))
    assert cache.get_seq_length() == 1000
    assert cache.nbytes() == size_after_one > 0


@pytest.mark.parametrize("backend", ["fused", "compiled"])
def test_a_decoding_step_reads_no_tensor_value_on_the_host(lm, backend, monkeypatch):
    """No host sync and no data-dependent Python branch per token: a decoding step with an attention mask (as generate
    passes it, padded rows included) never turns a tensor into a Python value."""
    from modeling_slstm import slstm_cpu
    from modeling_slstm.slstm_op import use_backend

    if backend == "compiled" and not slstm_cpu.compiled_available():
        pytest.skip("the C++ kernel cannot be built here")
    ids = prompts(batch=2, length=4)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad(), use_backend(backend):
        cache = state_of(lm(ids, attention_mask=mask))
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)

        def refuse(*args):
            raise AssertionError("a tensor was read on the host during a decoding step")

        with monkeypatch.context() as patch:
            for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
                patch.setattr(torch.Tensor, name, refuse)
            logits = lm(ids[:, -1:], attention_mask=step_mask, **with_cache(cache)).logits
    assert logits.shape == (2, 1, V) and cache.get_seq_length() == 5


def test_cache_storage_after_a_long_prefill_is_the_state_only(lm):
    """No tensor in the cache may be a view that keeps a sequence-length buffer alive."""

    def storage_bytes(cache):
        tensors = [t for layer in cache.layers for t in (*layer.cell_state, layer.conv_window)]
        return sum(t.untyped_storage().nbytes() for t in tensors)

    short = state_of(lm(prompts(batch=2, length=1)))
    long = state_of(lm(prompts(batch=2, length=600)))
    assert storage_bytes(long) <= storage_bytes(short) <= 4 * short.nbytes()  # bounded, whatever the prompt length


def test_cache_batch_operations(lm):
    ids = prompts(batch=3)
    cache = state_of(lm(ids))
    nxt = torch.randint(1, V, (3, 1))

    reordered = state_of(lm(ids))
    reordered.reorder_cache(torch.tensor([2, 0, 1]))
    torch.testing.assert_close(lm(nxt[[2, 0, 1]], **with_cache(reordered)).logits,
                               lm(nxt, **with_cache(cache)).logits[[2, 0, 1]])

    repeated = state_of(lm(ids))
    repeated.batch_repeat_interleave(2)
    assert repeated.layers[0].batch_size == 6
    selected = state_of(lm(ids))
    selected.batch_select_indices(torch.tensor([1]))
    assert selected.layers[0].batch_size == 1
    ref = state_of(lm(ids))
    torch.testing.assert_close(lm(nxt[1:2], **with_cache(selected)).logits,
                               lm(nxt, **with_cache(ref)).logits[1:2])

    selected.reset()
    assert selected.get_seq_length() == 0 and selected.layers[0].cell_state is None
    torch.testing.assert_close(lm(nxt[1:2], **with_cache(selected)).logits, lm(nxt[1:2]).logits)

    offloaded = state_of(lm(ids))
    offloaded.offload(0)
    offloaded.prefetch(0)
    assert offloaded.layers[0].device.type == "cpu"
    assert offloaded.is_compileable is False


def test_stateful_stepping_equals_full_forward(lm_on_device):
    """The documented streaming pattern: prefill, then feed tokens one at a time (or in chunks) with the cache."""
    lm = lm_on_device
    ids = prompts(batch=2, length=12, device=lm.device)
    full = lm(ids).logits
    out = lm(ids[:, :5], use_cache=True)
    cache, logits = state_of(out), [out.logits]
    for t in range(5, 9):
        logits.append(lm(ids[:, t:t + 1], **with_cache(cache)).logits)
    logits.append(lm(ids[:, 9:], **with_cache(cache)).logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-5, atol=1e-5)


# --- streamers and pipeline with a locally built tokenizer -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    chars = "abcdefghijklmnopqrstuvwxyz .,"
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   model_input_names=["input_ids", "attention_mask"])


def test_streamers(lm, tokenizer):
    ids = tokenizer("hello world", return_tensors="pt")
    expected = lm.generate(**ids, max_new_tokens=6, do_sample=False)
    text = tokenizer.decode(expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    printed = []

    class Capture(TextStreamer):
        def on_finalized_text(self, chunk, stream_end=False):
            printed.append(chunk)

    lm.generate(**ids, max_new_tokens=6, do_sample=False, streamer=Capture(tokenizer, skip_prompt=True, skip_special_tokens=True))
    assert "".join(printed) == text

    iterator = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=lm.generate, kwargs=dict(**ids, max_new_tokens=6, do_sample=False,
                                                               streamer=iterator))
    worker.start()
    streamed = "".join(iterator)
    worker.join()
    assert streamed == text


def test_text_generation_pipeline(lm, tokenizer):
    lm.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=1, max_new_tokens=5, do_sample=False)
    generator = pipeline("text-generation", model=lm, tokenizer=tokenizer)
    result = generator("abc", max_new_tokens=5, do_sample=False)
    ids = tokenizer("abc", return_tensors="pt")
    expected = tokenizer.decode(lm.generate(**ids, max_new_tokens=5, do_sample=False)[0], skip_special_tokens=True)
    assert result[0]["generated_text"] == expected
    batch = generator(["ab", "a longer prompt"], max_new_tokens=4, do_sample=False, batch_size=2)
    assert len(batch) == 2
