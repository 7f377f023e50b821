"""``RNNCell``, ``LSTMCell``, ``GRUCell`` and ``LayerNormLSTMCell``: one time step as a
module, with torch.nn's signatures, parameter names (``weight_ih``, ``weight_hh``,
``bias_ih``, ``bias_hh``), initialisation, unbatched input and exception words, so
``ours.load_state_dict(theirs.state_dict())`` works both ways. They are what attention
decoders and RL policies are written with: the caller owns the loop over time.

Each step is :mod:`whiteboard.nn.cells`' equations, and each cell has ``trace(input, hx)``,
which returns the step's gates beside its usual result.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from whiteboard.nn import cells

__all__ = ["RNNCell", "LSTMCell", "GRUCell", "LayerNormLSTMCell"]


class _CellBase(nn.Module):
    """torch.nn.RNNCellBase's parameters and checks; subclasses set ``gate_count`` and ``mode``."""

    gate_count: int
    mode: str

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        rows = self.gate_count * hidden_size
        self.weight_ih = nn.Parameter(torch.empty((rows, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((rows, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(rows, **factory))
            self.bias_hh = nn.Parameter(torch.empty(rows, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self._add_parameters(factory)
        self.reset_parameters()

    def _add_parameters(self, factory: dict) -> None:
        """Parameters beyond torch.nn's four."""

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity}"
        return s

    def forward(self, input: Tensor, hx=None):
        result, _ = self._step(input, hx)
        return result

    def trace(self, input: Tensor, hx=None):
        """Like ``forward``, and also the step's gates and states: ``(result, fields)`` with
        fields a dict of ``whiteboard.TRACE_FIELDS[mode]`` names, each (B, H) ((H,) unbatched)."""
        result, record = self._step(input, hx)
        unbatched = input.dim() == 1
        fields = {name: getattr(record, name) for name in cells.TRACE_FIELDS[self.mode]}
        return result, {k: v.squeeze(0) for k, v in fields.items()} if unbatched else fields

    # torch.nn's checks, in its words (nn/modules/rnn.py and ATen's RNN.cpp)

    def _check_input(self, input: Tensor) -> bool:
        """Whether the input is batched, after torch.nn's rank check."""
        if input.dim() not in (1, 2):
            raise ValueError(f"{type(self).__name__.replace('LayerNorm', '')}: Expected input to be 1D or 2D, "
                             f"got {input.dim()}D instead")
        return input.dim() == 2

    def _check_sizes(self, input: Tensor, states: list[Tensor], labels: list[str]) -> None:
        if input.shape[1] != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.shape[1]} expected {self.input_size}")
        for state, label in zip(states, labels):
            if input.shape[0] != state.shape[0]:
                raise RuntimeError(f"Input batch size {input.shape[0]} doesn't match hidden{label} batch size "
                                   f"{state.shape[0]}")
            if state.shape[1] != self.hidden_size:
                raise RuntimeError(f"hidden{label} has inconsistent hidden_size: got {state.shape[1]}, expected "
                                   f"{self.hidden_size}")

    def _one_state(self, input: Tensor, hx: Tensor | None) -> tuple[Tensor, Tensor, bool]:
        """(input (B, I), h (B, H), batched) for the cells with one state."""
        batched = self._check_input(input)
        name = type(self).__name__
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        x = input if batched else input.unsqueeze(0)
        h = x.new_zeros(x.shape[0], self.hidden_size) if hx is None else (hx if batched else hx.unsqueeze(0))
        self._check_sizes(x, [h], ["0"])
        return x, h, batched

    def _two_states(self, input: Tensor, hx) -> tuple[Tensor, Tensor, Tensor, bool]:
        """(input (B, I), h, c (B, H), batched) for the LSTMs."""
        batched = self._check_input(input)
        if hx is not None:
            for index, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{index}] to be 1D or 2D, got {value.dim()}D instead")
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            h, c = zeros, zeros
        else:
            h, c = (hx[0], hx[1]) if batched else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        self._check_sizes(x, [h, c], ["0", "1"])
        return x, h, c, batched

    def _weights(self) -> tuple:
        return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh


class RNNCell(_CellBase):
    """torch.nn.RNNCell: ``h' = phi(W_ih x + b_ih + W_hh h + b_hh)``, with the seed's
    ``nonlinearity="sigmoid"`` beside tanh and relu. ``forward(input, hx=None) -> h'``."""

    gate_count, mode = 1, "RNN"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, device, dtype)
        self.nonlinearity = nonlinearity

    def _step(self, input, hx):
        x, h, batched = self._one_state(input, hx)
        if self.nonlinearity not in cells.NONLINEARITIES:  # torch.nn.RNNCell refuses it here too
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        record = cells.rnn_step(x, h, *self._weights(), nonlinearity=self.nonlinearity)
        return (record.hidden if batched else record.hidden.squeeze(0)), record


class GRUCell(_CellBase):
    """torch.nn.GRUCell, gate order r, z, n. ``forward(input, hx=None) -> h'``."""

    gate_count, mode = 3, "GRU"

    def _step(self, input, hx):
        x, h, batched = self._one_state(input, hx)
        record = cells.gru_step(x, h, *self._weights())
        return (record.hidden if batched else record.hidden.squeeze(0)), record


class LSTMCell(_CellBase):
    """torch.nn.LSTMCell, gate order i, f, g, o. ``forward(input, (h, c)=None) -> (h', c')``."""

    gate_count, mode = 4, "LSTM"

    def _step(self, input, hx):
        x, h, c, batched = self._two_states(input, hx)
        record = self._lstm_step(x, h, c)
        result = (record.hidden, record.cell)
        return (result if batched else (result[0].squeeze(0), result[1].squeeze(0))), record

    def _lstm_step(self, x, h, c):
        return cells.lstm_step(x, h, c, *self._weights())


class LayerNormLSTMCell(LSTMCell):
    """One step of :class:`whiteboard.LayerNormLSTM`: an LSTMCell with ``gain_ih``, ``gain_hh``
    (4H), ``gain_cell`` and ``bias_cell`` (H) besides torch.nn's four parameters; gains start
    at 1 and the shift at 0."""

    def _add_parameters(self, factory: dict) -> None:
        H = self.hidden_size
        for name, size in (("gain_ih", 4 * H), ("gain_hh", 4 * H), ("gain_cell", H), ("bias_cell", H)):
            self.register_parameter(name, nn.Parameter(torch.empty(size, **factory)))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            for name in ("gain_ih", "gain_hh", "gain_cell"):
                getattr(self, name).fill_(1.0)
            self.bias_cell.zero_()

    def _lstm_step(self, x, h, c):
        return cells.layernorm_lstm_step(x, h, c, *self._weights(), self.gain_ih, self.gain_hh, self.gain_cell,
                                         self.bias_cell)
