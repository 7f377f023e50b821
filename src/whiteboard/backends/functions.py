"""The autograd Functions: one layer, one direction, forward over the whole sequence and a
hand-written backward through time. Each runs its sweeps on the compiled loop where it is
handed the compiled module (``compiled``, CPU float32/float64, see
:mod:`whiteboard.backends.compiled.loops`), else on the torch loop
(:mod:`whiteboard.backends.torch_sweeps`), and on the torch loop too wherever the compiled
one meets a NaN or an Inf, which the torch loop propagates as torch.nn does.

Where the written-out sweeps cannot serve, each backward recomputes the forward with the
reference loop and lets autograd differentiate it
(:func:`whiteboard.backends.reference.autograd_backward`): under ``create_graph=True``
(double backward: gradient penalties, ``gradgradcheck``) and for batched gradients
(``torch.func.vmap``, ``gradcheck``'s ``check_batched_grad``), which neither the ``out=``
buffers of the torch sweep nor the compiled calls can take part in.

The layer-norm LSTM's Function and the LSTM with projections', which have no compiled loop,
are in :mod:`whiteboard.backends.layer_norm` and :mod:`whiteboard.backends.projection`.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from whiteboard.backends import torch_sweeps
from whiteboard.backends.base import Call, needs_grad
from whiteboard.backends.compiled import loops
from whiteboard.backends.layer_norm import FusedLayerNormLSTM, layernorm_lstm_sequence
from whiteboard.backends.projection import run_lstmp
from whiteboard.backends.reference import autograd_backward, flat_reference, needs_autograd_backward
from whiteboard.nn import cells

__all__ = ["FusedRNN", "FusedLSTM", "FusedGRU", "FusedLayerNormLSTM", "rnn_sequence", "lstm_sequence",
           "gru_sequence", "layernorm_lstm_sequence", "run_sequence", "finite_or_none"]


def finite_or_none(compiled, *tensors: Tensor | None):
    """``compiled`` where ``tensors`` are all finite, else None (the torch loop). For what the
    compiled forward's own check cannot see: it tests every pre-activation, which any NaN
    or Inf in x, h0, the weights or the biases reaches, but an LSTM's c0 enters no
    pre-activation."""
    if compiled is None:
        return None
    return compiled if compiled.all_finite([t for t in tensors if t is not None]) else None


def _backward_loop(ctx, *grads: Tensor | None):
    """The compiled module for this backward, or None for the torch sweep: the compiled one
    is built for finite numbers (it turned a NaN in the incoming gradient into zeros),
    the torch sweep propagates NaN and Inf as torch.nn does."""
    return finite_or_none(ctx.compiled, *grads)


def run_sequence(sequence, compiled, *args):
    """``sequence(*args, compiled)`` on the compiled loop; where that met a NaN or an Inf (it
    returns None), again on the torch loop. Returns (its result, the compiled module, or
    None where the torch loop ran)."""
    if compiled is not None:
        result = sequence(*args, compiled)
        if result is not None:
            return result, compiled
    return sequence(*args, None), None


def rnn_sequence(x, h0, w_ih, w_hh, b_ih, b_hh, mask, nonlinearity, compiled=None):
    """Forward only: (states (T+1, B, H), output (T, B, H)); None from the compiled loop
    where it met a NaN or an Inf."""
    if compiled is not None:
        return loops.rnn_forward(compiled, x, h0, w_ih, w_hh, b_ih, b_hh, mask, nonlinearity)
    return torch_sweeps.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, mask, nonlinearity)


def lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, keep_gates: bool, compiled=None):
    """Forward only: (hs, cs, gates, output), see torch_sweeps.lstm_forward."""
    if compiled is not None:
        return loops.lstm_forward(compiled, x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, keep_gates)
    return torch_sweeps.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, keep_gates)


def gru_sequence(x, h0, w_ih, w_hh, b_ih, b_hh, mask, keep: bool, compiled=None):
    """Forward only: (hs, rz, n, hn, output), see torch_sweeps.gru_forward."""
    if compiled is not None:
        return loops.gru_forward(compiled, x, h0, w_ih, w_hh, b_ih, b_hh, mask, keep)
    return torch_sweeps.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, mask, keep)


class FusedRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, mask, nonlinearity, compiled=None):
        (hs, out), compiled = run_sequence(rnn_sequence, compiled, x, h0, w_ih, w_hh, b_ih, b_hh, mask, nonlinearity)
        ctx.compiled = compiled
        ctx.nonlinearity = nonlinearity
        ctx.has_bias = b_ih is not None
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, mask, hs)
        return out, hs[-1].clone()

    @staticmethod
    def backward(ctx, d_out, d_hn):
        x, h0, w_ih, w_hh, b_ih, b_hh, mask, hs = ctx.saved_tensors
        if needs_autograd_backward((d_out, d_hn)):
            step = partial(cells.rnn_step, nonlinearity=ctx.nonlinearity)
            return autograd_backward(ctx, (x, h0, w_ih, w_hh, b_ih, b_hh, mask), (d_out, d_hn), flat_reference(step, 1))
        needs = ctx.needs_input_grad
        args = (d_out, d_hn, x, w_ih, w_hh, mask, hs, ctx.nonlinearity, (needs[0], needs[2], needs[3]), ctx.has_bias)
        compiled = _backward_loop(ctx, d_out, d_hn)
        if compiled is not None:
            (dx, dw_ih, dw_hh), dh, db = loops.rnn_backward(compiled, *args)
        else:
            (dx, dw_ih, dw_hh), dh, db = torch_sweeps.rnn_backward(*args)
        db = db if needs[4] or needs[5] else None
        return dx, dh, dw_ih, dw_hh, db, db, None, None, None


class FusedLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, compiled=None):
        compiled = finite_or_none(compiled, c0)
        (hs, cs, gates, out), compiled = run_sequence(lstm_sequence, compiled, x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                      mask, True)
        ctx.compiled = compiled
        ctx.has_bias = b_ih is not None
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, hs, cs, gates)
        return out, hs[-1].clone(), cs[-1].clone()

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, hs, cs, gates = ctx.saved_tensors
        if needs_autograd_backward((d_out, d_hn, d_cn)):
            return autograd_backward(ctx, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask), (d_out, d_hn, d_cn),
                                     flat_reference(cells.lstm_step, 2))
        needs = ctx.needs_input_grad
        args = (d_out, d_hn, d_cn, x, w_ih, w_hh, mask, hs, cs, gates, (needs[0], needs[3], needs[4]), ctx.has_bias)
        compiled = _backward_loop(ctx, d_out, d_hn, d_cn)
        if compiled is not None:
            (dx, dw_ih, dw_hh), dh, dc, db = loops.lstm_backward(compiled, *args)
        else:
            (dx, dw_ih, dw_hh), dh, dc, db = torch_sweeps.lstm_backward(*args)
        db = db if needs[5] or needs[6] else None
        return dx, dh, dc, dw_ih, dw_hh, db, db, None, None


class FusedGRU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, mask, compiled=None):
        (hs, rz, n, hn, out), compiled = run_sequence(gru_sequence, compiled, x, h0, w_ih, w_hh, b_ih, b_hh, mask, True)
        ctx.compiled = compiled
        ctx.has_bias = b_ih is not None
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, mask, hs, rz, n, hn)
        return out, hs[-1].clone()

    @staticmethod
    def backward(ctx, d_out, d_hn):
        x, h0, w_ih, w_hh, b_ih, b_hh, mask, hs, rz, n, hn = ctx.saved_tensors
        if needs_autograd_backward((d_out, d_hn)):
            return autograd_backward(ctx, (x, h0, w_ih, w_hh, b_ih, b_hh, mask), (d_out, d_hn),
                                     flat_reference(cells.gru_step, 1))
        needs = ctx.needs_input_grad
        args = (d_out, d_hn, x, w_ih, w_hh, mask, hs, rz, n, hn, (needs[0], needs[2], needs[3], needs[4], needs[5]),
                ctx.has_bias)
        compiled = _backward_loop(ctx, d_out, d_hn)
        if compiled is not None:
            (dx, dw_ih, dw_hh), dh, db_ih, db_hh = loops.gru_backward(compiled, *args)
        else:
            (dx, dw_ih, dw_hh), dh, db_ih, db_hh = torch_sweeps.gru_backward(*args)
        return dx, dh, dw_ih, dw_hh, db_ih, db_hh, None, None


def run_direction(call: Call, x: Tensor, initial: list[Tensor], weights: tuple, mask: Tensor | None, compiled=None):
    """One layer, one direction on the Functions: (output, final states, None). With grad
    through the Function of the call's cell; without, its forward alone, which keeps
    only what the next step needs. ``compiled``: the compiled module, or None for the
    torch loop."""
    h0 = initial[0]
    if call.projection:
        out, finals = run_lstmp(x, initial, weights, mask, needs_grad(x, *initial, *weights))
        return out, finals, None
    if needs_grad(x, *initial, *weights):
        if call.layer_norm:
            out, h_n, c_n = FusedLayerNormLSTM.apply(x, h0, initial[1], *weights, mask, cells.LAYER_NORM_EPS)
            return out, [h_n, c_n], None
        if call.mode == "RNN":
            out, h_n = FusedRNN.apply(x, h0, *weights, mask, call.nonlinearity, compiled)
            return out, [h_n], None
        if call.mode == "GRU":
            out, h_n = FusedGRU.apply(x, h0, *weights, mask, compiled)
            return out, [h_n], None
        out, h_n, c_n = FusedLSTM.apply(x, h0, initial[1], *weights, mask, compiled)
        return out, [h_n, c_n], None
    if call.layer_norm:
        hs, cs, out, _ = layernorm_lstm_sequence(x, h0, initial[1], *weights, mask, False, cells.LAYER_NORM_EPS)
        return out, [hs[-1], cs[-1]], None
    if call.mode == "RNN":
        (hs, out), _ = run_sequence(rnn_sequence, compiled, x, h0, *weights, mask, call.nonlinearity)
        return out, [hs[-1]], None
    if call.mode == "GRU":
        (hs, _, _, _, out), _ = run_sequence(gru_sequence, compiled, x, h0, *weights, mask, False)
        return out, [hs[-1]], None
    compiled = finite_or_none(compiled, initial[1])
    (hs, cs, _, out), _ = run_sequence(lstm_sequence, compiled, x, *initial, *weights, mask, False)
    return out, [hs[-1], cs[-1]], None
