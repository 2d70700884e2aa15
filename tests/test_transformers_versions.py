"""The installed transformers line's own names: the state is `cache` from 5.24 (`past_key_values` before, still accepted
with transformers' FutureWarning), activation checkpointing under its current name, and the deprecation guard that
every test runs under (conftest) really catches what transformers deprecates. Every test runs on the test device
(`--device`)."""

import inspect

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from conftest import random_model, state_of, watch_deprecations, with_cache
from modeling_slstm import SLSTMCache
from modeling_slstm.transformers_compat import CACHE


NEWEST_NAMES = CACHE == "cache"  # transformers >= 5.24
OTHER = "past_key_values" if NEWEST_NAMES else "cache"


def ids_batch(batch=2, length=9, seed=0, device="cpu"):
    """Drawn on the CPU (the same ids on every device), then moved to `device`."""
    return torch.randint(1, 61, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def test_the_state_goes_by_the_installed_lines_name(device):
    model = random_model().to(device)
    for method in (model.forward, model.model.forward, model.prepare_inputs_for_generation):
        parameters = inspect.signature(method).parameters
        assert CACHE in parameters and OTHER not in parameters, list(parameters)
    assert CACHE in CausalLMOutputWithPast.__dataclass_fields__  # transformers' own output class carries it
    ids = ids_batch(device=device)
    out = model(ids)
    assert isinstance(out, CausalLMOutputWithPast) and isinstance(state_of(out), SLSTMCache)
    generated = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(getattr(generated, CACHE), SLSTMCache)


def test_continuing_under_the_current_name_equals_the_full_forward(device):
    model = random_model().to(device)
    ids = ids_batch(device=device)
    head = model(ids[:, :4])
    tail = model(ids[:, 4:], **with_cache(state_of(head)))
    torch.testing.assert_close(torch.cat([head.logits, tail.logits], 1), model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.old_names
@pytest.mark.skipif(not NEWEST_NAMES, reason="past_key_values is the current name before transformers 5.24")
def test_past_key_values_still_works_with_a_future_warning(device):
    model = random_model().to(device)
    ids = ids_batch(device=device)
    head = model(ids[:, :4])
    with pytest.warns(FutureWarning, match="past_key_values"):
        tail = model(ids[:, 4:], past_key_values=head.cache)
    torch.testing.assert_close(torch.cat([head.logits, tail.logits], 1), model(ids).logits, rtol=1e-5, atol=1e-5)
    assert tail.past_key_values is tail.cache and tail["past_key_values"] is tail.cache

    plain = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    with pytest.warns(FutureWarning, match="past_key_values"):
        again = model.generate(plain.sequences, attention_mask=torch.ones_like(plain.sequences), max_new_tokens=3,
                               do_sample=False, past_key_values=plain.cache)
    full = model.generate(ids, max_new_tokens=7, do_sample=False)
    assert torch.equal(again, full)


@pytest.mark.old_names
@pytest.mark.skipif(not NEWEST_NAMES, reason="the renamed state is what transformers >= 5.24 deprecates")
def test_the_guard_sees_warnings_and_transformers_log_messages(device):
    model = random_model().to(device)
    with watch_deprecations() as found:
        out = model(ids_batch(device=device))
    assert found == []
    with watch_deprecations() as found:
        model(ids_batch(device=device), past_key_values=None)  # deprecate_kwarg: a FutureWarning
    assert len(found) == 1 and found[0].startswith("FutureWarning"), found
    with watch_deprecations() as found:
        out.past_key_values  # the output classes' BC property: transformers' logger
    assert len(found) == 1 and found[0].startswith("transformers."), found
