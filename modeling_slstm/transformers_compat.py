"""What differs between the transformers lines this package supports (4.57.x and 5.x), and nothing else.

The rest of the package (and its tests) uses these names instead of looking at the installed version. Each entry says
which line needs it and when it can go; the lines are told apart by the feature itself, not by a version string, except
where only the meaning of an argument changed.
"""

import functools
import inspect
import json
from pathlib import Path

import transformers
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg


# --- The recurrent state's name -----------------------------------------------------------------------------------
# transformers 5.24 renamed `past_key_values` to `cache`: the model keyword, the field of every output class and
# generate()'s model kwargs. 4.57.x-5.23.x pass, return and read `past_key_values`.
# Delete when the oldest supported line is 5.24: `cache` everywhere, and `accepts_old_cache_name` becomes transformers'
# own `deprecate_kwarg("past_key_values", ..., new_name="cache")`.
CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_OLD_CACHE = "past_key_values"


def accepts_old_cache_name(function):
    """Decorate a method whose state parameter is named `cache` so that it takes the installed line's name.

    From 5.24: `past_key_values=` still works, with transformers' FutureWarning, as in its own models. Before: the
    signature shows `past_key_values` (generate() checks its model kwargs against it) and that name is mapped to `cache`.
    """
    if CACHE == "cache":
        return deprecate_kwarg(_OLD_CACHE, "5.40.0", new_name="cache")(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if _OLD_CACHE in kwargs:
            kwargs["cache"] = kwargs.pop(_OLD_CACHE)
        return function(*args, **kwargs)

    signature = inspect.signature(function)
    wrapper.__signature__ = signature.replace(
        parameters=[p.replace(name=_OLD_CACHE) if p.name == "cache" else p for p in signature.parameters.values()]
    )
    return wrapper


# --- Activation checkpointing's name -----------------------------------------------------------------------------
# transformers 5.23 named gradient checkpointing "activation checkpointing" (`activation_checkpointing_enable/disable`,
# `is_activation_checkpointing`, the TrainingArguments field `activation_checkpointing`); 5.24 deprecates the old names.
# 4.57.x knows only `gradient_checkpointing*`. Delete when the oldest supported line is 5.23.
CHECKPOINTING = (
    "activation_checkpointing" if hasattr(PreTrainedModel, "activation_checkpointing_enable") else "gradient_checkpointing"
)


# --- Cache.crop's argument -----------------------------------------------------------------------------------------
# transformers 5.x calls `crop(n)` with the (non-positive) number of tokens to remove; 4.57.x with the length to keep
# (negative: remove that many). Delete when the oldest supported line is 5.0.
_BEFORE_5 = int(transformers.__version__.split(".")[0]) < 5
CROP_TAKES_TOKENS_TO_REMOVE = not _BEFORE_5


# --- Prompt lookup without an end-of-sequence token ------------------------------------------------------------------
# transformers 4.57's prompt-lookup candidates assume an eos_token_id (a TypeError deep inside without one); 5.x does not.
# Delete when the oldest supported line is 5.0.
PROMPT_LOOKUP_NEEDS_EOS = _BEFORE_5


# --- Prompt lookup past max_length -----------------------------------------------------------------------------------
# transformers 4.57's prompt-lookup candidates are not cut at max_length, and its assisted decoding accepts them all:
# generate() can return more tokens than asked for. 5.x caps them. Delete when the oldest supported line is 5.0.
def cap_candidates(generator, max_length: int) -> None:
    """Make `generator.get_candidates` propose no token past `max_length - 1` (the model adds one after them)."""
    if not _BEFORE_5:
        return
    get_candidates = generator.get_candidates

    def capped(input_ids, *args, **kwargs):
        candidates, logits = get_candidates(input_ids, *args, **kwargs)
        keep = max(max_length - 1, input_ids.shape[1])
        if candidates.shape[1] > keep:
            candidates = candidates[:, :keep]
            logits = None if logits is None else logits[:, : keep - input_ids.shape[1]]
        return candidates, logits

    generator.get_candidates = capped


# --- What prepare_inputs_for_generation is told ---------------------------------------------------------------------
# transformers 5.x passes `next_sequence_length` (tokens the model has not seen) and `is_first_iteration`; 4.57.x passes
# neither, and its attention mask spans past + new tokens. Delete when the oldest supported line is 5.0.
def new_tokens(kwargs: dict, input_ids, attention_mask, seen: int) -> tuple:
    """(tokens not yet fed to the state or None for all, whether this is the prefill); pops 5.x's keys from kwargs."""
    if "next_sequence_length" in kwargs or "is_first_iteration" in kwargs:
        return kwargs.pop("next_sequence_length", None), kwargs.pop("is_first_iteration", False)
    total = attention_mask.shape[1] if attention_mask is not None else input_ids.shape[1]
    return (total - seen if seen else None), seen == 0


# --- Saved tokenizers --------------------------------------------------------------------------------------------
# transformers 5.x saves a `tokenizers`-backed tokenizer as class `TokenizersBackend`, which 4.57.x cannot load;
# `PreTrainedTokenizerFast` loads on both. Delete when the oldest supported line is 5.0.
def portable_tokenizer_config(directory: str) -> None:
    """Rewrite `tokenizer_config.json` in `directory` (if any) to name a class every supported line knows."""
    path = Path(directory) / "tokenizer_config.json"
    if path.is_file():
        fields = json.loads(path.read_text())
        if fields.get("tokenizer_class") == "TokenizersBackend":
            fields["tokenizer_class"] = "PreTrainedTokenizerFast"
            path.write_text(json.dumps(fields, indent=2, ensure_ascii=False) + "\n")


__all__ = [
    "CACHE",
    "CHECKPOINTING",
    "CROP_TAKES_TOKENS_TO_REMOVE",
    "PROMPT_LOOKUP_NEEDS_EOS",
    "accepts_old_cache_name",
    "cap_candidates",
    "new_tokens",
    "portable_tokenizer_config",
]
