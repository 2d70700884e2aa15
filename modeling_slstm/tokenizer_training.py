"""A byte-level BPE tokenizer trained with `tokenizers`, wrapped as a transformers fast tokenizer."""

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# generate() rejects the token_type_ids a `tokenizers`-backed tokenizer emits by default on transformers 4.57.
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` with end-of-text (also used as bos) and pad tokens, left padding for generation."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        model_input_names=MODEL_INPUT_NAMES,
        clean_up_tokenization_spaces=False,
    )


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE on `texts`; every byte string is encodable, so there is no unknown token.

    The vocabulary holds at most `vocab_size` tokens (256 bytes + 2 special tokens + merges); a small corpus may stop
    earlier. Size the model's embedding with `len(tokenizer)`.
    """
    if vocab_size < 258 + 1:
        raise ValueError(f"the vocabulary size must be > 258 (256 bytes and 2 special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tokenizer)


def ensure_special_tokens(tokenizer) -> None:
    """Give a user-supplied tokenizer the eos and pad tokens generation and batching need (in place)."""
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no end-of-text (eos) token; pick one that does, or omit --tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_input_names = MODEL_INPUT_NAMES


__all__ = ["EOS_TOKEN", "PAD_TOKEN", "ensure_special_tokens", "train_bpe_tokenizer", "wrap_tokenizer"]
