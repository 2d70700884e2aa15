"""Train an sLSTM language model with the transformers `Trainer`: the engine behind `slstm train` and `slstm demo`.

Single process, or data parallel under `torchrun --nproc_per_node N` or `accelerate launch --multi_gpu --num_processes N`
(on a machine without GPUs both start N CPU processes that synchronise gradients over gloo). Note that
`accelerate launch --cpu --num_processes N` starts a single process unless given an MPI hostfile.
"""

import difflib
import inspect
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments, set_seed

from .checkpoints import AtomicCheckpointTrainer, checkpoint_folders, newest_complete_checkpoint, remove_staging
from .checkpoints import STAGING as CHECKPOINT_STAGING
from .configuration_slstm import SLSTMConfig
from .corpus import Corpus, load_corpus
from .folders import MODEL_FOLDER_FILES, model_code_files, refuse_overlap, remove_tool_files
from .model_card import write_model_card
from .modeling_slstm import SLSTMForCausalLM
from .tokenizer_training import ensure_special_tokens, train_bpe_tokenizer
from .transformers_compat import CHECKPOINTING, portable_tokenizer_config


logger = logging.getLogger(__name__)

DEFAULT_LICENSE = "apache-2.0"  # the project's own; the trained weights' licence is the user's choice (--license)


@dataclass
class TrainingOptions:
    """What `slstm train` takes; the defaults are the command line's."""

    output_dir: str
    checkpoint_dir: Optional[str] = None  # None = beside the output dir, `OUTPUT_DIR-checkpoints`
    config: str = "tiny"  # preset name, a JSON file, or a folder holding config.json
    data: list[str] = field(default_factory=list)  # text files; empty = the corpus bundled with Python
    tokenizer: Optional[str] = None  # a tokenizer to use instead of training one (folder or Hub id)
    max_steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: Optional[int] = None  # None = 10% of max_steps, at most 100
    gradient_accumulation_steps: int = 1
    eval_fraction: float = 0.05
    max_chars: Optional[int] = None
    eval_steps: int = 100
    save_steps: int = 100
    logging_steps: int = 10
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    resume: bool = False
    overwrite: bool = False
    disable_progress_bar: bool = False
    license: str = DEFAULT_LICENSE  # Hub licence identifier for the model card


def checkpoint_dir(options: TrainingOptions) -> Path:
    """Where checkpoints go: outside the model folder, so uploading the folder never uploads optimizer states."""
    if options.checkpoint_dir:
        return Path(options.checkpoint_dir)
    out = Path(options.output_dir).resolve()
    return out.with_name(out.name + "-checkpoints")


@dataclass
class TrainingResult:
    output_dir: str
    metrics: dict
    trainer: Trainer


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive `block_size` token windows of one long token stream, as causal LM examples (labels = inputs)."""

    def __init__(self, token_ids: torch.Tensor, block_size: int):
        self.num_tokens = int(token_ids.numel())
        num_blocks = token_ids.numel() // block_size
        self.blocks = token_ids[: num_blocks * block_size].view(num_blocks, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, idx: int) -> dict:
        return {"input_ids": self.blocks[idx], "labels": self.blocks[idx]}


class PerplexityTrainer(AtomicCheckpointTrainer):
    """`Trainer` that writes complete checkpoints only and also logs `eval_perplexity` = exp(eval_loss)."""

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = round(math.exp(min(logs["eval_loss"], 50.0)), 4)
        super().log(logs, *args, **kwargs)


class _WallTime(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start


def _warn_unknown_fields(spec: str, fields: dict) -> None:
    """A misspelt field would silently keep its default: name it (the config keeps it as an unused attribute)."""
    known = set(SLSTMConfig().to_dict()) | set(inspect.signature(SLSTMConfig.__init__).parameters)
    for name in sorted(set(fields) - known):
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        logger.warning("--config %s: %r is not an SLSTMConfig field and has no effect%s", spec, name, hint)


def resolve_config(spec: str) -> SLSTMConfig:
    """A preset name (`tiny`, `125m`, ...), a JSON file of config fields, or a folder holding config.json."""
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"--config {spec}: the folder has no config.json")
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ValueError(f"--config {spec}: file not found")
        try:
            fields = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"--config {spec}: not a readable JSON file ({error})") from error
        if not isinstance(fields, dict):
            raise ValueError(f"--config {spec}: expected a JSON object of config fields")
        fields.pop("_comment", None)
        for key in ("auto_map", "architectures", "transformers_version", "model_type"):
            fields.pop(key, None)
        _warn_unknown_fields(spec, fields)
        return SLSTMConfig(**fields)
    if spec not in SLSTMConfig.available_presets():
        raise ValueError(
            f"--config {spec}: unknown preset; available: {', '.join(SLSTMConfig.available_presets())} "
            "(or a path to a .json config)"
        )
    return SLSTMConfig.from_preset(spec)


def validate_options(options: TrainingOptions) -> None:
    """Reject nonsensical numbers before anything is written."""
    for name in ("max_steps", "batch_size", "seq_len", "gradient_accumulation_steps", "eval_steps", "save_steps",
                 "logging_steps"):
        value = getattr(options, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if options.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {options.seq_len}")
    if not (options.lr > 0 and math.isfinite(options.lr)):
        raise ValueError(f"--lr must be a positive number, got {options.lr}")
    if options.warmup_steps is not None and options.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {options.warmup_steps}")
    if not (options.weight_decay >= 0 and math.isfinite(options.weight_decay)):
        raise ValueError(f"--weight-decay must be a finite number >= 0, got {options.weight_decay}")
    if not 0 <= options.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {options.seed}")
    if options.resume and options.overwrite:
        raise ValueError("--resume continues the run in --output-dir and --overwrite starts it again: pick one")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]*", options.license or ""):
        raise ValueError(f"--license must be a Hub licence identifier such as apache-2.0 or mit, got {options.license!r}")
    if not options.resume:
        inputs = {"--data": options.data, "--config": [options.config],
                  "--tokenizer": [options.tokenizer] if options.tokenizer else []}
        refuse_overlap({"--output-dir": options.output_dir, "--checkpoint-dir": str(checkpoint_dir(options))}, inputs)
    out, checkpoints = Path(options.output_dir).resolve(), checkpoint_dir(options).resolve()
    if checkpoints == out or out in checkpoints.parents or checkpoints in out.parents:
        raise ValueError(
            f"--checkpoint-dir {options.checkpoint_dir} must lie outside --output-dir {options.output_dir} (and not "
            "hold it): uploading the model folder would take the checkpoints and their optimizer states along"
        )


def _create_folders(options: TrainingOptions) -> None:
    for flag, folder in (("--output-dir", Path(options.output_dir)), ("--checkpoint-dir", checkpoint_dir(options))):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"{flag} {folder}: cannot create it ({error.strerror or error})") from None


def _run_files(folder: Path) -> list[str]:
    """What a training run writes into its checkpoint folder: `checkpoint-N` and the staging folder."""
    staging = [CHECKPOINT_STAGING] if (folder / CHECKPOINT_STAGING).exists() else []
    return [p.name for p in checkpoint_folders(folder)] + staging


def check_output_dir(options: TrainingOptions) -> Optional[str]:
    """Refuse to clobber a non-empty output or checkpoint dir; with `resume`, return the newest complete checkpoint
    (logging any newer incomplete one it skips)."""
    out, checkpoints = Path(options.output_dir), checkpoint_dir(options)
    for flag, folder in (("--output-dir", out), ("--checkpoint-dir", checkpoints)):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{flag} {folder} exists and is not a directory")
    if options.resume:
        last, skipped = newest_complete_checkpoint(checkpoints)
        for folder, problem in skipped:
            logger.warning("Skipping incomplete checkpoint %s: %s", folder, problem)
        if last is None:
            found = f" ({len(skipped)} incomplete)" if skipped else ""
            raise ValueError(
                f"--resume: no complete checkpoint in {checkpoints}{found}; start a new run without --resume "
                "(checkpoints are written every --save-steps steps)"
            )
        return str(last)
    if not options.overwrite:
        for flag, folder, used in (("--output-dir", out, out.is_dir() and any(out.iterdir())),
                                   ("--checkpoint-dir", checkpoints, bool(_run_files(checkpoints)))):
            if used:
                raise ValueError(
                    f"{flag} {folder} is not empty; pass --overwrite to replace its model, --resume to continue its "
                    "last checkpoint, or choose another --output-dir"
                )
    return None


def clear_previous_run(options: TrainingOptions) -> None:
    """--overwrite: delete the previous run's model, tokenizer, card and checkpoints, by name; keep everything else."""
    out, checkpoints = Path(options.output_dir), checkpoint_dir(options)
    removed = remove_tool_files(out, MODEL_FOLDER_FILES + model_code_files())
    removed += [f"{checkpoints.name}/{name}" for name in remove_tool_files(checkpoints, _run_files(checkpoints))]
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    if removed:
        logger.info("--overwrite: removed the previous run's %s", ", ".join(removed))


def tokenize_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """All documents as one token stream, each followed by the end-of-text token."""
    ids = []
    for text in documents:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _datasets(tokenizer, corpus: Corpus, seq_len: int) -> tuple[TokenBlocks, TokenBlocks]:
    """Training blocks of `seq_len` tokens, and evaluation blocks (shorter if the held-out text is short)."""
    train_ids = tokenize_stream(tokenizer, corpus.train)
    eval_ids = tokenize_stream(tokenizer, corpus.eval)
    if train_ids.numel() < seq_len:
        raise ValueError(
            f"the training text is only {train_ids.numel()} tokens, less than one --seq-len {seq_len} block; "
            "pass more text or lower --seq-len"
        )
    if eval_ids.numel() < 2:
        raise ValueError("the held-out text is under 2 tokens; pass more text or raise --eval-fraction")
    return TokenBlocks(train_ids, seq_len), TokenBlocks(eval_ids, min(seq_len, eval_ids.numel()))


def _load_tokenizer(name: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(f"--tokenizer {name}: cannot load it ({str(error).splitlines()[0]})") from error
    ensure_special_tokens(tokenizer)
    return tokenizer


def _training_arguments(options: TrainingOptions) -> TrainingArguments:
    warmup = options.warmup_steps if options.warmup_steps is not None else min(100, options.max_steps // 10)
    extra = {}
    if not torch.cuda.is_available() and (options.bf16 or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        # Without a GPU the Trainer allows bf16, and sets up multi-process (gloo) training under torchrun or
        # `accelerate launch --multi_gpu`, only when told to run on the CPU.
        extra["use_cpu"] = True
    if options.gradient_checkpointing:
        extra[CHECKPOINTING] = True
        extra[f"{CHECKPOINTING}_kwargs"] = {"use_reentrant": False}
    return TrainingArguments(
        output_dir=str(checkpoint_dir(options)),
        max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        learning_rate=options.lr,
        weight_decay=options.weight_decay,
        adam_beta2=0.95,
        warmup_steps=warmup,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        eval_strategy="steps",
        eval_steps=options.eval_steps,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=2,
        logging_steps=options.logging_steps,
        logging_first_step=True,
        bf16=options.bf16,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=options.seed,
        report_to="none",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every parameter gets a gradient
        disable_tqdm=options.disable_progress_bar,
        **extra,
    )


def _replica_weight_digests(model: torch.nn.Module) -> list[str]:
    """A digest of the weights in every data-parallel process (all equal when the replicas stayed in sync)."""
    import hashlib

    import torch.distributed as dist

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    return digests


def train(options: TrainingOptions, corpus: Optional[Corpus] = None) -> TrainingResult:
    """Train a tokenizer (unless given) and an sLSTM LM, save both with a generation config and a model card."""
    validate_options(options)
    config = resolve_config(options.config)
    if corpus is None:
        corpus = load_corpus(options.data, eval_fraction=options.eval_fraction, max_chars=options.max_chars)

    args = _training_arguments(options)  # sets up the process group when launched data parallel
    is_main = args.process_index == 0
    if not is_main:
        logger.setLevel(logging.WARNING)
    checkpoint = check_output_dir(options)
    with args.main_process_first(desc="output dir check"):
        pass  # every process has checked the output dir before the main one writes into it
    out = Path(options.output_dir)
    given_tokenizer = _load_tokenizer(options.tokenizer) if options.tokenizer and checkpoint is None else None
    if is_main and options.overwrite:  # only once every input has loaded: a failed run leaves the old model in place
        clear_previous_run(options)  # stale checkpoints of the replaced run would confuse --resume
    if is_main:
        remove_staging(checkpoint_dir(options))  # what a killed save left

    with args.main_process_first(desc="tokenizer"):
        if checkpoint is not None:
            tokenizer = _load_tokenizer(checkpoint)
            config = SLSTMConfig.from_pretrained(checkpoint)
            logger.info("Resuming from %s (the newest complete checkpoint)", checkpoint)
        elif given_tokenizer is not None:
            tokenizer = given_tokenizer
        elif is_main:
            started = time.perf_counter()
            tokenizer = train_bpe_tokenizer(corpus.train, vocab_size=config.vocab_size)
            logger.info("Trained a byte-level BPE tokenizer: %d tokens in %.1fs", len(tokenizer),
                        time.perf_counter() - started)
        else:
            tokenizer = _load_tokenizer(str(out))  # the main process saved it before letting the others in
        train_dataset, eval_dataset = _datasets(tokenizer, corpus, options.seq_len)
        if is_main:
            _create_folders(options)
        if is_main and checkpoint is None and not options.tokenizer:
            tokenizer.save_pretrained(str(out))
            portable_tokenizer_config(str(out))

    if checkpoint is None:
        config.vocab_size = len(tokenizer)
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    set_seed(options.seed)  # identical initial weights in every process
    model = SLSTMForCausalLM(config)
    generation = model.generation_config
    generation.eos_token_id, generation.pad_token_id = config.eos_token_id, config.pad_token_id
    generation.bos_token_id = config.bos_token_id
    # Sampling defaults only: a saved length (max_new_tokens) would override every caller's max_length.
    generation.do_sample, generation.temperature, generation.top_p = True, 0.8, 0.95

    num_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "Model: %.2fM parameters (%d layers, hidden %d, vocab %d); data: %d train blocks (%d tokens), %d eval blocks "
        "(%d tokens) of %d tokens; %d process(es)",
        num_params / 1e6, config.num_hidden_layers, config.hidden_size, config.vocab_size, len(train_dataset),
        train_dataset.num_tokens, len(eval_dataset), eval_dataset.num_tokens, options.seq_len, args.world_size,
    )
    wall_time = _WallTime()
    trainer = PerplexityTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[wall_time],
    )
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(train_output.metrics)
    metrics.update(trainer.evaluate())
    metrics["global_step"] = trainer.state.global_step
    metrics["num_parameters"] = num_params
    metrics["train_tokens"] = train_dataset.num_tokens
    metrics["eval_tokens"] = eval_dataset.num_tokens
    metrics["world_size"] = args.world_size
    metrics["wall_time_seconds"] = round(getattr(wall_time, "seconds", float("nan")), 1)
    if args.world_size > 1:
        metrics["replica_weight_digests"] = _replica_weight_digests(trainer.model)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if losses:
        metrics["first_logged_loss"], metrics["last_logged_loss"] = losses[0], losses[-1]

    # The Trainer turns the cache off for training (5.x copies TrainingArguments.use_cache, False, into the config and
    # the generation config); a saved model decodes with its state, O(1) per token.
    trainer.model.config.use_cache = trainer.model.generation_config.use_cache = True
    trainer.save_model(str(out))  # model (safetensors), config with auto_map, model code, generation config, tokenizer
    if trainer.is_world_process_zero():
        portable_tokenizer_config(str(out))
        (out / "all_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_model_card(out, config=config, metrics=metrics, options=asdict(options), corpus=corpus,
                         license=options.license)
    return TrainingResult(output_dir=str(out), metrics=metrics, trainer=trainer)


def leave_data_parallel(exit_code: int) -> None:
    """End a data-parallel process: wait for every rank, then exit at once with `exit_code`; a no-op in a single
    process. Skipping the process group's teardown is deliberate: with gloo a worker thread can still be releasing the
    Python tensors of finished collectives, and the teardown then deadlocks on the GIL (`destroy_process_group`) or
    aborts at interpreter exit (pytorch/pytorch#56297, #179291). Both happened here with torch 2.13."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()  # no rank leaves while a peer still needs it
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


__all__ = ["TrainingOptions", "TrainingResult", "TokenBlocks", "leave_data_parallel", "resolve_config", "train"]
