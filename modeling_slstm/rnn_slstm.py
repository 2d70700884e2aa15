"""`sLSTM`: a stacked sLSTM with the calling convention of `torch.nn.LSTM`.

    rnn = sLSTM(input_size=32, hidden_size=64, num_layers=2, dropout=0.1, num_heads=4)
    outputs, (h, c, n, m) = rnn(inputs)                 # inputs (S, B, 32); outputs (S, B, 64); h ... (2, B, 64)
    more, state = rnn(next_inputs, (h, c, n, m))        # continues exactly where the first call stopped
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from .slstm_op import FORGET_GATES, slstm_scan


logger = logging.get_logger(__name__)


class sLSTM(nn.Module):  # noqa: N801  (the name the project promises)
    """Multi-layer sLSTM. Per layer l: gates = W_l x_t + R_l h_{t-1} + b_l (R block-diagonal over `num_heads`).

    Args:
        input_size: features of x.
        hidden_size: features of h (H); must be divisible by `num_heads`.
        num_layers: stacked layers; layer l > 0 reads the outputs of layer l - 1.
        dropout: dropout on the outputs of every layer but the last (as nn.LSTM), in training mode only.
        batch_first: inputs and outputs are (B, S, *) instead of (S, B, *). The state is always (num_layers, B, H).
        num_heads: heads of the block-diagonal recurrence; 1 = full memory mixing like a classic LSTM.
        bias: learn the gate bias b_l.
        forget_gate: "sigmoid" (default) or "exp".

    Parameters, per layer l: `weight_ih_l{l}` (4H, input), rows ordered head-major [head, gate i f z o, unit];
    `weight_hh_l{l}` (NH, DH, 4*DH); `bias_l{l}` (NH, 4*DH). All start U(-1/sqrt(H), 1/sqrt(H)) as nn.LSTM.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        batch_first: bool = False,
        num_heads: int = 1,
        bias: bool = True,
        forget_gate: str = "sigmoid",
    ):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                            ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sLSTM: {name} must be a positive integer, got {value!r}.")
        if hidden_size % num_heads:
            raise ValueError(f"sLSTM: hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"sLSTM: dropout must be a probability in [0, 1), got {dropout!r}.")
        if forget_gate not in FORGET_GATES:
            raise ValueError(f"sLSTM: forget_gate must be one of {FORGET_GATES}, got {forget_gate!r}.")
        if dropout > 0 and num_layers == 1:
            logger.warning_once(
                f"sLSTM: dropout={dropout} has no effect with num_layers=1: as in nn.LSTM, dropout applies to the "
                "outputs of every layer but the last. Use num_layers > 1, or dropout on the outputs yourself."
            )
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.dropout, self.batch_first, self.num_heads, self.bias = float(dropout), batch_first, num_heads, bias
        self.forget_gate = forget_gate
        head_dim = hidden_size // num_heads
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(4 * hidden_size, layer_input)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(num_heads, head_dim, 4 * head_dim)))
            bias_param = nn.Parameter(torch.empty(num_heads, 4 * head_dim)) if bias else None
            self.register_parameter(f"bias_l{layer}", bias_param)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.hidden_size)
        for param in self.parameters():
            nn.init.uniform_(param, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, num_heads={self.num_heads}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}, bias={self.bias}"
        )

    def forward(
        self, inputs: torch.Tensor, hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """inputs (S, B, input_size) [(B, S, input_size) if batch_first, or unbatched (S, input_size)];
        hidden_states: (h, c, n, m), each (num_layers, B, H) [(num_layers, H) unbatched], default zeros.

        Returns outputs of the last layer, (S, B, H) [(B, S, H) / (S, H)], and the final (h, c, n, m), float32.
        """
        unbatched = inputs.dim() == 2
        if inputs.dim() not in (2, 3) or inputs.shape[-1] != self.input_size:
            raise ValueError(
                f"sLSTM expects inputs of shape (seq_len, batch, {self.input_size})"
                f"{' with batch_first=True: (batch, seq_len, ...)' if self.batch_first else ''} or unbatched "
                f"(seq_len, {self.input_size}); got {tuple(inputs.shape)}."
            )
        x = inputs.unsqueeze(0) if unbatched else (inputs if self.batch_first else inputs.transpose(0, 1))  # (B, S, I)
        batch_size, seq_len = x.shape[:2]
        states = self._split_state(hidden_states, batch_size, unbatched, x.device)

        nh, dh = self.num_heads, self.hidden_size // self.num_heads
        finals = []
        for layer in range(self.num_layers):
            weight_ih = getattr(self, f"weight_ih_l{layer}")
            gates = F.linear(x, weight_ih).view(batch_size, seq_len, nh, 4 * dh)  # (B, S, NH, 4*DH)
            out, final = slstm_scan(
                gates,
                getattr(self, f"weight_hh_l{layer}"),
                getattr(self, f"bias_l{layer}"),
                states[layer] if states is not None else None,
                None,
                self.forget_gate,
            )
            x = out.flatten(-2)  # (B, S, NH, DH) -> (B, S, H)
            if layer < self.num_layers - 1 and self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
            finals.append(final)

        # per layer (h, c, n, m) of (B, NH, DH) -> four tensors (num_layers, B, H)
        state_out = tuple(torch.stack([f[k].flatten(-2) for f in finals]) for k in range(4))
        if unbatched:
            return x[0], tuple(s[:, 0] for s in state_out)
        return (x if self.batch_first else x.transpose(0, 1)), state_out

    def _split_state(self, hidden_states, batch_size: int, unbatched: bool, device) -> Optional[list]:
        """(h, c, n, m) of (L, B, H) -> per layer (h, c, n, m) of (B, NH, DH) float32."""
        if hidden_states is None:
            return None
        expected = (self.num_layers, self.hidden_size) if unbatched else (self.num_layers, batch_size, self.hidden_size)
        if not isinstance(hidden_states, (tuple, list)) or len(hidden_states) != 4:
            raise ValueError("sLSTM: hidden_states must be a tuple (h, c, n, m), as returned by a previous call.")
        for name, tensor in zip("hcnm", hidden_states):
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != expected:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"sLSTM: hidden state {name} must have shape {expected}, got {shape}.")
        nh, dh = self.num_heads, self.hidden_size // self.num_heads
        per_tensor = [t.to(device=device, dtype=torch.float32).view(self.num_layers, batch_size, nh, dh)
                      for t in hidden_states]
        return [tuple(t[layer] for t in per_tensor) for layer in range(self.num_layers)]


__all__ = ["sLSTM"]
