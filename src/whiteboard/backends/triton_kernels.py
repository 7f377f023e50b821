"""Triton kernels for the GPU's per-step pointwise work, and the autograd Functions that run
them around cuBLAS GEMMs (``torch.addmm`` / ``torch.mm``): one fused kernel per step for the
gate math and state update forward, one per step for the derivative factors backward, where
the torch loop launches a dozen small ops. The gates and cell states of every step are kept,
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
def _lstm_forward_step(z, c_prev, h_prev, alive, gates, c_out, h_out, n, H, HAS_MASK: tl.constexpr,
                       BLOCK: tl.constexpr):
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
def _lstm_backward_step(gates, c_t, c_prev, d_out, dh, dc, alive, dz, dc_out, n, H, HAS_MASK: tl.constexpr,
                        BLOCK: tl.constexpr):
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
    dc_t = dc_t + dh_t * o * (1.0 - tc * tc)
    tl.store(dz + row, dc_t * g * i * (1.0 - i), mask=inside)
    tl.store(dz + row + H, dc_t * tl.load(c_prev + offs, mask=inside, other=0.0) * f * (1.0 - f), mask=inside)
    tl.store(dz + row + 2 * H, dc_t * i * (1.0 - g * g), mask=inside)
    tl.store(dz + row + 3 * H, dh_t * tc * o * (1.0 - o), mask=inside)
    dc_next = dc_t * f
    if HAS_MASK:
        dc_next = tl.where(a, dc_next, dc_carry)
    tl.store(dc_out + offs, dc_next, mask=inside)


@triton.jit
def _rnn_forward_step(z, h_prev, alive, h_out, n, H, KIND: tl.constexpr, HAS_MASK: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    a_in = tl.load(z + offs, mask=inside, other=0.0)
    if KIND == 0:
        h = _tanh(a_in)
    elif KIND == 1:
        h = tl.maximum(a_in, 0.0)
    else:
        h = _sigmoid(a_in)
    if HAS_MASK:
        a = tl.load(alive + offs // H, mask=inside, other=0) != 0
        h = tl.where(a, h, tl.load(h_prev + offs, mask=inside, other=0.0))
    tl.store(h_out + offs, h, mask=inside)


@triton.jit
def _rnn_backward_step(h_t, d_out, dh, alive, dz, n, H, KIND: tl.constexpr, HAS_MASK: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    h = tl.load(h_t + offs, mask=inside, other=0.0)
    grad = tl.load(d_out + offs, mask=inside, other=0.0) + tl.load(dh + offs, mask=inside, other=0.0)
    if HAS_MASK:
        grad = tl.where(tl.load(alive + offs // H, mask=inside, other=0) != 0, grad, 0.0)
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


def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask):
    """(hs, cs (T+1, B, H), gates (T, B, 4H) activated i|f|g|o, output (T, B, H))."""
    T, B, _ = x.shape
    H = h0.shape[-1]
    xw = input_projection(x, w_ih, sum_bias(b_ih, b_hh))
    hs, cs = x.new_empty((T + 1, B, H)), x.new_empty((T + 1, B, H))
    hs[0], cs[0] = h0, c0
    gates = x.new_empty((T, B, 4 * H))
    w_hh_t = w_hh.t().contiguous()
    for t in range(T):
        z = torch.addmm(xw[t], hs[t], w_hh_t)  # cuBLAS
        _lstm_forward_step[_grid(B * H)](z, cs[t], hs[t], _alive(mask, t, z), gates[t], cs[t + 1], hs[t + 1], B * H, H,
                                         HAS_MASK=mask is not None, BLOCK=BLOCK)
    return hs, cs, gates, (hs[1:] if mask is None else hs[1:] * mask)


class TritonLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask):
        hs, cs, gates, out = lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask)
        ctx.has_bias = b_ih is not None
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, hs, cs, gates)
        ctx.mark_non_differentiable(gates, cs)
        return out, hs[-1].clone(), cs[-1].clone(), gates, cs

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn, _d_gates, _d_cs):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, hs, cs, gates = ctx.saved_tensors
        if needs_autograd_backward((d_out, d_hn, d_cn)):
            grads = autograd_backward(ctx, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask), (d_out, d_hn, d_cn),
                                      flat_reference(cells.lstm_step, 2))
            return grads
        T, B, H4 = gates.shape
        H = H4 // 4
        dh, dc = state_grad(d_hn, hs[0]), state_grad(d_cn, cs[0])
        d_out = output_grad(d_out, hs[1:])
        dz = x.new_empty((T, B, H4))
        dc_next = torch.empty_like(dc)
        for t in range(T - 1, -1, -1):
            _lstm_backward_step[_grid(B * H)](gates[t], cs[t + 1], cs[t], d_out[t], dh, dc, _alive(mask, t, dc), dz[t],
                                              dc_next, B * H, H, HAS_MASK=mask is not None, BLOCK=BLOCK)
            dc, dc_next = dc_next, dc
            dh_prev = torch.mm(dz[t], w_hh)  # cuBLAS
            dh = dh_prev if mask is None else torch.where(mask[t], dh_prev, dh)
        needs = ctx.needs_input_grad
        dx, dw_ih, dw_hh = weight_grads(dz, x, hs[:-1], w_ih, (needs[0], needs[3], needs[4]))
        db = dz.sum((0, 1)) if ctx.has_bias and (needs[5] or needs[6]) else None
        return dx, dh, dc, dw_ih, dw_hh, db, db, None


class TritonRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, mask, nonlinearity):
        T, B, _ = x.shape
        H = h0.shape[-1]
        xw = input_projection(x, w_ih, sum_bias(b_ih, b_hh))
        hs = x.new_empty((T + 1, B, H))
        hs[0] = h0
        zs = x.new_empty((T, B, H))  # the pre-activations, kept for a trace
        w_hh_t = w_hh.t().contiguous()
        for t in range(T):
            torch.addmm(xw[t], hs[t], w_hh_t, out=zs[t])
            _rnn_forward_step[_grid(B * H)](zs[t], hs[t], _alive(mask, t, zs[t]), hs[t + 1], B * H, H,
                                            KIND=KINDS[nonlinearity], HAS_MASK=mask is not None, BLOCK=BLOCK)
        ctx.nonlinearity, ctx.has_bias = nonlinearity, b_ih is not None
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, mask, hs)
        ctx.mark_non_differentiable(hs, zs)
        return (hs[1:] if mask is None else hs[1:] * mask), hs[-1].clone(), hs, zs

    @staticmethod
    def backward(ctx, d_out, d_hn, _d_hs, _d_zs):
        x, h0, w_ih, w_hh, b_ih, b_hh, mask, hs = ctx.saved_tensors
        if needs_autograd_backward((d_out, d_hn)):
            step = partial(cells.rnn_step, nonlinearity=ctx.nonlinearity)
            return autograd_backward(ctx, (x, h0, w_ih, w_hh, b_ih, b_hh, mask), (d_out, d_hn), flat_reference(step, 1))
        T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
        dh = state_grad(d_hn, hs[0])
        d_out = output_grad(d_out, hs[1:])
        dz = x.new_empty((T, B, H))
        for t in range(T - 1, -1, -1):
            _rnn_backward_step[_grid(B * H)](hs[t + 1], d_out[t], dh, _alive(mask, t, dh), dz[t], B * H, H,
                                             KIND=KINDS[ctx.nonlinearity], HAS_MASK=mask is not None, BLOCK=BLOCK)
            dh_prev = torch.mm(dz[t], w_hh)
            dh = dh_prev if mask is None else torch.where(mask[t], dh_prev, dh)
        needs = ctx.needs_input_grad
        dx, dw_ih, dw_hh = weight_grads(dz, x, hs[:-1], w_ih, (needs[0], needs[2], needs[3]))
        db = dz.sum((0, 1)) if ctx.has_bias and (needs[4] or needs[5]) else None
        return dx, dh, dw_ih, dw_hh, db, db, None, None
