"""`slstm bench`: the sLSTM's speed and memory side by side with its baselines, in one process.

    slstm bench [--sections layer,train,decode,prefill,state] [--repeats 7] [--threads N] [--json] [--quick]
                [--device cuda]
    slstm bench --sections speculative --model DIR [--draft DIR]
    slstm bench --preset 125m [--repeats 5]

Sections:
    layer    the op (`slstm_scan`) and the layer (`SLSTMLayer`), forward and forward+backward, vs `torch.nn.LSTM` of the
             same hidden size on the backend in force; the layer also on the reference backend and vs the official
             vanilla sLSTM layer
    train    LM training step (forward, loss, backward, AdamW) in tokens/s vs the official `xLSTMLMModel`, same config
    decode   greedy decoding tokens/s at each batch size and context: `generate()` vs the official `step()` loop and vs
             a transformers GPT-2 of the same width and depth; our bare forward loop vs the `step()` loop; per-token
             time at the longest context vs the shortest
    prefill  prompt tokens/s vs GPT-2 and the official forward (which returns no state)
    state    bytes of the recurrent state after the prefill vs GPT-2's KV cache and the official state
    speculative  (only when asked) greedy `generate()` with prompt lookup, and with a draft model (`--draft`), vs plain
             greedy `generate()` on repetitive code and on prose, with the share of drafted tokens accepted and a
             check that the output is the same; on a trained model and its tokenizer (`--model`), else on random
             weights and token ids (a smoke run: random weights accept almost nothing)
    preset   (only with --preset NAME, alone unless --sections names others) a named preset at full size, batch 1:
             the decoding step (a forward of one token with the state) in float32, with bfloat16 weights and with
             torchao's int8 weight-only FFN and LM head on bfloat16 (when torchao is installed) vs a streaming read of
             as many bytes as the step reads (the memory-bandwidth floor), the low-precision logits' error vs float32,
             batch 8 vs batch 1 tokens/s, and tokens/s vs GPT-2 124M (transformers, random weights, its KV cache) at
             each context; prefill and training-step tokens/s vs GPT-2 124M

The machine is shared and noisy, so the programs of one comparison run interleaved, in rounds whose order alternates
(A B C, C B A, ...), after a warm-up. Each row reports the median of each program and the median (and quartiles) of
the per-round ratios ours / baseline, in the row's unit: below 1 is better for times and bytes, above 1 for tokens/s.
Forward-only runs are inference (`torch.no_grad`). The official xLSTM (`pip install xlstm`) and GPT-2 comparisons are
skipped with one line when unavailable.

`--device cuda` runs every model and tensor on the GPU (our backend: "triton" under auto; the official layer and LM on
their own CUDA kernels, float32; nn.LSTM on cuDNN), synchronises around every timed call, and adds the peak CUDA
memory (`torch.cuda.max_memory_allocated`) of each layer forward+backward and training-step program.
"""

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import slstm_cpu
from .slstm_op import BACKENDS, flush_denormals, int8_rows, resolve_backend, slstm_scan, use_backend
from .transformers_compat import CACHE


SECTIONS = ("layer", "train", "decode", "prefill", "state", "speculative", "preset")
DEFAULT_SECTIONS = SECTIONS[:-2]  # speculative decoding wants a trained model (--model), preset a name (--preset)

Program = Callable[[], float]  # runs the thing once and returns the seconds it took (setup excluded)


@dataclass
class BenchSettings:
    """Shapes of every section. The defaults are the ones the project's goals are stated for."""

    batch_size: int = 8  # layer and train
    seq_len: int = 256  # layer and train
    hidden_size: int = 256
    num_heads: int = 4
    num_layers: int = 2  # LM sections
    vocab_size: int = 2048
    decode_batches: tuple[int, ...] = (1, 8)
    contexts: tuple[int, ...] = (64, 4096)
    new_tokens: int = 32
    prefill_len: int = 4096  # prefill and state
    speculative_tokens: int = 96  # new tokens per speculative-decoding run
    lookup_tokens: int = 10  # prompt_lookup_num_tokens
    preset: Optional[str] = None  # a named preset: the model's config (the four shapes above are copied from it)
    gpt2_shape: tuple[int, int, int] = (768, 12, 12)  # preset section: GPT-2's width, depth and heads (GPT-2 124M)
    repeats: int = 7
    warmup: int = 1
    official_backend: str = "vanilla"  # the official sLSTM's kernels: "vanilla" (PyTorch) on CPU, "cuda" on a GPU


QUICK_SETTINGS = BenchSettings(
    batch_size=2, seq_len=16, hidden_size=32, num_heads=4, num_layers=1, vocab_size=64,
    decode_batches=(1, 2), contexts=(8, 32), new_tokens=4, prefill_len=32, repeats=2, warmup=1,
    speculative_tokens=12,
)

# The preset section: its model shapes come from the preset (`preset_settings`). Decoding at batch 1 and 8 from each
# context, prefill of 512 tokens, training on B=2 S=128. At 125m on 2 cores, 5 minutes with other jobs running (the
# untimed prefills of 4096 tokens alone take 10-15 s per model).
PRESET_SETTINGS = BenchSettings(
    batch_size=2, seq_len=128, decode_batches=(1, 8), contexts=(512, 4096), new_tokens=16, prefill_len=512, repeats=5,
)
QUICK_PRESET_SETTINGS = replace(QUICK_SETTINGS, gpt2_shape=(32, 1, 4))
GPT2_124M = (768, 12, 12)  # width, depth, heads; vocabulary 50257


@dataclass
class Row:
    """One comparison: medians of two programs and the median of their per-round ratios."""

    key: str  # stable machine-readable name, e.g. "layer.fwd_bwd.vs_lstm"
    section: str
    measure: str
    setting: str
    ours: str
    ours_value: float
    baseline: str
    baseline_value: float
    unit: str
    ratio: float  # ours / baseline in `unit`
    ratio_q1: float
    ratio_q3: float
    rounds: int


@dataclass
class BenchReport:
    machine: dict
    settings: dict
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    goals: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------ timing
def synchronize() -> None:
    """Wait for the GPU's queued work (timings on CUDA); nothing to wait for on CPU."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> Program:
    """A program timing one call of `fn`."""

    def program() -> float:
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        return time.perf_counter() - start

    return program


def peak_cuda_bytes(program: Program) -> int:
    """Peak CUDA memory allocated during one run of `program` (the tensors alive before it included)."""
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    program()
    return torch.cuda.max_memory_allocated()


def memory_row(key: str, section: str, setting: str, ours: str, ours_bytes: int, baseline: str,
               baseline_bytes: int) -> Row:
    ratio = ours_bytes / baseline_bytes
    return Row(key, section, "peak CUDA memory", setting, ours, ours_bytes, baseline, baseline_bytes, "bytes", ratio,
               ratio, ratio, 1)


def interleave(programs: dict[str, Program], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each program over `repeats` rounds; the order alternates between rounds (A B C, C B A, ...)."""
    names = list(programs)
    for _ in range(warmup):
        for name in names:
            programs[name]()
    times = {name: [] for name in names}
    for round_idx in range(repeats):
        for name in names if round_idx % 2 == 0 else reversed(names):
            times[name].append(programs[name]())
    return times


def to_unit(seconds: float, unit: str, tokens: int = 1) -> float:
    """Seconds of one call as ms, ms per token or tokens/s."""
    if unit == "ms":
        return seconds * 1e3
    if unit == "ms/tok":
        return seconds * 1e3 / tokens
    if unit == "tok/s":
        return tokens / seconds
    raise ValueError(f"unit must be ms, ms/tok or tok/s, got {unit!r}")


def median_and_quartiles(values: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile); the quartiles equal the value for a single one."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q1, q3


def paired_ratios(ours: list[float], baseline: list[float]) -> list[float]:
    """Per-round ratios ours / baseline (the lists are aligned by round)."""
    if len(ours) != len(baseline):
        raise ValueError(f"need as many rounds of each program, got {len(ours)} and {len(baseline)}")
    return [a / b for a, b in zip(ours, baseline)]


def compare(
    times: dict[str, list[float]], key: str, section: str, measure: str, setting: str,
    ours: str, baseline: str, unit: str = "ms", tokens: int = 1, baseline_tokens: Optional[int] = None,
) -> Row:
    """The row comparing two interleaved programs of `times` (the baseline's tokens per call default to ours)."""
    ours_values = [to_unit(s, unit, tokens) for s in times[ours]]
    base_values = [to_unit(s, unit, tokens if baseline_tokens is None else baseline_tokens) for s in times[baseline]]
    ratio, q1, q3 = median_and_quartiles(paired_ratios(ours_values, base_values))
    return Row(
        key, section, measure, setting, ours, statistics.median(ours_values), baseline, statistics.median(base_values),
        unit, ratio, q1, q3, len(ours_values),
    )


# ---------------------------------------------------------------------------------------------------------- building
def official_xlstm_error() -> Optional[str]:
    """None when the official `xlstm` package imports, else why not."""
    try:
        import xlstm  # noqa: F401
    except Exception as error:  # ImportError, or a broken install of one of its dependencies
        return f"{type(error).__name__}: {error}"
    return None


def official_device_error(s: BenchSettings, device: str) -> Optional[str]:
    """None when the official layer runs a step on `device` (on CUDA it JIT-compiles its kernels: nvcc, ninja), else
    why not."""
    try:
        build_official_layer(s).to(device)(torch.zeros(1, 2, s.hidden_size, device=device))
    except Exception as error:  # a missing compiler, an unsupported GPU, ...
        return f"{type(error).__name__}: {str(error)[:300]}"
    return None


def torchao_error() -> Optional[str]:
    """None when torchao's int8 weight-only quantisation imports, else why not."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: F401
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def int8_weight_only(model):
    """A copy of `model` whose linear layers (the FFN's and the LM head) hold torchao's int8 weight-only rows."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantised = copy.deepcopy(model)
    quantize_(quantised, Int8WeightOnlyConfig())
    return quantised


def gpt2_error() -> Optional[str]:
    """None when transformers provides GPT-2, else why not."""
    try:
        from transformers import GPT2LMHeadModel  # noqa: F401
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def slstm_config(s: BenchSettings):
    from .configuration_slstm import SLSTMConfig

    if s.preset:
        return SLSTMConfig.from_preset(s.preset)
    return SLSTMConfig(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, num_hidden_layers=s.num_layers, num_heads=s.num_heads
    )


def build_slstm_lm(s: BenchSettings):
    from .modeling_slstm import SLSTMForCausalLM

    torch.manual_seed(0)
    model = SLSTMForCausalLM(slstm_config(s))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def build_slstm_layer(s: BenchSettings):
    """Our `SLSTMLayer` with random weights (non-zero R, so no path hides behind the official zero init)."""
    from .layers_slstm import SLSTMLayer

    torch.manual_seed(0)
    layer = SLSTMLayer(slstm_config(s), layer_idx=0)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.1)
    return layer


def official_layer_config(s: BenchSettings):
    from xlstm import sLSTMLayerConfig

    return sLSTMLayerConfig(
        embedding_dim=s.hidden_size, num_heads=s.num_heads, conv1d_kernel_size=4, backend=s.official_backend,
        dtype="float32",
    )


def build_official_layer(s: BenchSettings):
    from xlstm.blocks.slstm.layer import sLSTMLayer

    torch.manual_seed(0)
    layer = sLSTMLayer(official_layer_config(s))
    layer.reset_parameters()
    return layer


def build_official_lm(s: BenchSettings):
    """The official sLSTM-only `xLSTMLMModel` computing what `build_slstm_lm(s)` computes (vanilla backend, CPU)."""
    from xlstm import FeedForwardConfig, sLSTMBlockConfig, xLSTMLMModel, xLSTMLMModelConfig

    config = xLSTMLMModelConfig(
        vocab_size=s.vocab_size, num_blocks=s.num_layers, embedding_dim=s.hidden_size, tie_weights=True,
        add_post_blocks_norm=True, slstm_at="all", mlstm_block=None,
        slstm_block=sLSTMBlockConfig(
            slstm=official_layer_config(s), feedforward=FeedForwardConfig(proj_factor=1.3, act_fn="gelu")
        ),
    )
    torch.manual_seed(0)
    model = xLSTMLMModel(config)
    model.reset_parameters()
    return model


def build_gpt2(s: BenchSettings, max_positions: int):
    """A transformers GPT-2 of the same width, depth, heads and vocabulary, built from its config (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=s.vocab_size, n_embd=s.hidden_size, n_layer=s.num_layers, n_head=s.num_heads,
        n_positions=max_positions, pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def random_ids(s: BenchSettings, batch_size: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, s.vocab_size, (batch_size, length), generator=torch.Generator().manual_seed(seed))


def clone_tree(tree):
    """A copy of nested dicts / tuples / lists of tensors (the official state; its conv state is updated in place)."""
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(clone_tree(v) for v in tree)
    return tree


def tree_nbytes(tree) -> int:
    """Bytes of the tensors in nested dicts / tuples / lists."""
    if isinstance(tree, torch.Tensor):
        return tree.nbytes
    if isinstance(tree, dict):
        return sum(tree_nbytes(v) for v in tree.values())
    if isinstance(tree, (tuple, list)):
        return sum(tree_nbytes(v) for v in tree)
    return 0


def kv_cache_nbytes(cache) -> int:
    """Bytes of a transformers layered cache (keys and values of every layer)."""
    return tree_nbytes([(layer.keys, layer.values) for layer in cache.layers])


# ---------------------------------------------------------------------------------------------------------- programs
def forward_program(call: Callable[[], object]) -> Program:
    """Inference forward: `call()` under no_grad."""

    def run():
        with torch.no_grad():
            call()

    return timed(run)


def forward_backward_program(call: Callable[[], torch.Tensor], inputs: list, grad: torch.Tensor) -> Program:
    """Forward, then the gradients of every input for the fixed output gradient `grad` (nothing accumulates)."""

    def run():
        out = call()
        torch.autograd.grad(out, inputs, grad.view_as(out))

    return timed(run)


def on_reference(call: Callable[[], object]) -> Callable[[], object]:
    """`call` running on the reference sLSTM backend."""

    def run():
        with use_backend("reference"):
            return call()

    return run


def train_step_program(logits_fn: Callable[[torch.Tensor], torch.Tensor], params, ids: torch.Tensor) -> Program:
    """One training step: forward, next-token cross-entropy, backward, AdamW."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = logits_fn(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()

    return timed(step)


def prefill(model, prompt: torch.Tensor):
    """The cache of a transformers model (ours or GPT-2) after `prompt`."""
    with torch.no_grad():
        return getattr(model(prompt, use_cache=True), CACHE)


def official_prefill(model, prompt: torch.Tensor) -> dict:
    """The official state after `prompt`: it has no prefill, so step through it token by token."""
    state = None
    with torch.no_grad():
        for t in range(prompt.shape[1]):
            _, state = model.step(prompt[:, t : t + 1], state)
    return state


def generate_program(model, prompt: torch.Tensor, cache, num_tokens: int) -> Program:
    """`generate()` of `num_tokens` greedy tokens continuing the cache of `prompt` (copied first, untimed)."""
    ids = torch.cat([prompt, prompt[:, -1:]], dim=1)  # the cache holds the prompt; generate() feeds the last column
    mask = torch.ones_like(ids)

    def program() -> float:
        past = copy.deepcopy(cache)
        synchronize()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=num_tokens, do_sample=False, **{CACHE: past})
        synchronize()
        elapsed = time.perf_counter() - start
        if out.shape[1] != ids.shape[1] + num_tokens:
            raise RuntimeError(f"generate() stopped after {out.shape[1] - ids.shape[1]} of {num_tokens} tokens")
        return elapsed

    return program


def slstm_step(model) -> Callable:
    """Our model (or GPT-2) as a `loop_program` step: one forward of one token with the cache."""

    def step(token, cache):
        return model(token, use_cache=True, **{CACHE: cache}).logits, cache

    return step


def loop_program(step: Callable, token: torch.Tensor, state, num_tokens: int) -> Program:
    """Greedy decoding by hand, `step(token (B, 1), state) -> (logits (B, 1, V), state)`, from a copy of `state`."""

    def program() -> float:
        past = clone_tree(state) if isinstance(state, dict) else copy.deepcopy(state)
        synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            next_token = token
            for _ in range(num_tokens):
                logits, past = step(next_token, past)
                next_token = logits[:, -1:].argmax(-1)
        synchronize()
        return time.perf_counter() - start

    return program


# ---------------------------------------------------------------------------------------------------------- sections
@dataclass
class BenchRun:
    """What every section needs: the shapes, the backend in force, which optional baselines are available."""

    settings: BenchSettings
    backend: str
    official: bool
    gpt2: bool
    model_dir: Optional[str] = None  # speculative: a trained model folder (with its tokenizer)
    draft_dir: Optional[str] = None  # speculative: a draft model folder
    preset: Optional[BenchSettings] = None  # the preset section's settings (`preset_settings`)
    device: str = "cpu"  # of every model and tensor of the layer, train, decode, prefill and state sections
    torchao: bool = False  # torchao's int8 weight-only quantisation runs here (the preset's int8 rows)


def layer_section(run: BenchRun) -> list[Row]:
    """Op and layer vs nn.LSTM on the backend in force; the layer also on the reference backend and vs the official."""
    s, backend, dev = run.settings, run.backend, run.device
    nh, dh, b, t, d = s.num_heads, s.hidden_size // s.num_heads, s.batch_size, s.seq_len, s.hidden_size
    gen = torch.Generator().manual_seed(0)
    gates = torch.randn(b, t, nh, 4 * dh, generator=gen).to(dev).requires_grad_()
    kernel = (0.1 * torch.randn(nh, dh, 4 * dh, generator=gen)).to(dev).requires_grad_()
    bias = (0.1 * torch.randn(nh, 4 * dh, generator=gen)).to(dev).requires_grad_()
    u = torch.randn(b, t, d, generator=gen).to(dev).requires_grad_()
    grad = torch.randn(b, t, d, generator=gen).to(dev)

    lstm, layer = torch.nn.LSTM(d, d, batch_first=True).to(dev), build_slstm_layer(s).to(dev)
    scan = lambda: slstm_scan(gates, kernel, bias)[0]  # noqa: E731
    calls = {  # name: (forward call, inputs to differentiate)
        "nn.LSTM": (lambda: lstm(u)[0], [u, *lstm.parameters()]),
        f"op ({backend})": (scan, [gates, kernel, bias]),
        f"layer ({backend})": (lambda: layer(u), [u, *layer.parameters()]),
    }
    pairs = [(f"op ({backend})", "nn.LSTM", "op_{}.vs_lstm"), (f"layer ({backend})", "nn.LSTM", "layer_{}.vs_lstm")]
    if backend != "reference":
        calls["layer (reference)"] = (on_reference(lambda: layer(u)), [u, *layer.parameters()])
        pairs += [("layer (reference)", "nn.LSTM", "layer_{}_reference.vs_lstm"),
                  (f"layer ({backend})", "layer (reference)", "layer_{}.vs_reference")]
    if run.official:
        official = build_official_layer(s).to(dev)
        calls["official layer"] = (lambda: official(u), [u, *official.parameters()])
        pairs.append((f"layer ({backend})", "official layer", "layer_{}.vs_official"))

    rows, setting = [], f"B={b} S={t} D={d} NH={nh}"
    for mode, label in (("fwd", "forward"), ("fwd_bwd", "forward+backward")):
        if mode == "fwd":
            programs = {name: forward_program(call) for name, (call, _) in calls.items()}
        else:
            programs = {name: forward_backward_program(call, inputs, grad) for name, (call, inputs) in calls.items()}
        times = interleave(programs, s.repeats, s.warmup)
        for ours, baseline, key in pairs:
            rows.append(compare(times, f"layer.{key.format(mode)}", "layer", f"{ours.split()[0]} {label}", setting,
                                ours, baseline))
        if mode == "fwd_bwd" and dev.startswith("cuda"):
            peak = {name: peak_cuda_bytes(program) for name, program in programs.items()}
            rows += [memory_row(f"layer.{key.format('memory')}", "layer", f"{setting} fwd+bwd", ours, peak[ours],
                                baseline, peak[baseline]) for ours, baseline, key in pairs]
    return rows


def train_section(run: BenchRun) -> list[Row]:
    """LM training step tokens/s vs the official xLSTMLMModel of the same config."""
    if not run.official:
        return []
    s = run.settings
    ids = random_ids(s, s.batch_size, s.seq_len).to(run.device)
    ours, official = build_slstm_lm(s).to(run.device).train(), build_official_lm(s).to(run.device).train()
    programs = {
        f"sLSTM LM ({run.backend})": train_step_program(
            lambda x: ours(x, use_cache=False).logits, ours.parameters(), ids
        ),
        "official LM": train_step_program(official, official.parameters(), ids),
    }
    times = interleave(programs, s.repeats, s.warmup)
    setting = f"B={s.batch_size} S={s.seq_len} D={s.hidden_size} NH={s.num_heads} L={s.num_layers} V={s.vocab_size}"
    rows = [compare(times, "train.step.vs_official", "train", "LM training step", setting, *programs,
                    unit="tok/s", tokens=ids.numel())]
    if run.device.startswith("cuda"):
        (ours_name, ours_program), (official_name, official_program) = programs.items()
        rows.append(memory_row("train.step.memory", "train", setting, ours_name, peak_cuda_bytes(ours_program),
                               official_name, peak_cuda_bytes(official_program)))
    return rows


def decode_programs(run: BenchRun, models: dict, batch: int) -> dict[str, Program]:
    """Every decoding program at this batch size, each context prefilled once (untimed)."""
    s, programs = run.settings, {}
    for ctx in s.contexts:
        prompt = random_ids(s, batch, ctx, seed=ctx).to(run.device)
        token, cache = prompt[:, -1:], prefill(models["ours"], prompt)
        programs[f"generate() ctx={ctx}"] = generate_program(models["ours"], prompt, cache, s.new_tokens)
        programs[f"forward loop ctx={ctx}"] = loop_program(slstm_step(models["ours"]), token, cache, s.new_tokens)
        if "official" in models:
            state = official_prefill(models["official"], prompt)
            programs[f"official step() ctx={ctx}"] = loop_program(models["official"].step, token, state, s.new_tokens)
        if "gpt2" in models:
            gpt2_cache = prefill(models["gpt2"], prompt)
            programs[f"GPT-2 generate() ctx={ctx}"] = generate_program(models["gpt2"], prompt, gpt2_cache, s.new_tokens)
    return programs


DECODE_PAIRS = (  # key suffix, ours, baseline
    ("generate_vs_official", "generate()", "official step()"),
    ("loop_vs_official", "forward loop", "official step()"),
    ("generate_vs_gpt2", "generate()", "GPT-2 generate()"),
)


def decode_section(run: BenchRun) -> list[Row]:
    """Greedy decoding tokens/s per batch size and context; per-token time at the longest context vs the shortest."""
    s = run.settings
    models = {"ours": build_slstm_lm(s).to(run.device).eval()}
    if run.official:
        models["official"] = build_official_lm(s).to(run.device).eval()
    if run.gpt2:
        models["gpt2"] = build_gpt2(s, max(s.contexts) + s.new_tokens + 1).to(run.device).eval()
    rows, short, long = [], min(s.contexts), max(s.contexts)
    for batch in s.decode_batches:
        times = interleave(decode_programs(run, models, batch), s.repeats, s.warmup)
        tokens = batch * s.new_tokens
        for ctx in s.contexts:
            setting = f"B={batch} ctx={ctx} +{s.new_tokens} tok"
            for suffix, ours, baseline in DECODE_PAIRS:
                if f"{baseline} ctx={ctx}" in times:
                    rows.append(compare(times, f"decode.b{batch}.ctx{ctx}.{suffix}", "decode", "greedy decoding",
                                        setting, f"{ours} ctx={ctx}", f"{baseline} ctx={ctx}", unit="tok/s",
                                        tokens=tokens))
        if long != short:
            rows.append(compare(times, f"decode.b{batch}.context_scaling", "decode", "time per token",
                                f"B={batch} +{s.new_tokens} tok", f"generate() ctx={long}", f"generate() ctx={short}",
                                unit="ms/tok", tokens=tokens))
    return rows


def prefill_section(run: BenchRun) -> list[Row]:
    """Prompt tokens/s at each decoding batch size vs GPT-2 (with its KV cache) and the official forward (no state)."""
    s = run.settings
    ours = build_slstm_lm(s).to(run.device).eval()
    baselines = {}
    if run.gpt2:
        gpt2 = build_gpt2(s, s.prefill_len).to(run.device).eval()
        baselines["GPT-2"] = ("gpt2", gpt2, lambda m, x: m(x, use_cache=True))
    if run.official:
        baselines["official forward"] = ("official", build_official_lm(s).to(run.device).eval(), lambda m, x: m(x))
    rows = []
    for batch in s.decode_batches:
        prompt = random_ids(s, batch, s.prefill_len).to(run.device)
        programs = {"sLSTM prefill": forward_program(lambda: ours(prompt, use_cache=True))}
        for name, (_, model, call) in baselines.items():
            programs[name] = forward_program(lambda m=model, c=call: c(m, prompt))
        times = interleave(programs, s.repeats, s.warmup)
        for name, (short_name, _, _) in baselines.items():
            rows.append(compare(times, f"prefill.b{batch}.vs_{short_name}", "prefill", "prefill",
                                f"B={batch} S={s.prefill_len}", "sLSTM prefill", name, unit="tok/s",
                                tokens=prompt.numel()))
    return rows


def state_section(run: BenchRun) -> list[Row]:
    """Bytes of our state after `prefill_len` tokens (batch 1) vs GPT-2's KV cache and the official state."""
    s = run.settings
    prompt = random_ids(s, 1, s.prefill_len).to(run.device)
    ours = prefill(build_slstm_lm(s).to(run.device).eval(), prompt).nbytes()
    baselines = {}
    if run.gpt2:
        gpt2 = build_gpt2(s, s.prefill_len).to(run.device).eval()
        baselines["gpt2"] = ("GPT-2 KV cache", kv_cache_nbytes(prefill(gpt2, prompt)))
    if run.official:  # the official state has a fixed size too: one step shows it
        state = official_prefill(build_official_lm(s).to(run.device).eval(), prompt[:, :1])
        baselines["official"] = ("official state", tree_nbytes(state))
    setting = f"B=1 after {s.prefill_len} tok"
    return [
        Row(f"state.vs_{key}", "state", "state bytes", setting, "sLSTM cache", ours, name, nbytes, "bytes",
            ours / nbytes, ours / nbytes, ours / nbytes, 1)
        for key, (name, nbytes) in baselines.items()
    ]


def speculative_texts(run: BenchRun, tokenizer) -> dict[str, torch.Tensor]:
    """(1, L) prompts: repetitive code (argument-parser lines differing in a number) and prose (Python's own docs);
    without a tokenizer, a repeating pattern of random ids and random ids."""
    if tokenizer is None:
        pattern = random_ids(run.settings, 1, 9, seed=1)
        return {"code": pattern.repeat(1, 8), "prose": random_ids(run.settings, 1, 72, seed=2)}
    from pydoc_data.topics import topics

    code = "".join(f"    parser.add_argument('--level-{i}', type=int, default={i}, help='level {i}')\n" for i in range(16))
    prose = topics["assert"][:1500]
    return {name: tokenizer(text, return_tensors="pt").input_ids for name, text in (("code", code), ("prose", prose))}


def count_forwards(model, run_generate: Callable[[], torch.Tensor], prompt_len: int) -> tuple[torch.Tensor, float]:
    """Run `run_generate` once, counting the tokens each forward of `model` took: (output, share of drafted tokens
    the model accepted). Each forward takes the last token plus k drafts and yields its accepted drafts plus one."""
    fed = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        out = run_generate()
    finally:
        hook.remove()
    drafted = fed[0] - prompt_len + sum(n - 1 for n in fed[1:])
    accepted = out.shape[1] - prompt_len - len(fed)
    return out, accepted / drafted if drafted else 0.0


def speculative_section(run: BenchRun) -> list[Row]:
    """Greedy tokens/s with prompt lookup and with a draft model vs plain greedy generate(), batch 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = run.settings
    if run.model_dir:
        model = AutoModelForCausalLM.from_pretrained(run.model_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
        weights = run.model_dir
    else:
        model, tokenizer, weights = build_slstm_lm(s).eval(), None, "random weights"
    draft = AutoModelForCausalLM.from_pretrained(run.draft_dir).eval() if run.draft_dir else None
    pad = model.generation_config.pad_token_id if model.generation_config.pad_token_id is not None else 0
    eos = model.generation_config.eos_token_id  # transformers 4.57's prompt lookup needs one
    eos = s.vocab_size - 1 if eos is None and not run.model_dir else eos
    rows = []
    for name, prompt in speculative_texts(run, tokenizer).items():
        options = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=s.speculative_tokens, do_sample=False,
                       pad_token_id=pad, eos_token_id=eos)
        variants = {"greedy generate()": {}, f"prompt lookup (k={s.lookup_tokens})": {
            "prompt_lookup_num_tokens": s.lookup_tokens}}
        if draft is not None:
            variants["draft model"] = {"assistant_model": draft}
        runs = {label: (lambda extra=extra: model.generate(prompt, **options, **extra)) for label, extra in variants.items()}
        expected = runs["greedy generate()"]()
        new_tokens = expected.shape[1] - prompt.shape[1]  # every variant yields these (or says OUTPUT DIFFERS)
        notes = {}
        for label in list(variants)[1:]:
            out, accepted = count_forwards(model, runs[label], prompt.shape[1])
            same = "same output" if torch.equal(out, expected) else "OUTPUT DIFFERS"
            notes[label] = f"{name}, B=1 +{new_tokens} tok, {accepted:.0%} accepted, {same}"
        with torch.no_grad():
            times = interleave({label: timed(fn) for label, fn in runs.items()}, s.repeats, s.warmup)
        for label, key in zip(list(variants)[1:], ("lookup", "draft")):
            rows.append(compare(times, f"speculative.{name}.{key}_vs_greedy", "speculative", f"{label} ({weights})",
                                notes[label], label, "greedy generate()", unit="tok/s", tokens=new_tokens))
    return rows


# ---------------------------------------------------------------------------------------------------- preset section
def preset_settings(name: str, base: BenchSettings) -> BenchSettings:
    """`base` running the named preset: its config, and its width, heads, depth and vocabulary copied for the ids."""
    from .configuration_slstm import SLSTMConfig

    config = SLSTMConfig.from_preset(name)
    return replace(base, preset=name, hidden_size=config.hidden_size, num_heads=config.num_heads,
                   num_layers=config.num_hidden_layers, vocab_size=config.vocab_size)


def build_preset_gpt2(s: BenchSettings, max_positions: int) -> tuple[str, object]:
    """(name, model): GPT-2 of `s.gpt2_shape` with the preset's vocabulary, built from its config (no download)."""
    width, depth, heads = s.gpt2_shape
    model = build_gpt2(replace(s, hidden_size=width, num_layers=depth, num_heads=heads), max_positions).eval()
    if s.gpt2_shape == GPT2_124M and s.vocab_size == 50257:
        return "GPT-2 124M", model
    return f"GPT-2 D={width} L={depth} NH={heads}", model


def step_tensors(model) -> list[torch.Tensor]:
    """What a decoding step reads: every parameter, tied ones once (the LM head reads a tied embedding), but an input
    embedding of its own (a step reads one of its rows); of a weight quantised to int8 rows, its rows and scales.
    Other tensor subclasses (other quantisations) and offloaded (meta) parameters are a ValueError: their bytes are
    not what they say."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tensors = []
    for name, p in model.named_parameters():
        if p is embedding and (head is None or head.weight is not embedding):
            continue
        rows = int8_rows([p])[0]
        if rows is None and (type(p) not in (torch.Tensor, torch.nn.Parameter) or p.is_meta):
            raise ValueError(f"The streaming floor reads plain parameters and int8 weight-only rows; {name} is a "
                             f"{type(p).__name__} on {p.device}.")
        tensors += list(rows) if rows is not None else [p.detach()]
    return tensors


def step_nbytes(model) -> int:
    """Bytes a decoding step reads (`step_tensors`)."""
    return sum(t.nbytes for t in step_tensors(model))


def stream_program(model, reads: int) -> Program:
    """`reads` streaming reads (`sum()` on torch's threads) of one buffer holding a copy of the bytes a decoding step
    reads (`step_tensors`), with their values (a buffer of one repeated value could be stored, or merged by the host,
    more cheaply than weights), summed as float32 with denormals flushed (int8 and bfloat16 bytes read as float32 hold
    some, which would slow the sum, not the read), from 2 MiB pages where the kernels ask for them for the weights they
    stream (a read from 4 KiB pages is slower: 20-25 % here)."""
    with torch.no_grad():
        data = torch.cat([t.reshape(-1).view(torch.uint8) for t in step_tensors(model)])
        buffer = torch.cat([data, data.new_zeros(-data.numel() % 4)]).view(torch.float32)
    if slstm_cpu.compiled_available():
        slstm_cpu.advise_huge_pages(buffer, wait=True)

    def run():
        with flush_denormals():
            for _ in range(reads):
                buffer.sum()

    return timed(run)


def arithmetic_programs(threads: int) -> dict[str, Program]:
    """The same float32 multiply-adds (512 x 512 matrix products, in cache) on one of torch's threads and on
    `threads`: their ratio shows whether the threads had cores of their own during the run. A host that puts two
    virtual CPUs on one physical core halves it, and with it the arithmetic that batch decoding needs."""
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    out = torch.empty_like(a)

    def on(n: int) -> Program:
        def run():
            torch.set_num_threads(n)
            try:
                for _ in range(8):
                    torch.mm(a, a, out=out)
            finally:
                torch.set_num_threads(threads)

        return timed(run)

    return {"matmul 1 thread": on(1), f"matmul {threads} threads": on(threads)}


def step_logits(model, cache, tokens: torch.Tensor) -> torch.Tensor:
    """Float32 logits (B, T, V) of `tokens` (B, T) fed one at a time from a copy of `cache` (teacher-forced)."""
    past, logits = copy.deepcopy(cache), []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits.append(model(tokens[:, t : t + 1], use_cache=True, **{CACHE: past}).logits.float())
    return torch.cat(logits, dim=1)


def logits_error_row(s: BenchSettings, fp32, fp32_cache, low, low_cache, context: int, label: str) -> Row:
    """The low-precision (`label`) model's decoding-step logits vs float32's on the same `new_tokens` tokens (batch
    1): the relative error ||low - fp32|| / ||fp32|| (Frobenius norms over every step and vocabulary entry)."""
    tokens = random_ids(s, 1, s.new_tokens, seed=1)
    reference, logits = step_logits(fp32, fp32_cache, tokens), step_logits(low, low_cache, tokens)
    error, norm = (logits - reference).norm().item(), reference.norm().item()
    agree = (logits.argmax(-1) == reference.argmax(-1)).sum().item()
    setting = f"{s.preset} B=1 ctx={context} +{s.new_tokens} tok, argmax agrees {agree}/{s.new_tokens}"
    return Row(f"preset.{label}_logits.vs_fp32", "preset", f"logits error ||{label}-fp32||/||fp32||", setting,
               f"{label} logits", error, "fp32 logits", norm, "L2 norm", error / norm, error / norm, error / norm, 1)


def preset_decode_rows(s: BenchSettings, ours, gpt2: Optional[tuple[str, object]], int8: bool = False) -> list[Row]:
    """Decoding steps in one interleaved run, each from its prefilled state (untimed): float32, bfloat16 and (`int8`)
    torchao's int8 weight-only FFN and head on bfloat16 at batch 1 vs streaming reads of the bytes each step reads,
    batch 8 vs batch 1, and batch 1 vs GPT-2 at each context."""
    short, n, big = min(s.contexts), s.new_tokens, max(s.decode_batches)
    bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    low = {"bf16": bf16, **({"int8": int8_weight_only(bf16)} if int8 else {})}  # label -> model
    # Programs run in this order, then reversed, round after round: each pair compared sits side by side (a floor beside
    # its step, batch 8 between the thread probe and batch 1, GPT-2 one short read from ours), as this host's memory
    # bandwidth changes state every few tens of seconds and a pair seconds apart can straddle a change.
    prompts = {ctx: random_ids(s, 1, ctx, seed=ctx) for ctx in s.contexts}
    caches = {ctx: prefill(ours, prompt) for ctx, prompt in prompts.items()}
    low_caches = {label: prefill(model, prompts[short]) for label, model in low.items()}
    nbytes = {label: step_nbytes(model) for label, model in (("fp32", ours), *low.items())}
    floors = {label: (f"read {n / 1e6:.0f} MB {label}", n) for label, n in nbytes.items()}  # name, bytes per step
    batch_prompt = random_ids(s, big, short, seed=short)
    threads = torch.get_num_threads()
    programs = {}
    for label, model in low.items():
        programs[floors[label][0]] = stream_program(model, n)
        programs[f"{label} B=1 ctx={short}"] = loop_program(slstm_step(model), prompts[short][:, -1:],
                                                            low_caches[label], n)
    programs.update({
        **arithmetic_programs(threads),
        f"fp32 B={big} ctx={short}": loop_program(slstm_step(ours), batch_prompt[:, -1:], prefill(ours, batch_prompt), n),
    })
    for ctx in s.contexts:
        programs[f"fp32 B=1 ctx={ctx}"] = loop_program(slstm_step(ours), prompts[ctx][:, -1:], caches[ctx], n)
        if ctx == short:
            programs[floors["fp32"][0]] = stream_program(ours, n)
        if gpt2:
            gpt2_name, gpt2_model = gpt2
            programs[f"{gpt2_name} B=1 ctx={ctx}"] = loop_program(
                slstm_step(gpt2_model), prompts[ctx][:, -1:], prefill(gpt2_model, prompts[ctx]), n)
    if slstm_cpu.compiled_available():  # a first step asks for huge pages behind the streamed weights: time them after,
        for label in ("fp32", *low):
            programs[f"{label} B=1 ctx={short}"]()
        for p in gpt2[1].parameters() if gpt2 else ():  # and GPT-2 reads its weights from the same kind of pages
            if p.is_contiguous():
                slstm_cpu.advise_huge_pages(p.detach())
        slstm_cpu.wait_for_huge_pages()
    times = interleave(programs, s.repeats, s.warmup)
    parallel = statistics.median(times["matmul 1 thread"]) / statistics.median(times[f"matmul {threads} threads"])

    rows = []
    for label, (floor, nbytes) in floors.items():
        rate = nbytes * n / statistics.median(times[floor]) / 1e9
        rows.append(compare(times, f"preset.{label}_step.vs_floor", "preset", "decoding step vs streaming floor",
                            f"{s.preset} B=1 ctx={short} +{n} tok, floor {rate:.0f} GB/s", f"{label} B=1 ctx={short}",
                            floor, unit="ms/tok", tokens=n))
    rows += [logits_error_row(s, ours, caches[short], model, low_caches[label], short, label)
             for label, model in low.items()]
    setting = f"{s.preset} ctx={short} +{n} tok, multiply-adds/s on {threads} thread(s) vs 1: {parallel:.2f}x"
    rows.append(compare(times, f"preset.b{big}.vs_b1", "preset", f"decoding batch {big} vs 1", setting,
                        f"fp32 B={big} ctx={short}", f"fp32 B=1 ctx={short}", unit="tok/s", tokens=big * n,
                        baseline_tokens=n))
    if gpt2:
        for ctx in s.contexts:
            rows.append(compare(times, f"preset.ctx{ctx}.vs_gpt2", "preset", f"decoding vs {gpt2[0]}",
                                f"{s.preset} B=1 ctx={ctx} +{n} tok", f"fp32 B=1 ctx={ctx}",
                                f"{gpt2[0]} B=1 ctx={ctx}", unit="tok/s", tokens=n))
    return rows


def preset_prefill_row(s: BenchSettings, ours, gpt2: tuple[str, object]) -> Row:
    """Prompt tokens/s (batch 1, `prefill_len` tokens) vs GPT-2, both returning their cache."""
    gpt2_name, gpt2_model = gpt2
    prompt = random_ids(s, 1, s.prefill_len)
    programs = {"sLSTM prefill": forward_program(lambda: ours(prompt, use_cache=True)),
                gpt2_name: forward_program(lambda: gpt2_model(prompt, use_cache=True))}
    times = interleave(programs, s.repeats, s.warmup)
    return compare(times, "preset.prefill.vs_gpt2", "preset", "prefill", f"{s.preset} B=1 S={s.prefill_len}",
                   *programs, unit="tok/s", tokens=prompt.numel())


def preset_train_row(run: BenchRun, ours, gpt2: tuple[str, object]) -> Row:
    """Training-step tokens/s (forward, loss, backward, AdamW) vs GPT-2 on the same ids; leaves both models trained."""
    s, (gpt2_name, gpt2_model) = run.preset, gpt2
    ids = random_ids(s, s.batch_size, s.seq_len)
    ours.train()
    gpt2_model.train()
    programs = {
        f"sLSTM LM ({run.backend})": train_step_program(
            lambda x: ours(x, use_cache=False).logits, ours.parameters(), ids
        ),
        gpt2_name: train_step_program(lambda x: gpt2_model(x, use_cache=False).logits, gpt2_model.parameters(), ids),
    }
    times = interleave(programs, s.repeats, s.warmup)
    return compare(times, "preset.train.vs_gpt2", "preset", "LM training step",
                   f"{s.preset} B={s.batch_size} S={s.seq_len}", *programs, unit="tok/s", tokens=ids.numel())


def preset_section(run: BenchRun) -> list[Row]:
    """A named preset at full size: decoding vs the streaming floor, bfloat16 weights, batch 8 and GPT-2; prefill and
    training step vs GPT-2 (training last: it changes the weights)."""
    s = run.preset
    ours = build_slstm_lm(s).eval()
    positions = max(max(s.contexts) + s.new_tokens + 1, s.prefill_len, s.seq_len)
    gpt2 = build_preset_gpt2(s, positions) if run.gpt2 else None
    rows = preset_decode_rows(s, ours, gpt2, int8=run.torchao)
    if gpt2:
        rows += [preset_prefill_row(s, ours, gpt2), preset_train_row(run, ours, gpt2)]
    return rows


SECTION_FNS = {
    "layer": layer_section, "train": train_section, "decode": decode_section, "prefill": prefill_section,
    "state": state_section, "speculative": speculative_section, "preset": preset_section,
}


# ------------------------------------------------------------------------------------------------------------- goals
GOALS = (  # description, row key pattern (a prefix and a suffix), target ratio, "max" or "min"
    ("layer forward+backward <= 1.0x nn.LSTM time", ("layer.layer_fwd_bwd.vs_lstm", ""), 1.0, "max"),
    ("LM training step >= 5x the official tokens/s", ("train.step.vs_official", ""), 5.0, "min"),
    ("decoding >= 2x the official step() loop's tokens/s", ("decode.", ".generate_vs_official"), 2.0, "min"),
    ("time per token at the longest context <= 1.1x the shortest", ("decode.", ".context_scaling"), 1.1, "max"),
    ("prompt lookup >= 1.5x greedy tokens/s on repetitive code", ("speculative.code.lookup_vs_greedy", ""), 1.5, "min"),
    ("a draft model (--draft) faster than greedy on repetitive code", ("speculative.code.draft_vs_greedy", ""), 1.0,
     "min"),
    ("preset: float32 decoding step <= 1.5x a streaming read of its bytes", ("preset.fp32_step.vs_floor", ""), 1.5,
     "max"),
    ("preset: bfloat16 decoding step <= 1.5x a streaming read of its bytes", ("preset.bf16_step.vs_floor", ""), 1.5,
     "max"),
    ("preset: bfloat16 logits within 5% of float32 (relative L2)", ("preset.bf16_logits.vs_fp32", ""), 0.05, "max"),
    ("preset: int8 weight-only decoding step <= 1.5x a streaming read of its bytes", ("preset.int8_step.vs_floor", ""),
     1.5, "max"),
    ("preset: int8 weight-only logits within 5% of float32 (relative L2)", ("preset.int8_logits.vs_fp32", ""), 0.05,
     "max"),
    ("preset: decoding at batch 8 >= 6x batch 1's tokens/s", ("preset.b", ".vs_b1"), 6.0, "min"),
    ("preset: decoding >= 2x GPT-2 124M's tokens/s (its KV cache)", ("preset.ctx", ".vs_gpt2"), 2.0, "min"),
)


def check_goals(rows: list[Row]) -> list[dict]:
    """Each project goal against every row it applies to: {goal, key, ratio, target, met}."""
    results = []
    for goal, (prefix, suffix), target, bound in GOALS:
        for row in rows:
            if row.key.startswith(prefix) and row.key.endswith(suffix):
                met = row.ratio <= target if bound == "max" else row.ratio >= target
                results.append({"goal": goal, "key": row.key, "ratio": row.ratio, "target": target, "met": met})
    return results


# -------------------------------------------------------------------------------------------------------- formatting
def format_value(value: float, unit: str) -> str:
    if unit == "bytes":
        for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if value >= scale:
                return f"{value / scale:.1f} {name}"
        return f"{value:.0f} B"
    if unit == "tok/s":
        return f"{value:,.0f} tok/s" if value >= 100 else f"{value:.3g} tok/s"
    return f"{value:.3g} {unit}"


def format_ratio(row: Row) -> str:
    if row.rounds == 1:
        return f"{row.ratio:.3g}x"
    return f"{row.ratio:.3g}x [{row.ratio_q1:.3g}-{row.ratio_q3:.3g}]"


def format_table(rows: list[Row]) -> str:
    """A plain-text (Markdown) table: one line per row."""
    header = ("section", "measure", "setting", "ours", "value", "baseline", "value", "ours/baseline [IQR]")
    lines = [header] + [
        (r.section, r.measure, r.setting, r.ours, format_value(r.ours_value, r.unit), r.baseline,
         format_value(r.baseline_value, r.unit), format_ratio(r))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def preset_rounds(preset: Optional[dict]) -> str:
    """The preset section's own rounds, for the report's header ("" without it)."""
    if preset is None:
        return ""
    return f" (the preset section, {preset['preset']}: {preset['repeats']} rounds after {preset['warmup']} warm-up)"


def format_report(report: BenchReport) -> str:
    m = report.machine
    lines = [
        f"command: {m['command']}",
        f"torch {m['torch']}, transformers {m['transformers']}, xlstm {m['xlstm']}; {m['threads']} torch threads on "
        f"{m['cpu_count']} CPUs; device {m['device']}; sLSTM backend: {m['backend']}",
        f"load average (1 min): {m['load_before']:.2f} before, "
        f"{', '.join(f'{v:.2f} at {k}' for k, v in m['load_at_section_start'].items())}, {m['load_after']:.2f} after; "
        f"{report.settings['repeats']} interleaved rounds after {report.settings['warmup']} warm-up, medians"
        + preset_rounds(report.settings["preset_section"]),
        "",
        format_table(report.rows),
    ]
    if report.skipped:
        lines += [""] + [f"skipped: {note}" for note in report.skipped]
    if report.goals:
        shapes = "the --quick shapes are not the goals' shapes" if report.settings["quick"] else "default shapes"
        lines += ["", f"goals ({shapes}):"]
        for g in report.goals:
            lines.append(f"  {'met   ' if g['met'] else 'MISSED'} {g['goal']}: {g['key']} = {g['ratio']:.3g}x")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------------- main
def machine_info(argv: list[str], backend: str) -> dict:
    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "command": " ".join(["slstm", "bench", *argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "xlstm": version("xlstm"),
        "torchao": version("torchao"),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "backend": backend,
        "load_before": os.getloadavg()[0],
    }


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="slstm bench", description="Speed and memory of the sLSTM vs nn.LSTM, the official xLSTM and GPT-2.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from .configuration_slstm import SLSTMConfig

    presets = SLSTMConfig.available_presets()
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated, among {', '.join(SECTIONS)} (default {','.join(DEFAULT_SECTIONS)}; "
                             "with --preset, only preset)")
    parser.add_argument("--preset", default=None, choices=presets, metavar="NAME",
                        help=f"run the preset section on this named preset at full size ({', '.join(presets)})")
    parser.add_argument("--model", default=None, help="speculative: a trained model folder (default: random weights)")
    parser.add_argument("--draft", default=None, help="speculative: a draft model folder (same tokenizer)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 2 rounds: a smoke run, not a measurement")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds per comparison (default 7, 5 in the preset section, 2 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="sLSTM backend (default: SLSTM_BACKEND, else auto)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--device", default="cpu",
                        help="device of the models and tensors (cpu, cuda, cuda:1; speculative and preset: always cpu)")
    args = parser.parse_args(argv)
    if args.sections is None:
        args.sections = "preset" if args.preset else ",".join(DEFAULT_SECTIONS)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device takes cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}, no GPU visible)")
    args.sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown or not args.sections:
        parser.error(f"--sections takes a comma-separated list among {', '.join(SECTIONS)}; got {unknown or 'none'}")
    if "preset" in args.sections and not args.preset:
        parser.error(f"the preset section needs --preset NAME, among {', '.join(presets)}")
    if args.preset and "preset" not in args.sections:
        args.sections.append("preset")
    if args.repeats is not None and args.repeats < 1 or args.threads is not None and args.threads < 1:
        parser.error("--repeats and --threads must be positive")
    return args


def run_bench(args: argparse.Namespace, argv: list[str]) -> BenchReport:
    """Every requested section on the backend in force; optional baselines skipped with one line each."""
    settings = QUICK_SETTINGS if args.quick else BenchSettings()
    if args.repeats is not None:
        settings = replace(settings, repeats=args.repeats)
    if args.device.startswith("cuda"):
        settings = replace(settings, official_backend="cuda")
    probe = torch.zeros(1, 1, settings.num_heads, 4 * settings.hidden_size // settings.num_heads, device=args.device)
    backend = resolve_backend(probe)
    report = BenchReport(machine=machine_info(argv, backend), settings={**asdict(settings), "quick": args.quick})
    report.machine["device"] = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    official_error, gpt2_unavailable = official_xlstm_error(), gpt2_error()
    if official_error is None and args.device != "cpu":
        official_error = official_device_error(settings, args.device)
    if official_error:
        report.skipped.append(f"official xlstm comparisons ({official_error})")
    if gpt2_unavailable:
        report.skipped.append(f"GPT-2 comparisons ({gpt2_unavailable})")
    torchao_unavailable = torchao_error() if args.preset else None
    if torchao_unavailable:
        report.skipped.append(f"the preset's int8 weight-only rows (torchao: {torchao_unavailable})")
    preset = None
    if args.preset:
        preset = preset_settings(args.preset, QUICK_PRESET_SETTINGS if args.quick else PRESET_SETTINGS)
        preset = preset if args.repeats is None else replace(preset, repeats=args.repeats)
    report.settings["preset_section"] = asdict(preset) if preset else None
    run = BenchRun(settings, backend, official=official_error is None, gpt2=gpt2_unavailable is None,
                   model_dir=args.model, draft_dir=args.draft, preset=preset,
                   device=args.device, torchao=torchao_unavailable is None)
    report.machine["load_at_section_start"] = {}
    for name in args.sections:
        report.machine["load_at_section_start"][name] = os.getloadavg()[0]
        print(f"slstm bench: {name} ...", file=sys.stderr, flush=True)
        report.rows += SECTION_FNS[name](run)
    report.machine["load_after"] = os.getloadavg()[0]
    report.goals = check_goals(report.rows)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    """`slstm bench`: run the requested sections and print a table (or JSON with --json)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with use_backend(args.backend):
        report = run_bench(args, argv)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
