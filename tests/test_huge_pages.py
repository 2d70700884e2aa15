"""Weights that the decoding kernels stream are backed by 2 MiB pages (csrc/huge_pages.cpp): asked for on a background
thread, contents unchanged; never for memory shared copy-on-write with another process, off with SLSTM_HUGE_PAGES=0
and in a forked child. Each run in a fresh process, the weight checked alone in a mapping of its own (/proc/self/smaps
counts huge pages per mapping)."""

import functools
import os
import subprocess
import sys

import pytest
import torch

from modeling_slstm import slstm_cpu


pytestmark = [
    pytest.mark.skipif(not slstm_cpu.compiled_available(), reason="the C++ kernel cannot be built here"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are asked of Linux"),
]

TESTS = os.path.dirname(os.path.abspath(__file__))

# A model whose blocks hold ~19 MiB of float32 weights (more than the kernels expect to stay in cache, so they stream);
# the up-projection weight of block 1 (4 MiB) is moved into a private mapping between two guard pages, starting on a
# 2 MiB boundary. Prints the huge-page bytes of that mapping before and after a decoding step (and the
# worker's wait), and whether the logits of that step came out the same as before it.
#   cow: a forked child holds the weights (copy-on-write) meanwhile.  fork: a child forked while regions are queued
#   waits for the worker (it must return at once).
SCRIPT = r"""
import copy, ctypes, mmap, os, re, signal, sys, time, torch
sys.path.insert(0, sys.argv[1])
from conftest import random_model
from modeling_slstm import slstm_cpu
from modeling_slstm.transformers_compat import CACHE  # `cache` from transformers 5.24, else `past_key_values`

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
HUGE, PAGE = 2 << 20, mmap.PAGESIZE

def own_mapping(t):
    size = t.numel() * t.element_size() + 2 * HUGE + 2 * PAGE
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(area))
    for guard in (base, base + size - PAGE):
        assert libc.mprotect(guard, PAGE, 0) == 0  # PROT_NONE
    start = (base + PAGE + HUGE - 1) // HUGE * HUGE
    copy_ = torch.frombuffer(area, dtype=torch.uint8)[start - base : start - base + t.numel() * t.element_size()]
    copy_ = copy_.view(t.dtype).view(t.shape)
    copy_.copy_(t)
    return copy_, area

def huge_bytes(t):
    for line in open("/proc/self/smaps"):
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span[1], 16) <= t.data_ptr() < int(span[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024

torch.manual_seed(0)
model = random_model(hidden_size=632, num_heads=4, num_hidden_layers=2)
weight = model.model.layers[1].ffn.gate_up_proj.weight
weight.data, area = own_mapping(weight.data)
ids = torch.randint(1, 61, (1, 3))
child = None
with torch.no_grad():
    cache = getattr(model(ids[:, :2], use_cache=True), CACHE)
    before = huge_bytes(weight)
    if "probe" in sys.argv:  # whether this machine collapses on request at all, without the kernels
        slstm_cpu.advise_huge_pages(weight.data, wait=True)
    if "cow" in sys.argv:
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
    first = model(ids[:, 2:], use_cache=True, **{CACHE: copy.deepcopy(cache)}).logits
    if "fork" in sys.argv:
        queued = torch.ones(32 << 20)  # 128 MiB: tens of regions still queued when the child starts
        slstm_cpu.advise_huge_pages(queued)
        print("PENDING", slstm_cpu._library().slstm_huge_pages(None, 0, 0))
        child = os.fork()
        if child == 0:
            os._exit(slstm_cpu._library().slstm_huge_pages(None, 0, 1) != 0)  # must return at once: nothing queued
        for _ in range(300):
            done, status = os.waitpid(child, os.WNOHANG)
            if done:
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            status = 1 << 8
        print("CHILD", os.waitstatus_to_exitcode(status))
    slstm_cpu.wait_for_huge_pages()
    again = model(ids[:, 2:], use_cache=True, **{CACHE: copy.deepcopy(cache)}).logits
    print("BEFORE", before, "AFTER", huge_bytes(weight), "SAME", torch.equal(first, again))
if "cow" in sys.argv:
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
"""


def run(*args: str, **env: str) -> dict:
    result = subprocess.run([sys.executable, "-c", SCRIPT, TESTS, *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    words = result.stdout.split()
    out = {words[k]: words[k + 1] for k in range(0, len(words), 2)}
    if out["BEFORE"] != "0":
        pytest.skip("the weight's memory was on huge pages before any was asked for")
    return out


@functools.cache
def probe_run() -> dict:
    return run("probe")


def huge_pages_possible() -> None:
    """Skip unless this machine collapses memory into huge pages on request (Linux 6.1+), and on request only
    (transparent_hugepage "madvise": with "always", memory may come on huge pages without it)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        mode = ""
    if "[madvise]" not in mode:
        pytest.skip(f"transparent huge pages are not on request here: {mode.strip() or 'unknown'}")
    if int(probe_run()["AFTER"]) == 0:
        pytest.skip("this kernel does not collapse memory into huge pages when asked (MADV_COLLAPSE: Linux 6.1+)")


def test_streamed_weights_get_huge_pages_with_the_same_values():
    huge_pages_possible()
    out = run()
    assert out["SAME"] == "True"
    assert int(out["AFTER"]) >= 4 << 20, out  # 4 MiB of weight from a 2 MiB boundary: two whole regions at least


def test_no_huge_pages_for_memory_shared_after_a_fork():
    """A collapse copies the pages: a forked worker of a server would hold its own copy of the weights, and so would
    its parent. Memory this process shares is left on its pages; a forked child asks for nothing, and its wait for
    the worker (which stayed in the parent) returns though regions were queued at the fork."""
    huge_pages_possible()
    out = run("cow")
    assert out["SAME"] == "True" and int(out["AFTER"]) == 0, out
    out = run("fork")
    assert int(out["PENDING"]) > 0 and out["CHILD"] == "0" and int(out["AFTER"]) >= 4 << 20, out


def test_huge_pages_off():
    huge_pages_possible()
    for value in ("0", "off"):
        out = run(SLSTM_HUGE_PAGES=value)
        assert out["SAME"] == "True" and int(out["AFTER"]) == 0, (value, out)


def test_advise_huge_pages_takes_plain_contiguous_cpu_tensors():
    with pytest.raises(ValueError, match="plain dense contiguous CPU tensor"):
        slstm_cpu.advise_huge_pages(torch.ones(4, 4).t())
    with pytest.raises(ValueError, match="plain dense contiguous CPU tensor"):
        slstm_cpu.advise_huge_pages(torch.ones(4).to_sparse())
    slstm_cpu.advise_huge_pages(torch.ones(0), wait=True)  # nothing to ask for
