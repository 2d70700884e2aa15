"""Convert a transformers sLSTM folder back into an official NX-AI xLSTM state_dict and config.

    python convert/convert_hf_to_xlstm.py --model DIR --output-dir OUT [--layout vanilla|cuda]
        [--format pt|safetensors] [--config-format json|yaml] [--overwrite]

OUT gets `model.pt` (or `model.safetensors`) for `xLSTMLMModel.load_state_dict(..., strict=True)` and `config.json`
(or `config.yaml`), the bare `xLSTMLMModelConfig` dict. Configs the official model cannot express (e.g.
forget_gate="exp") are refused: one `error: ...` line, exit code 2, nothing written.
"""

import argparse
import sys

from transformers.utils import logging
from xlstm_mapping import convert_hf_to_xlstm


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a folder saved with save_pretrained")
    parser.add_argument("--output-dir", required=True, help="folder to create (must be empty or absent)")
    parser.add_argument("--layout", choices=("vanilla", "cuda"), default="vanilla",
                        help="official backend whose parameter layout to write (default: vanilla)")
    parser.add_argument("--format", choices=("pt", "safetensors"), default="pt", help="state_dict file format")
    parser.add_argument("--config-format", choices=("json", "yaml"), default="json", help="config file format")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    args = parser.parse_args(argv)
    logging.disable_progress_bar()
    try:
        result = convert_hf_to_xlstm(
            args.model, args.output_dir, layout=args.layout, file_format=args.format,
            config_format=args.config_format, overwrite=args.overwrite,
        )
    except ValueError as err:  # a refusal: nothing was written
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. no space or permission while writing; the partial output was removed
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {result['checkpoint']} ({result['layout']} layout) and {result['config']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
