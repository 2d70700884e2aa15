"""Conversion between the official NX-AI xLSTM sLSTM language model (`xlstm.xLSTMLMModel`) and `SLSTMForCausalLM`.

Importable by tests; the scripts `convert_xlstm_to_hf.py` and `convert_hf_to_xlstm.py` are thin command lines over
`convert_xlstm_to_hf` and `convert_hf_to_xlstm`. User errors raise `ValueError` and nothing is written.

Official state_dict (prefix `xlstm_block_stack.blocks.{l}.`), NH heads of DH = D / NH units, gates g = i, f, z, o:
    xlstm.fgate / igate / zgate / ogate.weight  (NH, DH, DH)   fgate feeds the INPUT gate, igate the FORGET gate
    xlstm.slstm_cell._recurrent_kernel_         vanilla (NH, 4*DH, DH) [h, g*DH + o, d]
                                                cuda    (NH, DH, 4*DH) [h, d, g*DH + o]
    xlstm.slstm_cell._bias_                     vanilla (4*D,) gate-major [g*D + h*DH + o]
                                                cuda    (4*D,) head-major [h*4*DH + g*DH + o]
Ours: gate_proj.weight (4, NH, DH, DH) = [fgate, igate, zgate, ogate], recurrent_kernel (NH, DH, 4*DH) = the cuda
layout, gate_bias (NH, 4*DH) = the cuda bias viewed per head. Everything else is a rename.
"""

import datetime
import json
import math
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from modeling_slstm import SLSTMConfig, SLSTMForCausalLM
from modeling_slstm.folders import MODEL_FOLDER_FILES, model_code_files, refuse_overlap, remove_tool_files


LAYOUTS = ("vanilla", "cuda")
BLOCK = "xlstm_block_stack.blocks.{}."
POST_NORM = "xlstm_block_stack.post_blocks_norm.weight"
# Official gate-map names in our gate order i, f, z, o (the official layer feeds `fgate` into i and `igate` into f).
GATE_NAMES = ("fgate", "igate", "zgate", "ogate")
# Official per-block keys that are plain renames of ours.
RENAMES = (
    ("xlstm_norm.weight", "slstm_norm.weight"),
    ("xlstm.conv1d.conv.weight", "slstm.conv.conv.weight"),
    ("xlstm.conv1d.conv.bias", "slstm.conv.conv.bias"),
    ("xlstm.group_norm.weight", "slstm.out_norm.weight"),
    ("ffn_norm.weight", "ffn_norm.weight"),
    ("ffn.proj_up.weight", "ffn.gate_up_proj.weight"),
    ("ffn.proj_up.bias", "ffn.gate_up_proj.bias"),
    ("ffn.proj_down.weight", "ffn.down_proj.weight"),
    ("ffn.proj_down.bias", "ffn.down_proj.bias"),
)
ACT_FROM_OFFICIAL = {"gelu": "gelu", "relu": "relu", "relu^2": "relu2", "sigmoid": "sigmoid", "swish": "swish",
                     "selu": "selu"}
ACT_TO_OFFICIAL = {"gelu": "gelu", "relu": "relu", "relu2": "relu^2", "silu": "swish", "swish": "swish",
                   "sigmoid": "sigmoid", "selu": "selu"}
OFFICIAL_BIAS_INITS = ("powerlaw_blockdependent", "small_init", "standard")  # "zeros" works but is not in its Literal

# Official config fields (xlstm 2.0.6 dataclasses) that do not change what a trained model computes: optimiser,
# initialisation, precision or kernel-compilation settings, and values the official code derives or overwrites.
IGNORED_TOP = {"weight_decay_on_embedding", "context_length", "bias", "_block_map"}
IGNORED_BLOCK = {"_num_blocks", "_block_idx"}
IGNORED_SLSTM = {
    "embedding_dim", "hidden_size", "dropout", "num_states", "_block_idx", "_num_blocks", "backend",
    "gradient_recurrent_cut", "forward_clipval", "batch_size", "dtype", "dtype_b", "dtype_r", "dtype_w", "dtype_g",
    "dtype_s", "dtype_a", "enable_automatic_mixed_precision", "initial_val",
}
IGNORED_FFN = {"embedding_dim", "dropout", "_num_blocks", "_proj_up_dim"}
# Fields that are read, with the official defaults.
TOP_DEFAULTS = {
    "vocab_size": -1, "tie_weights": False, "add_embedding_dropout": False, "mlstm_block": None, "slstm_block": None,
    "num_blocks": 1, "embedding_dim": 128, "add_post_blocks_norm": True, "dropout": 0.0, "slstm_at": [],
}
BLOCK_DEFAULTS = {"slstm": {}, "feedforward": {}}
SLSTM_DEFAULTS = {
    "num_heads": 4, "conv1d_kernel_size": 4, "group_norm_weight": True, "function": "slstm", "num_gates": 4,
    "bias_init": "powerlaw_blockdependent", "recurrent_weight_init": "zeros", "gradient_recurrent_clipval": None,
    "input_shape": "BSGNH", "internal_input_shape": "SBNGH", "output_shape": "BNSH", "constants": {},
}
FFN_DEFAULTS = {
    "proj_factor": 1.3, "act_fn": "gelu", "bias": False, "ff_type": "ffn_gated", "round_proj_up_dim_up": True,
    "round_proj_up_to_multiple_of": 64,
}


class OfficialModel(NamedTuple):
    """An official config read into ours, plus the official facts our config does not hold."""

    config: SLSTMConfig
    group_norm_weight: bool  # False: the checkpoint has no `group_norm.weight` (scale 1, i.e. our offset 0)
    backend: str  # the backend the official config names (the checkpoint's layout is detected, not taken from it)


# ----------------------------------------------------------------------------------------------------------- configs
def read_config_file(path: str) -> dict:
    """An official config file (YAML or JSON): the bare `xLSTMLMModelConfig` dict, or nested under `model:`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path.name} is YAML but PyYAML is not installed (pip install pyyaml)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{path.name} is not valid YAML: {' '.join(str(err).split())}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path.name} is not valid JSON ({err}); YAML files must end in .yaml or .yml") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]  # NX-AI experiment files: {model: {...}, training: {...}, dataset: {...}}
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} must hold a mapping (the xLSTMLMModelConfig fields), got {type(data).__name__}")
    return data


def _section(data: Any, where: str, defaults: dict, ignored: set) -> dict:
    """`defaults` updated with the known fields of `data`; unknown fields are an error (as dacite's strict mode)."""
    if not isinstance(data, dict):
        raise ValueError(f"config: {where} must be a mapping, got {data!r}")
    unknown = sorted(set(data) - set(defaults) - ignored)
    if unknown:
        raise ValueError(f"config: unknown field(s) in {where}: {', '.join(unknown)}")
    return {**defaults, **{k: v for k, v in data.items() if k in defaults}}


def _unsupported(where: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config: unsupported option {where}={value!r}: {why}")


def config_from_official(data: dict) -> OfficialModel:
    """Our `SLSTMConfig` for an official sLSTM-only `xLSTMLMModelConfig` dict; refuses what would compute otherwise."""
    top = _section(data, "the model config", TOP_DEFAULTS, IGNORED_TOP)
    for name in ("vocab_size", "num_blocks", "embedding_dim"):
        value = top[name]
        if isinstance(value, str) and "${" in value:
            raise ValueError(f"config: {name}={value!r} is an unresolved OmegaConf interpolation; put the number in")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
    num_blocks = top["num_blocks"]
    if top["mlstm_block"] is not None and top["slstm_at"] != "all":
        mlstm_at = [idx for idx in range(num_blocks) if idx not in top["slstm_at"]]
        if mlstm_at:
            raise ValueError(
                f"config: mLSTM blocks are not supported (blocks {mlstm_at} are mLSTM, slstm_at={top['slstm_at']!r}); "
                "only sLSTM-only models convert"
            )
    if top["slstm_block"] is None:
        raise ValueError("config: no slstm_block: an sLSTM-only model needs `slstm_block: {slstm: {...}}`")
    block = _section(top["slstm_block"], "slstm_block", BLOCK_DEFAULTS, IGNORED_BLOCK)
    slstm = _section(block["slstm"], "slstm_block.slstm", SLSTM_DEFAULTS, IGNORED_SLSTM)

    where = "slstm_block.slstm."
    if slstm["function"] != "slstm":
        raise _unsupported(where + "function", slstm["function"], "only the sLSTM cell ('slstm') is implemented")
    if slstm["num_gates"] != 4:
        raise _unsupported(where + "num_gates", slstm["num_gates"], "the sLSTM has 4 gates")
    if slstm["gradient_recurrent_clipval"] is not None:
        raise _unsupported(
            where + "gradient_recurrent_clipval", slstm["gradient_recurrent_clipval"],
            "the official CUDA kernel also clips the cell output to +-this value in the forward pass, which this model "
            "does not do",
        )
    for name in ("input_shape", "output_shape"):
        if slstm[name] != SLSTM_DEFAULTS[name]:
            raise _unsupported(where + name, slstm[name], f"the official layer needs {SLSTM_DEFAULTS[name]!r}")
    if block["slstm"].get("backend", "cuda") == "cuda" and slstm["internal_input_shape"] != "SBNGH":
        raise _unsupported(where + "internal_input_shape", slstm["internal_input_shape"], "CUDA kernels need 'SBNGH'")
    if slstm["constants"]:
        raise _unsupported(where + "constants", slstm["constants"], "extra CUDA kernel constants may change its math")
    if not isinstance(slstm["group_norm_weight"], bool):
        raise _unsupported(where + "group_norm_weight", slstm["group_norm_weight"], "must be true or false")

    ffn_fields = dict(ffn_proj_factor=0)
    if block["feedforward"] is not None:
        ffn = _section(block["feedforward"], "slstm_block.feedforward", FFN_DEFAULTS, IGNORED_FFN)
        where = "slstm_block.feedforward."
        if ffn["ff_type"] != "ffn_gated":
            raise _unsupported(where + "ff_type", ffn["ff_type"], "only 'ffn_gated' exists")
        if ffn["act_fn"] not in ACT_FROM_OFFICIAL:
            raise _unsupported(where + "act_fn", ffn["act_fn"], f"known: {', '.join(ACT_FROM_OFFICIAL)}")
        ffn_fields = dict(
            ffn_proj_factor=ffn["proj_factor"],
            ffn_round_to=ffn["round_proj_up_to_multiple_of"],
            ffn_act=ACT_FROM_OFFICIAL[ffn["act_fn"]],
            ffn_bias=ffn["bias"],
        )
        if not ffn["round_proj_up_dim_up"]:
            multiple, width = ffn["round_proj_up_to_multiple_of"], ffn["proj_factor"] * top["embedding_dim"]
            if math.floor(width / multiple) != math.ceil(width / multiple):
                raise _unsupported(where + "round_proj_up_dim_up", False, "only rounding the FFN width up is supported")

    if slstm["bias_init"] not in OFFICIAL_BIAS_INITS + ("zeros",):
        raise _unsupported(where + "bias_init", slstm["bias_init"], f"known: {', '.join(OFFICIAL_BIAS_INITS)}")
    dropout = top["dropout"]
    try:
        config = SLSTMConfig(
            vocab_size=top["vocab_size"],
            hidden_size=top["embedding_dim"],
            num_hidden_layers=num_blocks,
            num_heads=slstm["num_heads"],
            conv1d_kernel_size=slstm["conv1d_kernel_size"],
            forget_gate="sigmoid",
            dropout=dropout,
            embedding_dropout=dropout if top["add_embedding_dropout"] else 0.0,
            add_post_blocks_norm=top["add_post_blocks_norm"],
            layer_norm_eps=1e-5,
            recurrent_weight_init=slstm["recurrent_weight_init"],
            forget_bias_init=slstm["bias_init"],
            tie_word_embeddings=top["tie_weights"],
            **ffn_fields,
        )
    except ValueError as err:  # our config's own checks (e.g. num_heads must divide embedding_dim)
        raise ValueError(f"config: {err}") from None
    return OfficialModel(config, slstm["group_norm_weight"], block["slstm"].get("backend", "cuda"))


def config_to_official(config: SLSTMConfig, layout: str = "vanilla") -> dict:
    """The official `xLSTMLMModelConfig` dict (JSON/YAML-ready) computing what `config` computes."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    problems = []
    if config.forget_gate != "sigmoid":
        problems.append(f"forget_gate={config.forget_gate!r} (the official sLSTM has only the sigmoid forget gate)")
    if config.ffn_act not in ACT_TO_OFFICIAL:
        problems.append(f"ffn_act={config.ffn_act!r} (official: {', '.join(ACT_FROM_OFFICIAL)})")
    if config.layer_norm_eps != 1e-5:
        problems.append(f"layer_norm_eps={config.layer_norm_eps!r} (official norms use 1e-5)")
    if config.conv1d_kernel_size == 1:
        problems.append("conv1d_kernel_size=1 (the official forward pass fails for it)")
    if config.embedding_dropout not in (0.0, config.dropout):
        problems.append(
            f"embedding_dropout={config.embedding_dropout!r} (official embedding dropout is off or equal to dropout="
            f"{config.dropout!r})"
        )
    if problems:
        raise ValueError(f"the official xLSTM cannot express: {'; '.join(problems)}")
    slstm = {
        "num_heads": config.num_heads,
        "conv1d_kernel_size": config.conv1d_kernel_size,
        "backend": layout,
        "recurrent_weight_init": config.recurrent_weight_init,
    }
    if config.forget_bias_init in OFFICIAL_BIAS_INITS:
        slstm["bias_init"] = config.forget_bias_init
    if layout == "vanilla":
        slstm["dtype"] = "float32"  # informational: vanilla computes in the parameters' dtype
    feedforward = None
    if config.ffn_dim:
        feedforward = {
            "proj_factor": float(config.ffn_proj_factor),  # dacite (strict) wants a float
            "act_fn": ACT_TO_OFFICIAL[config.ffn_act],
            "bias": config.ffn_bias,
            "round_proj_up_to_multiple_of": config.ffn_round_to,
        }
    return {
        "vocab_size": config.vocab_size,
        "num_blocks": config.num_hidden_layers,
        "embedding_dim": config.hidden_size,
        "tie_weights": config.tie_word_embeddings,
        "add_post_blocks_norm": config.add_post_blocks_norm,
        "dropout": float(config.dropout),
        "add_embedding_dropout": config.embedding_dropout > 0,
        "slstm_block": {"slstm": slstm, "feedforward": feedforward},
    }


# ------------------------------------------------------------------------------------------------------ state_dicts
def official_shapes(config: SLSTMConfig, layout: str, group_norm_weight: bool = True) -> dict[str, tuple]:
    """Every key of the official state_dict for `config` with its shape (both embedding and lm_head, tied or not)."""
    d, nh, dh, k, f, v = (config.hidden_size, config.num_heads, config.head_dim, config.conv1d_kernel_size,
                          config.ffn_dim, config.vocab_size)
    shapes = {"token_embedding.weight": (v, d), "lm_head.weight": (v, d)}
    for idx in range(config.num_hidden_layers):
        block = BLOCK.format(idx)
        shapes[block + "xlstm_norm.weight"] = (d,)
        if k:
            shapes[block + "xlstm.conv1d.conv.weight"] = (d, 1, k)
            shapes[block + "xlstm.conv1d.conv.bias"] = (d,)
        for name in GATE_NAMES:
            shapes[block + f"xlstm.{name}.weight"] = (nh, dh, dh)
        kernel_shape = (nh, 4 * dh, dh) if layout == "vanilla" else (nh, dh, 4 * dh)
        shapes[block + "xlstm.slstm_cell._recurrent_kernel_"] = kernel_shape
        shapes[block + "xlstm.slstm_cell._bias_"] = (4 * d,)
        if group_norm_weight:
            shapes[block + "xlstm.group_norm.weight"] = (d,)
        if f:
            shapes[block + "ffn_norm.weight"] = (d,)
            shapes[block + "ffn.proj_up.weight"] = (2 * f, d)
            shapes[block + "ffn.proj_down.weight"] = (d, f)
            if config.ffn_bias:
                shapes[block + "ffn.proj_up.bias"] = (2 * f,)
                shapes[block + "ffn.proj_down.bias"] = (d,)
    if config.add_post_blocks_norm:
        shapes[POST_NORM] = (d,)
    return shapes


def _listing(items: list[str], limit: int = 8) -> str:
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def strip_prefix(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove the common prefix of a wrapped official state_dict (e.g. `model.`, `module.`): (state_dict, prefix)."""
    anchor = BLOCK.format(0) + "xlstm_norm.weight"
    prefixes = sorted(key[: -len(anchor)] for key in state_dict if key.endswith(anchor))
    if len(prefixes) != 1:
        found = f"found it under {len(prefixes)} prefixes {prefixes}" if prefixes else "no such key"
        raise ValueError(f"not an official sLSTM xLSTMLMModel state_dict: expected one key ending in {anchor!r}, "
                         f"{found}")
    prefix = prefixes[0]
    outside = sorted(key for key in state_dict if not key.startswith(prefix))
    if outside:
        raise ValueError(f"checkpoint keys outside the common prefix {prefix!r}: {_listing(outside)}")
    return {key[len(prefix):]: value for key, value in state_dict.items()}, prefix


def detect_layout(state_dict: dict[str, torch.Tensor], config: SLSTMConfig) -> str:
    """'vanilla' or 'cuda', from the shape of every recurrent kernel (the biases have one shape in both layouts)."""
    nh, dh = config.num_heads, config.head_dim
    layouts = {}
    for idx in range(config.num_hidden_layers):
        key = BLOCK.format(idx) + "xlstm.slstm_cell._recurrent_kernel_"
        if key not in state_dict:
            continue  # reported with every other missing key by check_official_keys
        shape = tuple(state_dict[key].shape)
        if shape == (nh, 4 * dh, dh):
            layouts[key] = "vanilla"
        elif shape == (nh, dh, 4 * dh):
            layouts[key] = "cuda"
        else:
            raise ValueError(
                f"checkpoint does not match the config: {key} has shape {list(shape)}, expected [{nh}, {4 * dh}, "
                f"{dh}] (vanilla layout) or [{nh}, {dh}, {4 * dh}] (cuda layout) for num_heads={nh}, "
                f"embedding_dim={config.hidden_size}"
            )
    if not layouts:
        raise ValueError("checkpoint has no xlstm.slstm_cell._recurrent_kernel_ for any block of the config")
    if len(set(layouts.values())) > 1:
        raise ValueError(f"checkpoint mixes vanilla and cuda recurrent-kernel layouts across blocks: {layouts}")
    return next(iter(layouts.values()))


def check_official_keys(
    state_dict: dict[str, torch.Tensor], config: SLSTMConfig, layout: str, group_norm_weight: bool = True
) -> None:
    """One ValueError listing every unknown, missing and wrong-shape key (tied: lm_head or embedding may be absent)."""
    expected = official_shapes(config, layout, group_norm_weight)
    optional = set()
    if config.tie_word_embeddings:
        # One of the two shared names suffices (safetensors keeps one name per shared tensor).
        optional = {"lm_head.weight"} if "token_embedding.weight" in state_dict else {"token_embedding.weight"}
    unknown = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict) - optional)
    wrong = sorted(
        f"{key} {list(state_dict[key].shape)} (expected {list(expected[key])})"
        for key in set(state_dict) & set(expected)
        if tuple(state_dict[key].shape) != expected[key]
    )
    not_float = sorted(key for key, value in state_dict.items() if not value.is_floating_point())
    problems = [
        f"{len(items)} {what}: {_listing(items)}"
        for what, items in (("unknown key(s)", unknown), ("missing key(s)", missing), ("wrong shape(s)", wrong),
                            ("non-float tensor(s)", not_float))
        if items
    ]
    if problems:
        raise ValueError(f"checkpoint does not match the config ({layout} layout): {'; '.join(problems)}")
    if config.tie_word_embeddings and "lm_head.weight" in state_dict and "token_embedding.weight" in state_dict:
        if not torch.equal(state_dict["lm_head.weight"], state_dict["token_embedding.weight"]):
            raise ValueError("config has tie_weights=true but lm_head.weight differs from token_embedding.weight")


def state_dict_from_official(
    state_dict: dict[str, torch.Tensor], config: SLSTMConfig, layout: str
) -> dict[str, torch.Tensor]:
    """Our `SLSTMForCausalLM` state_dict from a checked, prefix-free official one (values copied exactly)."""
    nh, dh = config.num_heads, config.head_dim
    embedding = state_dict.get("token_embedding.weight", state_dict.get("lm_head.weight"))
    ours = {
        "model.embeddings.weight": embedding,
        "lm_head.weight": embedding if config.tie_word_embeddings else state_dict["lm_head.weight"],
    }
    for idx in range(config.num_hidden_layers):
        src, dst = BLOCK.format(idx), f"model.layers.{idx}."
        for official_name, our_name in RENAMES:
            if src + official_name in state_dict:
                ours[dst + our_name] = state_dict[src + official_name]
        if src + "xlstm.group_norm.weight" not in state_dict:  # group_norm_weight=False: scale 1, offset 0
            ours[dst + "slstm.out_norm.weight"] = torch.zeros(config.hidden_size, dtype=embedding.dtype)
        ours[dst + "slstm.gate_proj.weight"] = torch.stack(
            [state_dict[src + f"xlstm.{name}.weight"] for name in GATE_NAMES]
        )  # (4, NH, DH_out, DH_in)
        kernel = state_dict[src + "xlstm.slstm_cell._recurrent_kernel_"]
        bias = state_dict[src + "xlstm.slstm_cell._bias_"]
        if layout == "vanilla":
            kernel = kernel.transpose(1, 2)  # [h, g*DH + o, d] -> [h, d, g*DH + o]
            bias = bias.reshape(4, nh, dh).transpose(0, 1)  # [g, h, o] -> [h, g, o]
        ours[dst + "slstm.recurrent_kernel"] = kernel.contiguous()
        ours[dst + "slstm.gate_bias"] = bias.reshape(nh, 4 * dh).contiguous()
    if config.add_post_blocks_norm:
        ours["model.norm.weight"] = state_dict[POST_NORM]
    return ours


def state_dict_to_official(
    state_dict: dict[str, torch.Tensor], config: SLSTMConfig, layout: str = "vanilla"
) -> dict[str, torch.Tensor]:
    """The official state_dict (in `layout`) from our `SLSTMForCausalLM` one; lm_head is kept when tied, as official."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    nh, dh = config.num_heads, config.head_dim
    official = {
        "token_embedding.weight": state_dict["model.embeddings.weight"],
        "lm_head.weight": state_dict["model.embeddings.weight" if config.tie_word_embeddings else "lm_head.weight"],
    }
    for idx in range(config.num_hidden_layers):
        src, dst = f"model.layers.{idx}.", BLOCK.format(idx)
        for official_name, our_name in RENAMES:
            if src + our_name in state_dict:
                official[dst + official_name] = state_dict[src + our_name]
        for name, weight in zip(GATE_NAMES, state_dict[src + "slstm.gate_proj.weight"].unbind(0)):
            official[dst + f"xlstm.{name}.weight"] = weight.contiguous()
        kernel = state_dict[src + "slstm.recurrent_kernel"]  # (NH, DH, 4*DH)
        bias = state_dict[src + "slstm.gate_bias"]  # (NH, 4*DH)
        if layout == "vanilla":
            kernel = kernel.transpose(1, 2)
            bias = bias.reshape(nh, 4, dh).transpose(0, 1)  # [h, g, o] -> [g, h, o]
        official[dst + "xlstm.slstm_cell._recurrent_kernel_"] = kernel.contiguous()
        official[dst + "xlstm.slstm_cell._bias_"] = bias.reshape(-1).contiguous()
    if config.add_post_blocks_norm:
        official[POST_NORM] = state_dict["model.norm.weight"]
    return official


# ------------------------------------------------------------------------------------------------------------ files
def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from `.pt` / `.pth` / `.bin` (torch.load, weights_only) or `.safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        elif suffix in (".pt", ".pth", ".bin"):
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"checkpoint {path.name}: unknown format {suffix!r} (use .pt, .pth, .bin or .safetensors)")
    except ValueError:
        raise
    except pickle.UnpicklingError:
        raise ValueError(
            f"cannot read checkpoint {path.name} with torch.load(weights_only=True): not a torch file, or it holds "
            "objects other than tensors (save the state_dict alone)"
        ) from None
    except Exception as err:  # safetensors and zip errors have many types
        raise ValueError(f"cannot read checkpoint {path.name}: {' '.join(str(err).split())[:300]}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"checkpoint {path.name} is not a state_dict (a flat mapping of names to tensors)")
    return state_dict


# What each direction writes: all --overwrite removes from a non-empty output folder.
OFFICIAL_FILES = ("model.pt", "model.safetensors", "config.json", "config.yaml")


def _check_output_dir(output_dir: str, overwrite: bool, inputs: dict[str, list[str]]) -> Path:
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory")
    refuse_overlap({"--output-dir": output_dir}, inputs)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output directory {out} is not empty (pass --overwrite to replace the files it wrote there)")
    return out


def _publish(write, output_dir: Path, tool_files: tuple[str, ...]) -> None:
    """Run `write(tmp_dir)` in a temporary sibling of `output_dir`, then move the result into place: a new or empty
    folder is renamed in whole (never half-written); into a non-empty one (--overwrite) the files of `tool_files`
    names are removed and the new ones moved in, one rename each, and every other file is left alone."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new folder
    try:
        write(tmp)
        if output_dir.is_dir() and any(output_dir.iterdir()):
            remove_tool_files(output_dir, tool_files + tuple(p.name for p in tmp.iterdir()))
            for produced in sorted(tmp.iterdir()):
                os.rename(produced, output_dir / produced.name)
        else:
            if output_dir.is_dir():
                output_dir.rmdir()
            os.rename(tmp, output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _model_card(official: OfficialModel, config_path: str, checkpoint_path: str, prefix: str, layout: str) -> str:
    config = official.config
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    prefix_note = f", key prefix `{prefix}` removed" if prefix else ""
    return f"""---
library_name: transformers
tags: [slstm, xlstm, recurrent]
---

# sLSTM language model (converted from the official xLSTM)

Converted on {today} by `convert/convert_xlstm_to_hf.py` (project `modeling_slstm`) from an official NX-AI `xlstm`
`xLSTMLMModel` with sLSTM blocks only:

- source config: `{Path(config_path).name}` (names backend `{official.backend}`)
- source checkpoint: `{Path(checkpoint_path).name}` ({layout} backend layout detected{prefix_note})
- size: {config.num_hidden_layers} blocks, hidden size {config.hidden_size}, {config.num_heads} heads, \
conv kernel {config.conv1d_kernel_size}, FFN width {config.ffn_dim}, vocabulary {config.vocab_size}, \
tied embeddings: {str(config.tie_word_embeddings).lower()}

The weights are those of the source checkpoint, rearranged (float32); logits match the official model.

```python
import modeling_slstm  # or pass trust_remote_code=True instead
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
```
"""


def convert_xlstm_to_hf(config_path: str, checkpoint_path: str, output_dir: str, overwrite: bool = False) -> dict:
    """Official config + checkpoint -> a `from_pretrained` folder. Returns {"layout", "prefix", "config"}."""
    out = _check_output_dir(output_dir, overwrite, {"--config": [config_path], "--checkpoint": [checkpoint_path]})
    official = config_from_official(read_config_file(config_path))
    config = official.config
    state_dict, prefix = strip_prefix(load_checkpoint(checkpoint_path))
    layout = detect_layout(state_dict, config)
    check_official_keys(state_dict, config, layout, official.group_norm_weight)
    model = SLSTMForCausalLM(config).eval()
    model.load_state_dict(state_dict_from_official(state_dict, config, layout), strict=True)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(official, config_path, checkpoint_path, prefix, layout))

    _publish(write, out, MODEL_FOLDER_FILES + model_code_files())
    return {"layout": layout, "prefix": prefix, "config": config}


def convert_hf_to_xlstm(
    model_dir: str,
    output_dir: str,
    layout: str = "vanilla",
    file_format: str = "pt",
    config_format: str = "json",
    overwrite: bool = False,
) -> dict:
    """A `from_pretrained` folder -> official `model.{pt,safetensors}` + `config.{json,yaml}`. Returns the paths."""
    if file_format not in ("pt", "safetensors"):
        raise ValueError(f"format must be 'pt' or 'safetensors', got {file_format!r}")
    if config_format not in ("json", "yaml"):
        raise ValueError(f"config format must be 'json' or 'yaml', got {config_format!r}")
    out = _check_output_dir(output_dir, overwrite, {"--model": [model_dir]})
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model_dir} is not a saved model folder (no config.json)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != SLSTMConfig.model_type:
        raise ValueError(f"{model_dir} holds a {model_type!r} model, not an sLSTM ('{SLSTMConfig.model_type}')")
    try:
        config = SLSTMConfig.from_pretrained(model_dir)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the config in {model_dir}: {' '.join(str(err).split())[:300]}") from None
    official_config = config_to_official(config, layout)
    if config_format == "yaml":
        try:
            import yaml
        except ImportError:
            raise ValueError("--config-format yaml needs PyYAML: `pip install pyyaml`") from None
    try:
        model = SLSTMForCausalLM.from_pretrained(model_dir, config=config)
    except Exception as err:  # noqa: BLE001  missing, truncated or refused weights (safetensors, zip, weights_only pickle)
        raise ValueError(f"cannot load the model in {model_dir}: {' '.join(str(err).split())[:300]}") from None
    state_dict = state_dict_to_official(model.state_dict(), config, layout)

    def write(tmp: Path) -> None:
        if file_format == "pt":
            torch.save(state_dict, tmp / "model.pt")
        else:
            from safetensors.torch import save_file

            # safetensors refuses shared storage: give every name its own contiguous tensor
            tensors = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}
            save_file(tensors, str(tmp / "model.safetensors"))
        if config_format == "json":
            (tmp / "config.json").write_text(json.dumps(official_config, indent=2) + "\n")
        else:
            (tmp / "config.yaml").write_text(yaml.safe_dump(official_config, sort_keys=False))

    _publish(write, out, OFFICIAL_FILES)
    return {
        "checkpoint": str(out / f"model.{file_format}"),
        "config": str(out / f"config.{config_format}"),
        "layout": layout,
    }
