"""The decoding kernels at the sizes people use: the LM head's matrix-vector product (`slstm::linear_decode`), the
team of torch's threads that shares each step's matrix products, and bfloat16 weights read as bfloat16. Each against the module
path (the oracle), exactly where the arithmetic is the same and within rounding where it is not."""

import copy
import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from modeling_slstm import slstm_cpu, slstm_op
from modeling_slstm.slstm_op import use_backend
from modeling_slstm.transformers_compat import CROP_TAKES_TOKENS_TO_REMOVE

from conftest import random_model, state_of, with_cache


pytestmark = pytest.mark.skipif(not slstm_cpu.compiled_available(), reason="the C++ kernel cannot be built here")

# Big enough for the team (at least 2**18 multiply-adds per call at batch 8), and no multiple of the kernel's chunks:
# D 76 (DH 38, 4*DH 152 columns of R), FFN 99.
TEAM_SIZES = dict(hidden_size=76, num_heads=2, ffn_round_to=1)
# Batch 8 at width 520: the element-wise phases (norms, conv, cells, FFN activation) run on the team too.
WIDE_SIZES = dict(hidden_size=520, num_heads=4, ffn_round_to=1)


def _storage_resized_away(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.untyped_storage().resize_(0)  # the shape stays: a pointer read would run off the allocation
    return t


def bf16_ulp_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("out_features, in_features", [(5, 3), (130, 64), (4099, 100)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_decode_matches_f_linear(threads, dtype, rows, out_features, in_features, bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, in_features, generator=gen).to(dtype)
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    expected = F.linear(x.float(), weight.float(), None if b is None else b.float())  # float32 sums
    outs = []
    for count in (1, 2):
        threads(count)
        with torch.no_grad():
            outs.append(slstm_op.linear_decode_step(x, weight, b))
    assert outs[0].dtype == dtype and outs[0].shape == (rows, 1, out_features)
    assert torch.equal(outs[0], outs[1])  # each output is summed by one thread, in one order
    if dtype == torch.float32:
        torch.testing.assert_close(outs[0], expected, rtol=1e-5, atol=1e-5)
    else:
        bf16_ulp_close(outs[0], expected)


@pytest.mark.parametrize("weights", ["float32", "int8", "bfloat16"])
@pytest.mark.parametrize("in_features", [100, 632])
def test_each_row_of_a_batch_gets_the_bits_it_gets_alone(threads, weights, in_features):
    """Batches of 1 to 9 rows (groups of 8, then 1 to 7; several rows of x meet two rows of W at a time) over an odd
    number of outputs and widths with a 16-wide and a scalar tail: each row's outputs are the bits of that row alone
    (a batch row, or a verified draft token, decodes as it would by itself), on one thread and on two."""
    gen = torch.Generator().manual_seed(in_features)
    dtype = torch.bfloat16 if weights == "bfloat16" else torch.float32
    x = torch.randn(9, 1, in_features, generator=gen).to(dtype)
    weight, scale = torch.randn(37, in_features, generator=gen).to(dtype), None
    if weights == "int8":
        weight, scale = torch.randint(-127, 128, (37, in_features), generator=gen, dtype=torch.int8), torch.rand(37, 1)
    b = torch.randn(37, generator=gen).to(dtype)
    for count in (1, 2):
        threads(count)
        with torch.no_grad():
            alone = torch.cat([slstm_op.linear_decode_step(x[r : r + 1], weight, b, scale) for r in range(9)])
            for rows in range(1, 10):
                assert torch.equal(slstm_op.linear_decode_step(x[:rows], weight, b, scale), alone[:rows]), rows


@pytest.mark.parametrize("replace, message", [
    (dict(x=torch.zeros(2, 8, dtype=torch.bfloat16)), "`weight` must be a contiguous torch.bfloat16"),
    (dict(x=torch.zeros(2, 8, dtype=torch.float16)), "float32 or bfloat16"),
    (dict(x=torch.zeros(2, 7)), "`weight` must be .* shape \\(5, 7\\)"),
    (dict(x=torch.zeros(2, 1, 8)), "`x` must be a 2-D tensor"),
    (dict(bias=torch.zeros(4)), "`bias` must be"),
    (dict(weight=torch.zeros(8, 5).t()), "non-contiguous"),
    (dict(weight=_storage_resized_away(torch.zeros(5, 8))), "storage holds 0 bytes of the 160"),
    (dict(weight=torch.zeros(5, 8, device="meta")), "on meta beside CPU tensors"),
])
def test_the_linear_decode_op_checks_every_tensor(replace, message):
    """Every tensor is checked in C++ before the kernel reads a pointer: its memory must be what its dtype and shape
    say (no storage resized away under it, as FSDP does), or a ValueError names it. (A lazily negated tensor reaches the
    kernel negated: torch's Negative fallback resolves it first; tested with the block op.)"""
    args = dict(x=torch.zeros(2, 8), weight=torch.zeros(5, 8), bias=None)
    args.update(replace)
    with pytest.raises(ValueError, match=message):
        torch.ops.slstm.linear_decode(**args)


def _zero_state(*shape: int) -> list:
    """A state (h, c, n, m) for the raw op: zeros of (B, NH, DH) each."""
    return [torch.zeros(*shape) for _ in range(4)]


def test_the_block_decode_op_refuses_weights_of_another_dtype():
    block = random_model().model.layers[0]
    x = torch.randn(2, 1, 32)
    with torch.no_grad(), use_backend("compiled"):
        weights = block._one_call_weights(x)
        args = [x.bfloat16(), None, [torch.zeros(2, 3, 32, dtype=torch.bfloat16)], _zero_state(2, 4, 8),
                [torch.empty(0) if t is None else t for t in weights.tensors()], list(weights.eps), [0], [0]]
        with pytest.raises(ValueError, match="`norm1_weight \\(block 0\\)` must be a contiguous torch.bfloat16"):
            torch.ops.slstm.block_decode(*args)
        args[0] = x.half()
        with pytest.raises(ValueError, match="float32 or bfloat16"):
            torch.ops.slstm.block_decode(*args)


def _bad(t: torch.Tensor, kind: str) -> torch.Tensor:
    """t made unreadable for the kernel in one way."""
    if kind == "shape":
        return torch.zeros(t.shape[0] + 1, *t.shape[1:], dtype=t.dtype)  # the last dim of some gives a size
    if kind == "non-contiguous":
        return torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)[..., ::2]
    if kind == "storage":
        return _storage_resized_away(t.detach())
    return t.double()


@pytest.mark.parametrize("kind, message", [
    ("shape", "must be a contiguous torch.float32 tensor of shape"), ("non-contiguous", "must .* got a non-contiguous"),
    ("storage", "must be a plain dense CPU tensor; its storage holds 0"),
    ("float64", "must be a contiguous torch.float32"),
])
def test_the_block_decode_op_checks_every_weight_of_every_block(kind, message):
    """Each weight of the second of two blocks, made wrong in one way: a ValueError naming it and its block,
    and nothing is written."""
    model = random_model(num_hidden_layers=2)
    x = torch.randn(2, 1, 32)
    with torch.no_grad(), use_backend("compiled"):
        flat = []
        for block in model.model.layers:
            weights = block._one_call_weights(x)
            flat += [torch.empty(0) if t is None else t for t in weights.tensors()]
        eps = [e for block in model.model.layers for e in block._one_call_weights(x).eps]
        windows, states = [torch.zeros(2, 3, 32)] * 2, _zero_state(2, 4, 8) * 2
        torch.ops.slstm.block_decode(x, None, windows, states, flat, eps, [0, 0], [0, 0])  # as given: fine
        for k, name in enumerate(slstm_cpu.WEIGHT_NAMES):
            second = slstm_cpu.BLOCK_WEIGHTS + k
            if not flat[second].numel():
                continue
            bad = list(flat)
            bad[second] = _bad(flat[second], kind)
            with pytest.raises(ValueError, match=f"`{name} \\(block 1\\)` {message}"):
                torch.ops.slstm.block_decode(x, None, windows, states, bad, eps, [0, 0], [0, 0])


def test_the_block_decode_op_reads_states_and_windows_as_their_values():
    """The state and window a step gets may be any view: rows in another order, transposed, expanded, lazily negated,
    or rows of a tensor since reset. The op reads each as the values it holds (a contiguous copy where needed), a
    weight held in a plain tensor subclass's memory as that memory, and a lazily negated weight negated."""
    model = random_model()
    x = torch.randn(3, 1, 32)
    gen = torch.Generator().manual_seed(0)
    whole = torch.randn(4, 3, 4, 8, generator=gen)
    window = torch.randn(3, 3, 32, generator=gen)
    with torch.no_grad(), use_backend("compiled"):
        args = _op_args(model, x)
        reset = whole.clone()
        reset_rows = reset.unbind(0)
        reset.set_(torch.randn(4, 3, 4, 8))  # the rows keep the old memory
        wrapped = list(args[4])
        wrapped[4] = wrapped[4].detach().clone().as_subclass(type("Wrapped", (torch.Tensor,), {}))
        wrapped[3] = torch._neg_view(-wrapped[3])
        cases = [  # (states, window, weights) as given, and as plain contiguous tensors
            ((whole[1], whole[0], whole[2], whole[3]), window, args[4]),
            (tuple(torch.randn(3, 8, 4, generator=gen).transpose(1, 2) for _ in range(4)), window.transpose(0, 1)
             .contiguous().transpose(0, 1), args[4]),
            (tuple(t[:1].expand(3, 4, 8) for t in whole.unbind(0)), window[:1].expand(3, 3, 32), args[4]),
            (tuple(torch._neg_view(whole).unbind(0)), torch._neg_view(window), args[4]),
            (reset_rows, window, wrapped),
        ]
        for state, win, weights in cases:
            given = torch.ops.slstm.block_decode(x, None, [win], list(state), weights, *args[5:])
            plain = torch.ops.slstm.block_decode(x, None, [win.clone().contiguous()],
                                                 [t.clone().contiguous() for t in state],
                                                 [t.clone().as_subclass(torch.Tensor).resolve_neg() for t in weights],
                                                 *args[5:])
            for a, b in zip(torch.utils._pytree.tree_leaves(given), torch.utils._pytree.tree_leaves(plain)):
                assert torch.equal(a, b)
    model = random_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad(), use_backend("compiled"):
        cache = state_of(model(ids[:, :4], use_cache=True))
        layer = cache.layers[0]
        expected = model(ids[:, 4:], **with_cache(copy.deepcopy(cache))).logits
        h, c, n, m = layer.cell_state
        layer.cell_state = (c, h, n, m)  # a different state, which must be read as such
        swapped = model(ids[:, 4:], **with_cache(cache)).logits
    assert not torch.equal(expected, swapped)


def _decode_steps(model, ids, mask=None):
    """Logits of each step of a token-by-token forward with the cache, and the final cache. ids (B, S)."""
    logits, cache = [], None
    with torch.no_grad():
        for t in range(ids.shape[1]):
            kwargs = {} if cache is None else with_cache(cache)
            step_mask = None if mask is None else mask[:, : t + 1]
            out = model(ids[:, t : t + 1], attention_mask=step_mask, use_cache=True, **kwargs)
            logits.append(out.logits)
            cache = state_of(out)
    return torch.cat(logits, 1), cache


@pytest.mark.parametrize("count, sizes", [(2, TEAM_SIZES), (3, TEAM_SIZES), (2, WIDE_SIZES)])
def test_the_team_gives_the_bits_of_one_thread_and_the_module_path(threads, count, sizes):
    """Decoding at batch 8 with sizes that engage the team, some steps masked: 1 thread and `count` threads give the
    same bits (each output has one owner), and both match the op-by-op path."""
    model = random_model(**sizes)
    width = sizes["hidden_size"]
    ids = torch.randint(0, 61, (8, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(8, 5, dtype=torch.long)
    mask[::3, 2] = 0
    results = {}
    for n in (1, count):
        threads(n)
        with use_backend("compiled"):
            with torch.no_grad():
                assert model.model.layers[0]._decodes_in_one_call(torch.zeros(8, 1, width))
            results[n] = _decode_steps(model, ids, mask)
    with use_backend("fused"):
        slow, slow_cache = _decode_steps(model, ids, mask)
    assert torch.equal(results[1][0], results[count][0])
    torch.testing.assert_close(results[count][0], slow, rtol=1e-4, atol=1e-4)
    for a, b in zip(results[count][1].layers[1]._tensors(), slow_cache.layers[1]._tensors()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_two_threads_decoding_at_once_get_their_own_results(threads):
    """Two Python threads in the kernels at the same time (ctypes releases the GIL): one has the team, the other runs
    its chunks alone; both get what they get one after the other."""
    threads(2)
    models = [random_model(seed=s, **TEAM_SIZES) for s in (0, 1)]
    ids = torch.randint(0, 61, (8, 6), generator=torch.Generator().manual_seed(2))
    with use_backend("compiled"):
        alone = [_decode_steps(m, ids)[0] for m in models]
    together = [None, None]

    def decode(k):
        with use_backend("compiled"):
            for _ in range(5):
                together[k] = _decode_steps(models[k], ids)[0]

    workers = [threading.Thread(target=decode, args=(k,)) for k in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or not os.path.isdir("/proc/self/task"), reason="Linux only")
def test_the_team_is_torchs_own_threads(threads):
    """The kernels share a step's products among torch's intra-op threads (the OpenMP pool torch loaded), not threads
    of their own that would fight torch's for the cores: a decoding step on a team adds no thread to the process."""
    threads(2)
    torch.ones(1 << 22).sum()  # torch's pool exists
    before = set(os.listdir("/proc/self/task"))
    x, weight = torch.randn(1, 1, 256), torch.randn(8192, 256)  # 2**21 multiply-adds: a team's job
    with torch.no_grad():
        out = slstm_op.linear_decode_step(x, weight, None)
    assert set(os.listdir("/proc/self/task")) <= before  # no new thread (another may have ended meanwhile)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-4)


def _head_in_child(queue, x, weight):
    torch.set_num_threads(2)  # torch's own OpenMP is not fork-safe: the child calls nothing but the kernel
    with torch.no_grad():
        out = slstm_op.linear_decode_step(x, weight, None).tolist()  # plain data: the child exits before the read
    queue.put((out, slstm_cpu._team_size()))


def test_a_forked_child_runs_the_kernels_on_its_own_thread(threads):
    """A child forked after the parent's team ran (DataLoader workers, multiprocessing) has none of its threads, and
    libgomp's pool does not survive a fork: the child runs the kernels on its own thread, and neither hangs nor
    differs."""
    threads(2)
    x, weight = torch.randn(1, 1, 100), torch.randn(4099, 100)
    with torch.no_grad():
        parent = slstm_op.linear_decode_step(x, weight, None)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_head_in_child, args=(queue, x, weight))
    child.start()
    result, team = queue.get(timeout=60)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert torch.equal(parent, torch.tensor(result))
    assert team == 1  # also when the library is first loaded in the child (its own pid then looks like a parent's)


_FORK_BEFORE_LOAD = """
import os, sys, torch
from modeling_slstm import slstm_cpu  # imported, the library not loaded yet
torch.set_num_threads(2)
reader, writer = os.pipe()
if os.fork() == 0:
    os.write(writer, str(slstm_cpu._team_size()).encode())  # first loaded here, in the child
    os._exit(0)
os.wait()
print("child team", os.read(reader, 16).decode(), "parent team", slstm_cpu._team_size())
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_before_the_library_loads_also_runs_alone():
    """The library's own fork handler only sees forks after it is loaded; a child forked between the module's import
    and the library's first load is told by Python, so it too runs the kernels on its own thread."""
    result = subprocess.run([sys.executable, "-c", _FORK_BEFORE_LOAD], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "child team 1 parent team 2" in result.stdout, result.stdout + result.stderr


def test_the_decoding_ops_run_in_cpp_from_the_call_down():
    """A decoding step's ops are the C++ implementations of csrc/slstm_ops.cpp, not Python: per token, no Python
    runs per tensor (speed is measured by `slstm bench`; this guards against a Python kernel coming back)."""
    for op in ("block_decode", "linear_decode"):
        table = torch._C._dispatch_dump_table(f"slstm::{op}")
        cpu = next(line for line in table.splitlines() if line.startswith("CPU:"))
        assert "slstm_ops.cpp" in cpu and "Python" not in cpu, cpu


def test_bf16_weights_decode_on_the_kernel_close_to_float32():
    """model.to(bfloat16) decodes through the kernels reading bf16 (float32 math, float32 state): each step within
    bf16 rounding of the float32 model holding the same rounded weights, with masked steps, and the logits within a
    few percent of the float32 model's. (The first token fills the empty cache on the modules, in bf16 arithmetic.)"""
    model = random_model(**TEAM_SIZES)
    low = copy.deepcopy(model).to(torch.bfloat16)
    rounded = copy.deepcopy(low).float()  # the float32 model of the bf16 weights
    ids = torch.randint(0, 61, (3, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 3] = 0
    with use_backend("compiled"):
        with torch.no_grad():
            assert low.model.layers[0]._decodes_in_one_call(torch.zeros(3, 1, 76, dtype=torch.bfloat16))
        fast, cache = _decode_steps(low, ids, mask)
        same_weights, same_cache = _decode_steps(rounded, ids, mask)
        full, _ = _decode_steps(model, ids, mask)
    assert fast.dtype == torch.bfloat16 and cache.layers[0].cell_state[0].dtype == torch.float32
    scale = same_weights.abs().max()
    assert (fast.float() - same_weights).abs().max() / scale < 0.02
    assert (fast.float() - full).abs().max() / full.abs().max() < 0.05
    for a, b in zip(cache.layers[1].cell_state, same_cache.layers[1].cell_state):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_bf16_one_call_step_matches_the_float32_block_of_the_same_weights():
    """One block, one step, no LM head: the bf16 kernel against the float32 op-by-op block holding the same rounded
    weights, fed the same rounded input: within bf16's rounding of the products' inputs (which the kernel rounds to
    bf16, as the bf16 modules do) and of the output, and no further from it than the bf16 modules."""
    block = random_model(**TEAM_SIZES).model.layers[0].to(torch.bfloat16)
    reference = copy.deepcopy(block).float()
    x = torch.randn(4, 1, 76, generator=torch.Generator().manual_seed(5)).bfloat16()
    with torch.no_grad(), use_backend("compiled"):
        assert block._decodes_in_one_call(x)
        fast = block(x, None, None)  # no cache: a step from the zero state (an empty cache would be a prompt)
    with torch.no_grad(), use_backend("fused"):
        slow = reference(x.float(), None, None)
        modules = block(x, None, None)
    assert fast.dtype == torch.bfloat16
    error = lambda out: ((out.float() - slow).norm() / slow.norm()).item()  # noqa: E731
    assert error(fast) < 0.01 and error(fast) <= error(modules)  # here 0.4 % and 0.8 %


def test_the_lm_head_decodes_on_the_kernel_unless_hooked(monkeypatch):
    """A decoding step's logits come from the blocks' kernel call for the stock head (with the final norm), from
    `linear_decode_step` when the model itself is hooked (its call cannot be skipped), and from the module (whose hooks
    run) when the head is hooked; all equal the op-by-op path's."""
    model = random_model()
    ids = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(4))
    calls = {"blocks": 0, "head": 0}
    original_blocks, original_head = slstm_op.block_decode_step, slstm_op.linear_decode_step

    def blocks(*args):
        calls["blocks"] += args[7] is not None  # the head given to the blocks' call
        return original_blocks(*args)

    monkeypatch.setattr("modeling_slstm.modeling_slstm.block_decode_step", blocks)
    monkeypatch.setattr("modeling_slstm.modeling_slstm.linear_decode_step",
                        lambda *args: calls.__setitem__("head", calls["head"] + 1) or original_head(*args))
    with use_backend("compiled"):
        fast, _ = _decode_steps(model, ids)
    assert calls == {"blocks": 3, "head": 0}  # the first token fills an empty cache: a prompt, on the modules
    with use_backend("fused"):
        slow, _ = _decode_steps(model, ids)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    seen = []
    handle = model.model.register_forward_pre_hook(lambda module, args: seen.append(1))
    with use_backend("compiled"):
        apart, _ = _decode_steps(model, ids)
    handle.remove()
    assert calls == {"blocks": 3, "head": 3} and len(seen) == 4
    torch.testing.assert_close(apart, slow, rtol=1e-5, atol=1e-5)
    handle = model.lm_head.register_forward_hook(lambda module, args, out: out + 1.0)
    with use_backend("compiled"):
        hooked, _ = _decode_steps(model, ids)
    handle.remove()
    assert calls == {"blocks": 3, "head": 3}
    torch.testing.assert_close(hooked, slow + 1.0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv, sizes, batch", [(0, {}, 2), (4, {}, 2), (4, WIDE_SIZES, 8)])
def test_a_recorded_draft_runs_in_one_call_and_rolls_back_exactly(monkeypatch, threads, conv, sizes, batch):
    """Under a recording cache (speculative decoding), a forward of several tokens runs each block in one kernel call
    that keeps the state after each token: its logits equal the op-by-op path's, and crop to any prefix equals a fresh
    prefill of that prefix, row by row under left padding. A longer forward (a prompt) runs op by op."""
    threads(2)
    model = random_model(conv1d_kernel_size=conv, **sizes)
    ids = torch.randint(0, 61, (batch, 80), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # row 0 is left-padded into the draft
    lengths = []
    original = slstm_op.block_decode_step
    monkeypatch.setattr("modeling_slstm.modeling_slstm.block_decode_step",
                        lambda x, *args, **kwargs: lengths.append(x.shape[1]) or original(x, *args, **kwargs))
    with torch.no_grad():
        for removed in range(0, 7):
            with use_backend("compiled"):
                cache = state_of(model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True))
                cache.activate_past_recording()
                lengths.clear()
                draft = model(ids[:, 5:11], attention_mask=mask[:, :11], use_cache=True, **with_cache(cache)).logits
                assert lengths == [6]  # both blocks in one call
                undo(cache, removed)
            with use_backend("fused"):
                expected = model(ids[:, :11], attention_mask=mask[:, :11]).logits[:, 5:]
                kept = 11 - removed
                fresh = state_of(model(ids[:, :kept], attention_mask=mask[:, :kept], use_cache=True))
            tolerance = 1e-4 if sizes else 1e-5  # wider: longer sums, larger rounding
            torch.testing.assert_close(draft, expected, rtol=1e-4, atol=tolerance)
            assert cache.get_seq_length() == fresh.get_seq_length()
            for ours, theirs in zip(cache.layers, fresh.layers):
                for a, b in zip(ours._tensors(), theirs._tensors()):
                    torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
        with use_backend("compiled"):
            cache.activate_past_recording()
            lengths.clear()
            model(ids[:, 11:], attention_mask=mask, use_cache=True, **with_cache(cache))  # 69 tokens
            assert lengths == []


@pytest.mark.parametrize("batch, dtype", [(1, torch.float32), (3, torch.float32), (3, torch.bfloat16)])
def test_a_verified_draft_has_the_bits_of_decoding_steps(batch, dtype):
    """Speculative decoding returns greedy's tokens only if verifying k drafted tokens in one forward computes what k
    decoding steps compute. On the kernels it does, to the bit: each row's sums run in the same order whatever the
    number of rows (batch rows or draft tokens), and the LM head too; with bf16 weights the conv window holds, between
    the draft's tokens, the bf16 values the cache holds between steps. A batch row also gets the bits it gets alone."""
    model = random_model(hidden_size=96, num_heads=2, ffn_round_to=1).to(dtype)
    ids = torch.randint(0, 61, (batch, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), use_backend("compiled"):
        prompt = state_of(model(ids[:, :4], use_cache=True))
        steps, cache = [], copy.deepcopy(prompt)
        for t in range(4, 12):
            out = model(ids[:, t : t + 1], use_cache=True, **with_cache(cache))
            steps.append(out.logits)
            cache = state_of(out)
        drafted = copy.deepcopy(prompt)
        drafted.activate_past_recording()
        verified = model(ids[:, 4:], use_cache=True, **with_cache(drafted)).logits
        assert torch.equal(verified, torch.cat(steps, 1))
        for a, b in zip(drafted.layers[1]._tensors(), cache.layers[1]._tensors()):
            assert torch.equal(a, b)
        if batch > 1:
            alone = copy.deepcopy(prompt)
            alone.batch_select_indices(torch.tensor([1]))
            for t in range(4, 12):
                out = model(ids[1:2, t : t + 1], use_cache=True, **with_cache(alone))
                assert torch.equal(out.logits, steps[t - 4][1:2])
                alone = state_of(out)


def undo(cache, tokens: int) -> None:
    """cache.crop of `tokens` tokens in the installed line's terms (4.57 reads crop(0) as "keep none")."""
    cache.crop(-tokens if tokens or CROP_TAKES_TOKENS_TO_REMOVE else cache.get_seq_length())


def test_a_decoding_step_runs_every_block_in_one_call_unless_a_block_is_hooked(monkeypatch):
    """The model's decoding step passes all blocks to one kernel call, with the same logits and hidden states as the
    op-by-op path; a forward hook on one block sends the step through the blocks one by one, and the hook runs."""
    model = random_model(num_hidden_layers=3)
    ids = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(8))
    calls = []
    original = slstm_op.block_decode_step
    monkeypatch.setattr("modeling_slstm.modeling_slstm.block_decode_step",
                        lambda x, mask, windows, *args, **kwargs: calls.append(len(windows))
                        or original(x, mask, windows, *args, **kwargs))
    with torch.no_grad():
        with use_backend("fused"):
            cache = state_of(model(ids[:, :3], use_cache=True))
            slow = model(ids[:, 3:], output_hidden_states=True, use_cache=True, **with_cache(copy.deepcopy(cache)))
        with use_backend("compiled"):
            fast = model(ids[:, 3:], output_hidden_states=True, use_cache=True, **with_cache(copy.deepcopy(cache)))
            assert calls == [3]
            seen = []
            handle = model.model.layers[1].register_forward_hook(lambda module, args, out: seen.append(1))
            calls.clear()
            hooked = model(ids[:, 3:], use_cache=True, **with_cache(copy.deepcopy(cache)))
            handle.remove()
    assert seen == [1] and calls == [1, 1, 1]
    torch.testing.assert_close(fast.logits, slow.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hooked.logits, slow.logits, rtol=1e-5, atol=1e-5)
    assert len(fast.hidden_states) == len(slow.hidden_states) == 4
    for a, b in zip(fast.hidden_states, slow.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _op_args(model, x):
    """torch.ops.slstm.block_decode's arguments for the model's first block at x (B, 1, D): a list to edit."""
    weights = model.model.layers[0]._one_call_weights(x)
    return [x, None, [torch.zeros(x.shape[0], 3, 32)], _zero_state(x.shape[0], 4, 8),
            [torch.empty(0) if t is None else t for t in weights.tensors()], list(weights.eps), [0], [0]]


def test_the_decode_ops_refuse_what_the_kernels_cannot_mean():
    """Raw-op inputs found by a red-team: flags out of range, a conv bias without a conv, a window for a block without
    a conv window, and a meta tensor beside CPU ones (the dispatcher would have run the fake implementation and
    returned uninitialised memory): each a ValueError."""
    model = random_model()
    x = torch.randn(2, 1, 32)
    with torch.no_grad(), use_backend("compiled"):
        args = _op_args(model, x)
        with pytest.raises(ValueError, match="exp_forget\\[0\\] must be 0 or 1"):
            torch.ops.slstm.block_decode(*args[:6], [7], [0])
        no_conv = list(args[4])
        no_conv[1] = torch.empty(0)  # conv weight absent, its bias still there
        with pytest.raises(ValueError, match="conv bias without a conv weight"):
            torch.ops.slstm.block_decode(*args[:2], [torch.empty(0)], args[3], no_conv, *args[5:])
        no_conv[2] = torch.empty(0)
        with pytest.raises(ValueError, match="no conv window"):
            torch.ops.slstm.block_decode(*args[:4], no_conv, *args[5:])
        meta_weights = list(args[4])
        meta_weights[4] = meta_weights[4].to("meta")
        with pytest.raises(ValueError, match="on meta beside CPU tensors"):
            torch.ops.slstm.block_decode(*args[:4], meta_weights, *args[5:])
        with pytest.raises(ValueError, match="on meta beside CPU tensors"):
            torch.ops.slstm.linear_decode(torch.zeros(2, 8), torch.zeros(5, 8, device="meta"), None)


def test_blocks_the_kernel_would_compute_differently_run_through_their_modules():
    """A block holding one weight of another dtype, or whose conv is no longer the causal depthwise one (a dilation,
    no bias), and an LM head of another dtype: the decoding step runs the modules, so it computes (or refuses) what
    they compute."""
    x = torch.randn(2, 1, 32)
    with torch.no_grad(), use_backend("compiled"):
        for change in (lambda b: setattr(b.slstm.conv.conv, "dilation", (2,)),
                       lambda b: setattr(b.slstm.conv.conv, "bias", None),
                       lambda b: setattr(b.slstm, "recurrent_kernel",
                                         torch.nn.Parameter(b.slstm.recurrent_kernel.bfloat16()))):
            block = random_model().model.layers[0]
            assert block._decodes_in_one_call(x)
            change(block)
            assert not block._decodes_in_one_call(x)
        model = random_model()
        model.model.layers[0].slstm.conv.conv.bias = None
        with use_backend("fused"):
            slow = model(torch.tensor([[3], [5]])).logits
        torch.testing.assert_close(model(torch.tensor([[3], [5]])).logits, slow, rtol=1e-5, atol=1e-5)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.bfloat16())
        with pytest.raises(RuntimeError):  # F.linear's own dtype error, as on the op-by-op path
            model(torch.tensor([[3], [5]]))


def test_empty_products_return_empty_or_zero_results():
    """No rows, no steps or no columns: empty results (a zero-width product is its bias, zeros here), never a crash
    (these divided by zero in the claim size and killed the process with SIGFPE)."""
    num_heads, head_dim, dim = 2, 4, 8
    weights = [torch.randn(dim), torch.empty(0), torch.empty(0), torch.randn(4, num_heads, head_dim, head_dim),
               torch.randn(num_heads, head_dim, 4 * head_dim), torch.empty(0), torch.randn(dim)] + [torch.empty(0)] * 7
    for batch, steps in ((2, 0), (0, 3)):
        out = torch.ops.slstm.block_decode(torch.randn(batch, steps, dim), None, [torch.empty(0)],
                                           _zero_state(batch, num_heads, head_dim), weights, [1e-5] * 3, [1], [0])
        assert out[0].shape == (1, batch, steps, dim)
    assert torch.ops.slstm.linear_decode(torch.randn(0, 8), torch.randn(5, 8), None).shape == (0, 5)
    assert torch.equal(torch.ops.slstm.linear_decode(torch.randn(2, 0), torch.randn(5, 0), None), torch.zeros(2, 5))
    assert torch.ops.slstm.linear_decode(torch.randn(2, 8), torch.randn(0, 8), None).shape == (2, 0)
    model = random_model()
    with torch.no_grad(), use_backend("compiled"):  # a decoding step that keeps no logits
        kept = model(torch.tensor([[1]]), use_cache=False, logits_to_keep=torch.tensor([], dtype=torch.long)).logits
    assert kept.shape == (1, 0, 61)


def test_a_0d_weight_is_a_value_error():
    """A 0-d conv or down weight in the raw op is refused by its shape check (it was an IndexError reading its size)."""
    model = random_model()
    with torch.no_grad(), use_backend("compiled"):
        args = _op_args(model, torch.randn(2, 1, 32))
        for position in (1, 10):  # conv weight, down weight
            weights = list(args[4])
            weights[position] = torch.tensor(1.0)
            with pytest.raises(ValueError, match="block 0"):
                torch.ops.slstm.block_decode(*args[:4], weights, *args[5:])


def test_an_empty_batch_decodes_to_an_empty_result():
    model = random_model()
    with torch.no_grad(), use_backend("compiled"):
        out = model(torch.zeros(0, 1, dtype=torch.long), use_cache=True)
    assert out.logits.shape == (0, 1, 61)


def test_a_model_with_non_contiguous_weights_decodes_through_its_modules():
    """channels_last gate maps, a transposed copy of a weight, an expanded norm weight, a non-contiguous LM head: the
    decoding kernels read weights as they are held, so these steps run through the modules, and generate what the
    fused backend generates (they were refused by the kernel's check)."""
    def down_transposed(model):
        down = model.model.layers[0].ffn.down_proj
        down.weight = torch.nn.Parameter(down.weight.detach().t().contiguous().t())

    def norm_expanded(model):
        norm = model.model.layers[0].slstm_norm
        norm.weight = torch.nn.Parameter(norm.weight.detach()[:1].expand_as(norm.weight))

    def head_transposed(model):
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().t().contiguous().t())

    ids = torch.randint(1, 61, (2, 5))
    for change in (lambda m: m.to(memory_format=torch.channels_last), down_transposed, norm_expanded, head_transposed):
        model = random_model()
        change(model)
        with torch.no_grad():
            with use_backend("fused"):
                expected = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0), expected)


_FRESH_PROCESS = """
import torch
from modeling_slstm import slstm_cpu  # the schemas only: the library is not loaded yet
x, w = torch.randn(2, 8), torch.randn(5, 8)
print("close", torch.allclose(torch.ops.slstm.linear_decode(x, w, None), x @ w.T, atol=1e-5))
"""


def test_the_raw_ops_build_and_load_the_library_on_first_call():
    """In a fresh process (or a loaded jit.trace program) the first call of a raw op loads the library and runs."""
    result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "close True" in result.stdout, result.stdout + result.stderr


class _Hollow(torch.Tensor):
    """A wrapper subclass whose storage has a size and no data, and which hands itself on to the kernels."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with torch._C._DisableTorchDispatch():
            return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make, message", [
    (lambda t: t.to_sparse(), "`weight` must be a plain dense CPU tensor, got a torch.sparse_coo"),
    (lambda t: t.to_sparse_csr(), "`weight` must be a plain dense CPU tensor, got a torch.sparse_csr"),
    (lambda t: t.to_mkldnn(), "`weight` must be a plain dense CPU tensor, got a torch._mkldnn"),
    (lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.quint8), "`weight` must be .* got a quantized"),
    (lambda t: _Hollow(t), "`weight` must be a plain dense CPU tensor; its storage has no data"),
])
def test_tensors_that_are_not_plain_memory_are_value_errors(make, message):
    """Sparse, mkldnn, quantized and dataless tensors: a ValueError naming the tensor, never the dispatcher's
    NotImplementedError or a read through a null pointer (the dataless one crashed the process)."""
    with pytest.raises(ValueError, match=message):
        torch.ops.slstm.linear_decode(torch.randn(2, 8), make(torch.randn(5, 8)), None)
    nested = torch.nested.nested_tensor([torch.randn(8), torch.randn(8)])
    with pytest.raises(ValueError, match="`x` must be a plain dense CPU tensor, got a nested"):
        torch.ops.slstm.linear_decode(nested, torch.randn(5, 8), None)


@pytest.mark.allow_deprecation("`torch.jit.script` is deprecated")  # torch.func's own first use, in torch
def test_derivatives_through_the_decoding_ops_raise_instead_of_being_zero():
    """Forward-mode AD, torch.func.grad and jvp through the raw ops raise (they returned zero derivatives)."""
    import torch.autograd.forward_ad as fwAD

    x, weight = torch.randn(2, 8), torch.randn(5, 8)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward AD"):
        torch.ops.slstm.linear_decode(fwAD.make_dual(x, torch.randn(2, 8)), weight, None)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.func.grad(lambda v: torch.ops.slstm.linear_decode(v, weight, None).sum())(x)
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.func.jvp(lambda v: torch.ops.slstm.linear_decode(v, weight, None), (x,), (torch.randn(2, 8),))


def test_degenerate_sizes_neither_crash_nor_confuse():
    """A head dim of 0 (divided by zero in the kernel's chunking: SIGFPE), no columns through the wrapper, a 0-d x."""
    empty = torch.empty(0)
    weights = [empty, empty, empty, torch.empty(4, 1, 0, 0), torch.empty(1, 0, 0)] + [empty] * 9
    out = torch.ops.slstm.block_decode(torch.empty(1, 1, 0), None, [empty], [empty] * 4, weights, [1e-5] * 3, [0], [0])
    assert out[0].shape == (1, 1, 1, 0)
    with torch.no_grad():
        assert slstm_cpu.linear_decode(torch.randn(2, 1, 0), torch.randn(5, 0), None).shape == (2, 1, 5)
        with pytest.raises(ValueError, match="takes x"):
            slstm_cpu.linear_decode(torch.tensor(1.0), torch.randn(5, 1), None)


@pytest.mark.parametrize("dtype, width", [(torch.float32, 632), (torch.float32, 640), (torch.bfloat16, 632)])
def test_weights_streaming_from_memory_decode_as_the_modules(dtype, width):
    """Blocks of width 632 holding ~19 MiB of weights (two in float32, four in bfloat16), more than the kernels expect
    to stay in cache (16 MiB per call), so every product (R's included) streams, prefetched where the kernels do: the
    float32 modules' numbers (of the same bf16 weights, within bf16 rounding of the logits, for a bfloat16 model).
    Batch 9 (a group of 8 rows and one more) reads R in panels of 16 rows (158 rows per head: a short last panel; 632
    columns: 8 beyond the last strip of 16), and each batch row still gets the bits it gets alone. At width 640 every
    float32 row starts a 64-byte line, so batch 1 reads all of them with stream loads (at 632, every other row)."""
    blocks = 2 if dtype == torch.float32 else 4
    model = random_model(hidden_size=width, num_heads=4, num_hidden_layers=blocks).to(dtype)
    assert all(p.data_ptr() % 64 == 0 for p in model.parameters())  # the allocator's alignment, which the loads need
    assert sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "layers" in n) > 17 << 20
    ids = torch.randint(1, 61, (9, 3))
    with torch.no_grad():
        fast, cache = _decode_steps(model, ids)
        with use_backend("fused"):
            slow, _ = _decode_steps(copy.deepcopy(model).float(), ids)
        with use_backend("compiled"):
            rows = [copy.deepcopy(cache) for _ in range(len(ids))]
            batch = model(ids[:, :1], use_cache=True, **with_cache(cache)).logits
            for i, alone in enumerate(rows):
                alone.batch_select_indices(torch.tensor([i]))
                one = model(ids[i : i + 1, :1], use_cache=True, **with_cache(alone)).logits
                assert torch.equal(one, batch[i : i + 1]), i
    if dtype == torch.float32:
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    else:  # the first step fills the cache on the bf16 modules, the rest run on the kernel
        assert (fast.float() - slow).abs().max() / slow.abs().max() < 0.02


def test_streaming_weights_off_a_64_byte_line_decode_bit_for_bit():
    """Float32 weights that stream are read with stream loads, which need every row on a 64-byte line; a weight held 4
    bytes off one (a view into a larger buffer, as a mapped checkpoint may give) is read with plain loads instead:
    the same bits, no fault. (The kernel steps only: torch's own products may round differently off a line.)"""
    model = random_model(hidden_size=640, num_heads=4, num_hidden_layers=2)
    ids = torch.randint(1, 61, (1, 4))
    with torch.no_grad():
        cache = state_of(model(ids[:, :2], use_cache=True))
        aligned = model(ids[:, 2:3], use_cache=True, **with_cache(copy.deepcopy(cache))).logits
        for module, name in ((model.model.layers[0].ffn.gate_up_proj, "weight"),
                             (model.model.layers[1].slstm, "recurrent_kernel"), (model.lm_head, "weight")):
            weight = getattr(module, name)
            held = torch.empty(weight.numel() + 1)[1:].view_as(weight).copy_(weight)
            assert held.data_ptr() % 64 == 4
            setattr(module, name, torch.nn.Parameter(held))
        shifted = model(ids[:, 2:3], use_cache=True, **with_cache(copy.deepcopy(cache))).logits
    assert torch.equal(aligned, shifted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_final_norm_runs_in_the_blocks_call_unless_it_is_hooked_or_replaced(monkeypatch, dtype):
    """A decoding step computes the model's final norm in the blocks' kernel call: its output as torch's layer norm
    gives it (to float32 rounding; bf16 within its rounding), its `norm` module not called. A hook on the norm, a
    replaced norm and a model without one take the module (the hook runs), and the op's `norm_weight` is checked."""
    model = random_model(num_hidden_layers=2).to(dtype)
    ids = torch.randint(1, 61, (2, 3), generator=torch.Generator().manual_seed(4))
    calls = []
    monkeypatch.setattr(type(model.model.norm), "__call__", lambda self, *a: calls.append(1) or torch.nn.Module.__call__(self, *a))
    with torch.no_grad():
        cache = state_of(model(ids[:, :2], use_cache=True))
        calls.clear()
        fused = model.model(ids[:, 2:], use_cache=True, **with_cache(copy.deepcopy(cache)))
        assert calls == []
        norm = model.model.norm
        seen = []
        handle = norm.register_forward_hook(lambda module, args, out: seen.append(1))
        hooked = model.model(ids[:, 2:], use_cache=True, **with_cache(copy.deepcopy(cache)))
        handle.remove()
        assert seen == [1] and calls == [1]
        model.model.norm = torch.nn.Identity()  # the last block's output as it is
        hidden = model.model(ids[:, 2:], use_cache=True, **with_cache(copy.deepcopy(cache))).last_hidden_state
        model.model.norm = None
        assert torch.equal(model.model(ids[:, 2:], use_cache=True, **with_cache(copy.deepcopy(cache))).last_hidden_state,
                           hidden)
        expected = F.layer_norm(hidden.float(), (hidden.shape[-1],), 1.0 + norm.weight.float(), None, norm.eps)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        for out in (fused, hooked):
            torch.testing.assert_close(out.last_hidden_state.float(), expected, rtol=tolerance, atol=tolerance)
        x = torch.randn(1, 1, hidden.shape[-1], dtype=dtype)
        for bad, message in ((torch.zeros(3, dtype=dtype), r"`norm_weight` must be .* of shape \(32,\)"),
                             (torch.zeros(32, dtype=torch.float64), r"`norm_weight` must be a contiguous")):
            with pytest.raises(ValueError, match=message):
                torch.ops.slstm.block_decode(x, None, [], [], [], [], [], [], False, bad, 1e-5)
        norm_weight, head_weight = torch.zeros(32, dtype=dtype), torch.randn(7, 32, dtype=dtype)
        out = torch.ops.slstm.block_decode(x, None, [], [], [], [], [], [], False, norm_weight, 1e-5, head_weight)
        torch.testing.assert_close(out[5].float(), F.layer_norm(x.float(), (32,), eps=1e-5), rtol=tolerance,
                                   atol=tolerance)
        torch.testing.assert_close(out[6].float(), F.linear(out[5].float(), head_weight.float()), rtol=tolerance,
                                   atol=tolerance)
        for weight, bias, message in ((torch.zeros(7, 31, dtype=dtype), None, r"`head_weight` must be .* \(7, 32\)"),
                                      (head_weight, torch.zeros(6, dtype=dtype), r"`head_bias` must be .* \(7,\)"),
                                      (None, torch.zeros(7, dtype=dtype), "`head_bias` or `head_scale` without `head_weight`")):
            with pytest.raises(ValueError, match=message):
                torch.ops.slstm.block_decode(x, None, [], [], [], [], [], [], False, norm_weight, 1e-5, weight, bias)


def test_what_the_one_call_step_would_misread_goes_to_the_modules_or_an_error():
    """Found by a red team: an empty state or window in the cache (the kernel would read zeros) is the cache's
    ValueError; dropout modules switched to train in an eval model (Monte Carlo dropout) and a misspelt forget gate
    run on the modules (dropout applied; the modules' ValueError), never on the kernel."""
    model = random_model()
    ids = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = state_of(model(ids[:, :3], use_cache=True))
        for what in ("state", "window"):
            broken = copy.deepcopy(cache)
            layer = broken.layers[1]
            if what == "state":
                layer.cell_state = (layer.cell_state[0], torch.empty(2, 4, 0), *layer.cell_state[2:])
            else:
                layer.conv_window = torch.empty(2, 0, 32)
            with pytest.raises(ValueError, match="does not belong to this model"):
                model(ids[:, 3:], use_cache=True, **with_cache(broken))
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.5
                module.train()
        runs = [model(ids[:, 3:], use_cache=True, **with_cache(copy.deepcopy(cache))).logits for _ in range(2)]
        assert not torch.equal(*runs)
        model.eval()
        model.model.layers[0].slstm.forget_gate = "Exp"
        with pytest.raises(ValueError, match="forget_gate must be one of"):
            model(ids[:, 3:], use_cache=True, **with_cache(copy.deepcopy(cache)))


@pytest.mark.allow_deprecation("non-full backward hooks")  # torch's own word on the legacy hook this test needs
def test_what_the_head_in_the_blocks_call_would_skip_keeps_the_model_call(monkeypatch):
    """Found by a red team: a decoding step runs the model's step and the head in one kernel call only when calling
    the model would run nothing else. A subclass's own `_logits`, a wrapper of the model's class `__call__` and a legacy
    backward hook under grad are honoured; the kept logits of a draft are contiguous (the loss views them)."""
    model = random_model()
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = state_of(model(ids[:, :3], use_cache=True))
        expected = model(ids[:, 3:4], use_cache=True, **with_cache(copy.deepcopy(cache))).logits

        class Halved(type(model)):
            def _logits(self, hidden_states, decoding_step):
                return super()._logits(hidden_states, decoding_step) / 2

        halved = copy.deepcopy(model)
        halved.__class__ = Halved
        torch.testing.assert_close(halved(ids[:, 3:4], use_cache=True, **with_cache(copy.deepcopy(cache))).logits,
                                   expected / 2)
        calls = []
        module_call = torch.nn.Module.__call__
        monkeypatch.setattr(type(model.model), "__call__",
                            lambda self, *a, **k: calls.append(1) or module_call(self, *a, **k), raising=False)
        model(ids[:, 3:4], use_cache=True, **with_cache(copy.deepcopy(cache)))
        assert calls == [1]
        monkeypatch.delattr(type(model.model), "__call__")
        recording = copy.deepcopy(cache)
        recording.activate_past_recording()
        draft = model(ids[:, 3:6], use_cache=True, logits_to_keep=2, labels=ids[:, 4:6], **with_cache(recording))
        assert draft.logits.is_contiguous() and torch.isfinite(draft.loss)
    fired = []
    model.model.register_backward_hook(lambda *args: fired.append(1))
    with torch.no_grad():
        model(ids[:, 3:4], use_cache=True, **with_cache(copy.deepcopy(cache)))  # no grad: nothing to fire
    model(ids[:, 3:4], use_cache=True, **with_cache(copy.deepcopy(cache))).logits.sum().backward()
    assert fired == [1]


def test_a_block_pruned_of_its_conv_or_ffn_decodes_as_its_modules():
    """Found by a red team: a block whose conv or FFN was removed after the model was built (the modules skip the part;
    the cache still holds the conv's window) decodes as the modules do, where the kernel used to refuse it."""
    model = random_model()
    ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = state_of(model(ids[:, :7], use_cache=True))
        model.model.layers[0].slstm.conv = None
        model.model.layers[1].ffn = None
        fast = model(ids[:, 7:], use_cache=True, **with_cache(copy.deepcopy(cache))).logits
        with use_backend("fused"):
            slow = model(ids[:, 7:], use_cache=True, **with_cache(copy.deepcopy(cache))).logits
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
