"""The `slstm` command line: train / generate / demo / bench, as a user runs them (subprocesses), plus the engine checks
behind them (data parallel replicas in sync, gradient checkpointing gives the same gradients, resume, bad arguments).

Everything runs offline on the tiny preset with a small slice of the bundled corpus, in well under two minutes on 2 CPU
cores.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest
import torch

from modeling_slstm import SLSTMConfig, SLSTMForCausalLM
from modeling_slstm import cli
from modeling_slstm.checkpoints import checkpoint_problem
from modeling_slstm.corpus import load_corpus, read_documents

from conftest import checkpointing, deprecations_in, tiny_config, without_torchao_import_lines


REPO = Path(__file__).resolve().parents[1]

# A few thousand tokens: enough for seq-len 32 blocks and a held-out split, trains in a second or two.
QUICK = ["--max-chars", "20000", "--seq-len", "32", "--batch-size", "4", "--logging-steps", "1", "--no-progress-bar"]


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"),
               TOKENIZERS_PARALLELISM="false",
               # One thread per process: the CI box has 2 cores and the 2-process test would oversubscribe them.
               OMP_NUM_THREADS="1")
    return env


def _slstm_command() -> list:
    """The installed console script when there is one (it is what users run), else `python -m modeling_slstm.cli`."""
    script = Path(sys.executable).parent / ("slstm.exe" if os.name == "nt" else "slstm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "modeling_slstm.cli"]


def _run(args, tmp_path, timeout=240, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, env=_env(tmp_path), timeout=timeout,
                            stdin=subprocess.DEVNULL, **kwargs)
    assert not deprecations_in(result.stdout + result.stderr), result.stderr
    result.stderr = without_torchao_import_lines(result.stderr)
    return result


def _checkpoints(output_dir: Path) -> Path:
    """The default checkpoint folder: beside the model folder, not in it."""
    return output_dir.with_name(output_dir.name + "-checkpoints")


def _copy_run(trained: Path, out: Path) -> None:
    shutil.copytree(trained, out)
    shutil.copytree(_checkpoints(trained), _checkpoints(out))


def _losses(output_dir: Path) -> list:
    checkpoints = sorted(_checkpoints(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`slstm train` for 4 steps (checkpoints at 2 and 4); returns the output dir."""
    tmp = tmp_path_factory.mktemp("train")
    out = tmp / "model"
    result = _run(_slstm_command() + ["train", "--config", "tiny", "--output-dir", str(out), "--max-steps", "4",
                                      "--save-steps", "2", "--eval-steps", "2", *QUICK], tmp)
    assert result.returncode == 0, result.stderr
    return out


# ------------------------------------------------------------------------------------------------------------ train
def test_train_saves_a_complete_model_folder(trained):
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "all_results.json", "modeling_slstm.py"):
        assert (trained / name).is_file(), name
    config = json.loads((trained / "config.json").read_text())
    assert config["model_type"] == "slstm" and "AutoModelForCausalLM" in config["auto_map"]
    metrics = json.loads((trained / "all_results.json").read_text())
    assert metrics["global_step"] == 4 and metrics["eval_perplexity"] > 1
    card = (trained / "README.md").read_text()
    assert "library_name: transformers" in card and "eval perplexity" in card
    assert sorted(p.name for p in _checkpoints(trained).iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not list(trained.glob("**/optimizer.pt"))  # uploading the model folder uploads no training state


def test_saved_folder_is_a_good_hub_model(trained):
    """No saved length that would shadow a caller's max_length, use_cache on, both auto classes, a licence."""
    generation = json.loads((trained / "generation_config.json").read_text())
    assert "max_new_tokens" not in generation and "max_length" not in generation
    assert generation.get("use_cache", True) is True  # decoding carries the state: O(1) per token
    config = json.loads((trained / "config.json").read_text())
    assert config["use_cache"] is True
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM"} <= set(config["auto_map"])
    assert "\nlicense: apache-2.0\n" in (trained / "README.md").read_text()
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(trained)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    prompt = tokenizer("The ", return_tensors="pt")
    width = prompt["input_ids"].shape[1]
    assert model.generate(**prompt, max_length=width + 3).shape[1] == width + 3
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator("The ", max_new_tokens=2, do_sample=False, return_full_text=False)
    assert len(tokenizer(out[0]["generated_text"])["input_ids"]) <= 2


def test_output_loads_with_auto_classes_and_generates(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained)
    model = AutoModelForCausalLM.from_pretrained(trained)
    assert isinstance(model, SLSTMForCausalLM)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    inputs = tokenizer(["The ", "A longer prompt"], return_tensors="pt", padding=True)
    assert set(inputs) == {"input_ids", "attention_mask"}  # no token_type_ids: generate would reject them
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)


def test_generate_cli_streams_text(trained, tmp_path):
    result = _run(_slstm_command() + ["generate", str(trained), "--prompt", "The ", "--max-new-tokens", "8",
                                      "--seed", "0"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The ") and len(result.stdout.strip()) > len("The")


def test_generate_text_api_greedy_beams_and_empty_prompt(trained, capsys):
    tokenizer, model = cli.load_for_generation(str(trained))
    greedy = cli.generate_text(tokenizer, model, "The ", max_new_tokens=5, temperature=0, stream=False)
    assert greedy == cli.generate_text(tokenizer, model, "The ", max_new_tokens=5, temperature=0)
    assert capsys.readouterr().out.strip() == greedy.strip()  # streamed to stdout
    cli.generate_text(tokenizer, model, "The ", max_new_tokens=5, num_beams=2)  # not streamable: printed at the end
    assert capsys.readouterr().out.startswith("The ")
    assert isinstance(cli.generate_text(tokenizer, model, "", max_new_tokens=3, seed=0, stream=False), str)
    for beams in (0, None, 2.0):
        with pytest.raises(ValueError, match="--num-beams must be a positive integer"):
            cli.generate_text(tokenizer, model, "The ", max_new_tokens=3, num_beams=beams)
    with pytest.raises(ValueError, match="--num-beams 3000 needs about"):  # the prompt runs once per beam
        cli.generate_text(tokenizer, model, "The " * 20000, max_new_tokens=3, num_beams=3000)


@pytest.mark.allow_deprecation("Passing `generation_config` together with generation-related")  # transformers' own
def test_generate_with_prompt_lookup_or_a_draft_gives_the_greedy_text(trained, capsys):
    prompt = "The class statement. The class statement. The class statement."
    argv = ["generate", str(trained), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0"]
    texts = []
    for extra in ([], ["--prompt-lookup", "4"], ["--assistant", str(trained)]):
        assert cli.main(argv + extra) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0].startswith(prompt) and texts[1] == texts[0] and texts[2] == texts[0]
    for extra, message in ((["--prompt-lookup", "4", "--assistant", str(trained)], "choose one"),
                           (["--prompt-lookup", "4", "--num-beams", "2"], "--num-beams 1"),
                           (["--num-beams", "100000000"], "--num-beams 100000000 needs about")):
        assert cli.main(argv + extra) == 2
        assert message in capsys.readouterr().err


def test_trust_remote_code_without_the_package(trained, tmp_path):
    """Load the saved folder as a Hub user would: the package is not importable, only the copied model code is used.

    The package is installed editable in the test venv, through a `.pth` file that `site` processes at start-up.
    `python -I -S` skips `site` (so no .pth, no editable finder, no user site, PYTHON* env vars and the cwd ignored);
    the venv's site-packages directories are then appended to sys.path by hand, which gives transformers and torch but
    not our package. The child asserts that `modeling_slstm` is not importable before loading.
    """
    folder = tmp_path / "hub-copy"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoints"))
    site_dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    ids = [[5, 6, 7, 8]]
    expected = SLSTMForCausalLM.from_pretrained(trained).eval()(torch.tensor(ids)).logits
    script = f"""
import importlib.util, json, sys
sys.path.extend({site_dirs!r})
assert importlib.util.find_spec("modeling_slstm") is None, "modeling_slstm must not be importable here"
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
# AutoTokenizer reads config.json too, whose auto_map needs the same consent (else it prompts [y/N]).
tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
base = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
assert type(base).__name__ == "SLSTMModel", type(base)
assert "modeling_slstm" not in sys.modules
with torch.no_grad():
    logits = model(torch.tensor({ids!r})).logits
    model.generate(**tokenizer("The ", return_tensors="pt"), max_new_tokens=3, do_sample=False)
print("RESULT", json.dumps({{"class": type(model).__module__, "logits": logits.tolist()}}))
"""
    result = _run([sys.executable, "-I", "-S", "-c", script], tmp_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[y/N]" not in result.stdout + result.stderr
    report = json.loads(result.stdout.split("RESULT", 1)[1])
    assert report["class"].startswith("transformers_modules")
    torch.testing.assert_close(torch.tensor(report["logits"]), expected, rtol=1e-5, atol=1e-5)


def test_resume_continues_from_the_last_checkpoint_with_bf16_and_checkpointing(trained, tmp_path):
    """`--resume` picks up checkpoint-4 and runs to step 6; the run also exercises --bf16 and
    --gradient-checkpointing (bf16 autocast with the float32 recurrent state, recomputed activations)."""
    out = tmp_path / "model"
    _copy_run(trained, out)
    result = _run(_slstm_command() + ["train", "--output-dir", str(out), "--resume", "--max-steps", "6",
                                      "--save-steps", "2", "--eval-steps", "2", "--bf16", "--gradient-checkpointing",
                                      *QUICK], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Resuming from" in result.stderr and "checkpoint-4" in result.stderr
    assert json.loads((out / "all_results.json").read_text())["global_step"] == 6
    state = json.loads((_checkpoints(out) / "checkpoint-6" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5, 6]
    for name in ("config.json", "generation_config.json"):  # the resumed model decodes with its state too
        assert json.loads((out / name).read_text()).get("use_cache", True) is True, name


def test_resume_skips_incomplete_checkpoints_and_a_killed_save(trained, tmp_path, capsys):
    """Newer checkpoints that cannot be resumed (no trainer state, truncated weights) and a save killed in the staging
    folder: --resume names what it skips, continues from the newest complete one and replaces the broken folders."""
    out = tmp_path / "model"
    _copy_run(trained, out)
    checkpoints = _checkpoints(out)
    for step, damage in ((5, "trainer_state.json"), (6, "model.safetensors")):
        broken = checkpoints / f"checkpoint-{step}"
        shutil.copytree(checkpoints / "checkpoint-4", broken)
        path = broken / damage
        if damage == "trainer_state.json":
            path.unlink()
        else:
            path.write_bytes(path.read_bytes()[:-100])
    shutil.copytree(checkpoints / "checkpoint-4", checkpoints / ".partial" / "checkpoint-6")
    assert cli.main(["train", "--output-dir", str(out), "--resume", "--max-steps", "6", "--save-steps", "2",
                     "--eval-steps", "6", *QUICK]) == 0
    err = capsys.readouterr().err
    assert "Skipping incomplete checkpoint" in err and "model.safetensors is truncated" in err
    assert "trainer_state.json is missing" in err
    assert f"Resuming from {checkpoints / 'checkpoint-4'}" in err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-5", "checkpoint-6"]  # rotation keeps 2
    assert checkpoint_problem(checkpoints / "checkpoint-6") is None


@pytest.mark.parametrize("damage", ["trainer_state.json", "model.safetensors", "optimizer.pt", "config.json"])
def test_checkpoint_problem_finds_each_damage(trained, tmp_path, damage):
    folder = tmp_path / "checkpoint-4"
    shutil.copytree(_checkpoints(trained) / "checkpoint-4", folder)
    assert checkpoint_problem(folder) is None
    path = folder / damage
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert damage in checkpoint_problem(folder)
    path.unlink()
    assert damage in checkpoint_problem(folder)


def test_a_save_killed_midway_leaves_no_checkpoint_folder(tmp_path, monkeypatch, capsys):
    """Ctrl-C while checkpoint-4 is written: it stays in the staging folder, checkpoint-2 is untouched, and --resume
    continues from checkpoint-2 (the Ctrl-C message promises that)."""
    from transformers import Trainer

    out = tmp_path / "model"
    save_rng_state = Trainer._save_rng_state

    def interrupted(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt  # after weights and optimizer, before the trainer state
        return save_rng_state(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", interrupted)
    args = ["train", "--output-dir", str(out), "--max-steps", "4", "--save-steps", "2", "--eval-steps", "4", *QUICK]
    assert cli.main(args) == 130
    assert "--resume" in capsys.readouterr().err
    checkpoints = _checkpoints(out)
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-2"]
    assert (checkpoints / ".partial" / "checkpoint-4" / "optimizer.pt").is_file()
    monkeypatch.setattr(Trainer, "_save_rng_state", save_rng_state)
    assert cli.main(["train", "--output-dir", str(out), "--resume", "--max-steps", "4", "--save-steps", "2",
                     "--eval-steps", "4", *QUICK]) == 0
    assert f"Resuming from {checkpoints / 'checkpoint-2'}" in capsys.readouterr().err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_overwrite_removes_only_what_the_tool_wrote(trained, tmp_path, capsys):
    out = tmp_path / "model"
    _copy_run(trained, out)
    checkpoints = _checkpoints(out)
    (out / "notes.txt").write_text("mine")
    (checkpoints / "best-by-hand").mkdir()
    (checkpoints / "best-by-hand" / "model.safetensors").write_text("mine")
    (checkpoints / "checkpoint-notes.md").write_text("mine")
    assert cli.main(["train", "--output-dir", str(out), "--overwrite", "--max-steps", "1", "--save-steps", "1",
                     "--eval-steps", "1", "--license", "mit", *QUICK]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (checkpoints / "best-by-hand" / "model.safetensors").read_text() == "mine"
    assert (checkpoints / "checkpoint-notes.md").read_text() == "mine"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*") if p.is_dir()) == ["checkpoint-1"]
    assert json.loads((out / "all_results.json").read_text())["global_step"] == 1
    assert "\nlicense: mit\n" in (out / "README.md").read_text()


def test_a_failed_overwrite_keeps_the_previous_model(trained, tmp_path, capsys):
    out = tmp_path / "model"
    _copy_run(trained, out)
    before = (out / "model.safetensors").read_bytes()
    assert cli.main(["train", "--output-dir", str(out), "--overwrite", "--tokenizer", str(tmp_path / "nope"),
                     *QUICK]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before and list(_checkpoints(out).glob("checkpoint-*"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_data_parallel_two_cpu_processes(tmp_path):
    """2 processes over gloo: both replicas end with identical weights (digests gathered from every rank) and the
    loss falls. `accelerate launch --multi_gpu` starts the processes with torchrun; on a machine without GPUs
    `slstm train` then runs them on the CPU (`accelerate launch --cpu` alone would start a single process)."""
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    result = _run(launch + ["-m", "modeling_slstm.cli", "train", "--output-dir", str(out), "--max-steps", "8",
                            "--save-steps", "8", "--eval-steps", "8", "--lr", "3e-3", "--warmup-steps", "0", *QUICK],
                  tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "all_results.json").read_text())
    assert metrics["world_size"] == 2
    digests = metrics["replica_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    losses = _losses(out)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses


# ---------------------------------------------------------------------------------------------- user errors (exit 2)
@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-data", "data file not found"),
        ("empty-data", "data file is empty"),
        ("non-empty-output", "is not empty"),
        ("unknown-preset", "unknown preset"),
        ("resume-without-checkpoint", "no complete checkpoint"),
        ("generate-missing-folder", "model folder not found"),
        ("bad-config-json", "not a readable JSON"),
        ("text-shorter-than-seq-len", "less than one --seq-len"),
        ("binary-data", "looks binary"),
        ("bad-license", "--license must be"),
        ("negative-seed", "--seed must be in"),
        ("infinite-weight-decay", "--weight-decay must be a finite number"),
        ("overwrite-into-data-folder", "holds the input --data"),
        ("overwrite-into-config-folder", "is the input --config"),
        ("output-inside-tokenizer", "is inside the input --tokenizer"),
        ("config-infinite-init", "initializer_range must be a number > 0"),
        ("config-nan-ffn", "ffn_proj_factor must be a number >= 0"),
        ("config-zero-width", "hidden_size must be a positive integer"),
        ("config-string-eps", "layer_norm_eps must be a number > 0"),
        ("config-bool-kernel", "conv1d_kernel_size must be an integer >= 0"),
        ("checkpoints-inside-output", "--checkpoint-dir"),
        ("output-dir-not-creatable", "cannot create it"),
    ],
)
def test_user_errors_exit_2_with_a_message(case, message, tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 40)
    bad_fields = {"config-infinite-init": ("initializer_range", math.inf), "config-nan-ffn": ("ffn_proj_factor", math.nan),
                  "config-zero-width": ("hidden_size", 0), "config-string-eps": ("layer_norm_eps", "1e-5"),
                  "config-bool-kernel": ("conv1d_kernel_size", True)}
    bad_config = tmp_path / "config.json"
    if case in bad_fields:
        fields = json.loads((REPO / "configuration" / "tiny.json").read_text())
        fields[bad_fields[case][0]] = bad_fields[case][1]
        bad_config.write_text(json.dumps(fields))  # NaN and Infinity as json writes (and reads) them
    if case.startswith("overwrite-into") or case == "output-inside-tokenizer":
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"hidden_size": 64, "num_heads": 4}))
        (out / "data.txt").write_text("some text " * 500)
    argv = {
        "missing-data": ["train", "--data", str(tmp_path / "nope.txt"), "--output-dir", str(out)],
        "empty-data": ["train", "--data", str(empty), "--output-dir", str(out)],
        "non-empty-output": ["train", "--output-dir", str(tmp_path), *QUICK],
        "unknown-preset": ["train", "--config", "no-such-preset", "--output-dir", str(out)],
        "resume-without-checkpoint": ["train", "--output-dir", str(tmp_path), "--resume", *QUICK],
        "generate-missing-folder": ["generate", str(tmp_path / "no-model")],
        "bad-config-json": ["train", "--config", str(bad_json), "--output-dir", str(out)],
        "text-shorter-than-seq-len": ["train", "--output-dir", str(out), "--max-chars", "3000", "--seq-len", "4096"],
        "binary-data": ["train", "--data", str(binary), "--output-dir", str(out)],
        "bad-license": ["train", "--output-dir", str(out), "--license", "Apache 2.0"],
        "negative-seed": ["train", "--output-dir", str(out), "--seed", "-1"],
        "infinite-weight-decay": ["train", "--output-dir", str(out), "--weight-decay", "inf"],
        "overwrite-into-data-folder": ["train", "--data", str(out / "data.txt"), "--output-dir", str(out),
                                       "--overwrite"],
        "overwrite-into-config-folder": ["train", "--config", str(out), "--output-dir", str(out), "--overwrite"],
        "output-inside-tokenizer": ["train", "--tokenizer", str(out), "--output-dir", str(out / "model")],
        **{name: ["train", "--config", str(bad_config), "--output-dir", str(out)] for name in bad_fields},
        "checkpoints-inside-output": ["train", "--output-dir", str(out), "--checkpoint-dir", str(out / "ckpt")],
        "output-dir-not-creatable": ["train", "--output-dir", str(empty / "out"), *QUICK],  # under a file
    }[case]
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err
    assert sum(line.startswith("error") for line in err.splitlines()) == 1, err
    after = sorted(p.name for p in out.iterdir()) if out.exists() else None
    assert after == before  # nothing written, nothing removed
    assert not _checkpoints(out).exists()


def test_generate_on_truncated_weights_is_one_error_line(trained, tmp_path, capsys):
    folder = tmp_path / "damaged"
    shutil.copytree(trained, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert cli.main(["generate", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and err.startswith(f"error: cannot load the model in {folder}")


def test_a_misspelt_config_field_is_named(tmp_path, caplog):
    from modeling_slstm.training import resolve_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hiden_size": 64, "num_heads": 4}))
    with caplog.at_level("WARNING"):
        assert resolve_config(str(path)).hidden_size == 256  # the default: hence the warning
    assert "'hiden_size' is not an SLSTMConfig field and has no effect; did you mean 'hidden_size'?" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        resolve_config(str(REPO / "configuration" / "tiny.json"))
        SLSTMForCausalLM(tiny_config()).save_pretrained(tmp_path / "saved")
        resolve_config(str(tmp_path / "saved"))  # a saved config.json: every field known
    assert "not an SLSTMConfig field" not in caplog.text


def test_non_utf8_data_is_read_with_a_warning(tmp_path, caplog):
    data = tmp_path / "latin1.txt"
    data.write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve text. ".encode("latin-1") * 20)
    with caplog.at_level("WARNING"):
        (text,) = read_documents([str(data)])
    assert "is not valid UTF-8: 60 undecodable" in caplog.text and "\ufffd" in text


def test_errors_from_the_console_script(tmp_path):
    """The real entry point: an unreachable Hub id (offline here) exits 2 with a message, no traceback."""
    hub = _run(_slstm_command() + ["generate", "nobody-here/no-such-model"], tmp_path)
    assert hub.returncode == 2 and hub.stderr.startswith("error: ") and "Hub" in hub.stderr
    assert "Traceback" not in hub.stderr


def test_argparse_errors_exit_2(capsys):
    for argv in (["train", "--output-dir", "o", "--max-steps", "0"], ["train"], ["generate"], []):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "error: " in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------------ engine bits
def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = SLSTMForCausalLM(SLSTMConfig.from_preset("tiny", vocab_size=97)).train()
    ids = torch.randint(0, 97, (2, 12))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    checkpointing(model, "enable")
    assert model.model.gradient_checkpointing
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bench_dispatch(monkeypatch):
    calls = []
    for name in ("bench", "state_tracking"):
        module = types.ModuleType(f"modeling_slstm.{name}")
        module.main = lambda argv, name=name: calls.append((name, argv)) or 0
        monkeypatch.setitem(sys.modules, f"modeling_slstm.{name}", module)
    assert cli.main(["bench", "state-tracking", "--quick"]) == 0
    assert cli.main(["bench", "--steps", "3"]) == 0
    assert calls == [("state_tracking", ["--quick"]), ("bench", ["--steps", "3"])]


def test_bench_missing_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "modeling_slstm.bench", None)  # makes the import fail as if the file were absent
    assert cli.main(["bench"]) == 2
    assert "modeling_slstm.bench" in capsys.readouterr().err


def test_demo_picks_a_fresh_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli._fresh_demo_dir() == cli.DEMO_OUTPUT_DIR
    (tmp_path / cli.DEMO_OUTPUT_DIR).mkdir()
    assert cli._fresh_demo_dir() == cli.DEMO_OUTPUT_DIR  # empty: reusable
    (tmp_path / f"{cli.DEMO_OUTPUT_DIR}-checkpoints" / "checkpoint-2").mkdir(parents=True)
    assert cli._fresh_demo_dir() == f"{cli.DEMO_OUTPUT_DIR}-2"  # an interrupted demo left checkpoints
    (tmp_path / cli.DEMO_OUTPUT_DIR / "config.json").write_text("{}")
    assert cli._fresh_demo_dir() == f"{cli.DEMO_OUTPUT_DIR}-2"


def test_corpus_split_is_disjoint_and_deterministic(tmp_path):
    corpus = load_corpus(max_chars=30000, eval_fraction=0.1)
    assert corpus.train and corpus.eval
    assert 0.05 < corpus.num_eval_chars / (corpus.num_train_chars + corpus.num_eval_chars) < 0.15
    assert load_corpus(max_chars=30000, eval_fraction=0.1) == corpus
    data = tmp_path / "one.txt"
    data.write_text("\n\n".join(f"Paragraph number {i} of a single file." for i in range(50)))
    single = load_corpus([str(data)], eval_fraction=0.1)
    assert single.train and single.eval and single.eval[-1].endswith("49 of a single file.")
