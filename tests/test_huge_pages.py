"""Weights that the decoding kernels stream are backed by 2 MiB pages (csrc/huge_pages.cpp): asked for once per region,
on a background thread, contents unchanged; off with SLSTM_HUGE_PAGES=0 and in a forked child. Each run in a fresh
process, so that the memory checked holds no huge page from another test."""

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

# Decodes a step of a model whose blocks hold ~19 MiB of float32 weights (more than the kernels expect to stay in cache,
# so they stream), waits for the worker, and prints how many of the up-projection weight's 2 MiB regions are huge pages
# and whether the logits of the same step, from the same state, came out the same after as before.
SCRIPT = r"""
import copy, os, re, sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import random_model
from modeling_slstm import slstm_cpu

def huge_bytes(t):
    # AnonHugePages of the mappings overlapping t's memory (smaps gives them per mapping)
    begin, end, total, inside = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), 0, False
    for line in open("/proc/self/smaps"):
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span[1], 16) < end and int(span[2], 16) > begin
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total

model = random_model(hidden_size=632, num_heads=4, num_hidden_layers=2)
weight = model.model.layers[1].ffn.gate_up_proj.weight
ids = torch.randint(1, 61, (1, 3))
with torch.no_grad():
    cache = model(ids[:, :2], use_cache=True).cache
    before = huge_bytes(weight)
    first = model(ids[:, 2:], use_cache=True, cache=copy.deepcopy(cache)).logits
    slstm_cpu.wait_for_huge_pages()
    again = model(ids[:, 2:], use_cache=True, cache=copy.deepcopy(cache)).logits
    print("BEFORE", before, "AFTER", huge_bytes(weight), "SAME", torch.equal(first, again))
    if "fork" in sys.argv:
        pid = os.fork()
        if pid == 0:  # the child asks for nothing and never waits on the parent's worker
            model(ids[:, 2:], use_cache=True, cache=copy.deepcopy(cache))
            os._exit(slstm_cpu._library().slstm_huge_pages(None, 0, 1) != 0)  # returns at once: nothing queued
        print("CHILD", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def run(*args: str, **env: str) -> dict:
    result = subprocess.run([sys.executable, "-c", SCRIPT, TESTS, *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    words = result.stdout.split()
    return {words[k]: words[k + 1] for k in range(0, len(words), 2)}


def collapse_works() -> bool:
    """Whether this kernel backs a fresh buffer with huge pages when asked (Linux 6.1+, THP not disabled)."""
    buffer = torch.ones(3 << 20)  # 12 MiB: at least four whole 2 MiB regions
    slstm_cpu.advise_huge_pages(buffer, wait=True)
    with open("/proc/self/smaps_rollup") as f:
        return int(f.read().split("AnonHugePages:")[1].split()[0]) > 0


def test_streamed_weights_get_huge_pages_with_the_same_values():
    if not collapse_works():
        pytest.skip("this kernel does not collapse memory into huge pages (MADV_COLLAPSE)")
    out = run("fork")
    assert out["SAME"] == "True"
    assert int(out["BEFORE"]) == 0 and int(out["AFTER"]) >= 4 << 20, out  # 6.4 MB of weight: at least 2 whole regions
    assert out["CHILD"] == "0"  # the forked child decoded and its wait returned: nothing queued there


def test_huge_pages_off():
    out = run(SLSTM_HUGE_PAGES="0")
    assert out["SAME"] == "True" and int(out["AFTER"]) == 0, out


def test_advise_huge_pages_takes_plain_contiguous_cpu_tensors():
    with pytest.raises(ValueError, match="plain dense contiguous CPU tensor"):
        slstm_cpu.advise_huge_pages(torch.ones(4, 4).t())
    with pytest.raises(ValueError, match="plain dense contiguous CPU tensor"):
        slstm_cpu.advise_huge_pages(torch.ones(4).to_sparse())
    slstm_cpu.advise_huge_pages(torch.ones(0), wait=True)  # nothing to ask for
