"""State-tracking benchmark: the formal-language tasks of xLSTM §4.1 (after Delétang et al. 2023), on one CPU.

    slstm bench state-tracking                      # 4 tasks x (sLSTM, Llama, nn.LSTM) x 3 seeds x 1000 steps
    python -m modeling_slstm.state_tracking --tasks parity --seeds 0,1 --json --plot parity.png

The defaults take about 10 minutes on a quiet 2-core CPU (about 25 under heavy load); `--tasks parity` a quarter.
The sLSTM has no causal conv here: with the official conv (kernel 4) it stays at chance on parity (see README).

Every task is a sequence classification written as language modelling: the input tokens, then `=`, and the model's
next-token scores at `=` (restricted to the answer tokens) are the prediction. Training samples lengths 3-40, testing
reports each length bucket up to 256 separately, as *scaled accuracy* (acc - chance) / (1 - chance): 0 = chance,
1 = perfect. All models have about the same number of parameters; every (task, model, seed) run is independent and
deterministic given its seed (up to the float summation order of the backend).
"""

import argparse
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


logger = logging.getLogger("modeling_slstm.state_tracking")

TRAIN_LENGTHS = (3, 40)
BUCKETS = ((3, 40), (41, 80), (81, 160), (161, 256))
MODELS = ("slstm", "llama", "lstm")
MODULUS = 5  # modular arithmetic and cycle navigation work on Z_5, as in the paper


# ----------------------------------------------------------------------------------------------------------------
# Tasks: each generator maps (length, batch size, torch.Generator) -> (symbols (B, L) long, labels (B,) long).
# Symbols are task-local ids 0..num_symbols-1; the token layout adds `=` and the answer tokens after them.
# ----------------------------------------------------------------------------------------------------------------


def parity(length: int, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit strings; the label is the number of ones mod 2."""
    bits = torch.randint(0, 2, (batch_size, length), generator=gen)
    return bits, bits.sum(1) % 2


def even_pairs(length: int, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Strings over {a, b}; the label is 1 when the count of "ab" plus "ba" substrings is even (iff first == last)."""
    chars = torch.randint(0, 2, (batch_size, length), generator=gen)
    changes = (chars[:, 1:] != chars[:, :-1]).sum(1)
    return chars, (changes % 2 == 0).long()


def cycle_navigation(length: int, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Moves 0 = stay, 1 = +1, 2 = -1 on a cycle of 5 positions from 0; the label is the final position."""
    moves = torch.randint(0, 3, (batch_size, length), generator=gen)
    steps = torch.tensor([0, 1, -1])[moves]
    return moves, steps.sum(1) % MODULUS


def modular_arithmetic(length: int, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`n op n op ... n` with n in 0..4 and op in {+, -, *} (ids 5, 6, 7), the value mod 5 with * binding first.

    Odd lengths only, as in the paper: an even length is shortened by one.
    """
    length = length if length % 2 else length - 1
    numbers = torch.randint(0, MODULUS, (batch_size, length // 2 + 1), generator=gen)
    ops = torch.randint(0, 3, (batch_size, length // 2), generator=gen)
    total = torch.zeros(batch_size, dtype=torch.long)  # sum of the finished additive terms
    term = numbers[:, 0].clone()  # the running product of the current (signed) term
    for k in range(ops.shape[1]):
        op, num = ops[:, k], numbers[:, k + 1]
        closes = op != 2  # + or - ends the term
        total = torch.where(closes, total + term, total)
        term = torch.where(op == 2, term * num, torch.where(op == 0, num, -num)) % MODULUS
    symbols = torch.empty(batch_size, length, dtype=torch.long)
    symbols[:, ::2] = numbers
    symbols[:, 1::2] = ops + MODULUS
    return symbols, (total + term) % MODULUS


@dataclass(frozen=True)
class Task:
    """A task: its generator, input alphabet and number of answer classes (chance = 1 / num_classes)."""

    name: str
    generate: Callable[[int, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    num_symbols: int
    num_classes: int

    @property
    def equals_token(self) -> int:
        return self.num_symbols

    @property
    def answer_tokens(self) -> list[int]:
        return list(range(self.num_symbols + 1, self.num_symbols + 1 + self.num_classes))

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 1 + self.num_classes

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes


TASKS = {
    "parity": Task("parity", parity, 2, 2),
    "even_pairs": Task("even_pairs", even_pairs, 2, 2),
    "modular_arithmetic": Task("modular_arithmetic", modular_arithmetic, MODULUS + 3, MODULUS),
    "cycle_navigation": Task("cycle_navigation", cycle_navigation, 3, MODULUS),
}


def make_batch(task: Task, length: int, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, L + 1) = symbols then `=`, and the class labels (B,)."""
    symbols, labels = task.generate(length, batch_size, gen)
    equals = torch.full((symbols.shape[0], 1), task.equals_token, dtype=torch.long)
    return torch.cat([symbols, equals], dim=1), labels


def bucket_lengths(low: int, high: int, count: int) -> list[int]:
    """`count` lengths spread evenly over [low, high] (both ends included, no duplicates)."""
    if count <= 1:
        return [high]
    return sorted({round(low + (high - low) * k / (count - 1)) for k in range(count)})


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}-{bucket[1]}"


def scaled_accuracy(accuracy: float, chance: float) -> float:
    """(accuracy - chance) / (1 - chance): 0 = chance level, 1 = perfect (negative = below chance)."""
    return (accuracy - chance) / (1.0 - chance)


# ----------------------------------------------------------------------------------------------------------------
# Models: each builder maps (vocab size, settings) -> an nn.Module whose forward(input_ids) gives logits (B, V) at
# the last position. Sizes are chosen so the three have about the same number of parameters (~110k).
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Everything a run needs besides (task, model, seed). Defaults are the benchmark's."""

    steps: int = 1000
    batch_size: int = 64
    lr: dict = field(default_factory=lambda: {"slstm": 3e-3, "llama": 1e-3, "lstm": 3e-3})
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    eval_lengths_per_bucket: int = 8
    eval_batch_size: int = 64
    hidden_size: int = 64
    num_layers: int = 2
    slstm_conv: int = 0
    slstm_recurrent_init: str = "zeros"
    slstm_heads: int = 1
    slstm_ffn: float = 1.3
    llama_heads: int = 4
    llama_intermediate: int = 216
    lstm_hidden: int = 84
    eval_seed: int = 1234
    threads: int = 1


class LastLogits(nn.Module):
    """Adapts a transformers causal LM to forward(input_ids) -> next-token logits at the last position (B, V)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[:, -1]


class LSTMLM(nn.Module):
    """Embedding -> torch.nn.LSTM -> linear head: the classic-RNN reference."""

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, hidden_size)
        self.rnn = nn.LSTM(hidden_size, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.rnn(self.embeddings(input_ids))
        return self.head(outputs[:, -1])


def build_slstm(vocab_size: int, settings: Settings) -> nn.Module:
    """Our sLSTM LM: official block layout (sLSTM + gated FFN), 1 head, causal conv per `settings.slstm_conv`."""
    from .configuration_slstm import SLSTMConfig
    from .modeling_slstm import SLSTMForCausalLM

    config = SLSTMConfig(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_heads=settings.slstm_heads,
        conv1d_kernel_size=settings.slstm_conv,
        ffn_proj_factor=settings.slstm_ffn,
        recurrent_weight_init=settings.slstm_recurrent_init,
        use_cache=False,
    )
    return LastLogits(SLSTMForCausalLM(config))


def build_llama(vocab_size: int, settings: Settings) -> nn.Module:
    """A Llama-style transformer (RoPE, RMSNorm, SwiGLU) from transformers, same width and depth as the sLSTM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.llama_intermediate,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.llama_heads,
        num_key_value_heads=settings.llama_heads,
        max_position_embeddings=2 * BUCKETS[-1][1],
        tie_word_embeddings=True,
        use_cache=False,
        attn_implementation="eager",  # faster than sdpa at this size on CPU
    )
    return LastLogits(LlamaForCausalLM(config))


def build_lstm(vocab_size: int, settings: Settings) -> nn.Module:
    """torch.nn.LSTM, as many layers as the others, hidden size chosen to match their parameter count."""
    return LSTMLM(vocab_size, settings.lstm_hidden, settings.num_layers)


BUILDERS = {"slstm": build_slstm, "llama": build_llama, "lstm": build_lstm}


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, tied weights counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation of one (task, model, seed)
# ----------------------------------------------------------------------------------------------------------------


def class_logits(model: nn.Module, task: Task, input_ids: torch.Tensor) -> torch.Tensor:
    """Scores of the answer tokens at `=`, (B, num_classes)."""
    return model(input_ids)[:, task.answer_tokens]


def train(model: nn.Module, task: Task, settings: Settings, seed: int, lr: float) -> list[float]:
    """AdamW with a one-cycle schedule, one uniformly drawn length in 3-40 per batch. Returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=max(settings.steps, 1), pct_start=settings.warmup_fraction
    )
    model.train()
    losses = []
    for _ in range(settings.steps):
        length = int(torch.randint(TRAIN_LENGTHS[0], TRAIN_LENGTHS[1] + 1, (1,), generator=gen))
        input_ids, labels = make_batch(task, length, settings.batch_size, gen)
        loss = F.cross_entropy(class_logits(model, task, input_ids), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, settings: Settings) -> dict[str, dict[str, float]]:
    """Accuracy and scaled accuracy per length bucket, on test sets that depend only on the task and `eval_seed`."""
    model.eval()
    results = {}
    for b, (low, high) in enumerate(BUCKETS):
        gen = torch.Generator().manual_seed(settings.eval_seed * 1000 + b)
        correct = total = 0
        for length in bucket_lengths(low, high, settings.eval_lengths_per_bucket):
            input_ids, labels = make_batch(task, length, settings.eval_batch_size, gen)
            correct += int((class_logits(model, task, input_ids).argmax(-1) == labels).sum())
            total += labels.numel()
        accuracy = correct / total
        results[bucket_name((low, high))] = {
            "accuracy": accuracy,
            "scaled_accuracy": scaled_accuracy(accuracy, task.chance),
        }
    return results


def run_one(task_name: str, model_name: str, seed: int, settings: Settings) -> dict:
    """Build, train and evaluate one model on one task with one seed; returns a JSON-ready record."""
    torch.set_num_threads(settings.threads)
    task = TASKS[task_name]
    torch.manual_seed(seed)
    model = BUILDERS[model_name](task.vocab_size, settings)
    start = time.perf_counter()
    losses = train(model, task, settings, seed, settings.lr[model_name])
    train_seconds = time.perf_counter() - start
    buckets = evaluate(model, task, settings)
    tail = losses[-max(1, len(losses) // 20) :] if losses else [float("nan")]
    return {
        "task": task_name,
        "model": model_name,
        "seed": seed,
        "params": count_parameters(model),
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(time.perf_counter() - start - train_seconds, 2),
        "final_train_loss": sum(tail) / len(tail),
        "buckets": buckets,
    }


def _run_job(job: tuple[str, str, int, Settings]) -> dict:
    return run_one(*job)


def run_all(tasks: list[str], models: list[str], seeds: list[int], settings: Settings, workers: int) -> list[dict]:
    """Every (task, model, seed), the sLSTM runs (the slowest) first, spread over `workers` processes."""
    cost = {"slstm": 0, "llama": 1, "lstm": 2}
    jobs = sorted(
        ((t, m, s, settings) for t in tasks for m in models for s in seeds), key=lambda job: cost.get(job[1], 0)
    )
    records = []
    if workers <= 1:
        for job in jobs:
            records.append(_run_job(job))
            _log_progress(records[-1], len(records), len(jobs))
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for record in pool.map(_run_job, jobs):
                records.append(record)
                _log_progress(record, len(records), len(jobs))
    order = {(t, m, s): k for k, (t, m, s) in enumerate((t, m, s) for t in tasks for m in models for s in seeds)}
    return sorted(records, key=lambda r: order[(r["task"], r["model"], r["seed"])])


def slstm_backend() -> str:
    """The sLSTM recurrence backend a float32 CPU run uses (results do not depend on it beyond float rounding)."""
    from . import slstm_op

    resolve = getattr(slstm_op, "resolve_backend", None)
    if resolve is None:
        return "reference"
    return resolve(torch.zeros(1, 1, 1, 4))


def _log_progress(record: dict, done: int, total: int) -> None:
    scores = " ".join(f"{v['scaled_accuracy']:+.2f}" for v in record["buckets"].values())
    logger.info(
        "[%d/%d] %s %s seed %d: %s (train %.0fs)",
        done, total, record["task"], record["model"], record["seed"], scores, record["train_seconds"],
    )


# ----------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------


def summarize(records: list[dict]) -> list[dict]:
    """Mean and per-seed scaled accuracy per (task, model, bucket)."""
    summary = []
    keys = list(dict.fromkeys((r["task"], r["model"]) for r in records))
    for task_name, model_name in keys:
        runs = [r for r in records if r["task"] == task_name and r["model"] == model_name]
        buckets = {}
        for name in runs[0]["buckets"]:
            per_seed = [r["buckets"][name]["scaled_accuracy"] for r in runs]
            buckets[name] = {"mean": sum(per_seed) / len(per_seed), "per_seed": per_seed}
        summary.append(
            {
                "task": task_name,
                "model": model_name,
                "params": runs[0]["params"],
                "seeds": [r["seed"] for r in runs],
                "scaled_accuracy": buckets,
            }
        )
    return summary


def _cell(scores: dict) -> str:
    """`mean [seed scores]`, e.g. ` 0.67 [1.00 1.00 0.00]`."""
    return f"{scores['mean']:5.2f} [" + " ".join(f"{v:.2f}" for v in scores["per_seed"]) + "]"


def format_table(summary: list[dict]) -> str:
    """A plain-text table: one block per task, one row per model, mean scaled accuracy [per seed] per bucket."""
    lines = []
    bucket_names = [bucket_name(b) for b in BUCKETS]
    for task_name in dict.fromkeys(s["task"] for s in summary):
        rows = [s for s in summary if s["task"] == task_name]
        task = TASKS[task_name]
        cells = [[_cell(r["scaled_accuracy"][b]) for b in bucket_names] for r in rows]
        width = max(len(c) for row in cells for c in row)
        header = f"{'model':<6} {'params':>7}  " + "  ".join(f"{'len ' + b:<{width}}" for b in bucket_names)
        lines.append(
            f"{task_name}  (scaled accuracy: 0 = chance {task.chance:.2f}, 1 = perfect; train lengths "
            f"{TRAIN_LENGTHS[0]}-{TRAIN_LENGTHS[1]}; mean [per seed {','.join(map(str, rows[0]['seeds']))}])"
        )
        lines.append(header.rstrip())
        for r, row in zip(rows, cells):
            lines.append((f"{r['model']:<6} {r['params']:>7,}  " + "  ".join(f"{c:<{width}}" for c in row)).rstrip())
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot(summary: list[dict], path: str) -> bool:
    """Mean scaled accuracy per bucket, one panel per task, one line per model. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: skipping the plot (pip install matplotlib).")
        return False
    task_names = list(dict.fromkeys(s["task"] for s in summary))
    fig, axes = plt.subplots(1, len(task_names), figsize=(4 * len(task_names), 3.4), squeeze=False)
    names = [bucket_name(b) for b in BUCKETS]
    for ax, task_name in zip(axes[0], task_names):
        for row in (s for s in summary if s["task"] == task_name):
            means = [row["scaled_accuracy"][b]["mean"] for b in names]
            ax.plot(names, means, marker="o", label=row["model"])
            for x, b in enumerate(names):
                ax.scatter([x] * len(row["scaled_accuracy"][b]["per_seed"]), row["scaled_accuracy"][b]["per_seed"],
                           s=8, alpha=0.35, color=ax.lines[-1].get_color())
        ax.axvspan(-0.3, 0.3, color="0.9", zorder=0)
        ax.set_title(task_name)
        ax.set_ylim(-0.15, 1.05)
        ax.set_xlabel("test length (shaded: training lengths)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("scaled accuracy")
    axes[0][0].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _names(value: str, allowed, what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise ValueError(f"--{what}: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(allowed)}.")
    return list(dict.fromkeys(names))


def _seeds(value: str) -> list[int]:
    try:
        seeds = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {value!r}.") from None
    if not seeds:
        raise ValueError("--seeds: give at least one seed.")
    if len(seeds) == 1 and "," not in value:  # "--seeds 3" means three seeds 0, 1, 2
        seeds = list(range(seeds[0]))
    if not seeds:
        raise ValueError("--seeds: give at least one seed.")
    return list(dict.fromkeys(seeds))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slstm bench state-tracking",
        description="Formal-language state tracking (xLSTM §4.1): train on lengths 3-40, test up to 256, "
        "scaled accuracy per length bucket for the sLSTM, a same-size Llama transformer and torch.nn.LSTM.",
    )
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 1000, --quick 8)")
    parser.add_argument("--seeds", default=None, help="N (seeds 0..N-1) or a list like 0,1,2 (default 3, --quick 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate for every model "
                        "(default: sLSTM 3e-3, nn.LSTM 3e-3, Llama 1e-3)")
    parser.add_argument("--slstm-conv", type=int, default=0, help="sLSTM causal conv width (0 = none; see README)")
    parser.add_argument("--slstm-recurrent-init", choices=("zeros", "standard"), default="zeros")
    parser.add_argument("--eval-lengths", type=int, default=None, help="test lengths per bucket (default 8)")
    parser.add_argument("--eval-batch-size", type=int, default=None, help="sequences per test length (default 64)")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: min(2, CPUs))")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON (all runs and the summary), not the table")
    parser.add_argument("--plot", metavar="PATH", default=None, help="write a PNG plot (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="a few steps on tiny test sets: a smoke test only")
    return parser


def settings_from_args(args: argparse.Namespace) -> tuple[Settings, list[int], int]:
    """Validated `Settings`, seeds and worker count from parsed arguments; ValueError on a bad value."""
    settings = Settings(batch_size=args.batch_size, slstm_conv=args.slstm_conv,
                        slstm_recurrent_init=args.slstm_recurrent_init, threads=args.threads)
    if args.quick:
        settings.steps, settings.eval_lengths_per_bucket, settings.eval_batch_size = 8, 1, 8
    if args.steps is not None:
        settings.steps = args.steps
    if args.eval_lengths is not None:
        settings.eval_lengths_per_bucket = args.eval_lengths
    if args.eval_batch_size is not None:
        settings.eval_batch_size = args.eval_batch_size
    if args.lr is not None:
        if not args.lr > 0:
            raise ValueError(f"--lr must be > 0, got {args.lr}.")
        settings.lr = {name: args.lr for name in MODELS}
    for name in ("steps", "batch_size", "eval_lengths_per_bucket", "eval_batch_size", "threads"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(settings, name)}.")
    if settings.slstm_conv < 0:
        raise ValueError(f"--slstm-conv must be >= 0, got {settings.slstm_conv}.")
    seeds = _seeds(args.seeds if args.seeds is not None else ("1" if args.quick else "3"))
    workers = args.workers if args.workers is not None else (1 if args.quick else min(2, os.cpu_count() or 1))
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}.")
    return settings, seeds, workers


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark; print the table (or JSON with --json). Returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        tasks = _names(args.tasks, TASKS, "tasks")
        models = _names(args.models, MODELS, "models")
        settings, seeds, workers = settings_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)
    backend = slstm_backend() if "slstm" in models else None
    logger.info(
        "state tracking: %s | %s | seeds %s | %d steps | %d worker(s) x %d thread(s) | sLSTM backend %s",
        ",".join(tasks), ",".join(models), ",".join(map(str, seeds)), settings.steps, workers, settings.threads,
        backend,
    )
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    records = run_all(tasks, models, seeds, settings, workers)
    wall = time.perf_counter() - start
    summary = summarize(records)
    if args.plot and plot(summary, args.plot):
        logger.info("plot written to %s", args.plot)
    if args.json:
        payload = {
            "settings": asdict(settings),
            "train_lengths": list(TRAIN_LENGTHS),
            "buckets": [bucket_name(b) for b in BUCKETS],
            "chance": {t: TASKS[t].chance for t in tasks},
            "seeds": seeds,
            "workers": workers,
            "slstm_backend": backend,
            "torch": torch.__version__,
            "wall_seconds": round(wall, 1),
            "load_average_1min": {"start": load_before, "end": os.getloadavg()[0] if load_before is not None else None},
            "summary": summary,
            "runs": records,
        }
        print(json.dumps(payload, indent=2))
    else:
        print(format_table(summary), end="")
        print(f"({len(records)} runs, {settings.steps} steps each, wall time {wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
