"""Output folders that never swallow their inputs: refuse to write where an input lives, and on `--overwrite` remove
only the files a tool writes (matched by name), never anything else a user keeps there."""

import fnmatch
import shutil
from pathlib import Path
from typing import Iterable, Optional

# What save_pretrained writes for a model and a tokenizer (weights, configs, tokenizer files, the copied model code).
MODEL_FOLDER_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "pytorch_model.bin", "README.md", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "training_args.bin", "all_results.json",
)


def model_code_files() -> tuple[str, ...]:
    """The module files save_pretrained copies beside the weights: the config and modeling files and their imports."""
    from transformers.dynamic_module_utils import get_relative_import_files

    here = Path(__file__).parent
    files = {here / "configuration_slstm.py", here / "modeling_slstm.py"}
    for start in list(files):
        files.update(Path(f) for f in get_relative_import_files(str(start)))
    return tuple(sorted(f.name for f in files))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def refuse_overlap(outputs: dict[str, Optional[str]], inputs: dict[str, Iterable[str]]) -> None:
    """ValueError when an output folder is, holds or sits inside an input (file or folder).

    outputs: {flag: folder}; inputs: {flag: paths} (paths that do not exist, e.g. Hub ids, are ignored).
    """
    for out_flag, out in outputs.items():
        if out is None:
            continue
        out_path = Path(out).resolve()
        for in_flag, paths in inputs.items():
            for given in paths:
                if not given or not Path(given).exists():
                    continue
                path = Path(given).resolve()
                if _inside(path, out_path) or (path.is_dir() and _inside(out_path, path)):
                    where = "is" if path == out_path else "holds" if _inside(path, out_path) else "is inside"
                    raise ValueError(
                        f"{out_flag} {out} {where} the input {in_flag} {given}; writing there could destroy it. "
                        f"Choose an {out_flag} outside your inputs (or copy the input elsewhere first)."
                    )


def written_by_tool(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def remove_tool_files(folder, patterns: Iterable[str]) -> list[str]:
    """Delete the entries of `folder` whose names match `patterns` (files or folders); returns their names."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        if written_by_tool(entry.name, patterns):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry.name)
    return removed


__all__ = ["MODEL_FOLDER_FILES", "model_code_files", "refuse_overlap", "remove_tool_files", "written_by_tool"]
