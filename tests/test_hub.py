"""Sharing: trust_remote_code in a fresh process without this package, push_to_hub (captured offline), presets in a wheel.
push_to_hub saves from the test device (`--device`); the rest stays on the CPU: the fresh processes load the saved
copy on the CPU and compare with what this process computed there, and the wheel test only builds and imports."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
import transformers

from modeling_slstm.slstm_op import use_backend

from conftest import deprecations_in, random_model


REPO = Path(__file__).resolve().parents[1]

# Runs first in the child: any import of this package by its own name fails, as on a machine that never installed it.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import sys
    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_slstm" or name.startswith("modeling_slstm."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
    sys.meta_path.insert(0, _Blocker())
    """
)


# Interpreters of other virtual environments with another transformers line (.ci/run passes the other leg's).
OTHER_PYTHONS = [path for path in os.environ.get("SLSTM_OTHER_PYTHONS", "").split(os.pathsep) if path]


def run_isolated(code: str, cwd: Path, tmp_path: Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [python, "-c", BLOCK_PACKAGE + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_remote_code_loads_in_a_fresh_process_without_the_package(tmp_path):
    model = random_model()
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    ids = torch.randint(0, 61, (2, 9))
    with use_backend("fused"):  # what the copy runs without the package's kernels
        torch.save({"ids": ids, "logits": model(ids).logits.detach()}, tmp_path / "expected.pt")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    result = run_isolated(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        try:
            import modeling_slstm
            raise SystemExit("the package is importable: the test proves nothing")
        except ModuleNotFoundError:
            pass
        model = AutoModelForCausalLM.from_pretrained({str(saved)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        logits = model(expected["ids"]).logits
        assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        out = model.generate(expected["ids"][:, :3], max_new_tokens=4, do_sample=False)
        assert out.shape == (2, 7)
        print("REMOTE-OK")
        """,
        cwd=elsewhere,
        tmp_path=tmp_path,
    )
    assert "REMOTE-OK" in result.stdout, result.stdout + result.stderr
    assert not deprecations_in(result.stderr), result.stderr


@pytest.mark.skipif(not OTHER_PYTHONS, reason="SLSTM_OTHER_PYTHONS names no interpreter with another transformers line")
@pytest.mark.parametrize("python", OTHER_PYTHONS)
def test_saved_here_loads_and_generates_on_another_transformers_line(python, tmp_path):
    model = random_model()
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the other line's generate() must pass the mask the same way
    with use_backend("fused"):  # what the copy runs without this package's kernels: the same math on both sides
        expected = {"ids": ids, "mask": mask, "logits": model(ids).logits.detach(),
                    "greedy": model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False),
                    "version": transformers.__version__}
    torch.save(expected, tmp_path / "expected.pt")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    result = run_isolated(
        f"""
        import torch, transformers
        from transformers import AutoModelForCausalLM
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        assert transformers.__version__ != expected["version"], "the same transformers line: the test proves nothing"
        model = AutoModelForCausalLM.from_pretrained({str(saved)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-5)
        greedy = model.generate(expected["ids"], attention_mask=expected["mask"], max_new_tokens=6, do_sample=False)
        assert torch.equal(greedy, expected["greedy"]), (greedy, expected["greedy"])
        print("CROSS-OK", expected["version"], "->", transformers.__version__)
        """,
        cwd=elsewhere,
        tmp_path=tmp_path,
        python=python,
    )
    assert "CROSS-OK" in result.stdout, result.stdout + result.stderr
    assert not deprecations_in(result.stderr), result.stderr


# Runs next in the child: starting any process fails, so a compiler (or anything else) cannot run unnoticed.
FORBID_PROCESSES = textwrap.dedent(
    """
    import os, subprocess
    def _forbidden(*args, **kwargs):
        raise RuntimeError("a subprocess was started: " + repr(args[:1]))
    subprocess.Popen = _forbidden
    for _name in ("system", "posix_spawn", "posix_spawnp", "fork", "forkpty", "execv", "execve", "popen"):
        if hasattr(os, _name):
            setattr(os, _name, _forbidden)
    """
)


def test_the_hub_copy_is_pure_pytorch_and_starts_no_process(tmp_path):
    """The saved folder carries no C++, no subprocess or ctypes use; without the package it loads, runs on the
    PyTorch path and generates with every way of starting a process patched to raise."""
    model = random_model()
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    for source in saved.glob("*.py"):
        text = source.read_text()
        for marker in ("#include", 'extern "C"', "import subprocess", "import ctypes", "from subprocess",
                       "from ctypes", "from .slstm_cpu"):
            assert marker not in text, f"{source.name} contains {marker!r}"
    ids = torch.randint(0, 61, (2, 3))
    with use_backend("fused"):
        expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    torch.save({"ids": ids, "tokens": expected}, tmp_path / "expected.pt")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    result = run_isolated(
        FORBID_PROCESSES + f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(saved)!r}, trust_remote_code=True).eval()
        op = __import__(type(model).__module__.rsplit(".", 1)[0] + ".slstm_op", fromlist=["_kernels"])
        assert op._kernels is None and op.resolve_backend(torch.zeros(1, 1, 1, 4)) == "fused"
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        tokens = model.generate(expected["ids"], max_new_tokens=4, do_sample=False)
        assert torch.equal(tokens, expected["tokens"]), tokens
        print("PURE-OK")
        """,
        cwd=elsewhere,
        tmp_path=tmp_path,
    )
    assert "PURE-OK" in result.stdout, result.stdout + result.stderr


def test_push_to_hub_uploads_weights_code_config_and_card(tmp_path, monkeypatch, device):
    import huggingface_hub
    import transformers.utils.hub as hub
    from huggingface_hub import RepoUrl

    uploaded = {}

    def create_repo(*args, **kwargs):
        repo_id = kwargs.get("repo_id") or args[-1]
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(*args, operations=(), **kwargs):
        for op in operations:
            source = op.path_or_fileobj
            uploaded[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else source.read()
        return None

    def load_card(*args, **kwargs):  # a new repo: no card on the Hub yet
        raise hub.EntryNotFoundError("no README.md in the repo yet")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: create_repo(*a, **k))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, *a, **k: create_commit(*a, **k))
    monkeypatch.setattr(hub.ModelCard, "load", load_card)
    for name, fn in (("create_repo", create_repo), ("create_commit", create_commit)):
        if hasattr(hub, name):  # transformers 4.57 calls the module-level functions
            monkeypatch.setattr(hub, name, fn)

    random_model().to(device).push_to_hub("someone/slstm-tiny")
    expected = {"config.json", "model.safetensors", "README.md", "modeling_slstm.py", "configuration_slstm.py",
                "layers_slstm.py", "cache_slstm.py", "slstm_op.py", "transformers_compat.py"}
    assert expected <= set(uploaded), sorted(uploaded)
    config = json.loads(uploaded["config.json"])
    assert config["model_type"] == "slstm"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_slstm.SLSTMForCausalLM"


@pytest.mark.skipif(os.environ.get("SLSTM_SKIP_WHEEL") == "1", reason="wheel build disabled")
def test_presets_ship_in_the_wheel(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = wheel_dir.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "modeling_slstm/presets/tiny.json" in names and "modeling_slstm/presets/1.3b.json" in names
    for source in ("slstm_cpu.cpp", "slstm_cpu.h", "slstm_ops.cpp", "huge_pages.cpp"):  # compiled on first use
        assert f"modeling_slstm/csrc/{source}" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)  # what pip install puts in site-packages
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import modeling_slstm, pathlib; "
        f"assert pathlib.Path(modeling_slstm.__file__).is_relative_to({str(target)!r}), modeling_slstm.__file__; "
        "from modeling_slstm import SLSTMConfig; "
        "assert SLSTMConfig.from_preset('tiny').hidden_size == 128; "
        "assert SLSTMConfig.from_preset('760m').hidden_size == 1536; "
        "from modeling_slstm import slstm_cpu; "
        "assert all(p.is_file() for p in (*slstm_cpu._SOURCES, *slstm_cpu._HEADERS)); print('WHEEL-OK')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert "WHEEL-OK" in result.stdout, result.stdout + result.stderr
