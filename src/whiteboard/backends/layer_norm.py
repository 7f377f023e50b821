"""The layer-normalized LSTM on the torch loop (it has no compiled loop): the forward over
the whole sequence and its hand-written backward through time, as an autograd Function.
The equations are :func:`whiteboard.nn.cells.layernorm_lstm_step`'s."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from whiteboard.backends.common import carry, input_projection, output_grad, state_grad, sum_bias
from whiteboard.backends.compiled import planning
from whiteboard.backends.reference import autograd_backward, flat_reference, needs_autograd_backward
from whiteboard.nn import cells


def _normalize(z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(z - mean) * rstd over the last dimension, and rstd (..., 1), in one ATen call."""
    normalized, _, rstd = torch.native_layer_norm(z, (z.shape[-1],), None, None, eps)
    return normalized, rstd.view(*z.shape[:-1], 1)


def _normalize_backward(d_normalized: Tensor, normalized: Tensor, rstd: Tensor) -> Tensor:
    """Gradient through z -> (z - mean) * rstd, given the normalized values."""
    mean_d = d_normalized.mean(-1, keepdim=True)
    mean_dn = (d_normalized * normalized).mean(-1, keepdim=True)
    return rstd * (d_normalized - mean_d - normalized * mean_dn)


def input_side(x, w_ih, b_ih, b_hh, gain_ih, eps):
    """What does not depend on the recurrence, for all steps at once: the input projection
    normalized (T, B, 4H), its rstd (T, B, 1), and LN(W_ih x; gain_ih) + b, each step's base."""
    xw_hat, rstd_ih = _normalize(input_projection(x, w_ih, None), eps)
    base = xw_hat * gain_ih
    bias = sum_bias(b_ih, b_hh)
    return xw_hat, rstd_ih, (base if bias is None else base + bias)


class Kept(NamedTuple):
    """What both layer-norm Functions keep for their backward: the 12 tensor arguments in the
    Function's order, the states (T + 1, B, H), and the forward's saved tensors."""

    x: Tensor
    h0: Tensor
    c0: Tensor
    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None
    b_hh: Tensor | None
    gain_ih: Tensor
    gain_hh: Tensor
    gain_cell: Tensor
    bias_cell: Tensor
    mask: Tensor | None
    hs: Tensor
    cs: Tensor
    xw_hat: Tensor  # (T, B, 4H) the input projection, normalized
    rstd_ih: Tensor  # (T, B, 1)
    gates: Tensor  # (T, B, 4H) i, f, g, o
    hw_hat: Tensor  # (T, B, 4H) W_hh h_{t-1}, normalized
    rstd_hh: Tensor
    c_hat: Tensor  # (T, B, H) c_t, normalized
    rstd_c: Tensor
    tanh_y: Tensor  # (T, B, H) tanh of the normalized cell


def keep_for_backward(ctx, args: tuple, hs: Tensor, cs: Tensor, saved: tuple) -> None:
    """Save what :func:`saved_or_recomputed` reads back as :class:`Kept`: the arguments, the
    states, then the forward's (xw_hat, rstd_ih, gates, hw_hat, rstd_hh, c_hat, rstd_c, tanh_y)."""
    ctx.has_bias = args[5] is not None
    ctx.save_for_backward(*args, hs, cs, *saved)


def saved_or_recomputed(ctx, grads) -> tuple:
    """(the gradients of the 12 tensor arguments recomputed with the reference, None) where
    the backward must be differentiable or batched, else (None, the :class:`Kept` tensors)."""
    tensors = ctx.saved_tensors
    if needs_autograd_backward(grads):
        return autograd_backward(ctx, tensors[:12], grads, flat_reference(cells.layernorm_lstm_step, 2)), None
    return None, Kept(*tensors)


def parameter_grads(ctx, kept: Kept, dz, d_hw, d_y, dh, dc) -> tuple:
    """After a reverse sweep produced dz and d_hw (T, B, 4H) and d_y (T, B, H): the gradients of
    all 13 arguments in the Function's order, eps's None included (large GEMMs and sums over
    all steps)."""
    needs, k = ctx.needs_input_grad, kept
    x, w_ih, xw_hat, hw_hat, c_hat = k.x, k.w_ih, k.xw_hat, k.hw_hat, k.c_hat
    T, B = dz.shape[0], dz.shape[1]
    rows = lambda t: t.reshape(T * B, t.shape[-1])  # noqa: E731
    d_xw = _normalize_backward(dz * k.gain_ih, xw_hat, k.rstd_ih)  # (T, B, 4H)
    dx = torch.mm(rows(d_xw), w_ih).view(T, B, w_ih.shape[1]) if needs[0] else None
    dw_ih = torch.mm(rows(d_xw).t(), rows(x)) if needs[3] else None
    dw_hh = torch.mm(rows(d_hw).t(), rows(k.hs[:-1])) if needs[4] else None
    db = dz.sum((0, 1)) if ctx.has_bias and (needs[5] or needs[6]) else None
    d_gain_ih = (dz * xw_hat).sum((0, 1)) if needs[7] else None
    d_gain_hh = (dz * hw_hat).sum((0, 1)) if needs[8] else None
    d_gain_cell = (d_y * c_hat).sum((0, 1)) if needs[9] else None
    d_bias_cell = d_y.sum((0, 1)) if needs[10] else None
    return dx, dh, dc, dw_ih, dw_hh, db, db, d_gain_ih, d_gain_hh, d_gain_cell, d_bias_cell, None, None


def layernorm_lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, gain_ih, gain_hh, gain_cell, bias_cell, mask,
                            keep: bool, eps: float):
    """Forward only, see :func:`whiteboard.nn.cells.layernorm_lstm_step`. Returns (hs, cs, out,
    saved): hs, cs (T+1, B, H); saved (when keep) holds what the backward sweep needs."""
    T, B, _ = x.shape
    H = h0.shape[-1]
    xw_hat, rstd_ih, base = input_side(x, w_ih, b_ih, b_hh, gain_ih, eps)
    w_hh_t, _ = planning.step_weights(w_hh, B, None, T)  # (H, 4H)
    hs = x.new_empty((T + 1, B, H))
    cs = x.new_empty((T + 1, B, H))
    hs[0] = h0
    cs[0] = c0
    steps = T if keep else 1
    gates = x.new_empty((steps, B, 4 * H))  # activated i|f|g|o
    hw_hat = x.new_empty((steps, B, 4 * H))
    rstd_hh = x.new_empty((steps, B, 1))
    c_hat = x.new_empty((steps, B, H))
    rstd_c = x.new_empty((steps, B, 1))
    tanh_y = x.new_empty((steps, B, H))  # tanh(LN(c_t))
    for t in range(T):
        s = t if keep else 0
        normalized, rstd_hh[s] = _normalize(torch.mm(hs[t], w_hh_t), eps)
        hw_hat[s] = normalized
        z = torch.addcmul(base[t], normalized, gain_hh)  # (B, 4H)
        torch.sigmoid(z, out=gates[s])
        gates[s, :, 2 * H : 3 * H] = torch.tanh(z[:, 2 * H : 3 * H])
        i, f, g, o = gates[s].chunk(4, dim=1)
        c_new = torch.addcmul(f * cs[t], i, g)
        normalized, rstd_c[s] = _normalize(c_new, eps)
        c_hat[s] = normalized
        torch.tanh(torch.addcmul(bias_cell, normalized, gain_cell), out=tanh_y[s])
        h_new = o * tanh_y[s]
        if mask is None:
            hs[t + 1] = h_new
            cs[t + 1] = c_new
        else:
            torch.where(mask[t], h_new, hs[t], out=hs[t + 1])
            torch.where(mask[t], c_new, cs[t], out=cs[t + 1])
    out = hs[1:] if mask is None else hs[1:] * mask
    saved = (xw_hat, rstd_ih, gates, hw_hat, rstd_hh, c_hat, rstd_c, tanh_y) if keep else None
    return hs, cs, out, saved


class FusedLayerNormLSTM(torch.autograd.Function):
    """Layer-norm LSTM, whole sequence, with the backward sweep written out.

    Beyond the LSTM's, the reverse step carries the two per-step normalizations
    (of W h_{t-1} and of c_t) back through their mean and variance; the input side's
    normalization, the gains and all weight gradients are done for all steps at once
    after the sweep.
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, gain_ih, gain_hh, gain_cell, bias_cell, mask, eps):
        hs, cs, out, saved = layernorm_lstm_sequence(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, gain_ih, gain_hh, gain_cell, bias_cell, mask, True, eps
        )
        keep_for_backward(ctx, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, gain_ih, gain_hh, gain_cell, bias_cell, mask), hs, cs,
                          saved)
        return out, hs[-1].clone(), cs[-1].clone()

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        recomputed, kept = saved_or_recomputed(ctx, (d_out, d_hn, d_cn))
        if recomputed is not None:
            return recomputed
        T, B, H4 = kept.gates.shape
        i, f, g, o = kept.gates.chunk(4, dim=2)  # 4 x (T, B, H)
        # Factors that do not depend on the reverse recurrence, for all steps at once.
        k = torch.stack((g * i * (1 - i), kept.cs[:-1] * f * (1 - f), i * (1 - g * g)), dim=2)  # (T, B, 3, H)
        k_o = kept.tanh_y * o * (1 - o)  # (T, B, H)
        dy_from_dh = o * (1 - kept.tanh_y * kept.tanh_y)  # d tanh(LN(c)) / d LN(c), times o
        f = f.contiguous()
        dz = kept.x.new_empty((T, B, H4))
        d_hw = kept.x.new_empty((T, B, H4))  # gradient of W h_{t-1}, before its normalization
        d_y = kept.x.new_empty((T, B, H4 // 4))  # gradient of LN(c_t)
        dh = state_grad(d_hn, kept.hs[0])
        dc = state_grad(d_cn, kept.cs[0])
        d_out = output_grad(d_out, kept.tanh_y)
        mask = kept.mask
        for t in range(T - 1, -1, -1):
            m = None if mask is None else mask[t]
            dh_t = d_out[t] + dh if m is None else (d_out[t] + dh) * m
            torch.mul(dh_t, dy_from_dh[t], out=d_y[t])
            dc_t = _normalize_backward(d_y[t] * kept.gain_cell, kept.c_hat[t], kept.rstd_c[t])
            dc_t += dc if m is None else dc * m
            dz_t = dz[t].view(B, 4, H4 // 4)
            torch.mul(dc_t.unsqueeze(1), k[t], out=dz_t[:, :3])
            torch.mul(dh_t, k_o[t], out=dz_t[:, 3])
            d_hw[t] = _normalize_backward(dz[t] * kept.gain_hh, kept.hw_hat[t], kept.rstd_hh[t])
            dh_prev = torch.mm(d_hw[t], kept.w_hh)  # (B, H)
            dh, dc = carry(m, dh_prev, dh), carry(m, dc_t * f[t], dc)
        return parameter_grads(ctx, kept, dz, d_hw, d_y, dh, dc)
