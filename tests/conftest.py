"""Shared helpers: tiny configs and models whose every parameter is random (the official init zeros R), the installed
transformers' names for the state and for activation checkpointing, a guard against its deprecations, and the device
the device-taking tests run on (`pytest --device cuda`, or SLSTM_TEST_DEVICE=cuda; default cpu)."""

import contextlib
import logging
import os
import re
import warnings

import pytest
import torch
import transformers

from modeling_slstm import SLSTMConfig, SLSTMForCausalLM
from modeling_slstm.transformers_compat import CACHE, CHECKPOINTING


# Tiny models: one thread avoids OpenMP spin contention, which makes microsecond ops take milliseconds on 2 cores.
torch.set_num_threads(1)

def tiny_config(**overrides) -> SLSTMConfig:
    fields = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_heads=4, conv1d_kernel_size=4)
    fields.update(overrides)
    return SLSTMConfig(**fields)


@torch.no_grad()
def randomize_(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random non-zero values, so no path (R, biases, norms, conv) hides behind a zero init."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return model


def random_model(seed: int = 0, **overrides) -> SLSTMForCausalLM:
    torch.manual_seed(seed)
    return randomize_(SLSTMForCausalLM(tiny_config(**overrides)), seed=seed).eval()


@pytest.fixture
def threads():
    """Set torch's thread count for a test (the kernels' team follows it), restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


MASK_KINDS = ("random", "left_padding", "all_masked_row", "none_taken")


def mask_of_kind(kind: str, batch_size: int, seq_len: int, starts: list) -> torch.Tensor:
    """A (B, S) bool mask of the steps taken: "random", "left_padding" (row b starts at starts[b]), "all_masked_row"
    (random, rows 0 and 1 take no step: row 0 a fresh row whose m comes back as given), "none_taken"."""
    gen = torch.Generator().manual_seed(3)
    if kind == "random":
        return torch.rand(batch_size, seq_len, generator=gen) > 0.4
    if kind == "left_padding":
        return torch.arange(seq_len)[None, :] >= torch.tensor(starts)[:, None]
    if kind == "all_masked_row":
        mask = torch.rand(batch_size, seq_len, generator=gen) > 0.3
        mask[:2] = False
        return mask
    return torch.zeros(batch_size, seq_len, dtype=torch.bool)


def state_of(output):
    """The recurrent state an output carries, under the installed transformers' name (`cache`, or `past_key_values`)."""
    return getattr(output, CACHE)


def with_cache(cache) -> dict:
    """The keyword argument that passes a state to forward() or generate() on the installed transformers."""
    return {CACHE: cache}


def checkpointing(model, action: str, **kwargs):
    """The installed transformers' activation-checkpointing API: action "enable", "disable" or "is" (the flag)."""
    if action == "is":
        return getattr(model, f"is_{CHECKPOINTING}")
    kwargs = {f"{CHECKPOINTING}_kwargs": kwargs} if kwargs else {}
    return getattr(model, f"{CHECKPOINTING}_{action}")(**kwargs)


# --- device -------------------------------------------------------------------------------------------------------
def pytest_addoption(parser):
    parser.addoption("--device", default=None,
                     help="device of the tests that take one (cpu, cuda, cuda:1; default: SLSTM_TEST_DEVICE or cpu)")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device of the tests that take one: --device, else SLSTM_TEST_DEVICE, else cpu. A device this machine does
    not have fails the test (a CUDA run that silently tested the CPU would prove nothing)."""
    name = request.config.getoption("--device") or os.environ.get("SLSTM_TEST_DEVICE") or "cpu"
    try:
        chosen = torch.device(name)
    except RuntimeError as err:
        pytest.fail(f"--device {name!r} is not a torch device: {err}", pytrace=False)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"--device {name}: CUDA is not available on this machine", pytrace=False)
    return chosen


@pytest.fixture
def model(device) -> SLSTMForCausalLM:
    """A random tiny model on the test device."""
    return random_model().to(device)


# --- no deprecations ------------------------------------------------------------------------------------------------
# Today's deprecation in transformers is a later release's removal: every test fails if what it runs triggers one,
# as a FutureWarning/DeprecationWarning or as transformers' own "... is deprecated" log message.
DEPRECATION = re.compile(r"deprecat", re.IGNORECASE)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record: logging.LogRecord) -> None:
        if DEPRECATION.search(record.getMessage()):
            self.messages.append(f"{record.name}: {record.getMessage()}")


# What a child process's output may say of deprecations that are neither transformers' nor ours: torch's word, at
# import, on the Enums torchao 0.18 (the test extra, imported by transformers when installed) registers with pytree.
FOREIGN_DEPRECATIONS = ("Calling register_constant() on Enum subclasses is deprecated",)
# The lines torchao 0.18's import logs to stderr, in every process that imports transformers' modeling code: the
# above, and the CUDA-only libraries of its CPU wheel that it fails to load.
TORCHAO_IMPORT_LINES = re.compile(r"Failed to load .*torchao.*\.so|register_constant\(\) on Enum subclasses")


def without_torchao_import_lines(stderr: str) -> str:
    """A child's stderr as our code wrote it: without the lines torchao's import logs (`TORCHAO_IMPORT_LINES`)."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not TORCHAO_IMPORT_LINES.search(line))


def deprecations_in(text: str) -> list:
    """The lines of a child process's output that announce a deprecation (but `FOREIGN_DEPRECATIONS`)."""
    return [line for line in text.splitlines()
            if DEPRECATION.search(line) and not any(foreign in line for foreign in FOREIGN_DEPRECATIONS)]


@contextlib.contextmanager
def watch_deprecations():
    """Collect, into the yielded list, the deprecations announced in the block: FutureWarnings, DeprecationWarnings and
    transformers' log messages that say "deprecated"."""
    transformers.utils.logging.warning_once.cache_clear()  # a message logged "once" by an earlier test shows again
    records = _Records()
    library_logger = transformers.utils.logging.get_logger()  # the "transformers" logger: every module's parent
    library_logger.addHandler(records)
    found = records.messages
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        library_logger.removeHandler(records)
        found += [
            f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}"
            for w in caught
            if issubclass(w.category, (FutureWarning, DeprecationWarning))
        ]


@pytest.fixture(autouse=True)
def no_transformers_deprecations(request):
    """Fail the test on any deprecation that what it runs raises; a test that checks the old names still work opts
    out with `@pytest.mark.old_names`, one that runs a transformers path deprecating its own call with
    `@pytest.mark.allow_deprecation("words of that message")`."""
    if request.node.get_closest_marker("old_names"):
        yield
        return
    allowed = [marker.args[0] for marker in request.node.iter_markers("allow_deprecation")]
    with watch_deprecations() as found:
        yield
    found = [message for message in found if not any(pattern in message for pattern in allowed)]
    if found:
        pytest.fail("transformers deprecations triggered:\n" + "\n".join(found), pytrace=False)


# --- the scan op's oracle checks (test_fused, test_triton) ----------------------------------------------------------
def scan_inputs(B, S, NH, DH, seed=0, with_state=True, fresh=True, scale=1.0, device="cpu"):
    """gates, R, b and (h0, c0, n0, m0) or None, drawn on the CPU and moved to `device`; n0 has zeros (fresh
    elements) next to running ones when `fresh`."""
    gen = torch.Generator().manual_seed(seed)
    gates = torch.randn(B, S, NH, 4 * DH, generator=gen) * scale
    R = torch.randn(NH, DH, 4 * DH, generator=gen) / DH**0.5
    b = torch.randn(NH, 4 * DH, generator=gen)
    state = None
    if with_state:
        h, c, m = (torch.randn(B, NH, DH, generator=gen) for _ in range(3))
        n = torch.rand(B, NH, DH, generator=gen) + 0.5
        if fresh:
            n[0] = 0.0  # the first row starts fresh, the others run
            n[-1, 0, :1] = 0.0  # and one element of the last row
        state = (h, c, n, m)
    move = lambda t: t.to(device)  # noqa: E731
    return move(gates), move(R), move(b), None if state is None else tuple(map(move, state))


def scan_values_and_grads(fn, gates, R, b, state, mask, forget_gate, seed=1):
    """Values (out, h, c, n, m) and gradients of a random linear loss wrt (gates, R, b[, h0, c0, n0, m0])."""
    leaves = [t.detach().clone().requires_grad_() for t in [gates, R, b, *(state or ())]]
    out, final = fn(*leaves[:3], tuple(leaves[3:]) if state is not None else None, mask, forget_gate)
    values = [out.float(), *final]
    gen = torch.Generator().manual_seed(seed)
    loss = sum((v * torch.randn(v.shape, generator=gen).to(v.device)).sum() for v in values)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return [v.detach() for v in values], grads


def assert_rel_close(actual, expected, tol=1e-5, what=""):
    """Each actual tensor on the expected one's device and shape, within tol of the largest |expected| element."""
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.device == e.device, (what, k)
        scale = e.abs().max().item() if e.numel() else 0.0
        err = (a.double() - e.double()).abs().max().item() if e.numel() else 0.0
        assert err <= tol * max(scale, 1e-6), f"{what}[{k}]: max error {err:.3g}, max |expected| {scale:.3g}"
