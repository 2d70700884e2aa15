"""The `slstm` command line: train, generate, demo, bench.

    slstm train --config tiny --output-dir out [--data FILE ...] [--max-steps N] ...
    slstm generate out --prompt "The "
    slstm demo
    accelerate launch --cpu --num_processes 2 -m modeling_slstm.cli train ...   # data parallel

User errors (bad arguments, missing data, a non-empty output dir) print `error: ...` on stderr and exit with status 2.
"""

import argparse
import importlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence


logger = logging.getLogger(__name__)

DEMO_OUTPUT_DIR = "slstm-demo"
DEMO_MAX_STEPS = 800  # eval perplexity ~50 in ~1.4 min on a quiet 2-core box; more steps overfit the small corpus (2000: ~178)
DEMO_PROMPTS = ("The ", "def ", "A list is ")


# ---------------------------------------------------------------------------------------------------------- parsing
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    from .training import TrainingOptions

    d = TrainingOptions(output_dir="")
    parser.add_argument("--max-steps", type=_positive_int, default=d.max_steps, help="optimizer steps (default %(default)s)")
    parser.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="sequences per step and process (default %(default)s)")
    parser.add_argument("--seq-len", type=_positive_int, default=d.seq_len, help="tokens per training sequence (default %(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate, AdamW with warmup and cosine decay (default %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --max-steps, at most 100")
    parser.add_argument("--weight-decay", type=_non_negative_float, default=d.weight_decay)
    parser.add_argument("--gradient-accumulation-steps", type=_positive_int, default=d.gradient_accumulation_steps)
    parser.add_argument("--eval-fraction", type=float, default=d.eval_fraction, help="share of the text held out for evaluation (default %(default)s)")
    parser.add_argument("--max-chars", "--max-train-chars", dest="max_chars", type=_positive_int, default=None,
                        help="use only the first N characters of the text (train + eval), for quick runs")
    parser.add_argument("--eval-steps", type=_positive_int, default=d.eval_steps, help="evaluate every N steps (default %(default)s)")
    parser.add_argument("--save-steps", type=_positive_int, default=d.save_steps, help="checkpoint every N steps (default %(default)s)")
    parser.add_argument("--logging-steps", type=_positive_int, default=d.logging_steps, help="log the loss every N steps (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (the recurrent state stays float32)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward to save memory")
    parser.add_argument("--overwrite", action="store_true", help="replace the model in a non-empty --output-dir: the files a previous run wrote there and its checkpoints are deleted, other files kept")
    parser.add_argument("--no-progress-bar", dest="disable_progress_bar", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    from .training import TrainingOptions

    d = TrainingOptions(output_dir="")
    parser = argparse.ArgumentParser(
        prog="slstm",
        description="Train and sample sLSTM language models (xLSTM, Beck et al. 2024) with Hugging Face transformers.",
    )
    commands = parser.add_subparsers(dest="command", metavar="{train,generate,demo,bench}")
    commands.required = True

    train = commands.add_parser("train", help="train a tokenizer and a model, save them loadable by Auto classes",
                                description="Train a byte-level BPE tokenizer and an sLSTM LM with the transformers Trainer.")
    train.add_argument("--config", default="tiny", help="preset name (tiny, 125m, 350m, 760m, 1.3b), a .json config file, or a folder with config.json (default %(default)s)")
    train.add_argument("--data", nargs="+", action="extend", metavar="FILE", default=[], help="UTF-8 text files (default: the Python documentation bundled with Python, pydoc_data.topics)")
    train.add_argument("--tokenizer", default=None, help="use this tokenizer (folder or Hub id) instead of training a BPE one")
    train.add_argument("--output-dir", required=True, help="where the model, tokenizer and model card go (a folder ready to upload)")
    train.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: OUTPUT_DIR-checkpoints beside the model folder, so uploading the folder uploads no optimizer state)")
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --checkpoint-dir")
    train.add_argument("--license", default=d.license, help="licence of the trained model, written to the model card's Hub metadata (default %(default)s)")
    _add_training_arguments(train)

    generate = commands.add_parser("generate", help="stream text from a trained model", description="Generate text, streamed to stdout as it is produced.")
    generate.add_argument("model", metavar="MODEL", help="a local model folder or a Hub id")
    generate.add_argument("--prompt", default="", help="text to continue (default: start from the end-of-text token)")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=100)
    generate.add_argument("--temperature", type=_non_negative_float, default=0.8, help="0 = greedy (default %(default)s)")
    generate.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default %(default)s)")
    generate.add_argument("--num-beams", type=_positive_int, default=1, help="beam search (not streamed) when > 1")
    generate.add_argument("--seed", type=int, default=None, help="for reproducible sampling")
    generate.add_argument("--prompt-lookup", type=_positive_int, default=0, metavar="N",
                          help="speculative decoding: draft N tokens by copying from the context (same text, faster "
                               "when the text repeats itself)")
    generate.add_argument("--assistant", default=None, metavar="DIR",
                          help="speculative decoding: draft tokens with this smaller model (same tokenizer)")

    demo = commands.add_parser("demo", help="train the tiny preset on the bundled corpus for a few minutes, then sample",
                               description="Train the tiny preset on the Python documentation bundled with Python (a few minutes on a laptop CPU), print samples.")
    demo.add_argument("--output-dir", default=None, help=f"default ./{DEMO_OUTPUT_DIR} (or a fresh ./{DEMO_OUTPUT_DIR}-N when it is taken)")
    demo.add_argument("--overwrite", action="store_true", help="replace the model in --output-dir")
    demo.add_argument("--max-steps", type=_positive_int, default=DEMO_MAX_STEPS, help="default %(default)s")
    demo.add_argument("--seed", type=int, default=42)

    commands.add_parser("bench", add_help=False, help="benchmarks: `slstm bench state-tracking ...` or `slstm bench ...`")
    return parser


# --------------------------------------------------------------------------------------------------------- commands
def run_train(args: argparse.Namespace) -> int:
    from .training import TrainingOptions, leave_data_parallel, train

    fields = {k: v for k, v in vars(args).items() if k in TrainingOptions.__dataclass_fields__}
    result = train(TrainingOptions(**fields))
    if result.trainer.is_world_process_zero():
        _print_summary(result)
    leave_data_parallel(0)
    return 0


def _print_summary(result) -> None:
    m = result.metrics
    print(
        f"\nSaved to {result.output_dir}: {m.get('global_step', '?')} steps in {m.get('train_runtime', 0):.0f}s, "
        f"train loss {m.get('first_logged_loss', float('nan')):.3f} -> {m.get('last_logged_loss', float('nan')):.3f}, "
        f"eval loss {m.get('eval_loss', float('nan')):.3f}, eval perplexity {m.get('eval_perplexity', float('nan')):.2f}"
    )
    print(f"Try it: slstm generate {result.output_dir} --prompt \"The \"")


def load_for_generation(name: str):
    """Tokenizer and model from a local folder or the Hub (user errors as ValueError)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from . import SLSTMConfig  # noqa: F401  (registers the model with the Auto classes)

    hf_logging.disable_progress_bar()  # keep the terminal for the generated text
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name  # Hub ids are `owner/name`
    if not path.exists() and looks_local:
        raise ValueError(f"model folder not found: {name}")
    if path.exists() and not (path / "config.json").is_file():
        raise ValueError(f"{name} is not a model folder (no config.json); train one with `slstm train`")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else name)
        model = AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else name)
    except Exception as error:  # noqa: BLE001  (a damaged folder fails in safetensors, torch or json: all user errors)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if path.exists():
            raise ValueError(f"cannot load the model in {name}: {reason}") from error
        raise ValueError(
            f"cannot load {name!r}: it is not a local folder, and the Hugging Face Hub could not provide it "
            f"(offline, HF_HUB_OFFLINE set, or no such model). Details: {reason}"
        ) from error
    model.eval()
    return tokenizer, model


def generate_text(tokenizer, model, prompt: str = "", max_new_tokens: int = 100, temperature: float = 0.8,
                  top_p: float = 0.95, num_beams: int = 1, seed: Optional[int] = None, stream: bool = True,
                  prompt_lookup: int = 0, assistant=None) -> str:
    """Continue `prompt`; with `stream` (and no beam search) the text is printed to stdout token by token.

    `prompt_lookup` > 0 drafts that many tokens from the context, `assistant` (a smaller model with the same tokenizer)
    drafts with a model: speculative decoding, the same text as without.
    """
    import torch
    from transformers import TextStreamer, set_seed

    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    if type(num_beams) is not int or num_beams < 1:
        raise ValueError(f"--num-beams must be a positive integer, got {num_beams!r}")
    if prompt_lookup and assistant is not None:
        raise ValueError("--prompt-lookup and --assistant are two ways to draft tokens: choose one")
    if (prompt_lookup or assistant is not None) and num_beams > 1:
        raise ValueError("speculative decoding (--prompt-lookup, --assistant) runs without beam search: --num-beams 1")
    if seed is not None:
        set_seed(seed)
    if prompt:
        inputs = tokenizer(prompt, return_tensors="pt")
    else:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("the tokenizer has neither a bos nor an eos token to start from: pass --prompt")
        inputs = {"input_ids": torch.tensor([[start]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    _check_beam_memory(model, num_beams, inputs["input_ids"].shape[1], max_new_tokens)
    # Keyword arguments, not a GenerationConfig: 4.57 swaps values equal to the library defaults in a passed config
    # (do_sample=False, temperature=1.0) for the model's own (sampling), so greedy requests would sample.
    options = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        options.update(do_sample=False, temperature=1.0, top_p=1.0)
    if model.generation_config.pad_token_id is None:
        options["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if prompt_lookup:
        options["prompt_lookup_num_tokens"] = prompt_lookup
    if assistant is not None:
        options["assistant_model"] = assistant
    streamer = None
    if stream and num_beams == 1:
        streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    with torch.no_grad():
        sequences = model.generate(**inputs, **options, streamer=streamer)
    text = tokenizer.decode(sequences[0], skip_special_tokens=True)
    if stream and streamer is None:
        print(text, flush=True)
    return text


def _check_beam_memory(model, num_beams: int, prompt_len: int, max_new_tokens: Optional[int]) -> None:
    """A ValueError before generating when beam search would need more than half the memory available: per beam the
    prompt's activations (the prompt runs once per beam), a few float32 copies of the logits over the vocabulary
    (scores, log-probabilities, the top-k over all beams), a recurrent state and the token ids."""
    config = model.config
    width, layers, vocab = (getattr(config, name, None) for name in ("hidden_size", "num_hidden_layers", "vocab_size"))
    if num_beams <= 1 or not all(isinstance(v, int) for v in (width, layers, vocab)):
        return  # no beams, or a model whose sizes this estimate does not know
    window = max((getattr(config, "conv1d_kernel_size", 0) or 0) - 1, 0)
    tokens = prompt_len + (max_new_tokens or 0)
    per_beam = 64 * width * prompt_len + 16 * vocab + layers * width * (16 + 4 * window) + 24 * tokens
    available = _available_memory()
    if available is not None and num_beams * per_beam > available // 2:
        raise ValueError(f"--num-beams {num_beams} needs about {num_beams * per_beam / 2**30:.1f} GiB (per beam: the "
                         f"prompt's activations, logits over {vocab} tokens, a state, its tokens); "
                         f"{available / 2**30:.1f} GiB of memory is available. Use fewer beams.")


def _available_memory() -> Optional[int]:
    """Bytes this process can still allocate: MemAvailable (free plus reclaimable cache), within a cgroup v2 memory
    limit when one is set; None where neither is known (not Linux)."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, ValueError, StopIteration, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            left = max(int(limit) - used, 0)
            available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    return available


def run_generate(args: argparse.Namespace) -> int:
    tokenizer, model = load_for_generation(args.model)
    assistant = None
    if args.assistant is not None:
        assistant_tokenizer, assistant = load_for_generation(args.assistant)
        if assistant_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"--assistant {args.assistant}: its tokenizer differs from the model's; a draft model must "
                             "share the model's tokenizer")
    generate_text(tokenizer, model, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.num_beams,
                  args.seed, prompt_lookup=args.prompt_lookup, assistant=assistant)
    return 0


def _fresh_demo_dir() -> str:
    def taken(folder: Path) -> bool:
        return any(f.exists() and (not f.is_dir() or any(f.iterdir()))
                   for f in (folder, folder.with_name(folder.name + "-checkpoints")))

    candidate, n = Path(DEMO_OUTPUT_DIR), 1
    while taken(candidate):
        n += 1
        candidate = Path(f"{DEMO_OUTPUT_DIR}-{n}")
    if n > 1:
        logger.warning("./%s is taken: saving to ./%s (use --output-dir DIR --overwrite to reuse a folder)",
                       DEMO_OUTPUT_DIR, candidate)
    return str(candidate)


def run_demo(args: argparse.Namespace) -> int:
    from .training import TrainingOptions, leave_data_parallel, train

    output_dir = args.output_dir or _fresh_demo_dir()
    logger.info("Training the tiny preset on the Python docs bundled with Python for %d steps (a few minutes on a "
                "CPU) into %s", args.max_steps, output_dir)
    started = time.perf_counter()
    options = TrainingOptions(output_dir=output_dir, config="tiny", max_steps=args.max_steps, overwrite=args.overwrite,
                              seed=args.seed, eval_steps=200, save_steps=200, logging_steps=50)
    result = train(options)
    if not result.trainer.is_world_process_zero():
        leave_data_parallel(0)
        return 0
    minutes = (time.perf_counter() - started) / 60
    tokenizer, model = load_for_generation(output_dir)
    print("\nSamples (temperature 0.8, top-p 0.95):")
    for i, prompt in enumerate(DEMO_PROMPTS):
        print(f"\n--- sample {i + 1} ---")
        generate_text(tokenizer, model, prompt, max_new_tokens=60, seed=args.seed + i)
    _print_summary(result)
    print(f"Demo took {minutes:.1f} minutes. Load it in Python:\n"
          f"  from transformers import AutoModelForCausalLM, AutoTokenizer\n"
          f"  model = AutoModelForCausalLM.from_pretrained({output_dir!r}, trust_remote_code=True)\n"
          f"  tokenizer = AutoTokenizer.from_pretrained({output_dir!r}, trust_remote_code=True)")
    leave_data_parallel(0)
    return 0


def run_bench(argv: Sequence[str]) -> int:
    """`slstm bench state-tracking ...` -> modeling_slstm.state_tracking.main, else modeling_slstm.bench.main."""
    if argv and argv[0] == "state-tracking":
        module_name, argv = "state_tracking", list(argv[1:])
    else:
        module_name, argv = "bench", list(argv)
    try:
        module = importlib.import_module(f".{module_name}", __package__ or "modeling_slstm")
    except ModuleNotFoundError as error:
        if error.name != f"modeling_slstm.{module_name}":
            raise
        raise ValueError(f"`slstm bench` needs modeling_slstm.{module_name}, which this install does not have yet") from None
    status = module.main(argv)
    return status if isinstance(status, int) else 0


# ------------------------------------------------------------------------------------------------------------- main
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (main() may run several times in one process, e.g. in tests)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(level: int = logging.INFO) -> None:
    """Our INFO messages to stderr as `[slstm] ...` (transformers keeps its own logging settings)."""
    package_logger = logging.getLogger(__package__ or "modeling_slstm")
    if not any(isinstance(h, _StderrHandler) for h in package_logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[slstm] %(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `slstm` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    try:
        if argv and argv[0] == "bench":
            return run_bench(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command == "train":
            return run_train(args)
        if args.command == "generate":
            _setup_logging(logging.WARNING)  # stdout and stderr are for the generated text and real problems
            return run_generate(args)
        return run_demo(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted (a training run continues from its last checkpoint with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
