"""One time step of each recurrent cell, written as its equations.

These functions are the reference: slow, obvious, and the oracle every fast path is
tested against. They know nothing about time loops, layers or corpora.

Shapes (glossary in the package docstring): ``x`` is (B, I), states are (B, H),
``w_ih`` is (G*H, I) and ``w_hh`` is (G*H, H) with G gates stacked in torch.nn's order.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "RNNStep",
    "LSTMStep",
    "GRUStep",
    "rnn_step",
    "lstm_step",
    "gru_step",
    "layer_norm",
    "layernorm_lstm_step",
    "LAYER_NORM_EPS",
    "NONLINEARITIES",
    "TRACE_FIELDS",
    "zoneout_mix",
]

#: What each cell records per step in a trace (whiteboard.nn.layers.Trace), in order.
TRACE_FIELDS: dict[str, tuple[str, ...]] = {
    "RNN": ("preactivation", "hidden"),
    "LSTM": ("input_gate", "forget_gate", "cell_candidate", "output_gate", "cell", "hidden"),
    "GRU": ("reset_gate", "update_gate", "candidate", "hidden"),
}

NONLINEARITIES: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    # The seed writes the vanilla RNN with a sigmoid; torch.nn offers only tanh/relu.
    "sigmoid": torch.sigmoid,
}


class RNNStep(NamedTuple):
    hidden: Tensor  # s_t, (B, H)
    preactivation: Tensor  # U x_t + W s_{t-1} + b, (B, H)


class LSTMStep(NamedTuple):
    hidden: Tensor  # h_t, (B, H)
    cell: Tensor  # s_t, the whiteboard, (B, H)
    input_gate: Tensor  # i_t, selective read
    forget_gate: Tensor  # f_t, selective forget
    cell_candidate: Tensor  # s~_t (torch.nn's g_t), what could be written
    output_gate: Tensor  # o_t, selective write


class GRUStep(NamedTuple):
    hidden: Tensor  # h_t, (B, H)
    reset_gate: Tensor  # r_t
    update_gate: Tensor  # z_t
    candidate: Tensor  # n_t


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def rnn_step(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    nonlinearity: str = "tanh",
) -> RNNStep:
    """Vanilla RNN step.

    .. math::
        a_t = U x_t + b_{ih} + W s_{t-1} + b_{hh}
        s_t = \\phi(a_t)

    ``U`` is ``w_ih`` (H, I), ``W`` is ``w_hh`` (H, H), ``phi`` one of ``NONLINEARITIES``.
    """
    phi = NONLINEARITIES[nonlinearity]
    a = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)  # (B, H)
    return RNNStep(hidden=phi(a), preactivation=a)


def lstm_step(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    w_hr: Tensor | None = None,
) -> LSTMStep:
    """LSTM step, exactly torch.nn.LSTM's (no peepholes), gate order i, f, g, o; with
    ``w_hr`` (P, H) the LSTM with projections (LSTMP, Sak et al. 2014), whose h is P wide.

    .. math::
        i_t = \\sigma(U_i x_t + W_i h_{t-1} + b_i)      selective read
        f_t = \\sigma(U_f x_t + W_f h_{t-1} + b_f)      selective forget
        g_t = \\tanh(U_g x_t + W_g h_{t-1} + b_g)       candidate
        o_t = \\sigma(U_o x_t + W_o h_{t-1} + b_o)      selective write
        c_t = f_t \\odot c_{t-1} + i_t \\odot g_t        the whiteboard
        h_t = o_t \\odot \\tanh(c_t)                 (LSTMP: h_t = W_hr (o_t \\odot \\tanh(c_t)))
    """
    z = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)  # (B, 4H)
    i, f, g, o, c_new = _lstm_gates_and_cell(z, c)
    h_new = o * torch.tanh(c_new)
    if w_hr is not None:
        h_new = _linear(h_new, w_hr, None)  # (B, P)
    return LSTMStep(h_new, c_new, i, f, g, o)


def _lstm_gates_and_cell(z: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Pre-activations z (B, 4H) in gate order i, f, g, o -> (i, f, g, o, c_t)."""
    zi, zf, zg, zo = z.chunk(4, dim=-1)  # 4 x (B, H)
    i = torch.sigmoid(zi)
    f = torch.sigmoid(zf)
    g = torch.tanh(zg)
    o = torch.sigmoid(zo)
    c_new = f * c + i * g
    return i, f, g, o, c_new


#: Added to the variance in :func:`layer_norm` (torch.nn.LayerNorm's default).
LAYER_NORM_EPS = 1e-5


def layer_norm(z: Tensor, gain: Tensor, bias: Tensor | None = None, eps: float = LAYER_NORM_EPS) -> Tensor:
    """Normalize over the last dimension, then scale and shift (Ba et al. 2016).

    .. math:: \\mathrm{LN}(z; \\alpha, \\beta) = \\alpha \\odot (z - \\mu) / \\sqrt{\\sigma^2 + \\epsilon} + \\beta

    with the mean and (biased) variance taken over the features of each row.
    """
    mean = z.mean(-1, keepdim=True)
    variance = ((z - mean) ** 2).mean(-1, keepdim=True)
    normalized = (z - mean) / torch.sqrt(variance + eps) * gain
    return normalized if bias is None else normalized + bias


def layernorm_lstm_step(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    gain_ih: Tensor,
    gain_hh: Tensor,
    gain_cell: Tensor,
    bias_cell: Tensor,
) -> LSTMStep:
    """Layer-normalized LSTM step (Ba, Kiros & Hinton 2016, section 3.1), gate order i, f, g, o.

    .. math::
        z_t = \\mathrm{LN}(U x_t; \\alpha_{ih}) + \\mathrm{LN}(W h_{t-1}; \\alpha_{hh}) + b
        i_t, f_t, o_t = \\sigma(z_t^{i,f,o}),\\quad g_t = \\tanh(z_t^{g})
        c_t = f_t \\odot c_{t-1} + i_t \\odot g_t
        h_t = o_t \\odot \\tanh(\\mathrm{LN}(c_t; \\alpha_c, \\beta_c))

    The input and recurrent projections are each normalized over all 4H gate rows
    together, so neither can drown the other out whatever the scale of x or h. The paper
    gives those two normalizations a shift too; it would only duplicate ``b`` (here
    ``b_ih + b_hh``, torch.nn's layout), so they have a gain alone.
    """
    z = layer_norm(x @ w_ih.T, gain_ih) + layer_norm(h @ w_hh.T, gain_hh)  # (B, 4H)
    if b_ih is not None:
        z = z + b_ih + b_hh
    i, f, g, o, c_new = _lstm_gates_and_cell(z, c)
    h_new = o * torch.tanh(layer_norm(c_new, gain_cell, bias_cell))
    return LSTMStep(h_new, c_new, i, f, g, o)


def gru_step(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> GRUStep:
    """GRU step, exactly torch.nn.GRU's, gate order r, z, n.

    .. math::
        r_t = \\sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr})
        z_t = \\sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz})
        n_t = \\tanh(W_{in} x_t + b_{in} + r_t \\odot (W_{hn} h_{t-1} + b_{hn}))
        h_t = (1 - z_t) \\odot n_t + z_t \\odot h_{t-1}
    """
    xr, xz, xn = _linear(x, w_ih, b_ih).chunk(3, dim=-1)  # 3 x (B, H)
    hr, hz, hn = _linear(h, w_hh, b_hh).chunk(3, dim=-1)  # 3 x (B, H)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    h_new = (1 - z) * n + z * h
    return GRUStep(h_new, r, z, n)


def zoneout_mix(new: Tensor, old: Tensor, p: float, training: bool) -> Tensor:
    """Zoneout's state update (Krueger et al. 2017): keep ``old`` with probability p per
    element (training), or mix by p (evaluation)."""
    if p == 0:
        return new
    if training:
        keep = torch.empty_like(new).bernoulli_(p).bool()
        return torch.where(keep, old, new)
    return p * old + (1 - p) * new
