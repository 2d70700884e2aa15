"""Speculative decoding: the state rolls back exactly (SLSTMCache.crop after activate_past_recording), so assisted
generation with a draft model and prompt lookup return the tokens of plain greedy decoding. Every test runs on the test
device (`--device`); the C++ `compiled` backend (CPU tensors only) is skipped elsewhere."""

import copy
import pickle

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextStreamer

from conftest import random_model, state_of, with_cache
from modeling_slstm import SLSTMCache, SLSTMConfig, SLSTMForCausalLM, layers_slstm
from modeling_slstm.modeling_slstm import _latest_match
from modeling_slstm.slstm_op import use_backend
from modeling_slstm.transformers_compat import CROP_TAKES_TOKENS_TO_REMOVE, PROMPT_LOOKUP_NEEDS_EOS


V = 61
EOS = V - 1  # transformers 4.57's prompt lookup needs an end-of-sequence token
# transformers 5.24's own assisted generation calls the draft's generate() in a way that it deprecates itself
ASSISTANT_DEPRECATION = pytest.mark.allow_deprecation("Passing `generation_config` together with generation-related")


@pytest.fixture(scope="module")
def lm(device):
    return random_model(seed=3).to(device)


@pytest.fixture(scope="module")
def draft(device):
    return random_model(seed=4, hidden_size=16, num_heads=2, num_hidden_layers=1, conv1d_kernel_size=2).to(device)


def ids_of(length, seed=0, batch=1, device="cpu"):
    """Token ids drawn on the CPU (the same ids on every device), then moved to `device`."""
    return torch.randint(1, V - 1, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def repetitive(length=30, period=7, seed=0, device="cpu"):
    return ids_of(period, seed, device=device).repeat(1, -(-length // period))[:, :length]


def skip_compiled_off_cpu(backend, device):
    if backend == "compiled" and device.type != "cpu":
        pytest.skip("the compiled backend's C++ kernel takes CPU tensors only")


def greedy(model, ids, **kwargs):
    kwargs.setdefault("max_new_tokens", 16)
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=EOS,
                          pad_token_id=EOS, **kwargs)


def undo(cache, tokens: int) -> None:
    """cache.crop of `tokens` tokens in the installed line's terms (4.57 reads crop(0) as "keep none")."""
    cache.crop(-tokens if tokens or CROP_TAKES_TOKENS_TO_REMOVE else cache.get_seq_length())


def layer_states(cache) -> list:
    return [(layer.conv_window, *layer.cell_state) for layer in cache.layers]


def assert_same_state(cache, expected, atol=1e-5):
    assert cache.get_seq_length() == expected.get_seq_length()
    for ours, theirs in zip(layer_states(cache), layer_states(expected)):
        for a, b in zip(ours, theirs):
            if a is None or b is None:
                assert a is None and b is None
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


# --- the cache's rollback ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "fused", "compiled"])
@pytest.mark.parametrize("conv", [0, 4])
def test_crop_equals_a_fresh_prefill_of_what_is_kept(backend, conv, device):
    skip_compiled_off_cpu(backend, device)
    model = random_model(conv1d_kernel_size=conv).to(device)
    ids = ids_of(13, device=device)
    with use_backend(backend):
        for removed in range(0, 7):
            cache = state_of(model(ids[:, :5]))
            cache.activate_past_recording()
            model(ids[:, 5:6], **with_cache(cache))  # one token: the one-call decoding step where it runs
            model(ids[:, 6:12], **with_cache(cache))  # six more in one forward
            undo(cache, removed)
            kept = 12 - removed
            assert_same_state(cache, state_of(model(ids[:, :kept])))
            # and the model continues from it as from the fresh prefill
            torch.testing.assert_close(model(ids[:, kept:kept + 1], **with_cache(cache)).logits,
                                       model(ids[:, :kept + 1]).logits[:, -1:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "fused", "compiled"])
@pytest.mark.parametrize("conv", [0, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_a_long_recorded_forward_undoes_its_last_tokens_in_a_few_steps(backend, conv, padded, device, monkeypatch):
    # speculative decoding's first forward is the prompt followed by drafts: undoing drafts replayed the whole prompt
    skip_compiled_off_cpu(backend, device)
    model = random_model(conv1d_kernel_size=conv).to(device)
    ids = ids_of(100, batch=2, device=device)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :7] = 0
        mask[0, 90] = 0  # a masked step inside the cheap tail
    scanned = []
    scan = layers_slstm.slstm_scan

    def counted(gates, *args, **kwargs):
        scanned.append(gates.shape[1])
        return scan(gates, *args, **kwargs)

    monkeypatch.setattr(layers_slstm, "slstm_scan", counted)
    with use_backend(backend):
        plain = model(ids, attention_mask=mask).logits
        for removed in (0, 1, 20, 36, 37, 60):  # 36: back to the split (100 - 64 tokens); 37: before it
            cache = SLSTMCache(model.config)
            cache.activate_past_recording()
            assert torch.equal(model(ids, attention_mask=mask, **with_cache(cache)).logits, plain)  # split == one scan
            scanned.clear()
            undo(cache, removed)
            assert max(scanned, default=0) <= (64 if removed <= 36 else 100 - removed)
            kept = 100 - removed
            assert_same_state(cache, state_of(model(ids[:, :kept], attention_mask=mask[:, :kept])), atol=0)


def test_crop_under_left_padding_keeps_each_row_exact(device):
    model = random_model().to(device)
    ids = ids_of(9, batch=2, device=device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 is left-padded
    cache = state_of(model(ids[:, :2], attention_mask=mask[:, :2]))
    cache.activate_past_recording()
    model(ids[:, 2:], attention_mask=mask, **with_cache(cache))
    undo(cache, 4)
    assert_same_state(cache, state_of(model(ids[:, :5], attention_mask=mask[:, :5])))


def test_crop_of_nothing_drops_what_was_kept_and_recording_stays_on(lm):
    cache = state_of(lm(ids_of(4, device=lm.device)))
    cache.activate_past_recording()
    lm(ids_of(3, seed=1, device=lm.device), **with_cache(cache))
    assert all(len(layer._records) == 1 for layer in cache.layers)
    undo(cache, 0)
    assert all(not layer._records and layer.record_past for layer in cache.layers)
    assert cache.get_seq_length() == 7
    cache.stop_past_recording()
    lm(ids_of(2, seed=2, device=lm.device), **with_cache(cache))
    assert all(not layer._records for layer in cache.layers)


def test_without_recording_nothing_is_kept_and_nothing_can_be_undone(lm):
    cache = state_of(lm(ids_of(4, device=lm.device)))
    for _ in range(3):
        lm(ids_of(2, seed=1, device=lm.device), **with_cache(cache))
    assert all(not layer._records and not layer.record_past for layer in cache.layers)
    with pytest.raises(ValueError, match="activate_past_recording"):
        cache.crop(-1)


def test_undoing_more_than_was_recorded_or_a_positive_crop_is_refused(lm):
    cache = state_of(lm(ids_of(4, device=lm.device)))
    cache.activate_past_recording()
    lm(ids_of(2, seed=1, device=lm.device), **with_cache(cache))
    with pytest.raises(ValueError, match="Cannot undo 3 tokens"):
        cache.crop(-3)
    if CROP_TAKES_TOKENS_TO_REMOVE:
        with pytest.raises(ValueError, match="negative"):
            cache.crop(2)
    else:  # transformers 4.57: the length to keep
        cache.crop(5)
        kept = torch.cat([ids_of(4, device=lm.device), ids_of(2, seed=1, device=lm.device)[:, :1]], 1)
        assert_same_state(cache, state_of(lm(kept)))


@pytest.mark.parametrize("backend", ["compiled", "fused"])  # drafts on the kernel (they keep each step) or the modules
@pytest.mark.parametrize("copy_of", [lambda c: pickle.loads(pickle.dumps(c)), copy.deepcopy], ids=["pickle", "deepcopy"])
def test_a_recording_cache_pickles_and_its_copy_undoes_what_it_can_exactly(backend, copy_of):
    """A copy keeps the state and what undoes kernel-recorded drafts and whole forwards; undoing part of a forward run
    on the modules (its replay reads the model) is refused in the copy, and the original still can."""
    model = random_model()
    ids = ids_of(12)
    with use_backend(backend), torch.no_grad():  # as generate() runs (a state with autograd history won't deep-copy)
        cache = state_of(model(ids[:, :5]))
        cache.activate_past_recording()
        model(ids[:, 5:6], **with_cache(cache))
        model(ids[:, 6:9], **with_cache(cache))  # a draft of three
        model(ids[:, 9:12], **with_cache(cache))
        copied = copy_of(cache)
        assert_same_state(copied, cache, atol=0)
        undo(copied, 3)  # the last forward, whole
        assert_same_state(copied, state_of(model(ids[:, :9])))
        partial = copy_of(cache)
        undo(cache, 5)  # the last forward and two of the draft's three tokens
        assert_same_state(cache, state_of(model(ids[:, :7])))
        if backend == "compiled":
            undo(partial, 5)
            assert_same_state(partial, state_of(model(ids[:, :7])))
        else:
            with pytest.raises(ValueError, match="can only be undone whole"):
                undo(partial, 5)
            assert_same_state(partial, state_of(model(ids)))  # refused before any layer changed
            undo(partial, 3)
            assert_same_state(partial, state_of(model(ids[:, :9])))


# --- generate() ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [ids_of(9, seed=5), repetitive()], ids=["random", "repetitive"])
def test_prompt_lookup_returns_greedy_tokens(lm, prompt):
    prompt = prompt.to(lm.device)
    expected = greedy(lm, prompt, max_new_tokens=24)
    assert torch.equal(greedy(lm, prompt, max_new_tokens=24, prompt_lookup_num_tokens=3), expected)


def test_prompt_lookup_runs_no_logits_processor_when_there_is_none(lm, monkeypatch):
    # transformers' prompt lookup would run the (empty) processor list on dummy logits once per drafted token
    calls = []
    call = LogitsProcessorList.__call__

    def counted(self, *args, **kwargs):
        calls.append(len(self))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(LogitsProcessorList, "__call__", counted)
    prompt = repetitive(device=lm.device)
    expected = greedy(lm, prompt, max_new_tokens=16)
    calls.clear()
    assert torch.equal(greedy(lm, prompt, max_new_tokens=16, prompt_lookup_num_tokens=4), expected)
    assert calls == []
    # a processor that forbids tokens still vets the drafts, and the output is still greedy's
    banned = {"suppress_tokens": prompt[0, 3:5].tolist()}
    expected = greedy(lm, prompt, max_new_tokens=16, **banned)
    calls.clear()
    assert torch.equal(greedy(lm, prompt, max_new_tokens=16, prompt_lookup_num_tokens=4, **banned), expected)
    assert calls and all(calls)


@pytest.mark.parametrize("prompt_len", [1, 2, 9])
def test_the_first_speculative_forward_has_greedys_bits(prompt_len):
    """Speculative decoding's first forward carries the prompt and the first drafts, keeping their k + 1 logits;
    greedy's prefill keeps the prompt's last. Both run the prompt but its kept positions on the modules, then the rest
    as a decoding step, so each logit has greedy's bits: a near-tie of the top two logits is decided the same way (a
    red-team built LM heads with two near-equal rows: 6 of 60 generations parted from greedy before)."""
    model = random_model(seed=3)
    prompt, drafts = ids_of(prompt_len, seed=7), ids_of(3, seed=8)
    with torch.no_grad(), use_backend("compiled"):
        cache = SLSTMCache(model.config)
        steps = [model(prompt, use_cache=True, logits_to_keep=1, **with_cache(cache)).logits]
        for t in range(3):
            steps.append(model(drafts[:, t : t + 1], use_cache=True, **with_cache(cache)).logits)
        recording = SLSTMCache(model.config)
        recording.activate_past_recording()
        both = torch.cat([prompt, drafts], 1)
        verified = model(both, attention_mask=torch.ones_like(both), use_cache=True, logits_to_keep=4,
                         **with_cache(recording)).logits
    assert torch.equal(verified, torch.cat(steps, 1))
    for ours, greedys in zip(layer_states(recording), layer_states(cache)):
        assert all(a is b is None or torch.equal(a, b) for a, b in zip(ours, greedys))


def test_prompt_lookup_drafts_from_the_latest_occurrence(lm, monkeypatch):
    """Drafts follow the latest earlier occurrence of the last n-gram (transformers takes the first): in lines that
    differ in one token, the latest line carries on as the next will. The output is still greedy's."""
    a, b, c, x, y, z = 1, 2, 3, 4, 5, 6
    ids = torch.tensor([a, b, c, x, a, b, c, y, a, b])
    assert _latest_match(ids, 2, 10, 100, None).tolist() == [c, y, a, b]  # after the 2nd "a b", not the 1st
    assert _latest_match(ids, 2, 2, 100, None).tolist() == [c, y]  # at most num_output_tokens
    assert _latest_match(ids, 2, 10, 1, None).tolist() == [c]  # no draft past max_length - 1
    assert _latest_match(ids, 2, 10, 100, torch.tensor([y])).tolist() == [c]  # cut before an end token
    assert _latest_match(torch.tensor([a, b, c, z]), 2, 10, 100, None) is None  # "z" never came before
    assert _latest_match(torch.tensor([z, a, b, z]), 1, 10, 100, None).tolist() == [a, b, z]
    rounds = []  # (ids, candidates) of each prompt-lookup round
    prompt = repetitive(device=lm.device)
    expected = greedy(lm, prompt, max_new_tokens=16)
    make_generator = SLSTMForCausalLM._get_candidate_generator

    def spied(self, *args, **kwargs):
        generator = make_generator(self, *args, **kwargs)
        get = generator.get_candidates
        generator.get_candidates = lambda ids, *a, **k: rounds.append((ids, get(ids, *a, **k)[0])) or get(ids, *a, **k)
        return generator

    monkeypatch.setattr(SLSTMForCausalLM, "_get_candidate_generator", spied)
    assert torch.equal(greedy(lm, prompt, max_new_tokens=16, prompt_lookup_num_tokens=4), expected)
    assert rounds
    for ids, candidates in rounds:
        room = prompt.shape[1] + 16 - 1 - ids.shape[1]
        latest = _latest_match(ids[0].cpu(), 2, 4, room, torch.tensor([EOS]))
        assert candidates[0, ids.shape[1] :].cpu().tolist() == ([] if latest is None else latest.tolist())


@ASSISTANT_DEPRECATION
@pytest.mark.parametrize("prompt", [ids_of(9, seed=5), repetitive()], ids=["random", "repetitive"])
def test_assisted_generation_returns_greedy_tokens(lm, draft, prompt):
    prompt = prompt.to(lm.device)
    expected = greedy(lm, prompt, max_new_tokens=20)
    assert torch.equal(greedy(lm, prompt, max_new_tokens=20, assistant_model=draft), expected)
    assert torch.equal(greedy(lm, prompt, max_new_tokens=20, assistant_model=lm), expected)  # every draft accepted


def test_the_returned_state_records_nothing_and_continues(lm):
    prompt = repetitive(device=lm.device)
    out = greedy(lm, prompt, max_new_tokens=10, prompt_lookup_num_tokens=3, return_dict_in_generate=True)
    cache = state_of(out)
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    assert all(not layer.record_past and not layer._records for layer in cache.layers)
    more = greedy(lm, out.sequences, max_new_tokens=6, **with_cache(cache))
    assert torch.equal(more, greedy(lm, prompt, max_new_tokens=16))


@ASSISTANT_DEPRECATION
def test_streamer_and_stopping_criteria_work_with_speculation(lm, draft):
    prompt = repetitive(device=lm.device)
    streamed = []

    class Collect(TextStreamer):
        def __init__(self):
            pass

        def put(self, value):
            streamed.extend(value.flatten().tolist())

        def end(self):
            pass

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= prompt.shape[1] + 5, dtype=torch.bool,
                              device=input_ids.device)

    out = greedy(lm, prompt, max_new_tokens=20, assistant_model=draft, streamer=Collect(),
                 stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert streamed == out[0].tolist()
    assert prompt.shape[1] + 5 <= out.shape[1] <= prompt.shape[1] + 20
    assert torch.equal(out, greedy(lm, prompt, max_new_tokens=20)[:, : out.shape[1]])


@ASSISTANT_DEPRECATION
def test_sampling_with_a_draft_and_with_prompt_lookup_follows_transformers(lm, draft):
    torch.manual_seed(0)
    prompt = repetitive(device=lm.device)
    for extra in ({"assistant_model": draft}, {"prompt_lookup_num_tokens": 3}):
        out = lm.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=12,
                          eos_token_id=EOS, pad_token_id=EOS, **extra)
        assert out.shape[0] == 1 and torch.equal(out[:, : prompt.shape[1]], prompt)
        assert prompt.shape[1] < out.shape[1] <= prompt.shape[1] + 12 and int(out.max()) < V


def test_a_batch_is_refused_as_transformers_refuses_it(lm):
    prompt = ids_of(6, batch=2, device=lm.device)
    with pytest.raises(ValueError, match="batch_size = 1"):
        greedy(lm, prompt, prompt_lookup_num_tokens=3)


def test_prompt_lookup_without_an_end_token(device):
    # fresh: transformers may leave an assistant's settings on a model used as its own draft
    lm = random_model(seed=3).to(device)
    prompt = repetitive(device=lm.device)
    run = lambda: lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,  # noqa: E731
                              prompt_lookup_num_tokens=3, pad_token_id=0)
    if PROMPT_LOOKUP_NEEDS_EOS:  # transformers 4.57 would fail deep inside: a clear error instead
        with pytest.raises(ValueError, match="eos_token_id"):
            run()
    else:
        assert torch.equal(run(), lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                              pad_token_id=0))


@pytest.mark.parametrize("max_new_tokens", [3, 7, 12])
def test_prompt_lookup_stops_at_max_new_tokens(max_new_tokens, device):
    # the official initialisation (R = 0) falls into a 2-token loop here: lookup proposes far past the end
    torch.manual_seed(0)
    model = SLSTMForCausalLM(SLSTMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=4)).eval()
    model = model.to(device)
    prompt = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(1)).repeat(1, 8).to(device)
    expected = greedy(model, prompt, max_new_tokens=max_new_tokens)
    out = greedy(model, prompt, max_new_tokens=max_new_tokens, prompt_lookup_num_tokens=10)
    assert out.shape[1] <= prompt.shape[1] + max_new_tokens and torch.equal(out, expected)


@pytest.mark.parametrize("operation", ["reorder_cache", "batch_select_indices", "batch_repeat_interleave"])
def test_a_batch_operation_ends_what_can_be_undone(lm, operation):
    cache = state_of(lm(ids_of(4, batch=3, device=lm.device)))
    cache.activate_past_recording()
    lm(ids_of(2, seed=1, batch=3, device=lm.device), **with_cache(cache))
    argument = {"reorder_cache": torch.tensor([2, 0, 1], device=lm.device),
                "batch_select_indices": torch.tensor([0, 2], device=lm.device),
                "batch_repeat_interleave": 2}[operation]
    getattr(cache, operation)(argument)
    with pytest.raises(ValueError, match="Cannot undo 1 tokens"):  # the kept states have the old batch layout
        cache.crop(-1)
