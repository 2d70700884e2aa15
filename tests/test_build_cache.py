"""The kernel library's build cache: a truncated or garbage library is rebuilt (never a crash), a library other users
could have written is not loaded, the compiler runs within a timeout, the cache directory is private."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from modeling_slstm import slstm_cpu


@pytest.fixture
def built():
    if not slstm_cpu.compiled_available():
        pytest.skip("the C++ kernel cannot be built here")
    return slstm_cpu._lib._name


def _cached_copy(library: str, root) -> str:
    """The built library and its recorded hash, copied into a fresh cache under root."""
    directory = root / "modeling_slstm"
    directory.mkdir(mode=0o700)
    target = directory / os.path.basename(library)
    shutil.copy(library, target)
    shutil.copy(library + ".sha256", str(target) + ".sha256")
    return str(target)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_library_in_the_cache_is_rebuilt_not_loaded(built, tmp_path, damage):
    library = _cached_copy(built, tmp_path)
    size = os.path.getsize(library)
    with open(library, "r+b") as f:
        if damage == "truncated":
            f.truncate(size // 3)
        else:
            f.seek(size // 2)
            f.write(os.urandom(4096))
    code = textwrap.dedent(
        """
        import torch
        from modeling_slstm import slstm_cpu
        from modeling_slstm.slstm_op import slstm_scan, use_backend
        from modeling_slstm.slstm_reference import slstm_scan_reference
        gates, R = torch.randn(2, 5, 2, 16), torch.randn(2, 4, 16) * 0.3
        with use_backend("compiled"):
            out, _ = slstm_scan(gates, R)
        torch.testing.assert_close(out, slstm_scan_reference(gates, R)[0], rtol=1e-5, atol=1e-5)
        print("RAN", slstm_cpu._lib._name)
        """
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "RAN" in result.stdout, result.stdout + result.stderr
    assert "does not match its recorded sha256" in result.stderr
    assert slstm_cpu._verified(library) and os.path.getsize(library) > size // 2


def test_a_library_or_directory_others_can_write_is_not_loaded(built, tmp_path, monkeypatch):
    library = _cached_copy(built, tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for path, mode in ((library, 0o666), (os.path.dirname(library), 0o777)):
        os.chmod(path, mode)
        monkeypatch.setattr(slstm_cpu, "_lib", None)
        assert not slstm_cpu.compiled_available()
        assert "writable by group/others" in slstm_cpu.build_error() and path in slstm_cpu.build_error()
        os.chmod(path, 0o700)
    monkeypatch.setattr(slstm_cpu, "_lib", None)
    assert slstm_cpu.compiled_available()  # the same files, private again: loaded


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the machines CI runs on: Linux and GCC")
def test_the_kernels_build_here():
    """Every test of the compiled kernels skips where the library cannot be built. On Linux (CI's machines) it must
    build: a compile error in the source fails here instead of skipping them all."""
    assert slstm_cpu.compiled_available(), slstm_cpu.build_error()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the machines CI runs on: Linux and GCC")
def test_the_library_is_built_for_this_cpu_with_openmp(built):
    """The preferred build (-march=native, OpenMP) compiles here: the fallbacks exist for compilers that lack those,
    and must not hide an error in the source (a missing include once fell back silently to the portable build)."""
    with open(built, "rb") as f:
        assert b"GOMP_parallel" in f.read()  # OpenMP regions: linked to libgomp
    flags = [*slstm_cpu._VARIANTS[0], *slstm_cpu._FLAGS]
    assert os.path.basename(slstm_cpu._compile(slstm_cpu._build_compiler(), flags)) == os.path.basename(built)


def test_a_build_without_the_preferred_flags_says_which_and_why(built, monkeypatch, caplog):
    """A compiler that rejects -march=native or OpenMP (or an error in the AVX-512 code) gets a library several times
    slower: the build names the flags it went without and each distinct reason, instead of falling back silently."""
    omp = next(flag for flag in slstm_cpu._VARIANTS[0] if flag != slstm_cpu._NATIVE)

    def compile_(compiler, flags):
        if omp in flags:
            raise slstm_cpu._CompilerRejected("c++ failed: /usr/bin/ld: cannot find -lgomp")
        if slstm_cpu._NATIVE in flags:
            raise slstm_cpu._CompilerRejected("c++ failed: error: bad value 'native' for -march= switch")
        return built

    monkeypatch.setattr(slstm_cpu, "_compile", compile_)
    with caplog.at_level("WARNING"):
        slstm_cpu._build()
    assert f"built without {slstm_cpu._NATIVE} {omp} and runs slower" in caplog.text
    assert caplog.text.count("cannot find -lgomp") == 1 and "bad value 'native'" in caplog.text


@pytest.mark.parametrize("stderr, said", [
    ("a.cpp:3:1: error: 'knob' was not declared\na.cpp:4:2: note: see", "a.cpp:3:1: error: 'knob' was not declared"),
    ("/usr/bin/ld: cannot find -lgomp: No such file\ncollect2: error: ld returned 1 exit status",
     "/usr/bin/ld: cannot find -lgomp: No such file"),
    ("/tmp/cc.s: Assembler messages:\n/tmp/cc.s:9: Error: no such instruction: `vpdpbusd'",
     "/tmp/cc.s:9: Error: no such instruction: `vpdpbusd'"),
    ("collect2: error: ld returned 1 exit status", "collect2: error: ld returned 1 exit status"),
    ("something odd\nand more", "something odd"),
    ("", ""),
])
def test_a_failed_build_is_named_by_the_line_that_says_what_failed(stderr, said):
    assert slstm_cpu._what_failed(stderr) == said


def test_the_portable_build_compiles(built, tmp_path, monkeypatch):
    """The last fallback (no -march=native, no OpenMP) compiles: the code outside the AVX-512 and OpenMP paths."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    library = slstm_cpu._compile(slstm_cpu._build_compiler(), [*slstm_cpu._VARIANTS[-1], *slstm_cpu._FLAGS])
    with open(library, "rb") as f:
        assert b"GOMP_parallel" not in f.read()


def test_the_compiler_runs_within_a_timeout_and_the_cache_directory_is_private(tmp_path, monkeypatch):
    compiler = tmp_path / "slow-c++"
    compiler.write_text("#!/bin/sh\nsleep 30\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(slstm_cpu, "_BUILD_TIMEOUT", 1)
    monkeypatch.setattr(slstm_cpu, "_lib", None)
    assert not slstm_cpu.compiled_available()
    assert "did not finish within 1 s" in slstm_cpu.build_error()
    assert os.stat(tmp_path / "cache" / "modeling_slstm").st_mode & 0o777 == 0o700
