"""sLSTM language model for transformers: the sLSTM-only xLSTM LM of Beck et al. (2024), stateful and Hub-ready.

Top-down: block, PreTrainedModel, SLSTMModel, SLSTMForCausalLM (outputs are transformers' own classes). Layers are in `layers_slstm`, the recurrence
in `slstm_op`, the state in `cache_slstm`.
"""

import math
from typing import Optional, Union

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .cache_slstm import RecordedSteps, SLSTMCache, SLSTMCacheLayer
from .configuration_slstm import SLSTMConfig
from .layers_slstm import (
    FFN_ACTIVATION_FNS,
    CausalConv1d,
    GatedFeedForward,
    HeadwiseGateProjection,
    MultiHeadNorm,
    CHEAP_UNDO_TOKENS,
    OffsetLayerNorm,
    SLSTMLayer,
)
from .slstm_reference import FORGET_GATES
from .slstm_op import (
    BlockWeights,
    block_decode_step,
    decode_kernels_ready,
    int8_rows,
    kernel_takes,
    linear_decode_step,
)
from .transformers_compat import CACHE, PROMPT_LOOKUP_NEEDS_EOS, accepts_old_cache_name, cap_candidates, new_tokens
# Direct imports of the op's own modules, unused here: transformers 4.57's custom-code loader copies only the modeling
# file's *direct* relative imports into a saved model, and the op needs these files at run time.
from .slstm_fused import slstm_fused_scan  # noqa: F401
from .slstm_reference import slstm_scan_reference  # noqa: F401


logger = logging.get_logger(__name__)


def _forget_bias(kind: str, num_heads: int, head_dim: int, block_idx: int, num_blocks: int, hidden_size: int):
    """Initial forget-gate bias, (NH, DH), as the official xLSTM initialisers define it."""
    if kind == "powerlaw_blockdependent":
        ratio = block_idx / (num_blocks - 1) if num_blocks > 1 else 0.0
        k = torch.arange(head_dim, dtype=torch.float32) / max(head_dim - 1, 1)
        per_head = -(-5.0 + 12.0 * k ** (0.3 + 1.3 * ratio))  # +5 down to -7
    elif kind == "small_init":
        per_head = torch.linspace(3.0, 6.0, head_dim)
    elif kind == "standard":
        bound = 1 / math.sqrt(hidden_size)
        return torch.empty(num_heads, head_dim).uniform_(-bound, bound)
    else:  # "zeros"
        per_head = torch.zeros(head_dim)
    return per_head.expand(num_heads, head_dim)


# Longest forward that a recording cache (speculative decoding: drafts and their verification) runs through the
# one-call kernel, which keeps the state after each token for `crop`; longer ones (a prompt) run module by module.
MAX_ONE_CALL_DRAFT = CHEAP_UNDO_TOKENS  # longer ones scan their last CHEAP_UNDO_TOKENS apart (SLSTMLayer)


def _decode_in_one_call(
    x: torch.Tensor, mask: Optional[torch.Tensor], cache_layers: list, weights: list, norm: Optional[tuple] = None,
    head: Optional[tuple] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """x (B, S, D) through the blocks of `weights` in a row, in one kernel call, each reading and writing its cache
    layer (None: zeros in, nothing kept) -> every block's output (L, B, S, D), with `norm` (weight, eps) the final norm
    of the last (B, S, D), else None, and with `head` (weight, bias) the logits of that (B, S, V), else None."""
    recording = cache_layers[0] is not None and cache_layers[0].record_past
    windows = [None if c is None else c.conv_window for c in cache_layers]
    states = [None if c is None else c.cell_state for c in cache_layers]
    hidden, windows, states, steps, normed, logits = block_decode_step(x, mask, windows, states, weights, recording,
                                                                        norm, head)
    for l, cache_layer in enumerate(cache_layers):
        if cache_layer is not None:
            cache_layer.write(windows[l], states[l], x.shape[1], RecordedSteps(*steps[l]) if recording else None)
    return hidden, normed, logits


class SLSTMBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: x + sLSTM(LN(x)), then x + FFN(LN(x)) (the FFN is absent if ffn_proj_factor == 0).

    Under gradient checkpointing (training) the model passes no cache: a recomputed forward would write it twice.
    """

    def __init__(self, config: SLSTMConfig, layer_idx: int):
        super().__init__()
        self.slstm_norm = OffsetLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.slstm = SLSTMLayer(config, layer_idx)
        if config.ffn_dim:
            self.ffn_norm = OffsetLayerNorm(config.hidden_size, config.layer_norm_eps)
            self.ffn = GatedFeedForward(config)
        else:
            self.ffn_norm = self.ffn = None
        # what this block's cache layer must hold (SLSTMCacheLayer.check): width, heads, head dim, conv window length
        self.cache_dims = (config.hidden_size, config.num_heads, config.head_dim, max(config.conv1d_kernel_size - 1, 0))

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        cache_layer: Optional[SLSTMCacheLayer] = None,
    ) -> torch.Tensor:
        if cache_layer is not None:
            cache_layer.check(hidden_states, *self.cache_dims)
        weights = self._one_call_step_weights(hidden_states, cache_layer)
        if weights is not None:
            return _decode_in_one_call(hidden_states, mask, [cache_layer], [weights])[0][-1]
        hidden_states = hidden_states + self.slstm(self.slstm_norm(hidden_states), mask, cache_layer)
        if self.ffn is not None:
            hidden_states = hidden_states + self.ffn(self.ffn_norm(hidden_states))
        return hidden_states

    def _decodes_in_one_call(self, x: torch.Tensor) -> bool:
        return self._one_call_weights(x) is not None

    def _one_call_step_weights(self, x: torch.Tensor, cache_layer: Optional[SLSTMCacheLayer]) -> Optional[BlockWeights]:
        """`_one_call_weights` for a forward of x (B, S, D) that is a decoding step: one token, or a draft of up to
        MAX_ONE_CALL_DRAFT tokens into a recording cache (speculative decoding); else None."""
        return self._one_call_weights(x) if _is_decoding_step(x.shape[1], cache_layer) else None

    def _one_call_weights(self, x: torch.Tensor) -> Optional[BlockWeights]:
        """The weights for a decoding step of the whole block in one kernel call (`slstm_op.block_decode_step`), or
        None when that would not compute exactly what the modules compute (`_kernel_weights`). Cuts the per-token
        Python and dispatch overhead of ~20 small ops to one."""
        if not decode_kernels_ready(x) or _changed_globally():
            return None
        weights = _kernel_weights([self], x.dtype)
        return weights[0] if weights is not None else None


# What the one-call decoding step stands in for: (path in the block, stock class, may be absent), parents first;
# stored as (parent path, name, path, class, may be absent), split once here rather than per block and token.
_ONE_CALL_PARTS = tuple((*path.rpartition(".")[::2], path, cls, optional) for path, cls, optional in (
    ("slstm_norm", OffsetLayerNorm, False), ("slstm", SLSTMLayer, False),
    ("slstm.gate_proj", HeadwiseGateProjection, False), ("slstm.dropout", nn.Dropout, False),
    ("slstm.out_norm", MultiHeadNorm, False), ("slstm.conv", CausalConv1d, True), ("slstm.conv.conv", nn.Conv1d, False),
    ("ffn_norm", OffsetLayerNorm, True), ("ffn", GatedFeedForward, True), ("ffn.gate_up_proj", nn.Linear, False),
    ("ffn.down_proj", nn.Linear, False),
))


# Where the one-call step finds each weight (module path, attribute), in `BlockWeights` order.
_ONE_CALL_WEIGHTS = (
    ("slstm_norm", "weight"), ("slstm.conv.conv", "weight"), ("slstm.conv.conv", "bias"), ("slstm.gate_proj", "weight"),
    ("slstm", "recurrent_kernel"), ("slstm", "gate_bias"), ("slstm.out_norm", "weight"), ("ffn_norm", "weight"),
    ("ffn.gate_up_proj", "weight"), ("ffn.gate_up_proj", "bias"), ("ffn.down_proj", "weight"), ("ffn.down_proj", "bias"),
)


# The same by group: a part's group holds it for every block, in block order, and is read through its parent's group
# (group 0: the blocks). (parent's group, name, stock class, may be absent) and (group, attribute).
_GROUP = {"": 0, **{part[2]: k + 1 for k, part in enumerate(_ONE_CALL_PARTS)}}
_PART_GROUPS = tuple((_GROUP[parent], name, cls, optional) for parent, name, _, cls, optional in _ONE_CALL_PARTS)
_WEIGHT_GROUPS = tuple((_GROUP[path], name) for path, name in _ONE_CALL_WEIGHTS)
# the weights that may be int8 rows with a scale per row (torchao's weight-only int8, `int8_rows`): the FFN's
_INT8_WEIGHTS = tuple(_ONE_CALL_WEIGHTS.index(("ffn." + name, "weight")) for name in ("gate_up_proj", "down_proj"))
_SLSTM_NORM, _SLSTM, _DROPOUT, _OUT_NORM, _CONV, _FFN_NORM, _FFN = (
    _GROUP[path] for path in ("slstm_norm", "slstm", "slstm.dropout", "slstm.out_norm", "slstm.conv.conv", "ffn_norm",
                              "ffn"))


def _stock(modules: list, cls: type) -> bool:
    """Whether every module is of class `cls` exactly, unhooked, with its class's forward. Registering a
    parametrization swaps a module's class, so parametrized modules are refused too."""
    for m in modules:  # one pass, no generators: a decoding step checks ~260 modules per token
        if type(m) is not cls or m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
            return False
    return True


def _stock_parts(blocks: list) -> Optional[list]:
    """The blocks' submodules the one-call step stands in for, by group (`_PART_GROUPS`; None: an optional part absent
    from every block), when every part is `_stock`; else None, also when an optional part is in some blocks and not
    in others. A group is checked before its children are read (an adapter may wrap a module in one without them).
    Reads `_modules` directly, a group at a time across the blocks (a decoding step runs this per token). The caller
    checks the blocks themselves (a block's own hooks run when it is called) and `_changed_globally()`."""
    groups = [blocks]
    for parent, name, cls, optional in _PART_GROUPS:
        owners = groups[parent]
        parts = None if owners is None else [owner._modules.get(name) for owner in owners]
        if optional and parts is not None and all(part is None for part in parts):
            parts = None
        if parts is not None and not _stock(parts, cls):
            return None
        groups.append(parts)
    return groups


def _kernel_weights(blocks: list, dtype: torch.dtype) -> Optional[list]:
    """Each block's `BlockWeights` for a decoding step of these blocks in one kernel call (`slstm_op.block_decode_step`),
    in `dtype` as plain dense contiguous CPU tensors (the FFN's weights may be int8 rows with a scale each instead:
    `int8_rows`), or None when that would not compute exactly what the modules compute: a block or part that is not
    `_stock` (adapters, offloading, other quantised layers), active dropout, an FFN
    activation or a conv the kernel does not compute, a weight that is not a registered parameter (a plain tensor put
    in its place) or that the kernels cannot take (`kernel_takes`). The caller checks `decode_kernels_ready` and
    `_changed_globally()`."""
    groups = _stock_parts(blocks)
    if groups is None or any(dropout.training and dropout.p > 0 for dropout in groups[_DROPOUT]):  # MC dropout too
        return None
    if not all(layer.forget_gate in FORGET_GATES for layer in groups[_SLSTM]):  # the modules name a misspelt one
        return None
    ffns, convs = groups[_FFN], groups[_CONV]
    if ffns is None:
        groups[_FFN_NORM] = None  # a block without an FFN skips its FFN norm
    windows = [0] * len(blocks) if convs is None else [conv.kernel_size[0] - 1 for conv in convs]
    if any(window != block.cache_dims[3] for window, block in zip(windows, blocks)):
        return None  # a conv removed or replaced after the model was built: the cache's window is the modules' affair
    activations = ["gelu"] * len(blocks) if ffns is None else [ffn.activation for ffn in ffns]
    if ffns is not None and not all(ffn.act is FFN_ACTIVATION_FNS.get(ffn.activation) for ffn in ffns):
        return None  # the kernel knows the activation by name
    if convs is not None and not all(_causal_depthwise(conv) for conv in convs):  # it computes that conv, no other
        return None
    columns = []  # per weight, every block's
    for group, name in _WEIGHT_GROUPS:
        owners = groups[group]
        params = [None] * len(blocks) if owners is None else [owner._parameters for owner in owners]
        if owners is not None and not all(name in p for p in params):  # a plain tensor put in a parameter's place
            return None
        columns.append(params if owners is None else [p[name] for p in params])  # a parameter may be None (no bias)
    int8 = {k: int8_rows(columns[k]) for k in _INT8_WEIGHTS}  # per FFN weight, every block's (q, scale) or None
    # the modules' own dtype rules (a mixed-dtype block raises there): the kernel reads every other weight in x's dtype
    others = [t for k, column in enumerate(columns) if k not in int8 for t in column]
    others += [w for k, rows in int8.items() for w, qs in zip(columns[k], rows) if qs is None]
    if not kernel_takes(*others, dtype=dtype, contiguous=True):
        return None
    for k, rows in int8.items():  # int8_rows checked their q and scale
        columns[k] = [w if qs is None else qs[0] for w, qs in zip(columns[k], rows)]
    columns += [[None if qs is None else qs[1] for qs in rows] for rows in int8.values()]
    norm2 = [0.0] * len(blocks) if groups[_FFN_NORM] is None else [norm.eps for norm in groups[_FFN_NORM]]
    eps = zip([norm.eps for norm in groups[_SLSTM_NORM]], [norm.eps for norm in groups[_OUT_NORM]], norm2)
    exp_forget = [layer.forget_gate == "exp" for layer in groups[_SLSTM]]
    return [BlockWeights(*weights, *rest) for *weights, rest in zip(*columns, zip(eps, exp_forget, activations))]


def _kernel_head(head: nn.Module, x: torch.Tensor) -> Optional[tuple]:
    """(weight, bias, scale) of an LM head the kernels compute for input x (B, S, D): a `_stock` nn.Linear whose
    registered weights they take in x's dtype (as F.linear: a mixed-dtype head raises in the module), scale None, or
    whose weight is int8 rows (`int8_rows`: q and its scale per row) and bias in x's dtype; else None. The caller checks
    `decode_kernels_ready(x)` and `_changed_globally()`."""
    if not _stock([head], nn.Linear) or "weight" not in head._parameters or "bias" not in head._parameters:
        return None
    weight, bias = head._parameters["weight"], head._parameters["bias"]
    if weight is None:
        return None
    rows = int8_rows([weight])[0]
    if rows is not None:
        weight, scale = rows
    elif kernel_takes(weight, dtype=x.dtype, contiguous=True):
        scale = None
    else:
        return None
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or (bias is not None and bias.dim() != 1):
        return None  # the module's F.linear takes, or names, other shapes
    return (weight, bias, scale) if kernel_takes(bias, dtype=x.dtype, contiguous=True) else None


# The forwards the kernels compute, as defined (the block's own, its parts', the LM head's).
_STOCK_FORWARDS = tuple((cls, cls.forward) for cls in dict.fromkeys(
    (SLSTMBlock, nn.Linear, *(part[3] for part in _ONE_CALL_PARTS))))


def _is_decoding_step(seq_len: int, cache_layer: Optional[SLSTMCacheLayer]) -> bool:
    """Whether a forward of seq_len tokens is a decoding step, which runs on the kernels: one token without a cache,
    or continuing the state of one: one token, or a draft of up to MAX_ONE_CALL_DRAFT tokens into a recording cache
    (speculative decoding). A forward that fills an empty cache is a prompt and runs on the modules, whatever its
    length and whether the cache records (`SLSTMForCausalLM._prompt_then_step` then gives greedy's prefill and
    speculative decoding's first forward the same prompt part)."""
    if cache_layer is None:
        return seq_len == 1
    if cache_layer.cell_state is None:
        return False
    return seq_len == 1 or (cache_layer.record_past and 0 < seq_len <= MAX_ONE_CALL_DRAFT)


def _latest_match_drafts(generator) -> None:
    """Make a prompt-lookup `generator` draft from the latest earlier occurrence of the text's last n-gram instead of
    the first. On repetitive text the latest occurrence is the likeliest to continue the same way (in code whose lines
    differ in a number, the first occurrence is line 0, with the wrong number). Only the drafts change: the model
    verifies them, so the output is greedy's either way. Left as it is when logits processors filter the drafts."""
    if generator.logits_processor:
        return

    def get_candidates(input_ids: torch.Tensor, *args, **kwargs):
        drafts = _latest_match(input_ids[0], generator.max_matching_ngram_size, generator.num_output_tokens,
                               generator.max_length - 1 - input_ids.shape[1], generator.eos_token_id)
        if drafts is None:
            return input_ids, None
        return torch.cat([input_ids, drafts[None]], dim=1), None

    generator.get_candidates = get_candidates


def _latest_match(ids: torch.Tensor, max_ngram: int, max_drafts: int, room: int, eos) -> Optional[torch.Tensor]:
    """The tokens after the latest earlier occurrence of the longest suffix of ids (L,) of at most max_ngram tokens
    that has one: at most min(max_drafts, room), cut before an end-of-sequence token; None when there are none."""
    length = ids.shape[0]
    limit = min(max_drafts, room)
    for n in range(min(max_ngram, length - 1), 0, -1):
        windows = ids[: length - 1].unfold(0, n, 1)  # windows[p] = ids[p : p + n], each followed by a token
        hits = (windows == ids[length - n :]).all(dim=1).nonzero()
        if len(hits):
            start = int(hits[-1]) + n
            drafts = ids[start : min(start + limit, length)]
            if eos is not None and len(drafts):
                ends = torch.isin(drafts, torch.as_tensor(eos, device=ids.device)).nonzero()
                drafts = drafts[: int(ends[0])] if len(ends) else drafts
            return drafts if len(drafts) else None
    return None


def _causal_depthwise(conv: nn.Conv1d) -> bool:
    """Whether `conv` is still what CausalConv1d built (depthwise, stride 1, no padding or dilation, with a bias)."""
    return (conv.stride == (1,) and conv.padding == (0,) and conv.dilation == (1,) and conv.padding_mode == "zeros"
            and conv.groups == conv.in_channels == conv.out_channels and conv._parameters.get("bias") is not None)


def _changed_globally() -> bool:
    """Whether hooks registered for every module (`torch.nn.modules.module.register_module_forward_hook`) are set, or
    the forward of a class the kernels stand in for was replaced on the class (`MultiHeadNorm.forward = ...`)."""
    return bool(getattr(torch_module, "_global_forward_hooks", None) or
                getattr(torch_module, "_global_forward_pre_hooks", None) or
                any(cls.forward is not forward for cls, forward in _STOCK_FORWARDS))


class SLSTMPreTrainedModel(PreTrainedModel):
    config_class = SLSTMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["SLSTMBlock"]
    supports_gradient_checkpointing = True
    # False although the state is recurrent: transformers refuses assisted decoding for stateful models, and this one
    # rolls its state back (SLSTMCache.crop after activate_past_recording), which is all that decoding needs.
    _is_stateful = False

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state is an SLSTMCache, built in forward

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The official xLSTM initialisation (small_init, wang_init, zero norm offsets, powerlaw forget bias).

        Each module initialises only the parameters it owns directly: transformers 5.x skips, for custom code,
        modules without direct parameters.
        """
        config = self.config
        init = nn.init  # looked up at call time: transformers 5.x guards these against re-initialising loaded weights
        std = config.small_init_std
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (OffsetLayerNorm, MultiHeadNorm)):
            init.zeros_(module.weight)
        elif isinstance(module, HeadwiseGateProjection):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Conv1d):
            module.reset_parameters()  # PyTorch default, U(+-1/sqrt(K)), as the official model
        elif isinstance(module, SLSTMLayer):
            if config.recurrent_weight_init == "zeros":
                init.zeros_(module.recurrent_kernel)
            else:
                bound = 1 / math.sqrt(config.hidden_size)
                init.uniform_(module.recurrent_kernel, -bound, bound)
            if not getattr(module.gate_bias, "_is_hf_initialized", False):
                bias = torch.zeros(config.num_heads, 4, config.head_dim)  # (NH, gate, DH)
                bias[:, 1] = _forget_bias(
                    config.forget_bias_init,
                    config.num_heads,
                    config.head_dim,
                    module.layer_idx,
                    config.num_hidden_layers,
                    config.hidden_size,
                )
                module.gate_bias.copy_(bias.flatten(1))
        elif isinstance(module, nn.Linear):
            # FFN up-projection and LM head: small_init; FFN down-projection (writes into the residual): wang_init
            if getattr(module, "writes_residual", False):
                std = 2 / (config.num_hidden_layers * math.sqrt(config.hidden_size))
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)


class SLSTMModel(SLSTMPreTrainedModel):
    """Embeddings, sLSTM blocks and the final norm: (B, S) token ids -> (B, S, D) hidden states."""

    def __init__(self, config: SLSTMConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=None)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList([SLSTMBlock(config, idx) for idx in range(config.num_hidden_layers)])
        self.norm = OffsetLayerNorm(config.hidden_size, config.layer_norm_eps) if config.add_post_blocks_norm else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.embeddings = new_embeddings

    @accepts_old_cache_name
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        cache: Optional[SLSTMCache] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,  # e.g. cache_position from transformers 4.57 generate: the cache counts tokens itself
    ) -> Union[tuple, BaseModelOutputWithPast]:
        r"""
        attention_mask: (B, S) or (B, past + S), 1 = real token, 0 = padding; only the last S columns are read.
            A padded position leaves every piece of state untouched, so a left-padded row computes exactly what it
            computes alone. Its own output is meaningless.
        cache: an `SLSTMCache` from an earlier call (or a fresh `SLSTMCache(config)`): continue from it. It is updated
            in place and returned as the output's `cache`. (transformers before 5.24 name it `past_key_values`, in the
            keyword and in the output.)

        Returns a `BaseModelOutputWithPast`: `last_hidden_state` (B, S, D) after the final norm, the state, and with
        `output_hidden_states` the embeddings, each block's input and the final output.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden_states, all_hidden_states, cache, _ = self._forward(input_ids, attention_mask, inputs_embeds, cache,
                                                                   use_cache, output_hidden_states)
        output = BaseModelOutputWithPast(last_hidden_state=hidden_states, hidden_states=all_hidden_states,
                                         **{CACHE: cache})
        return output if return_dict else output.to_tuple()

    def _forward(self, input_ids, attention_mask, inputs_embeds, cache, use_cache, output_hidden_states,
                 head: Optional[nn.Module] = None) -> tuple:
        """`forward` -> its output's fields (last_hidden_state, hidden_states, cache) and the logits (B, S, V) of `head`
        when a decoding step ran it in the blocks' kernel call (with the final norm), else None: then the caller runs
        the head. (A tuple: the causal LM's decoding step needs no BaseModelOutputWithPast, ~50-100 us per token.)"""
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache if not self.training else False)

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"`input_ids` must be (batch, seq_len), got shape {tuple(input_ids.shape)}.")
            inputs_embeds = self.embeddings(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"`inputs_embeds` must be (batch, seq_len, {self.config.hidden_size}), got {tuple(inputs_embeds.shape)}."
            )
        batch_size, seq_len = inputs_embeds.shape[:2]
        mask = self._step_mask(attention_mask, batch_size, seq_len)

        if self.gradient_checkpointing and self.training and (use_cache or cache is not None):
            logger.warning_once("Activation checkpointing does not carry a cache: setting `use_cache=False`.")
            use_cache, cache = False, None
        if cache is not None:
            self._check_cache(cache, batch_size)
        elif use_cache:
            cache = SLSTMCache(self.config)

        hidden_states = self.embedding_dropout(inputs_embeds)
        all_hidden_states = () if output_hidden_states else None
        weights = self._blocks_in_one_call(hidden_states, cache) if seq_len else None
        normed = logits = None
        if weights is not None:  # a decoding step: every block in one kernel call, the final norm and head when they can
            layers = [None] * len(weights) if cache is None else cache.layers
            norm = self._kernel_norm(hidden_states)
            head = _kernel_head(head, hidden_states) if head is not None and (norm or self.norm is None) else None
            try:
                hidden, normed, logits = _decode_in_one_call(hidden_states, mask, layers, weights, norm, head)
            except ValueError:  # the kernel checks the state (nothing written yet): say so if the cache is the misfit
                if cache is not None:
                    self._check_cache_layers(hidden_states, cache)
                raise
            if output_hidden_states:
                all_hidden_states += (hidden_states, *hidden[:-1].unbind(0))
            hidden_states = hidden[-1]
        for idx, block in enumerate(self.layers if weights is None else ()):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            cache_layer = cache.layers[idx] if cache is not None else None
            if seq_len:  # an empty sequence leaves the state as it is: (B, 0, D) in, (B, 0, D) out
                hidden_states = block(hidden_states, mask=mask, cache_layer=cache_layer)
        if normed is not None:
            hidden_states = normed
        elif self.norm is not None:
            hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        return hidden_states, all_hidden_states, cache if use_cache or cache is not None else None, logits

    def _blocks_in_one_call(self, x: torch.Tensor, cache: Optional[SLSTMCache]) -> Optional[list]:
        """Every block's `BlockWeights` (`_kernel_weights`) when a forward of x (B, S, D) is a decoding step of every
        block (`_is_decoding_step`: each cache layer holds a state, all record or none) and the blocks have them, else
        None. A cache layer whose window or state is missing where the kernel would read zeros is named here
        (`_check_cache_layers`); the kernel checks the rest, and `forward` names a cache it refuses."""
        if not self.layers or not decode_kernels_ready(x) or _changed_globally():  # global: once for all blocks
            return None
        blocks = list(self.layers._modules.values())
        if not _stock(blocks, SLSTMBlock):  # the blocks' calls would be skipped
            return None
        if cache is not None:
            layers = cache.layers
            if any(layer.cell_state is None for layer in layers) or len({layer.record_past for layer in layers}) != 1:
                return None  # a prompt fills the empty layers; recording must be all or none
            # what the kernel would read as zeros (an absent or empty window or state); it checks the rest
            for layer, block in zip(layers, blocks):  # a loop, no generators: this runs per token
                state, window = layer.cell_state, layer.conv_window
                if (len(state) != 4 or not (state[0].numel() and state[1].numel() and state[2].numel()
                                            and state[3].numel())
                        or (window is None or not window.numel()) == (block.cache_dims[3] > 0)):
                    self._check_cache_layers(x, cache)
                    return None
        if not _is_decoding_step(x.shape[1], None if cache is None else cache.layers[0]):
            return None
        return _kernel_weights(blocks, x.dtype)

    def _kernel_norm(self, x: torch.Tensor) -> Optional[tuple]:
        """(weight, eps) of the final norm for the one-call step with input x (the blocks' kernel call computes it), or
        None: no final norm, or one that is not `_stock` or whose weight the kernels cannot take in x's dtype."""
        norm = self.norm
        if norm is None or not _stock([norm], OffsetLayerNorm) or "weight" not in norm._parameters:
            return None
        weight = norm._parameters["weight"]
        return (weight, norm.eps) if kernel_takes(weight, dtype=x.dtype, contiguous=True) and weight is not None else None

    def _check_cache_layers(self, x: torch.Tensor, cache: SLSTMCache) -> None:
        """A ValueError naming the first cache layer that does not fit its block (`SLSTMCacheLayer.check`)."""
        for block, layer in zip(self.layers, cache.layers):
            layer.check(x, *block.cache_dims)

    @staticmethod
    def _step_mask(attention_mask: Optional[torch.Tensor], batch_size: int, seq_len: int) -> Optional[torch.Tensor]:
        """(B, S) bool mask of the steps to take, or None when every step counts.

        A decoding step (S = 1) keeps its mask as a tensor: no host sync, no data-dependent branch per token. So does
        a traced or compiled forward (torch.jit.trace, torch.compile, torch.export): the graph must not depend on the
        mask's values.
        """
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size or attention_mask.shape[1] < seq_len:
            raise ValueError(
                f"`attention_mask` must be (batch, seq_len) or (batch, past + seq_len) with batch={batch_size} and "
                f"seq_len={seq_len}, got shape {tuple(attention_mask.shape)}."
            )
        mask = attention_mask[:, attention_mask.shape[1] - seq_len :].bool()
        if seq_len == 1 or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return mask
        return None if bool(mask.all()) else mask

    def _check_cache(self, cache, batch_size: int) -> None:
        if not isinstance(cache, SLSTMCache):
            raise ValueError(
                f"`{CACHE}` must be an SLSTMCache (from a previous call, or `SLSTMCache(model.config)`), got "
                f"{type(cache).__name__}. Key/value caches of attention models do not apply to the sLSTM."
            )
        if len(cache.layers) != len(self.layers):
            raise ValueError(f"The SLSTMCache has {len(cache.layers)} layers, the model {len(self.layers)}.")
        for layer in cache.layers:
            if layer.batch_size not in (-1, batch_size):
                raise ValueError(f"The SLSTMCache holds a batch of {layer.batch_size} sequences, the inputs {batch_size}.")


# SLSTMModel's forward and nn.Module's call as defined: the causal LM runs a decoding step through the model's
# `_forward` only while they are these (a forward or call replaced on the class would be skipped).
_MODEL_FORWARD, _MODULE_CALL = SLSTMModel.forward, nn.Module.__call__


class SLSTMForCausalLM(SLSTMPreTrainedModel, GenerationMixin):
    """SLSTMModel with a language-modelling head (optionally tied to the embeddings)."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: SLSTMConfig):
        super().__init__(config)
        self.model = SLSTMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.model.embeddings = new_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def save_pretrained(self, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`; a folder saved with its code also names the base model in `auto_map`,
        so `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads it too."""
        if self._auto_class is not None:
            module = type(self.model).__module__.split(".")[-1]
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}),
                                    "AutoModel": f"{module}.{type(self.model).__name__}"}
        return super().save_pretrained(*args, **kwargs)

    def generate(self, inputs: Optional[torch.Tensor] = None, *args, **kwargs):
        """`GenerationMixin.generate`, after refusing what the sLSTM cannot do instead of returning garbage: a
        `cache_implementation` (the state is an `SLSTMCache` the model builds itself; "paged" would switch to continuous
        batching) and a cache that has already consumed the inputs (it would be fed them a second time)."""
        generation_config = kwargs.get("generation_config", args[0] if args else None) or self.generation_config
        implementation = kwargs.get("cache_implementation", getattr(generation_config, "cache_implementation", None))
        # transformers 4.57 marks a draft model's own config "dynamic_full"; the draft gets its SLSTMCache regardless
        if implementation is not None and not getattr(generation_config, "is_assistant", False):
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported: the sLSTM carries a fixed-size recurrent "
                "state (an SLSTMCache the model creates), not a key/value cache. Leave cache_implementation unset."
            )
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # the name of 5.24+, or of the older lines
        seen = cache.get_seq_length() if isinstance(cache, SLSTMCache) else 0
        if seen:
            tokens = next((t for t in (kwargs.get("attention_mask"), inputs, kwargs.get("input_ids"),
                                       kwargs.get("inputs_embeds")) if t is not None), None)
            width = tokens.shape[1] if tokens is not None and tokens.dim() > 1 else 0
            if width <= seen:
                raise ValueError(
                    f"The cache has already consumed {seen} tokens but the inputs span only {width}, so generate() "
                    "would feed them again. Pass the whole sequence so far with the cache (the tokens it consumed "
                    "followed by the new ones, e.g. the `sequences` a previous generate() returned), or only the new "
                    "tokens with an attention_mask spanning the whole sequence; or start over without the cache."
                )
        return super().generate(inputs, *args, **kwargs)

    def _refuse_continuous_batching(self, *args, **kwargs):
        raise ValueError(
            "Continuous batching (generate_batch, init_continuous_batching, cache_implementation='paged') needs a paged "
            "key/value cache, which a recurrent model does not have; call generate() with a padded batch instead."
        )

    generate_batch = init_continuous_batching = continuous_batching_context_manager = _refuse_continuous_batching

    @accepts_old_cache_name
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Optional[SLSTMCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        **kwargs,
    ) -> dict:
        """Feed generate() only the tokens the state has not consumed yet; positions and cache_position do not apply.

        (Overriding also skips the generic version's per-step signature inspection, a quarter of the per-token time at
        batch 1.)
        """
        model_inputs = {k: v for k, v in kwargs.items() if k not in ("cache_position", "position_ids")}
        seen = cache.get_seq_length() if cache is not None else 0
        new, first = new_tokens(model_inputs, input_ids, attention_mask, seen)
        model_inputs.update({CACHE: cache, "attention_mask": attention_mask})
        if inputs_embeds is not None and first:
            model_inputs["inputs_embeds"] = inputs_embeds[:, -new:] if new else inputs_embeds
        else:
            model_inputs["input_ids"] = input_ids[:, -new:] if new else input_ids
        return model_inputs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode, *args, **kwargs):
        """As transformers does, and for speculative decoding (an assistant model or prompt lookup, or this model as
        the assistant) a recording SLSTMCache, so that the tokens the model rejects can be undone."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, *args, **kwargs)
        if PROMPT_LOOKUP_NEEDS_EOS and generation_config.prompt_lookup_num_tokens and generation_config.eos_token_id is None:
            raise ValueError(
                "Prompt lookup on transformers 4.57 needs an end-of-sequence token: pass `eos_token_id=...` to generate() "
                "(or set model.generation_config.eos_token_id)."
            )
        if generation_mode == GenerationMode.ASSISTED_GENERATION or generation_config.is_assistant:
            if model_kwargs.get(CACHE) is None:
                model_kwargs[CACHE] = SLSTMCache(self.config)
            model_kwargs[CACHE].activate_past_recording()

    def _get_candidate_generator(self, *args, **kwargs):
        """transformers' draft or prompt-lookup candidates, never past `max_length` (transformers 4.57 lets them).

        Prompt lookup runs generate()'s logits processors on dummy logits for every drafted token, to drop drafts they
        forbid; with no processor nothing is forbidden, so it is told there are none (~150 us less per round; a
        decoding step of a 2 x 128 model takes ~500 us, ~70 us of it in the kernels), and it drafts from the latest
        earlier occurrence of the last n-gram (`_latest_match_drafts`)."""
        generator = super()._get_candidate_generator(*args, **kwargs)
        if isinstance(generator, PromptLookupCandidateGenerator):
            if not generator.logits_processor:
                generator.logits_processor = None
            _latest_match_drafts(generator)
        cap_candidates(generator, kwargs.get("generation_config", args[0] if args else None).max_length)
        return generator

    def _assisted_decoding(self, *args, **kwargs):
        """transformers' assisted decoding; the cache it returns records no more (nothing left to undo)."""
        try:
            return super()._assisted_decoding(*args, **kwargs)
        finally:
            if isinstance(kwargs.get(CACHE), SLSTMCache):
                kwargs[CACHE].stop_past_recording()

    def _prompt_then_step(self, input_ids, attention_mask, inputs_embeds, cache, seq_len: int, keep: int):
        """A prompt into an empty cache whose last `keep` logits are wanted (generate()'s prefill keeps 1; speculative
        decoding's first forward, the prompt and k drafts, keeps k + 1), in two forwards: all but the kept positions (at
        least the first token) on the modules, as a prompt, then the rest as a decoding step. Each kept position then
        has the bits a decoding step gives it whatever the number kept, and the prompt part the same length whether
        drafts follow or not: prompt lookup and a draft model verify with greedy's own bits."""
        split = max(seq_len - keep, 1)
        tail = seq_len - split

        def part(begin: int, end: int) -> dict:
            chosen = dict(input_ids=None, inputs_embeds=None, attention_mask=attention_mask)
            if input_ids is not None:
                chosen["input_ids"] = input_ids[:, begin:end]
            else:
                chosen["inputs_embeds"] = inputs_embeds[:, begin:end]
            if attention_mask is not None:  # (B, past + S) with past 0: the columns up to this part's end
                chosen["attention_mask"] = attention_mask[:, : attention_mask.shape[1] - (seq_len - end)]
            return chosen

        run = dict(labels=None, use_cache=True, output_hidden_states=False, return_dict=True)
        first = self._forward_whole(**part(0, split), cache=cache, logits_to_keep=1, decoding_step=False, **run)
        logits = [first.logits] if tail < keep else []
        cache = getattr(first, CACHE)
        if tail:
            decoding_step = _is_decoding_step(tail, cache.layers[0])
            step = self._forward_whole(**part(split, seq_len), cache=cache, logits_to_keep=tail,
                                       decoding_step=decoding_step, **run)
            logits.append(step.logits)
            cache = getattr(step, CACHE)
        return CausalLMOutputWithPast(logits=torch.cat(logits, 1) if len(logits) > 1 else logits[0], **{CACHE: cache})

    def _skips_model_call(self, model: nn.Module) -> bool:
        """Whether a decoding step may run `model._forward` itself, with the head, instead of calling the model: the
        model is a `_stock` SLSTMModel whose call would run nothing else (no grad for backward hooks, no compiled call,
        the classes' own `__call__`, `forward` and this class's `_logits`), and nothing changed globally."""
        return (not torch.is_grad_enabled() and _stock([model], SLSTMModel)
                and not (model._backward_hooks or model._backward_pre_hooks)
                and getattr(model, "_compiled_call_impl", None) is None and type(model).__call__ is _MODULE_CALL
                and SLSTMModel.forward is _MODEL_FORWARD and type(self)._logits is _CAUSAL_LM_LOGITS
                and not _changed_globally())

    def _logits(self, hidden_states: torch.Tensor, decoding_step: bool) -> torch.Tensor:
        """lm_head(hidden_states), (B, S', D) -> (B, S', V). In a decoding step (`_is_decoding_step`: one token, or a
        draft to verify) a stock, unhooked nn.Linear head whose weights the kernels read runs on
        `slstm_op.linear_decode_step`: the head is the largest matrix of a decoding step, and torch's single-row matrix
        product reads it at a fraction of the memory bandwidth. Each row then gets the bits it gets alone, so a verified
        draft token has the logits of a decoding step. A prompt's head is the module, as its blocks are."""
        if decoding_step and decode_kernels_ready(hidden_states) and not _changed_globally():
            head = _kernel_head(self.lm_head, hidden_states)
            if head is not None:
                return linear_decode_step(hidden_states, *head)
        return self.lm_head(hidden_states)

    @accepts_old_cache_name
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        cache: Optional[SLSTMCache] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        **kwargs,
    ) -> Union[tuple, CausalLMOutputWithPast]:
        r"""
        labels: (B, S) next-token targets, shifted inside (labels = input_ids works); -100 is ignored.
        logits_to_keep: compute logits only for the last N positions (0 = all), or for the given indices.
        Other arguments as in [`SLSTMModel.forward`].

        Returns a `CausalLMOutputWithPast`: `loss`, `logits` (B, S', V) with S' the kept positions, the state as
        `cache` (`past_key_values` before transformers 5.24) and `hidden_states`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        # the head runs on the kernel where the blocks do (read before the forward fills the cache)
        tokens = input_ids if input_ids is not None else inputs_embeds
        seq_len = tokens.shape[1] if tokens is not None and tokens.dim() >= 2 else 0
        if cache is None:  # no state in: a stateless step, or a fresh cache (use_cache) that the forward fills
            fresh = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
            decoding_step = seq_len == 1 and not fresh
        else:
            fresh = isinstance(cache, SLSTMCache) and bool(cache.layers) and cache.layers[0].cell_state is None
            decoding_step = isinstance(cache, SLSTMCache) and bool(cache.layers) and _is_decoding_step(
                seq_len, cache.layers[0])
        if (fresh and seq_len > 1 and isinstance(logits_to_keep, int) and 0 < logits_to_keep <= MAX_ONE_CALL_DRAFT
                and labels is None and not output_hidden_states and len(self.model.layers)):
            output = self._prompt_then_step(input_ids, attention_mask, inputs_embeds, cache, seq_len, logits_to_keep)
            return output if return_dict else output.to_tuple()
        return self._forward_whole(input_ids, attention_mask, inputs_embeds, cache, labels, use_cache,
                                   output_hidden_states, return_dict, logits_to_keep, decoding_step, **kwargs)

    def _forward_whole(self, input_ids, attention_mask, inputs_embeds, cache, labels, use_cache, output_hidden_states,
                       return_dict, logits_to_keep, decoding_step: bool, **kwargs):
        """`forward` in one pass of the model: the head on the kernel when `decoding_step`, in the blocks' kernel call
        when the model is stock (unhooked, its own forward, which the call would skip)."""
        model = self.model
        if decoding_step and self._skips_model_call(model):
            hidden_states, all_hidden_states, cache, logits = model._forward(
                input_ids, attention_mask, inputs_embeds, cache, use_cache, output_hidden_states, head=self.lm_head)
        else:
            outputs = model(input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, cache=cache,
                            use_cache=use_cache, output_hidden_states=output_hidden_states, return_dict=True)
            hidden_states, all_hidden_states, cache, logits = (outputs.last_hidden_state, outputs.hidden_states,
                                                               getattr(outputs, CACHE), None)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        if logits is not None:  # every position's: keep some, held on their own as the head's own would be
            logits = logits[:, keep].contiguous()
        else:
            logits = self._logits(hidden_states[:, keep, :], decoding_step)

        loss = None
        if labels is not None:
            # kwargs carry the Trainer's `num_items_in_batch` and the pre-shifted `shift_labels` of context parallelism
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=all_hidden_states, **{CACHE: cache})
        return output if return_dict else output.to_tuple()


_CAUSAL_LM_LOGITS = SLSTMForCausalLM._logits  # a subclass's own `_logits` keeps the head out of the blocks' call


__all__ = ["SLSTMPreTrainedModel", "SLSTMModel", "SLSTMForCausalLM"]
