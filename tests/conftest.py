"""Shared helpers: tiny configs and models whose every parameter is random (the official init zeros R)."""

import pytest
import torch

from modeling_slstm import SLSTMConfig, SLSTMForCausalLM


# Tiny models: one thread avoids OpenMP spin contention, which makes microsecond ops take milliseconds on 2 cores.
torch.set_num_threads(1)

def tiny_config(**overrides) -> SLSTMConfig:
    fields = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_heads=4, conv1d_kernel_size=4)
    fields.update(overrides)
    return SLSTMConfig(**fields)


@torch.no_grad()
def randomize_(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random non-zero values, so no path (R, biases, norms, conv) hides behind a zero init."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return model


def random_model(seed: int = 0, **overrides) -> SLSTMForCausalLM:
    torch.manual_seed(seed)
    return randomize_(SLSTMForCausalLM(tiny_config(**overrides)), seed=seed).eval()


@pytest.fixture
def model() -> SLSTMForCausalLM:
    return random_model()
