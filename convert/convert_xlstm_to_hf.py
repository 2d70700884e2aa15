"""Convert an official NX-AI xLSTM sLSTM language model checkpoint into a transformers folder.

    python convert/convert_xlstm_to_hf.py --config CONFIG --checkpoint CKPT --output-dir DIR [--overwrite]

CONFIG: the official `xLSTMLMModelConfig` as YAML or JSON (bare, or under a top-level `model:` key).
CKPT: its state_dict (.pt/.pth/.bin or .safetensors), vanilla or CUDA backend layout (detected).
DIR: loads with `AutoModelForCausalLM.from_pretrained(DIR)` after `import modeling_slstm`, or with
`trust_remote_code=True`. Refusals print one `error: ...` line and exit with code 2, writing nothing.
"""

import argparse
import sys

from transformers.utils import logging
from xlstm_mapping import convert_xlstm_to_hf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="official model config, .yaml/.yml or .json")
    parser.add_argument("--checkpoint", required=True, help="official state_dict, .pt/.pth/.bin or .safetensors")
    parser.add_argument("--output-dir", required=True, help="folder to create (must be empty or absent)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    args = parser.parse_args(argv)
    logging.disable_progress_bar()
    try:
        result = convert_xlstm_to_hf(args.config, args.checkpoint, args.output_dir, overwrite=args.overwrite)
    except ValueError as err:  # a refusal: nothing was written
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. no space or permission while writing; the partial output was removed
        print(f"error: {err}", file=sys.stderr)
        return 1
    prefix = f", key prefix {result['prefix']!r} removed" if result["prefix"] else ""
    print(f"converted {args.checkpoint} ({result['layout']} layout{prefix}) -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
