"""The README.md (Hub model card) `slstm train` writes next to the model: what was trained, on what, how well."""

from pathlib import Path

from .configuration_slstm import SLSTMConfig
from .corpus import Corpus


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_model_card(config: SLSTMConfig, metrics: dict, options: dict, corpus: Corpus, name: str, path: str,
                      license: str = "apache-2.0") -> str:
    """Markdown with Hub metadata (licence included), the architecture, the training setup, the metrics and a usage
    snippet."""
    rows = [
        ("train loss (last logged)", metrics.get("last_logged_loss")),
        ("train loss (first logged)", metrics.get("first_logged_loss")),
        ("eval loss", metrics.get("eval_loss")),
        ("eval perplexity", metrics.get("eval_perplexity")),
        ("steps", metrics.get("global_step", options.get("max_steps"))),
        ("training time (s)", metrics.get("train_runtime")),
    ]
    results = "\n".join(f"| {label} | {_fmt(value)} |" for label, value in rows if value is not None)
    setup = [
        ("data", corpus.source),
        ("characters (train / held-out eval)", f"{corpus.num_train_chars} / {corpus.num_eval_chars}"),
        ("tokens (train / eval)", f"{metrics.get('train_tokens')} / {metrics.get('eval_tokens')}"),
        ("sequence length", options["seq_len"]),
        ("batch size per process x processes x accumulation",
         f"{options['batch_size']} x {metrics.get('world_size', 1)} x {options['gradient_accumulation_steps']}"),
        ("learning rate (AdamW, cosine, warmup)", options["lr"]),
        ("bf16 autocast", options["bf16"]),
        ("seed", options["seed"]),
    ]
    setup_rows = "\n".join(f"| {label} | {_fmt(value)} |" for label, value in setup)
    return f"""---
library_name: transformers
license: {license}
pipeline_tag: text-generation
tags:
- slstm
- xlstm
- recurrent
- text-generation
---

# {name}

An sLSTM language model (the sLSTM-only xLSTM of Beck et al., 2024, [arXiv:2405.04517](https://arxiv.org/abs/2405.04517)),
trained from scratch with `slstm train` of the `modeling_slstm` package.

## Model

| | |
|---|---|
| parameters | {metrics.get('num_parameters', 0) / 1e6:.2f}M |
| blocks x hidden size | {config.num_hidden_layers} x {config.hidden_size} |
| heads | {config.num_heads} |
| vocabulary | {config.vocab_size} (byte-level BPE) |
| conv kernel / FFN width | {config.conv1d_kernel_size} / {config.ffn_dim} |

## Training

| | |
|---|---|
{setup_rows}

## Results

| metric | value |
|---|---|
{results}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

# trust_remote_code runs the model code saved with the weights; after `import modeling_slstm` it is not needed.
tokenizer = AutoTokenizer.from_pretrained("{path}", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True)
inputs = tokenizer("The ", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=50)[0]))
```

or `slstm generate {path} --prompt "The "`.
"""


def write_model_card(output_dir, config: SLSTMConfig, metrics: dict, options: dict, corpus: Corpus,
                     license: str = "apache-2.0") -> Path:
    path = Path(output_dir) / "README.md"
    path.write_text(render_model_card(config, metrics, options, corpus, name=Path(output_dir).name,
                                      path=str(output_dir), license=license))
    return path


__all__ = ["render_model_card", "write_model_card"]
