"""convert/: official NX-AI xLSTM checkpoints <-> SLSTMForCausalLM.

Parity against the official package (CPU, vanilla backend) with every parameter random (its init zeros R, which would
hide layout bugs); CUDA-layout checkpoints are built from vanilla ones with the documented permutations. Round trips
ours -> official -> ours must be bit-identical. Refusals: exit code 2, one `error:` line, nothing written.
"""

import copy
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import modeling_slstm  # noqa: F401  (registers the Auto classes)
from modeling_slstm import SLSTMConfig, SLSTMForCausalLM
from transformers import AutoModelForCausalLM

from conftest import state_of, with_cache, without_torchao_import_lines


CONVERT_DIR = Path(__file__).resolve().parents[1] / "convert"
_spec = importlib.util.spec_from_file_location("xlstm_mapping", CONVERT_DIR / "xlstm_mapping.py")
mapping = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mapping)

TOL = 1e-5
VOCAB, BATCH, SEQ = 50, 2, 12


# ----------------------------------------------------------------------------------------------------------- helpers
def run_script(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, str(CONVERT_DIR / script), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, without_torchao_import_lines(err)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random at a moderate scale: vectors (biases, norm offsets) std 0.3, matrices 0.8/sqrt(fan_in),
    so activations stay O(1) and float32 round-off stays far below the tolerance."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        std = 0.3 if param.dim() == 1 else 0.8 * param.shape[-1] ** -0.5
        param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


def official_classes():
    xlstm = pytest.importorskip("xlstm")
    from xlstm.blocks.slstm.block import sLSTMBlockConfig
    from xlstm.blocks.slstm.layer import sLSTMLayerConfig
    from xlstm.components.feedforward import FeedForwardConfig

    return xlstm.xLSTMLMModel, xlstm.xLSTMLMModelConfig, sLSTMBlockConfig, sLSTMLayerConfig, FeedForwardConfig


def official_model(data: dict, seed: int = 0):
    """The official model for a config dict (built by hand, as dacite would), every parameter random, eval mode.

    It always runs the vanilla backend (CPU); CUDA-layout tests convert the weights, not the model.
    """
    model_cls, lm_cfg, block_cfg, layer_cfg, ffn_cfg = official_classes()
    data = copy.deepcopy(data)
    block = data.pop("slstm_block")
    ffn = block.get("feedforward", {})
    slstm = {**block["slstm"], "backend": "vanilla"}
    data["slstm_block"] = block_cfg(slstm=layer_cfg(**slstm), feedforward=None if ffn is None else ffn_cfg(**ffn))
    return randomize_(model_cls(lm_cfg(**data)).eval(), seed)


def vanilla_to_cuda(state_dict: dict, num_heads: int) -> dict:
    """The documented permutations: R (NH, 4DH, DH) -> (NH, DH, 4DH); bias gate-major -> head-major."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("_recurrent_kernel_"):
            value = value.permute(0, 2, 1).contiguous()
        elif key.endswith("_bias_"):
            value = value.reshape(4, num_heads, -1).permute(1, 0, 2).reshape(-1).contiguous()
        out[key] = value
    return out


def random_ours(seed: int = 0, **fields) -> SLSTMForCausalLM:
    return randomize_(SLSTMForCausalLM(SLSTMConfig(vocab_size=VOCAB, **fields)).eval(), seed)


def write_config(path: Path, data: dict, nested: bool) -> Path:
    data = {"model": data, "training": {"lr": 1e-3}} if nested else data
    if path.suffix == ".yaml":
        yaml = pytest.importorskip("yaml")
        path.write_text(yaml.safe_dump(data))
    else:
        path.write_text(json.dumps(data))
    return path


def official_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full forward and token-by-token `step()` logits of the official model, each (B, S, V)."""
    with torch.no_grad():
        full = model(ids)
        state, steps = None, []
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t : t + 1], state)
            steps.append(logits)
    return full, torch.cat(steps, dim=1)


def our_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full forward and token-by-token logits through our cache, each (B, S, V)."""
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :1], use_cache=True)
        steps = [out.logits]
        for t in range(1, ids.shape[1]):
            out = model(ids[:, t : t + 1], **with_cache(state_of(out)), use_cache=True)
            steps.append(out.logits)
    return full, torch.cat(steps, dim=1)


def official_dict(dim, heads, kernel, blocks, tied, feedforward, slstm=None, **top) -> dict:
    """An official config dict; feedforward None = blocks without FFN, {} = the default FFN."""
    slstm = {"num_heads": heads, "conv1d_kernel_size": kernel, "backend": "vanilla", "dtype": "float32",
             **(slstm or {})}
    return {"vocab_size": VOCAB, "embedding_dim": dim, "num_blocks": blocks, "tie_weights": tied,
            "slstm_block": {"slstm": slstm, "feedforward": feedforward}, **top}


# Official configs: heads 1/2/4, conv 0/2/4, 1-3 blocks, tied/untied, vanilla/cuda, .pt/.safetensors, wrapped keys.
CASES = {
    "nh1-k0-L1-tied-vanilla-pt-yaml": dict(
        official=official_dict(16, 1, 0, 1, True, {}), layout="vanilla", file="ckpt.pt", prefix="",
        config="cfg.yaml", nested=True, script=True,
    ),
    "nh2-k2-L2-untied-cuda-safetensors": dict(
        official=official_dict(24, 2, 2, 2, False, {"act_fn": "relu^2", "bias": True}, add_post_blocks_norm=False),
        layout="cuda", file="ckpt.safetensors", prefix="module.", config="cfg.json", nested=False, script=True,
    ),
    "nh4-k4-L3-untied-cuda-pth-noffn": dict(
        official=official_dict(32, 4, 4, 3, False, None, {"backend": "cuda", "group_norm_weight": False},
                               dropout=0.1, add_embedding_dropout=True),
        layout="cuda", file="ckpt.pth", prefix="model.", config="cfg.json", nested=True, script=False,
    ),
    "nh4-k4-L2-tied-vanilla-safetensors": dict(
        official=official_dict(32, 4, 4, 2, True, {"act_fn": "swish", "proj_factor": 2.0}), layout="vanilla",
        file="ckpt.safetensors", prefix="", config="cfg.yaml", nested=False, script=False,
    ),
}


def save_official_checkpoint(model, case: dict, path: Path) -> None:
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if case["layout"] == "cuda":
        state_dict = vanilla_to_cuda(state_dict, case["official"]["slstm_block"]["slstm"]["num_heads"])
    if path.suffix == ".safetensors" and case["official"]["tie_weights"]:
        del state_dict["lm_head.weight"]  # safetensors keeps one name per shared tensor
    state_dict = {case["prefix"] + k: v for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        save_file(state_dict, str(path))
    else:
        torch.save(state_dict, path)


# ------------------------------------------------------------------------------------------- official -> ours parity
@pytest.mark.parametrize("name", list(CASES))
def test_official_to_hf_parity(name, tmp_path):
    case = CASES[name]
    official = official_model(case["official"])
    config_path = write_config(tmp_path / case["config"], case["official"], case["nested"])
    ckpt_path = tmp_path / case["file"]
    save_official_checkpoint(official, case, ckpt_path)
    out = tmp_path / "hf"
    if case["script"]:
        code, stdout, stderr = finish(run_script(
            "convert_xlstm_to_hf.py", "--config", config_path, "--checkpoint", ckpt_path, "--output-dir", out
        ))
        assert code == 0, stderr
        assert f"{case['layout']} layout" in stdout
    else:
        assert mapping.convert_xlstm_to_hf(config_path, ckpt_path, out)["layout"] == case["layout"]

    card = (out / "README.md").read_text()
    assert ckpt_path.name in card and config_path.name in card and f"{case['layout']} backend layout" in card
    # trust_remote_code needs auto_map and the code beside the weights (loading it is tests/test_hub.py's business)
    assert "AutoModelForCausalLM" in json.loads((out / "config.json").read_text())["auto_map"]
    assert (out / "modeling_slstm.py").is_file() and (out / "configuration_slstm.py").is_file()
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(ours, SLSTMForCausalLM)
    assert ours.config.tie_word_embeddings == case["official"]["tie_weights"]

    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    ref_full, ref_steps = official_logits(official, ids)
    full, steps = our_logits(ours, ids)
    assert (full - ref_full).abs().max() <= TOL
    assert (steps - ref_steps).abs().max() <= TOL
    assert (steps - ref_full).abs().max() <= TOL


def test_cuda_permutations_match_official_cuda_cell():
    """The documented vanilla -> cuda permutations equal what the official CUDA cell stores (built without a GPU)."""
    pytest.importorskip("xlstm")
    from xlstm.blocks.slstm.cell import sLSTMCell_cuda, sLSTMCell_vanilla, sLSTMCellConfig

    config = dict(hidden_size=24, num_heads=2, dtype="float32", enable_automatic_mixed_precision=False)
    vanilla = sLSTMCell_vanilla(sLSTMCellConfig(backend="vanilla", **config))
    cuda = sLSTMCell_cuda(sLSTMCellConfig(backend="cuda", **config), skip_backend_init=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in vanilla.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    cuda.recurrent_kernel[:] = vanilla.recurrent_kernel[:]  # backend-agnostic external views
    cuda.bias[:] = vanilla.bias[:]
    converted = vanilla_to_cuda(vanilla.state_dict(), num_heads=2)
    for key, value in cuda.state_dict().items():
        assert torch.equal(converted[key], value), key


# ---------------------------------------------------------------------------------------- ours -> official -> ours
ROUND_TRIPS = {
    "vanilla-pt-json-script": dict(
        fields=dict(hidden_size=32, num_hidden_layers=2, num_heads=4, conv1d_kernel_size=4, tie_word_embeddings=True),
        layout="vanilla", format="pt", config_format="json", script=True,
    ),
    "cuda-safetensors-yaml": dict(
        fields=dict(hidden_size=16, num_hidden_layers=3, num_heads=2, conv1d_kernel_size=0, tie_word_embeddings=False,
                    ffn_bias=True, ffn_act="silu", add_post_blocks_norm=False, dropout=0.1, embedding_dropout=0.1),
        layout="cuda", format="safetensors", config_format="yaml", script=False,
    ),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per round-trip case, made once: a random model of ours saved, and converted to the official format.

    Returns a function name -> (model, our dir, official dir).
    """
    cache = {}

    def get(name: str) -> tuple[SLSTMForCausalLM, Path, Path]:
        if name not in cache:
            case, root = ROUND_TRIPS[name], tmp_path_factory.mktemp(name)
            if case["config_format"] == "yaml":
                pytest.importorskip("yaml")
            ours = random_ours(**case["fields"])
            ours_dir, official_dir = root / "ours", root / "official"
            ours.save_pretrained(ours_dir)
            args = ["--layout", case["layout"], "--format", case["format"], "--config-format", case["config_format"]]
            if case["script"]:
                proc = run_script("convert_hf_to_xlstm.py", "--model", ours_dir, "--output-dir", official_dir, *args)
                code, _, stderr = finish(proc)
                assert code == 0, stderr
            else:
                mapping.convert_hf_to_xlstm(
                    ours_dir, official_dir, case["layout"], case["format"], case["config_format"]
                )
            cache[name] = ours, ours_dir, official_dir
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_round_trip_is_exact(name, exported, tmp_path):
    case = ROUND_TRIPS[name]
    ours, ours_dir, official_dir = exported(name)
    back = tmp_path / "back"
    result = mapping.convert_xlstm_to_hf(
        official_dir / f"config.{case['config_format']}", official_dir / f"model.{case['format']}", back
    )
    assert result["layout"] == case["layout"]
    before, after = load_file(ours_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    config = SLSTMConfig.from_pretrained(back)
    for field, value in case["fields"].items():
        expected = "swish" if value == "silu" else value  # the official name of the same function
        assert getattr(config, field) == expected, field


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_exported_checkpoint_runs_in_official_model(name, exported):
    case = ROUND_TRIPS[name]
    pytest.importorskip("xlstm")
    ours, _, official_dir = exported(name)
    config_file = official_dir / f"config.{case['config_format']}"
    official = official_model(mapping.read_config_file(config_file))
    if case["format"] == "pt":
        state_dict = torch.load(official_dir / "model.pt", weights_only=True)
    else:
        state_dict = load_file(official_dir / "model.safetensors")
    if case["layout"] == "cuda":  # load into the official CUDA cell to check the layout, then read its external view
        from xlstm.blocks.slstm.cell import sLSTMCell_cuda

        for idx, block in enumerate(official.xlstm_block_stack.blocks):
            cell = block.xlstm.slstm_cell
            cuda_cell = sLSTMCell_cuda(copy.deepcopy(cell.config), skip_backend_init=True)
            prefix = f"xlstm_block_stack.blocks.{idx}.xlstm.slstm_cell."
            cuda_cell.load_state_dict({k: state_dict.pop(prefix + k) for k in ("_recurrent_kernel_", "_bias_")})
            state_dict[prefix + "_recurrent_kernel_"] = cell._recurrent_kernel_ext2int(cuda_cell.recurrent_kernel[:])
            state_dict[prefix + "_bias_"] = cell._bias_ext2int(cuda_cell.bias[:])
    official.load_state_dict(state_dict, strict=True)

    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    ref_full, ref_steps = official_logits(official, ids)
    full, steps = our_logits(ours, ids)
    assert (full - ref_full).abs().max() <= TOL
    assert (steps - ref_steps).abs().max() <= TOL


# ---------------------------------------------------------------------------------------------------------- refusals
def _refusal_inputs(kind: str, tmp_path: Path) -> tuple[list, Path]:
    """Script arguments for one refused conversion, and the output dir that must stay as it was."""
    fields = dict(hidden_size=16, num_hidden_layers=1, num_heads=2, conv1d_kernel_size=2, tie_word_embeddings=False)
    ours_dir, official_dir = tmp_path / "ours", tmp_path / "official"
    random_ours(**fields).save_pretrained(ours_dir)
    mapping.convert_hf_to_xlstm(ours_dir, official_dir)
    config, ckpt = official_dir / "config.json", official_dir / "model.pt"
    state_dict = torch.load(ckpt, weights_only=True)
    out = tmp_path / "out"
    if kind == "mlstm":
        data = json.loads(config.read_text())
        data.update(num_blocks=2, slstm_at=[1], mlstm_block={"mlstm": {"num_heads": 1}})
        config.write_text(json.dumps(data))
    elif kind == "wrong_shape":
        key = "xlstm_block_stack.blocks.0.xlstm.conv1d.conv.weight"
        state_dict[key] = state_dict[key][..., :1]
        torch.save(state_dict, ckpt)
    elif kind == "unknown_key":
        state_dict["xlstm_block_stack.blocks.0.xlstm.extra.weight"] = torch.zeros(3)
        torch.save(state_dict, ckpt)
    elif kind == "non_empty_output":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    elif kind == "output_holds_checkpoint":
        return ["--config", config, "--checkpoint", ckpt, "--output-dir", official_dir, "--overwrite"], out
    return ["--config", config, "--checkpoint", ckpt, "--output-dir", out], out


REFUSALS = {
    "mlstm": "mLSTM blocks are not supported",
    "wrong_shape": "wrong shape(s): xlstm_block_stack.blocks.0.xlstm.conv1d.conv.weight [16, 1, 1] "
                   "(expected [16, 1, 2])",
    "unknown_key": "unknown key(s): xlstm_block_stack.blocks.0.xlstm.extra.weight",
    "non_empty_output": "is not empty (pass --overwrite",
    "output_holds_checkpoint": "holds the input --config",
}


@pytest.fixture(scope="module")
def refusal_runs(tmp_path_factory):
    """Start every refused script run at once (each subprocess spends seconds importing torch and transformers)."""
    runs = {}
    for kind in REFUSALS:
        root = tmp_path_factory.mktemp(kind)
        args, out = _refusal_inputs(kind, root)
        runs[kind] = (run_script("convert_xlstm_to_hf.py", *args), root, out)
    return {kind: (finish(proc), root, out) for kind, (proc, root, out) in runs.items()}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_script_refusals(kind, refusal_runs):
    (code, stdout, stderr), root, out = refusal_runs[kind]
    assert code == 2
    assert stdout == ""
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert REFUSALS[kind] in stderr
    if kind == "non_empty_output":
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    else:
        assert not out.exists()
    expected = ["official", "ours"] + (["out"] if kind == "non_empty_output" else [])
    assert sorted(p.name for p in root.iterdir()) == expected  # no temporary folder left beside it
    assert sorted(p.name for p in (root / "official").iterdir()) == ["config.json", "model.pt"]  # inputs intact


def test_overwrite_replaces_only_what_the_tools_write(tmp_path):
    fields = dict(hidden_size=16, num_hidden_layers=1, num_heads=2, conv1d_kernel_size=2)
    random_ours(**fields).save_pretrained(tmp_path / "ours")
    mapping.convert_hf_to_xlstm(tmp_path / "ours", tmp_path / "official")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.safetensors").write_text("an older conversion")
    (out / "model-00001-of-00002.safetensors").write_text("an older, sharded conversion")
    mapping.convert_xlstm_to_hf(tmp_path / "official/config.json", tmp_path / "official/model.pt", out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 16
    official = tmp_path / "official"
    (official / "notes.txt").write_text("mine")
    mapping.convert_hf_to_xlstm(tmp_path / "ours", official, file_format="safetensors", overwrite=True)
    assert sorted(p.name for p in official.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official", "ours", "out"]  # no temporary folder left


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > PWNED",))


def _export_refusal(kind: str, root: Path) -> tuple[list, Path]:
    """convert_hf_to_xlstm.py arguments for one refused export, and the folder that must stay as it was."""
    src = root / "ours"
    random_ours(hidden_size=16, num_hidden_layers=1, num_heads=2, conv1d_kernel_size=2).save_pretrained(src)
    weights = src / "model.safetensors"
    if kind == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:-64])
    elif kind == "malicious_pickle":
        weights.unlink()
        torch.save({"model.embeddings.weight": _Exploit()}, src / "pytorch_model.bin")
    output = {"into_itself": src, "inside_input": src / "official", "holding_input": root}.get(kind, root / "out")
    return ["--model", src, "--output-dir", output, "--overwrite"], src


EXPORT_REFUSALS = {
    "truncated_weights": "cannot load the model in",
    "malicious_pickle": "cannot load the model in",
    "into_itself": "is the input --model",
    "inside_input": "is inside the input --model",
    "holding_input": "holds the input --model",
}


@pytest.mark.parametrize("kind", list(EXPORT_REFUSALS))
def test_export_script_refusals_keep_the_input(kind, tmp_path, monkeypatch, capsys):
    """The script's main() in this process (a subprocess per case would spend seconds importing torch)."""
    monkeypatch.syspath_prepend(str(CONVERT_DIR))  # the script imports xlstm_mapping from beside itself
    spec = importlib.util.spec_from_file_location("convert_hf_to_xlstm", CONVERT_DIR / "convert_hf_to_xlstm.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args, src = _export_refusal(kind, tmp_path)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    capsys.readouterr()  # the set-up's save_pretrained progress bar
    code = script.main([str(a) for a in args])
    stdout, stderr = capsys.readouterr()
    assert code == 2 and stdout == ""
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert EXPORT_REFUSALS[kind] in stderr
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert not list(tmp_path.glob("**/PWNED")) and not (Path.cwd() / "PWNED").exists()


def test_yaml_config_without_pyyaml_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: {vocab_size: 50}\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` now raises ImportError
    with pytest.raises(ValueError, match="PyYAML is not installed"):
        mapping.read_config_file(path)


BASE = official_dict(16, 2, 4, 2, False, {})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"slstm_block": {"slstm": {"function": "lstm"}}}, "function='lstm'"),
        ({"slstm_block": {"slstm": {"gradient_recurrent_clipval": 1.0}}}, "gradient_recurrent_clipval=1.0"),
        ({"slstm_block": {"slstm": {"constants": {"X": 1}}}}, "constants"),
        ({"slstm_block": {"slstm": {"backend": "cuda", "internal_input_shape": "SBGNH"}}}, "internal_input_shape"),
        ({"slstm_block": {"feedforward": {"act_fn": "tanh"}}}, "act_fn='tanh'"),
        ({"slstm_block": {"feedforward": {"round_proj_up_dim_up": False}}}, "round_proj_up_dim_up"),
        ({"slstm_block": {"slstm": {"num_heads": 3}}}, "divisible by num_heads"),
        ({"vocab_size": "${dataset.vocab_size}"}, "unresolved OmegaConf interpolation"),
        ({"mystery": 1}, "unknown field(s) in the model config: mystery"),
        ({"slstm_block": {"slstm": {"mystery": 1}}}, "unknown field(s) in slstm_block.slstm: mystery"),
        ({"mlstm_block": {"mlstm": {}}, "slstm_at": [0]}, "blocks [1] are mLSTM"),
    ],
)
def test_config_refusals(change, message):
    data = copy.deepcopy(BASE)
    for key, value in change.items():
        if key == "slstm_block":
            for part, fields in value.items():
                data["slstm_block"][part].update(fields)
        else:
            data[key] = value
    with pytest.raises(ValueError) as err:
        mapping.config_from_official(data)
    assert message in str(err.value)


def test_config_accepts_options_without_effect_on_inference():
    data = copy.deepcopy(BASE)
    data.update(context_length=256, bias=True, weight_decay_on_embedding=True, _block_map="1,1", slstm_at="all",
                mlstm_block={"mlstm": {}})
    data["slstm_block"]["slstm"].update(backend="cuda", dtype="bfloat16", batch_size=16, forward_clipval=3.0,
                                        bias_init="small_init", gradient_recurrent_cut=True, _block_idx=1)
    data["slstm_block"]["feedforward"].update(dropout=0.2, _proj_up_dim=0, embedding_dim=-1)
    official = mapping.config_from_official(data)
    assert official.config.forget_bias_init == "small_init" and official.backend == "cuda"
    assert official.config.ffn_dim == 64


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(forget_gate="exp"), "forget_gate='exp'"),
        (dict(layer_norm_eps=1e-6), "layer_norm_eps"),
        (dict(conv1d_kernel_size=1), "conv1d_kernel_size=1"),
        (dict(dropout=0.1, embedding_dropout=0.2), "embedding_dropout=0.2"),
    ],
)
def test_export_refusals(fields, message):
    config = SLSTMConfig(vocab_size=VOCAB, hidden_size=16, num_heads=2, **fields)
    with pytest.raises(ValueError) as err:
        mapping.config_to_official(config)
    assert message in str(err.value)


def test_known_fields_match_official_dataclasses():
    """Every official config field is either read or knowingly ignored (guards against a changed xlstm release)."""
    _, lm_cfg, block_cfg, layer_cfg, ffn_cfg = official_classes()

    def names(cls):
        return {field.name for field in dataclasses.fields(cls)}

    assert names(lm_cfg) == set(mapping.TOP_DEFAULTS) | mapping.IGNORED_TOP
    assert names(block_cfg) == set(mapping.BLOCK_DEFAULTS) | mapping.IGNORED_BLOCK
    assert names(layer_cfg) == set(mapping.SLSTM_DEFAULTS) | mapping.IGNORED_SLSTM
    assert names(ffn_cfg) == set(mapping.FFN_DEFAULTS) | mapping.IGNORED_FFN
