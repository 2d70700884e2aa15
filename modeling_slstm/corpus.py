"""Training text for the `slstm` command line: the corpus bundled with Python, or the user's files, split train/eval."""

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from transformers.utils import logging


logger = logging.get_logger(__name__)


BUNDLED_CORPUS_NAME = "pydoc_data.topics"


@dataclass
class Corpus:
    """Documents split into a training part and a held-out evaluation part."""

    train: list[str]
    eval: list[str]
    source: str

    @property
    def num_train_chars(self) -> int:
        return sum(len(text) for text in self.train)

    @property
    def num_eval_chars(self) -> int:
        return sum(len(text) for text in self.eval)


def bundled_documents() -> list[str]:
    """The Python documentation topics shipped with every CPython install (`pydoc_data.topics`, about 0.5M chars)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as error:  # some distributions strip it
        raise ValueError(
            f"This Python install has no `{BUNDLED_CORPUS_NAME}` (the bundled training text); pass --data FILE."
        ) from error
    return [topics[key].strip() for key in sorted(topics) if topics[key].strip()]


def read_documents(paths: Sequence[str]) -> list[str]:
    """One document per file (UTF-8); missing, unreadable, binary or empty files are user errors, invalid UTF-8 is read
    with replacement characters and a warning."""
    documents = []
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"data file not found: {path}")
        if os.path.isdir(path):
            raise ValueError(f"data path is a directory, expected a text file: {path}")
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except OSError as error:
            raise ValueError(f"cannot read data file {path}: {error.strerror or error}") from error
        if b"\0" in raw:
            raise ValueError(f"data file {path} looks binary or UTF-16 (it holds NUL bytes); pass UTF-8 text files")
        text = raw.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") - raw.count("\ufffd".encode())
        if bad:
            logger.warning_once(
                f"data file {path} is not valid UTF-8: {bad} undecodable byte sequence(s) read as U+FFFD; convert it "
                "to UTF-8 (e.g. iconv -f latin1 -t utf-8) to train on its real characters"
            )
        if not text.strip():
            raise ValueError(f"data file is empty: {path}")
        documents.append(text.strip())
    return documents


def _truncate(documents: list[str], max_chars: int) -> list[str]:
    kept, total = [], 0
    for text in documents:
        if total >= max_chars:
            break
        kept.append(text[: max_chars - total])
        total += len(kept[-1])
    return kept


def _split_point(text: str, position: int) -> int:
    """A cut near `position`, moved back to a paragraph, line or word boundary when there is one."""
    for boundary in ("\n\n", "\n", " "):
        found = text.rfind(boundary, 0, position)
        if found > 0:
            return found
    return position


def load_corpus(
    data_files: Optional[Sequence[str]] = None,
    eval_fraction: float = 0.05,
    max_chars: Optional[int] = None,
) -> Corpus:
    """Load `data_files` (or the bundled corpus), cap it at `max_chars`, hold out the last `eval_fraction` of it.

    The held-out part is the end of the text (cut at a paragraph, line or word boundary), so none of it is seen in
    training, and the split is the same on every run and in every process (`--resume`, data parallelism).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in (0, 1), got {eval_fraction}")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"--max-train-chars must be positive, got {max_chars}")
    if data_files:
        documents, source = read_documents(data_files), ", ".join(os.path.basename(p) for p in data_files)
    else:
        documents, source = bundled_documents(), f"`{BUNDLED_CORPUS_NAME}` (the Python documentation bundled with CPython)"
    if max_chars is not None:
        documents = _truncate(documents, max_chars)

    train, held_out = list(documents), []
    need = eval_fraction * sum(len(text) for text in documents)
    while need > 0 and train:
        text = train.pop()
        if len(text) <= need:
            held_out.insert(0, text)
            need -= len(text)
            continue
        cut = _split_point(text, len(text) - int(need))
        head, tail = text[:cut].strip(), text[cut:].strip()
        if head:
            train.append(head)
        if tail:
            held_out.insert(0, tail)
        break
    if not train or not held_out:
        raise ValueError(
            f"the training text ({sum(len(t) for t in documents)} characters) is too small to hold out an "
            "evaluation split; pass more text"
        )
    return Corpus(train=train, eval=held_out, source=source)


__all__ = ["Corpus", "bundled_documents", "load_corpus", "read_documents"]
