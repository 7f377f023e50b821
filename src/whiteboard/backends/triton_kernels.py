"""Triton kernels for the GPU's per-step pointwise work, and the autograd Functions that run
them around cuBLAS GEMMs (``torch.addmm`` / ``torch.mm``): one fused kernel per step for the
gate math and state update forward (zoneout's mix included), one per step for the
derivative factors backward, where the torch loop launches a dozen small ops. The gates and cell states of every step are kept,
so a trace costs nothing more. Imported only where it runs (CUDA, or the tests under
``TRITON_INTERPRET=1``, which runs these kernels on the CPU).
"""

from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl

from whiteboard.backends.common import input_projection, output_grad, state_grad, sum_bias, weight_grads
from whiteboard.backends.reference import autograd_backward, flat_reference, needs_autograd_backward
from whiteboard.nn import cells

BLOCK = 128
KINDS = {"tanh": 0, "relu": 1, "sigmoid": 2}


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _lstm_forward_step(z, c_prev, h_prev, alive, gates, c_out, h_out, keep_h, keep_c, c_new_out, n, H,
                       HAS_MASK: tl.constexpr, ZONEOUT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    b, j = offs // H, offs % H
    row = b * 4 * H + j
    i = _sigmoid(tl.load(z + row, mask=inside, other=0.0))
    f = _sigmoid(tl.load(z + row + H, mask=inside, other=0.0))
    g = _tanh(tl.load(z + row + 2 * H, mask=inside, other=0.0))
    o = _sigmoid(tl.load(z + row + 3 * H, mask=inside, other=0.0))
    cp = tl.load(c_prev + offs, mask=inside, other=0.0)
    c = f * cp + i * g
    h = o * _tanh(c)
    if ZONEOUT:  # keep weights: 1 keeps the old state (training's mask), p mixes (evaluation)
        tl.store(c_new_out + offs, c, mask=inside)
        wh = tl.load(keep_h + offs, mask=inside, other=0.0)
        wc = tl.load(keep_c + offs, mask=inside, other=0.0)
        c = wc * cp + (1.0 - wc) * c
        h = wh * tl.load(h_prev + offs, mask=inside, other=0.0) + (1.0 - wh) * h
    if HAS_MASK:
        a = tl.load(alive + b, mask=inside, other=0) != 0
        c = tl.where(a, c, cp)
        h = tl.where(a, h, tl.load(h_prev + offs, mask=inside, other=0.0))
    tl.store(gates + row, i, mask=inside)
    tl.store(gates + row + H, f, mask=inside)
    tl.store(gates + row + 2 * H, g, mask=inside)
    tl.store(gates + row + 3 * H, o, mask=inside)
    tl.store(c_out + offs, c, mask=inside)
    tl.store(h_out + offs, h, mask=inside)


@triton.jit
def _lstm_backward_step(gates, c_t, c_prev, d_out, dh, dc, alive, dz, dc_out, keep_h, keep_c, dh_kept, n, H,
                        HAS_MASK: tl.constexpr, ZONEOUT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    b, j = offs // H, offs % H
    row = b * 4 * H + j
    i = tl.load(gates + row, mask=inside, other=0.0)
    f = tl.load(gates + row + H, mask=inside, other=0.0)
    g = tl.load(gates + row + 2 * H, mask=inside, other=0.0)
    o = tl.load(gates + row + 3 * H, mask=inside, other=0.0)
    tc = _tanh(tl.load(c_t + offs, mask=inside, other=0.0))
    dh_t = tl.load(d_out + offs, mask=inside, other=0.0) + tl.load(dh + offs, mask=inside, other=0.0)
    dc_carry = tl.load(dc + offs, mask=inside, other=0.0)
    dc_t = dc_carry
    if HAS_MASK:
        a = tl.load(alive + b, mask=inside, other=0) != 0
        dh_t = tl.where(a, dh_t, 0.0)
        dc_t = tl.where(a, dc_t, 0.0)
    dc_kept = dc_t * 0.0
    if ZONEOUT:  # c_t is here the step's new cell before the mix; the kept parts skip the step
        wh = tl.load(keep_h + offs, mask=inside, other=0.0)
        wc = tl.load(keep_c + offs, mask=inside, other=0.0)
        tl.store(dh_kept + offs, dh_t * wh, mask=inside)
        dc_kept = dc_t * wc
        dh_t = dh_t * (1.0 - wh)
        dc_t = dc_t * (1.0 - wc)
    dc_t = dc_t + dh_t * o * (1.0 - tc * tc)
    tl.store(dz + row, dc_t * g * i * (1.0 - i), mask=inside)
    tl.store(dz + row + H, dc_t * tl.load(c_prev + offs, mask=inside, other=0.0) * f * (1.0 - f), mask=inside)
    tl.store(dz + row + 2 * H, dc_t * i * (1.0 - g * g), mask=inside)
    tl.store(dz + row + 3 * H, dh_t * tc * o * (1.0 - o), mask=inside)
    dc_next = dc_t * f + dc_kept
    if HAS_MASK:
        dc_next = tl.where(a, dc_next, dc_carry)
    tl.store(dc_out + offs, dc_next, mask=inside)


@triton.jit
def _rnn_forward_step(z, h_prev, alive, h_out, keep_h, h_new_out, n, H, KIND: tl.constexpr, HAS_MASK: tl.constexpr,
                      ZONEOUT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    a_in = tl.load(z + offs, mask=inside, other=0.0)
    if KIND == 0:
        h = _tanh(a_in)
    elif KIND == 1:
        h = tl.maximum(a_in, 0.0)
    else:
        h = _sigmoid(a_in)
    if ZONEOUT:
        tl.store(h_new_out + offs, h, mask=inside)
        wh = tl.load(keep_h + offs, mask=inside, other=0.0)
        h = wh * tl.load(h_prev + offs, mask=inside, other=0.0) + (1.0 - wh) * h
    if HAS_MASK:
        a = tl.load(alive + offs // H, mask=inside, other=0) != 0
        h = tl.where(a, h, tl.load(h_prev + offs, mask=inside, other=0.0))
    tl.store(h_out + offs, h, mask=inside)


@triton.jit
def _rnn_backward_step(h_t, d_out, dh, alive, dz, keep_h, dh_kept, n, H, KIND: tl.constexpr, HAS_MASK: tl.constexpr,
                       ZONEOUT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    h = tl.load(h_t + offs, mask=inside, other=0.0)
    grad = tl.load(d_out + offs, mask=inside, other=0.0) + tl.load(dh + offs, mask=inside, other=0.0)
    if HAS_MASK:
        grad = tl.where(tl.load(alive + offs // H, mask=inside, other=0) != 0, grad, 0.0)
    if ZONEOUT:  # h_t is here the step's new state before the mix
        wh = tl.load(keep_h + offs, mask=inside, other=0.0)
        tl.store(dh_kept + offs, grad * wh, mask=inside)
        grad = grad * (1.0 - wh)
    if KIND == 0:
        d = grad * (1.0 - h * h)
    elif KIND == 1:
        d = tl.where(h > 0.0, grad, 0.0)
    else:
        d = grad * h * (1.0 - h)
    tl.store(dz + offs, d, mask=inside)


def _grid(n: int):
    return (triton.cdiv(max(n, 1), BLOCK),)


def _alive(mask, t, like):
    return mask[t, :, 0].to(torch.int8).contiguous() if mask is not None else like


def _start(x, h0, w_ih, b_ih, b_hh):
    """(T, B, H, the input projection for all steps (T, B, G·H), the states (T+1, B, H) from h0)."""
    T, B, _ = x.shape
    H = h0.shape[-1]
    hs = x.new_empty((T + 1, B, H))
    hs[0] = h0
    return T, B, H, input_projection(x, w_ih, sum_bias(b_ih, b_hh)), hs


def _stepper(t: int, zoneout: bool):
    """A zoneout buffer's step t, or (without zoneout) a placeholder the kernel never reads."""
    return (lambda buffer: buffer[t]) if zoneout else (lambda buffer: buffer)


def _previous_state_grad(dz_t, w_hh, dh_kept, mask, t: int, dh):
    """The gradient reaching h_{t-1}: through W_hh (cuBLAS), plus zoneout's kept share; a
    sequence that has ended carries its gradient through the step."""
    dh_prev = torch.mm(dz_t, w_hh)
    if dh_kept is not None:
        dh_prev += dh_kept
    return dh_prev if mask is None else torch.where(mask[t], dh_prev, dh)


def _keep_weights(like, p: float, training: bool):
    """Zoneout's weight of the old state for one step (B, H): a Bernoulli(p) mask in training
    (drawn as the reference loop draws it), p in evaluation."""
    if training:
        return torch.empty_like(like).bernoulli_(p) if p else torch.zeros_like(like)
    return torch.full_like(like, p)


def _zoneout_reference(zoneout_weights, step, state_count: int):
    """The reference loop with these very zoneout weights, for autograd_backward (double and
    batched backward): run(x, *states, *weights, mask) -> (output, finals...)."""
    def run(x, *rest):
        state, weights, mask = list(rest[:state_count]), rest[state_count:-1], rest[-1]
        outputs = []
        for t in range(x.shape[0]):
            record = step(x[t], *state, *weights)
            new = [record.hidden, record.cell][:state_count]
            new = [w[t] * old + (1 - w[t]) * n for w, old, n in zip(zoneout_weights, state, new)]
            if mask is not None:
                new = [torch.where(mask[t], n, old) for n, old in zip(new, state)]
            outputs.append(new[0] if mask is None else new[0] * mask[t])
            state = new
        return (torch.stack(outputs, 0), *state)
    return run


class TritonLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, zoneout=None):
        T, B, H, xw, hs = _start(x, h0, w_ih, b_ih, b_hh)
        cs = x.new_empty((T + 1, B, H))
        cs[0] = c0
        gates = x.new_empty((T, B, 4 * H))
        keep_h = keep_c = c_new = gates  # placeholders the kernel never reads without zoneout
        if zoneout:
            keep_h, keep_c, c_new = (x.new_empty((T, B, H)) for _ in range(3))
        w_hh_t = w_hh.t().contiguous()
        for t in range(T):
            z = torch.addmm(xw[t], hs[t], w_hh_t)  # cuBLAS
            if zoneout:
                keep_h[t] = _keep_weights(hs[t], zoneout[0], zoneout[2])
                keep_c[t] = _keep_weights(cs[t], zoneout[1], zoneout[2])
            at = _stepper(t, bool(zoneout))
            _lstm_forward_step[_grid(B * H)](z, cs[t], hs[t], _alive(mask, t, z), gates[t], cs[t + 1], hs[t + 1],
                                             at(keep_h), at(keep_c), at(c_new), B * H, H, HAS_MASK=mask is not None,
                                             ZONEOUT=bool(zoneout), BLOCK=BLOCK)
        ctx.has_bias, ctx.zoneout = b_ih is not None, bool(zoneout)
        saved = (keep_h, keep_c, c_new) if zoneout else ()
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, hs, cs, gates, *saved)
        ctx.mark_non_differentiable(gates, cs)
        return (hs[1:] if mask is None else hs[1:] * mask), hs[-1].clone(), cs[-1].clone(), gates, cs

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn, _d_gates, _d_cs):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, hs, cs, gates, *saved = ctx.saved_tensors
        if needs_autograd_backward((d_out, d_hn, d_cn)):
            run = (_zoneout_reference(saved[:2], cells.lstm_step, 2) if ctx.zoneout
                   else flat_reference(cells.lstm_step, 2))
            return autograd_backward(ctx, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask), (d_out, d_hn, d_cn), run)
        T, B, H4 = gates.shape
        H = H4 // 4
        dh, dc = state_grad(d_hn, hs[0]), state_grad(d_cn, cs[0])
        d_out = output_grad(d_out, hs[1:])
        dz = x.new_empty((T, B, H4))
        dc_next, dh_kept = torch.empty_like(dc), torch.empty_like(dh)
        keep_h, keep_c, c_new = saved if ctx.zoneout else (dh, dh, cs[1:])
        for t in range(T - 1, -1, -1):
            at = _stepper(t, ctx.zoneout)
            _lstm_backward_step[_grid(B * H)](gates[t], c_new[t], cs[t], d_out[t], dh, dc, _alive(mask, t, dc), dz[t],
                                              dc_next, at(keep_h), at(keep_c), dh_kept, B * H, H,
                                              HAS_MASK=mask is not None, ZONEOUT=ctx.zoneout, BLOCK=BLOCK)
            dc, dc_next = dc_next, dc
            dh = _previous_state_grad(dz[t], w_hh, dh_kept if ctx.zoneout else None, mask, t, dh)
        needs = ctx.needs_input_grad
        dx, dw_ih, dw_hh = weight_grads(dz, x, hs[:-1], w_ih, (needs[0], needs[3], needs[4]))
        db = dz.sum((0, 1)) if ctx.has_bias and (needs[5] or needs[6]) else None
        return dx, dh, dc, dw_ih, dw_hh, db, db, None, None


class TritonRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, mask, nonlinearity, zoneout=None):
        T, B, H, xw, hs = _start(x, h0, w_ih, b_ih, b_hh)
        zs = x.new_empty((T, B, H))  # the pre-activations, kept for a trace
        keep_h = h_new = zs  # placeholders the kernel never reads without zoneout
        if zoneout:
            keep_h, h_new = x.new_empty((T, B, H)), x.new_empty((T, B, H))
        w_hh_t = w_hh.t().contiguous()
        for t in range(T):
            torch.addmm(xw[t], hs[t], w_hh_t, out=zs[t])
            if zoneout:
                keep_h[t] = _keep_weights(hs[t], zoneout[0], zoneout[2])
            at = _stepper(t, bool(zoneout))
            _rnn_forward_step[_grid(B * H)](zs[t], hs[t], _alive(mask, t, zs[t]), hs[t + 1], at(keep_h), at(h_new),
                                            B * H, H, KIND=KINDS[nonlinearity], HAS_MASK=mask is not None,
                                            ZONEOUT=bool(zoneout), BLOCK=BLOCK)
        ctx.nonlinearity, ctx.has_bias, ctx.zoneout = nonlinearity, b_ih is not None, bool(zoneout)
        saved = (keep_h, h_new) if zoneout else ()
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, mask, hs, *saved)
        ctx.mark_non_differentiable(hs, zs)
        return (hs[1:] if mask is None else hs[1:] * mask), hs[-1].clone(), hs, zs

    @staticmethod
    def backward(ctx, d_out, d_hn, _d_hs, _d_zs):
        x, h0, w_ih, w_hh, b_ih, b_hh, mask, hs, *saved = ctx.saved_tensors
        if needs_autograd_backward((d_out, d_hn)):
            step = partial(cells.rnn_step, nonlinearity=ctx.nonlinearity)
            run = _zoneout_reference(saved[:1], step, 1) if ctx.zoneout else flat_reference(step, 1)
            return autograd_backward(ctx, (x, h0, w_ih, w_hh, b_ih, b_hh, mask), (d_out, d_hn), run)
        T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
        dh = state_grad(d_hn, hs[0])
        d_out = output_grad(d_out, hs[1:])
        dz = x.new_empty((T, B, H))
        dh_kept = torch.empty_like(dh)
        keep_h, h_new = saved if ctx.zoneout else (dh, hs[1:])
        for t in range(T - 1, -1, -1):
            at = _stepper(t, ctx.zoneout)
            _rnn_backward_step[_grid(B * H)](h_new[t], d_out[t], dh, _alive(mask, t, dh), dz[t], at(keep_h), dh_kept,
                                             B * H, H, KIND=KINDS[ctx.nonlinearity], HAS_MASK=mask is not None,
                                             ZONEOUT=ctx.zoneout, BLOCK=BLOCK)
            dh = _previous_state_grad(dz[t], w_hh, dh_kept if ctx.zoneout else None, mask, t, dh)
        needs = ctx.needs_input_grad
        dx, dw_ih, dw_hh = weight_grads(dz, x, hs[:-1], w_ih, (needs[0], needs[2], needs[3]))
        db = dz.sum((0, 1)) if ctx.has_bias and (needs[4] or needs[5]) else None
        return dx, dh, dw_ih, dw_hh, db, db, None, None, None
