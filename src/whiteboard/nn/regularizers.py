"""Regularizers for recurrent language models, each a small module named after its paper.

* :class:`LockedDropout` - variational dropout (Gal & Ghahramani 2016): one mask per
  sequence, the same at every time step.
* :class:`EmbeddingDropout` - drops whole words from the embedding matrix (Gal &
  Ghahramani 2016, as used in AWD-LSTM).
* :class:`WeightDrop` - DropConnect on the hidden-to-hidden weights (Wan et al. 2013,
  Merity et al. 2018): one mask per forward call, shared by every time step, so it works
  unchanged with the fused and compiled paths.
* :class:`Zoneout` - each unit keeps its previous value with probability p (Krueger et al.
  2016). It changes the recurrence itself, so it runs on the reference loop.
* :func:`activation_regularization` / :func:`temporal_activation_regularization` - AR and
  TAR (Merity et al. 2017): L2 penalties on the outputs and on their step-to-step change.

Every one is the identity in evaluation mode except zoneout, which (as in the paper, like
dropout's rescaling) uses its expectation there: h_t = p h_{t-1} + (1 - p) h~_t.
"""

from __future__ import annotations

from torch import Tensor, nn

from whiteboard.nn.cells import zoneout_mix  # noqa: F401 (part of the regularizers' API)
from whiteboard.nn.recurrent import _RecurrentBase


class LockedDropout(nn.Module):
    """x (T, B, F) -> x with one dropout mask per (sequence, feature), constant over time."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"LockedDropout: p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        mask = x.new_empty((1,) + x.shape[1:]).bernoulli_(1 - self.p) / (1 - self.p)  # (1, B, F)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class EmbeddingDropout(nn.Module):
    """An embedding lookup that drops whole rows (words) of the matrix in training: a
    dropped word is zero wherever it occurs in the batch. Call it with the embedding to
    use: ``EmbeddingDropout(0.1)(model.embedding, tokens)`` (it holds no weights itself)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"EmbeddingDropout: p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, embedding: nn.Embedding, tokens: Tensor) -> Tensor:
        weight = embedding.weight
        looked_up = nn.functional.embedding(tokens, weight, embedding.padding_idx)  # (..., E)
        if not self.training or self.p == 0:
            return looked_up
        mask = weight.new_empty((weight.shape[0], 1)).bernoulli_(1 - self.p) / (1 - self.p)  # (V, 1)
        # Scaling the looked-up rows equals looking up in the scaled matrix, without writing
        # (and back-propagating through) a V x E copy of it at every step.
        return looked_up * nn.functional.embedding(tokens, mask)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _call_with(layer: _RecurrentBase, hook: str, value, args, kwargs):
    """Call ``layer`` with one of its per-call hooks set, and always unset it after (an
    exception mid-call must not leave the regularizer switched on)."""
    setattr(layer, hook, value)
    try:
        return layer(*args, **kwargs)
    finally:
        setattr(layer, hook, None)


def _hidden_weight_names(layer: _RecurrentBase) -> list[str]:
    return [name for name, _ in layer.named_parameters() if name.startswith("weight_hh")]


class WeightDrop(nn.Module):
    """DropConnect on a whiteboard layer's ``weight_hh_*`` (AWD-LSTM's weight drop).

    The wrapped layer keeps its parameters and names (``module.layer.weight_hh_l0``); in
    training each call draws one mask per weight matrix and runs the layer with the
    dropped weights, whichever implementation it uses.
    """

    def __init__(self, layer: _RecurrentBase, p: float):
        super().__init__()
        if not isinstance(layer, _RecurrentBase):
            raise TypeError("WeightDrop wraps a whiteboard RNN/LSTM/GRU layer")
        if not 0 <= p < 1:
            raise ValueError(f"WeightDrop: p must be in [0, 1), got {p}")
        self.layer = layer
        self.p = p

    def forward(self, *args, **kwargs):
        if not self.training or self.p == 0:
            return self.layer(*args, **kwargs)
        dropped = {name: nn.functional.dropout(getattr(self.layer, name), self.p, training=True)
                   for name in _hidden_weight_names(self.layer)}
        return _call_with(self.layer, "_weight_overrides", dropped, args, kwargs)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Zoneout(nn.Module):
    """Zoneout on a whiteboard layer's states: per unit and step, keep the previous value
    with probability ``p`` (``p_cell`` for an LSTM's cell state; defaults to ``p``).

    In evaluation, ``eval_mode="expectation"`` (the default, Krueger et al. 2016, section 3:
    "as in dropout, we use the expectation of the random noise at test time") mixes
    ``p * previous + (1 - p) * new``; ``eval_mode="identity"`` runs the plain layer, like
    every other regularizer here in eval mode.
    """

    EVAL_MODES = ("expectation", "identity")

    def __init__(self, layer: _RecurrentBase, p: float, p_cell: float | None = None, eval_mode: str = "expectation"):
        super().__init__()
        for value in (p, p if p_cell is None else p_cell):
            if not 0 <= value <= 1:
                raise ValueError(f"Zoneout: probabilities must be in [0, 1], got {value}")
        if eval_mode not in self.EVAL_MODES:
            raise ValueError(f"Zoneout: eval_mode must be one of {self.EVAL_MODES}, got {eval_mode!r}")
        self.layer = layer
        self.p = p
        self.p_cell = p if p_cell is None else p_cell
        self.eval_mode = eval_mode

    def forward(self, *args, **kwargs):
        if (self.p == 0 and self.p_cell == 0) or (not self.training and self.eval_mode == "identity"):
            return self.layer(*args, **kwargs)
        return _call_with(self.layer, "_zoneout", (self.p, self.p_cell, self.training), args, kwargs)

    def extra_repr(self) -> str:
        return f"p={self.p}, p_cell={self.p_cell}, eval_mode={self.eval_mode!r}"


def activation_regularization(output: Tensor, alpha: float) -> Tensor:
    """AR: alpha * mean(h_t^2) over the (dropped-out) outputs of the last layer."""
    return alpha * output.pow(2).mean()


def temporal_activation_regularization(output: Tensor, beta: float) -> Tensor:
    """TAR: beta * mean((h_t - h_{t-1})^2) over the last layer's raw outputs (T, B, H)."""
    if output.shape[0] < 2:
        return output.new_zeros(())
    return beta * (output[1:] - output[:-1]).pow(2).mean()
