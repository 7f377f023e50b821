"""``RNN``, ``LSTM`` and ``GRU`` layers: torch.nn's interface, our equations.

Constructor arguments, call signature, return values, parameter names, shapes and gate
order are torch.nn's, so ``ours.load_state_dict(theirs.state_dict())`` works both ways.
What torch.nn cannot do is added on top:

* ``layer.trace(input)`` returns, beside the usual outputs, every gate and state of every
  layer, direction and time step (a :class:`Trace`);
* ``implementation=`` names the loop that runs (see :mod:`whiteboard.backends`): by default
  the fastest that can run the call; ``"reference"`` is the plain loop over
  :mod:`whiteboard.nn.cells`;
* ``lengths=`` gives per-sequence lengths for a padded batch without packing it;
* ``RNN(nonlinearity="sigmoid")``, the seed's own choice, beside tanh and relu.

Parameter layout, per layer ``k`` and direction (suffix ``_reverse`` for backward)::

    weight_ih_l{k}  (G*H, I_k)   I_0 = input_size, I_k = D*H after the first layer
    weight_hh_l{k}  (G*H, H)
    bias_ih_l{k}    (G*H,)
    bias_hh_l{k}    (G*H,)

with G = 1 (RNN), 4 (LSTM: i|f|g|o) or 3 (GRU: r|z|n), D = 2 if bidirectional else 1.
"""

from __future__ import annotations

import math

import torch

from whiteboard.nn import cells
from whiteboard.nn.recurrent import SEED_NAMES, TRACE_FIELDS, Trace, _RecurrentBase  # noqa: F401 (their old home)

__all__ = ["RNN", "LSTM", "GRU", "LayerNormLSTM", "Trace", "TRACE_FIELDS", "SEED_NAMES"]


class RNN(_RecurrentBase):
    """Elman RNN, torch.nn.RNN-compatible, with the seed's sigmoid as a third choice.

    .. math::
        s_t = \\phi(W_{ih} x_t + b_{ih} + W_{hh} s_{t-1} + b_{hh}),
        \\quad \\phi \\in \\{\\tanh, \\mathrm{relu}, \\sigma\\}

    Args:
        input_size: features I of the input x.
        hidden_size: features H of the state s.
        num_layers: stacked layers L. Default 1.
        nonlinearity: ``'tanh'`` (default), ``'relu'`` or ``'sigmoid'``.
        bias: use ``bias_ih``/``bias_hh``. Default True.
        batch_first: input and output are (B, T, ·) instead of (T, B, ·). Default False.
        dropout: dropout on each layer's output except the last, in training. Default 0.
        bidirectional: add a layer that reads the sequence backwards. Default False.
        implementation: ``'auto'`` (default: the fastest backend that can run the call,
            see :func:`whiteboard.backends.explain`), ``'native'`` (the compiled loops),
            ``'fused'`` (the torch loop) or ``'reference'``.

    Shapes:
        input: (T, B, I), (B, T, I) if batch_first, (T, I) unbatched, or a PackedSequence.
        h_0: (L*D, B, H) or (L*D, H) unbatched; zeros if omitted.
        output: (T, B, D*H) ((B, T, D*H) if batch_first), or a PackedSequence.
        h_n: (L*D, B, H).

    Example:
        >>> rnn = RNN(10, 20, num_layers=2)
        >>> output, h_n = rnn(torch.randn(5, 3, 10))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
    """

    mode = "RNN"
    gate_count = 1

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh", *args, **kwargs):
        if nonlinearity not in cells.NONLINEARITIES:
            raise ValueError(f"Unknown nonlinearity {nonlinearity!r}. Select from {tuple(cells.NONLINEARITIES)}.")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, *args, **kwargs)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", nonlinearity={self.nonlinearity!r}" if self.nonlinearity != "tanh" else "")


class LSTM(_RecurrentBase):
    """LSTM, torch.nn.LSTM-compatible (no peepholes), with torch.nn's ``proj_size``.

    .. math::
        i_t = \\sigma(W_{ii} x_t + b_{ii} + W_{hi} h_{t-1} + b_{hi})    input gate  (selective read)
        f_t = \\sigma(W_{if} x_t + b_{if} + W_{hf} h_{t-1} + b_{hf})    forget gate (selective forget)
        g_t = \\tanh(W_{ig} x_t + b_{ig} + W_{hg} h_{t-1} + b_{hg})     candidate
        o_t = \\sigma(W_{io} x_t + b_{io} + W_{ho} h_{t-1} + b_{ho})    output gate (selective write)
        c_t = f_t \\odot c_{t-1} + i_t \\odot g_t                        cell state  (the whiteboard)
        h_t = o_t \\odot \\tanh(c_t)       (proj_size > 0: h_t = W_{hr} (o_t \\odot \\tanh(c_t)), LSTMP)

    Args: as :class:`RNN` without ``nonlinearity``, and
        proj_size: P > 0 projects h to P features (Sak et al. 2014), as torch.nn does: h_0,
            h_n and the output are P wide (c stays H), ``weight_hr_l{k}`` is (P, H) and
            ``weight_hh_l{k}`` (4H, P). Runs on the torch loop and the reference.
        forget_bias: where set, the forget gates' summed bias starts at this value.

    Shapes:
        input: (T, B, I), (B, T, I) if batch_first, (T, I) unbatched, or a PackedSequence.
        (h_0, c_0): each (L*D, B, H) or (L*D, H) unbatched; zeros if omitted.
        output: (T, B, D*H) ((B, T, D*H) if batch_first), or a PackedSequence.
        (h_n, c_n): each (L*D, B, H).

    Attributes:
        weight_ih_l{k}: (4H, I_k), rows i|f|g|o.  weight_hh_l{k}: (4H, H).
        bias_ih_l{k}, bias_hh_l{k}: (4H,).

    Example:
        >>> lstm = LSTM(10, 20, num_layers=2)
        >>> output, (h_n, c_n) = lstm(torch.randn(5, 3, 10))
        >>> output.shape, h_n.shape, c_n.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]), torch.Size([2, 3, 20]))
    """

    mode = "LSTM"
    gate_count = 4

    def __init__(self, *args, proj_size: int = 0, forget_bias: float | None = None, **kwargs):
        if len(args) > 7:  # torch.nn.LSTM's positional order: ..., bidirectional, proj_size, device, dtype
            proj_size, args = args[7], args[:7] + args[8:]
        if proj_size and self.layer_norm:
            raise ValueError("LayerNormLSTM: proj_size (projections) is not supported; use proj_size=0")
        kwargs["proj_size"] = proj_size
        if forget_bias is not None and not math.isfinite(forget_bias):
            raise ValueError(f"forget_bias must be a finite number, got {forget_bias!r}")
        self.forget_bias = None if forget_bias is None else float(forget_bias)
        super().__init__(*args, **kwargs)


class GRU(_RecurrentBase):
    """GRU, torch.nn.GRU-compatible, gate order r, z, n.

    .. math::
        r_t = \\sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr})   reset gate
        z_t = \\sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz})   update gate
        n_t = \\tanh(W_{in} x_t + b_{in} + r_t \\odot (W_{hn} h_{t-1} + b_{hn}))   candidate
        h_t = (1 - z_t) \\odot n_t + z_t \\odot h_{t-1}

    Args and shapes: as :class:`RNN` without ``nonlinearity``.

    Example:
        >>> gru = GRU(10, 20)
        >>> output, h_n = gru(torch.randn(5, 3, 10))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 20]), torch.Size([1, 3, 20]))
    """

    mode = "GRU"
    gate_count = 3


class LayerNormLSTM(LSTM):
    """Layer-normalized LSTM (Ba, Kiros & Hinton 2016), an LSTM with the same interface.

    .. math::
        (i, f, g, o)_t = \\mathrm{LN}(W_{ih} x_t; \\alpha_{ih}) + \\mathrm{LN}(W_{hh} h_{t-1}; \\alpha_{hh}) + b_{ih} + b_{hh}
        c_t = \\sigma(f_t) \\odot c_{t-1} + \\sigma(i_t) \\odot \\tanh(g_t)
        h_t = \\sigma(o_t) \\odot \\tanh(\\mathrm{LN}(c_t; \\alpha_c, \\beta_c))

    Normalizing each projection keeps the gates' pre-activations at unit scale whatever the
    size of the weights or of the inputs, which steadies training of deep and long-unrolled
    stacks. The state, returns and trace fields are the LSTM's.

    Parameters: torch.nn.LSTM's four per layer and direction (so an ``nn.LSTM`` state dict
    loads with ``strict=False``), plus ``gain_ih_l{k}`` (4H), ``gain_hh_l{k}`` (4H),
    ``gain_cell_l{k}`` (H) and ``bias_cell_l{k}`` (H); gains start at 1 and the shift at 0.

    Implementations: ``reference`` (:func:`whiteboard.nn.cells.layernorm_lstm_step` per step)
    and ``fused`` (:class:`whiteboard.backends.layer_norm.FusedLayerNormLSTM`, hand-written backward);
    ``auto`` picks ``fused``. There is no compiled loop for this cell yet.
    """

    eps = cells.LAYER_NORM_EPS
    layer_norm = True

    def _extra_parameter_sizes(self) -> dict[str, int]:
        H = self.hidden_size
        return {"gain_ih": 4 * H, "gain_hh": 4 * H, "gain_cell": H, "bias_cell": H}

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.reset_normalization()

    def reset_normalization(self) -> None:
        """Gains to 1 and the cell's shift to 0: the normalizations start as plain standardization."""
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if name.startswith("gain_"):
                    parameter.fill_(1.0)
                elif name.startswith("bias_cell"):
                    parameter.zero_()

    def _layer_weights(self, suffix: str, w_ih, w_hh) -> tuple:
        """(weight_ih, weight_hh, bias_ih, bias_hh, gain_ih, gain_hh, gain_cell, bias_cell)."""
        names = ("gain_ih", "gain_hh", "gain_cell", "bias_cell")
        return (*super()._layer_weights(suffix, w_ih, w_hh), *(getattr(self, name + suffix) for name in names))
