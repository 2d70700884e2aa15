"""Configuration of the sLSTM language model (the sLSTM-only xLSTM LM of Beck et al., 2024)."""

import json
import math
import numbers
from pathlib import Path
from typing import Optional

from transformers import PretrainedConfig


FORGET_GATE_KINDS = ("sigmoid", "exp")
RECURRENT_WEIGHT_INITS = ("zeros", "standard")
FORGET_BIAS_INITS = ("powerlaw_blockdependent", "small_init", "standard", "zeros")
FFN_ACTIVATIONS = ("gelu", "relu", "relu2", "silu", "swish", "sigmoid", "selu")


_INT_MAX = 2**31 - 1  # no tensor dimension of a model that fits in memory comes near it


def _check_integer(name: str, value, low: int, note: str = "") -> None:
    """An integer in [low, 2**31 - 1]; bools, floats such as 256.0 and strings such as "256" are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= _INT_MAX:
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        quoted = " (write the number without quotes)" if isinstance(value, str) else ""
        raise ValueError(f"SLSTMConfig.{name} must be {kind}{note} and at most {_INT_MAX}, got {value!r}{quoted}.")


def _check_number(name: str, value, expected: str, in_range) -> None:
    """A finite real number satisfying `in_range`; bools and strings such as "1e-5" are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        quoted = " (write the number without quotes)" if isinstance(value, str) else ""
        raise ValueError(f"SLSTMConfig.{name} must be {expected}, got {type(value).__name__} {value!r}{quoted}.")
    if not (math.isfinite(value) and in_range(value)):
        raise ValueError(f"SLSTMConfig.{name} must be {expected}, got {value!r}.")


def _preset_dirs() -> list[Path]:
    """Where named presets live: inside the installed package, or `configuration/` beside it in a source tree."""
    here = Path(__file__).resolve().parent
    return [here / "presets", here.parent / "configuration"]


class SLSTMConfig(PretrainedConfig):
    r"""Configuration for [`SLSTMModel`] and [`SLSTMForCausalLM`].

    Defaults give a small model; `SLSTMConfig.from_preset(name)` loads the named sizes (`tiny`, `125m`, `350m`, `760m`,
    `1.3b`). Field names follow transformers; the official xLSTM name is given where it differs.

    Args:
        vocab_size: tokens in the vocabulary.
        hidden_size: model width D (official `embedding_dim`); every block keeps it.
        num_hidden_layers: sLSTM blocks L (official `num_blocks`).
        num_heads: heads NH of the block-diagonal recurrence; must divide `hidden_size`. More heads = less memory
            mixing (each head only mixes its own DH = D / NH units) and cheaper recurrent matmuls.
        conv1d_kernel_size: width K of the causal depthwise conv feeding the input and forget gates; 0 = no conv.
        ffn_proj_factor: the gated FFN's inner width is F = round_up(ffn_proj_factor * D, ffn_round_to);
            0 = blocks without FFN (official `feedforward=None`).
        ffn_round_to: multiple F is rounded up to (64 officially, for tensor-core friendly shapes).
        ffn_act: activation on the FFN's gate half (official `act_fn`; exact erf GELU by default).
        ffn_bias: biases in the FFN projections (off officially).
        forget_gate: "sigmoid" (the paper's default, log-space) or "exp" (exponential forget gate).
        dropout: dropout on the sLSTM cell output, before the per-head norm (official `dropout`).
        embedding_dropout: dropout on the token embeddings (official `add_embedding_dropout` uses `dropout`).
        add_post_blocks_norm: a final LayerNorm after the last block.
        layer_norm_eps: epsilon of every LayerNorm (block norms, per-head norm, final norm).
        initializer_range: std of "small_init" for embeddings, gate maps and FFN up-projection;
            None = sqrt(2 / (5 * D)) as in the paper's code.
        recurrent_weight_init: "zeros" (official default; R starts at 0) or "standard" (U(+-1/sqrt(D))).
        forget_bias_init: init of the forget-gate bias: "powerlaw_blockdependent" (official default, per head from +5
            down to -7, flatter in deeper blocks), "small_init" (linspace(3, 6)), "standard" or "zeros".
        tie_word_embeddings: share the embedding matrix with the LM head.
        use_cache: return the recurrent state (`cache`; `past_key_values` before transformers 5.24) by default.
    """

    model_type = "slstm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the state, as transformers 5.24+ / 4.57 name it
    attribute_map = {"num_attention_heads": "num_heads"}  # the generic name tools read; sLSTM heads are recurrent

    def __init__(
        self,
        vocab_size: int = 50304,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_heads: int = 4,
        conv1d_kernel_size: int = 4,
        ffn_proj_factor: float = 1.3,
        ffn_round_to: int = 64,
        ffn_act: str = "gelu",
        ffn_bias: bool = False,
        forget_gate: str = "sigmoid",
        dropout: float = 0.0,
        embedding_dropout: float = 0.0,
        add_post_blocks_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        initializer_range: Optional[float] = None,
        recurrent_weight_init: str = "zeros",
        forget_bias_init: str = "powerlaw_blockdependent",
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        pad_token_id: Optional[int] = None,
        bos_token_id: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        **kwargs,
    ):
        num_heads = kwargs.pop("num_attention_heads", num_heads)  # validated below, not set behind _validate's back
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.conv1d_kernel_size = conv1d_kernel_size
        self.ffn_proj_factor = ffn_proj_factor
        self.ffn_round_to = ffn_round_to
        self.ffn_act = ffn_act
        self.ffn_bias = ffn_bias
        self.forget_gate = forget_gate
        self.dropout = dropout
        self.embedding_dropout = embedding_dropout
        self.add_post_blocks_norm = add_post_blocks_norm
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.recurrent_weight_init = recurrent_weight_init
        self.forget_bias_init = forget_bias_init
        # transformers 5.x drops generation parameters passed as kwargs: set it directly.
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self._validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # 5.x has no default for it; keep it an attribute on every version.
        self.tie_word_embeddings = tie_word_embeddings
        self._validate_special_tokens()

    def _validate(self) -> None:
        """Check every field's type and range (a config.json is user input too); each error says what to write."""
        for name in ("vocab_size", "hidden_size", "num_heads", "ffn_round_to"):
            _check_integer(name, getattr(self, name), low=1)
        _check_integer("num_hidden_layers", self.num_hidden_layers, low=0, note=" (0 = no blocks)")
        _check_integer("conv1d_kernel_size", self.conv1d_kernel_size, low=0, note=" (0 disables the conv)")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"SLSTMConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}): "
                "each head owns hidden_size / num_heads units. Pick num_heads among the divisors of hidden_size."
            )
        _check_number("ffn_proj_factor", self.ffn_proj_factor, "a number >= 0 (0 = no FFN)", lambda v: v >= 0)
        for name in ("dropout", "embedding_dropout"):
            _check_number(name, getattr(self, name), "a probability in [0, 1)", lambda v: 0 <= v < 1)
        _check_number("layer_norm_eps", self.layer_norm_eps, "a number > 0 (e.g. 1e-5)", lambda v: v > 0)
        if self.initializer_range is not None:
            _check_number("initializer_range", self.initializer_range,
                          "a number > 0, or null for the paper's sqrt(2 / (5 * hidden_size))", lambda v: v > 0)
        for name, allowed in (
            ("forget_gate", FORGET_GATE_KINDS),
            ("ffn_act", FFN_ACTIVATIONS),
            ("recurrent_weight_init", RECURRENT_WEIGHT_INITS),
            ("forget_bias_init", FORGET_BIAS_INITS),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"SLSTMConfig.{name} must be one of {allowed}, got {value!r}.")
        for name in ("ffn_bias", "add_post_blocks_norm", "use_cache", "tie_word_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"SLSTMConfig.{name} must be true or false, got {value!r}.")

    def _validate_special_tokens(self) -> None:
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name, None)
            ids = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
            if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < self.vocab_size
                   for t in ids):
                raise ValueError(
                    f"SLSTMConfig.{name} must be null, a token id in [0, vocab_size={self.vocab_size}) or a list of "
                    f"them, got {value!r}."
                )

    @property
    def head_dim(self) -> int:
        """Units per head, DH = D / NH."""
        return self.hidden_size // self.num_heads

    @property
    def ffn_dim(self) -> int:
        """The gated FFN's inner width F (0 when blocks have no FFN)."""
        if self.ffn_proj_factor == 0:
            return 0
        return self.ffn_round_to * math.ceil(self.ffn_proj_factor * self.hidden_size / self.ffn_round_to)

    @property
    def small_init_std(self) -> float:
        return self.initializer_range if self.initializer_range is not None else math.sqrt(2 / (5 * self.hidden_size))

    @classmethod
    def available_presets(cls) -> list[str]:
        """Names accepted by `from_preset`."""
        return sorted({p.stem for d in _preset_dirs() if d.is_dir() for p in d.glob("*.json")})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SLSTMConfig":
        """A named preset (`tiny`, `125m`, `350m`, `760m`, `1.3b`), with optional field overrides."""
        for directory in _preset_dirs():
            path = directory / f"{name}.json"
            if path.is_file():
                fields = json.loads(path.read_text())
                fields.pop("_comment", None)
                fields.update(overrides)
                return cls(**fields)
        raise ValueError(f"Unknown SLSTMConfig preset {name!r}; available: {', '.join(cls.available_presets())}.")


__all__ = ["SLSTMConfig"]
