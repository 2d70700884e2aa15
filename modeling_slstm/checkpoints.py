"""Training checkpoints that are complete or absent: written into a staging folder and renamed when done, checked
before `--resume` takes one.

    CHECKPOINT_DIR/checkpoint-N/       complete checkpoints (the Trainer's names)
    CHECKPOINT_DIR/.partial/           checkpoints being written; what a killed save leaves behind
"""

import json
import logging
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Optional

from transformers import Trainer


logger = logging.getLogger(__name__)

STAGING = ".partial"
_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_folders(checkpoint_dir) -> list[Path]:
    """The `checkpoint-N` folders of `checkpoint_dir`, newest (largest N) first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def _json_problem(path: Path, required_key: Optional[str] = None) -> Optional[str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{path.name} is unreadable or truncated"
    if required_key is not None and (not isinstance(data, dict) or required_key not in data):
        return f"{path.name} has no {required_key}"
    return None


def _safetensors_problem(path: Path) -> Optional[str]:
    """Whether the file ends where its header says its last tensor ends (a truncated copy does not)."""
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if path.stat().st_size != 8 + header_len + end:
            return f"{path.name} is truncated"
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError):
        return f"{path.name} is unreadable or truncated"
    return None


def checkpoint_problem(folder) -> Optional[str]:
    """Why `--resume` cannot continue from `folder`, or None when it is complete: trainer state, config, weights,
    optimizer and scheduler present and whole (torch files are zip archives: a truncated one has no directory)."""
    folder = Path(folder)
    problem = _json_problem(folder / "trainer_state.json", "global_step") or _json_problem(folder / "config.json")
    if problem:
        return problem
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        problem = _json_problem(index, "weight_map")
        shards = [] if problem else sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    for shard in shards:
        problem = problem or _safetensors_problem(folder / shard)
    for name in ("optimizer.pt", "scheduler.pt"):
        if not problem and not zipfile.is_zipfile(folder / name):
            problem = f"{name} is missing or truncated"
    if not problem and (folder / "tokenizer_config.json").exists():
        problem = _json_problem(folder / "tokenizer_config.json") or (
            _json_problem(folder / "tokenizer.json") if (folder / "tokenizer.json").exists() else None
        )
    return problem


def newest_complete_checkpoint(checkpoint_dir) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """The newest complete checkpoint (or None) and the newer ones skipped, each with the reason."""
    skipped = []
    for folder in checkpoint_folders(checkpoint_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def remove_staging(checkpoint_dir) -> None:
    """Delete what killed saves left in the staging folder."""
    staging = Path(checkpoint_dir) / STAGING
    if staging.is_dir():
        shutil.rmtree(staging)


class AtomicCheckpointTrainer(Trainer):
    """`Trainer` whose `checkpoint-N` folders appear only once complete: each is written under `.partial/` by every
    process, then renamed into place by the main one, and the oldest complete ones beyond `save_total_limit` removed."""

    _staging_dir: Optional[str] = None

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir if self._staging_dir is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        staging = run_dir / STAGING
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save and (staging / name).exists():
            shutil.rmtree(staging / name)
        self.accelerator.wait_for_everyone()  # nobody writes into the staging folder before it is clean
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)  # also rotates inside the staging folder, where it finds one
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every process has written its part (e.g. its RNG state)
        if self.args.should_save:
            target = run_dir / name
            if target.exists():  # an older run's folder of that step
                shutil.rmtree(target)
            (staging / name).rename(target)
            if not any(staging.iterdir()):
                staging.rmdir()
            limit = self.args.save_total_limit
            if limit:
                for old in checkpoint_folders(run_dir)[limit:]:
                    shutil.rmtree(old)
        self.accelerator.wait_for_everyone()


__all__ = ["AtomicCheckpointTrainer", "checkpoint_problem", "newest_complete_checkpoint", "remove_staging"]
