"""The layer-norm LSTM in Triton: one kernel per step forward and one backward, each program
one batch row, around cuBLAS GEMMs. A row's whole step is in one program: the normalization
of W h over its 4H gate rows, the gates, the cell, the normalization of the cell over H
and h; backward, the same two normalizations carried back through their mean and variance.
What does not depend on the recurrence (the input side's normalization, the weight and
gain gradients) is :mod:`whiteboard.backends.layer_norm`'s, shared with the torch loop.
Imported only where it runs (CUDA, or the tests under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from whiteboard.backends.common import output_grad, state_grad
from whiteboard.backends.layer_norm import input_side, keep_for_backward, parameter_grads, saved_or_recomputed
from whiteboard.backends.triton_kernels import _sigmoid, _tanh


# Its own sum, not tl.sum: Triton's interpreter runs a jit helper only where it was decorated
# under the interpreter, and triton.language's own may have been decorated before (the tests).
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sum(x):
    return tl.reduce(x, 0, _add)


@triton.jit
def _load4(ptr, row4, j, m, H):
    """A row's four gate blocks of H (i, f, g, o), each as a vector of the block's width."""
    return (tl.load(ptr + row4 + j, mask=m, other=0.0), tl.load(ptr + row4 + H + j, mask=m, other=0.0),
            tl.load(ptr + row4 + 2 * H + j, mask=m, other=0.0), tl.load(ptr + row4 + 3 * H + j, mask=m, other=0.0))


@triton.jit
def _store4(ptr, row4, j, m, H, v0, v1, v2, v3):
    tl.store(ptr + row4 + j, v0, mask=m)
    tl.store(ptr + row4 + H + j, v1, mask=m)
    tl.store(ptr + row4 + 2 * H + j, v2, mask=m)
    tl.store(ptr + row4 + 3 * H + j, v3, mask=m)


@triton.jit
def _forward_row(hw, base, gain_hh, gain_cell, bias_cell, c_prev, h_prev, alive, gates, hw_hat, rstd_hh, c_hat,
                 rstd_c, tanh_y, c_out, h_out, H, eps, HAS_MASK: tl.constexpr, BLOCK_H: tl.constexpr):
    b = tl.program_id(0)
    j = tl.arange(0, BLOCK_H)
    m = j < H
    row4, row = b * 4 * H, b * H
    a0, a1, a2, a3 = _load4(hw, row4, j, m, H)
    mean = (_sum(a0) + _sum(a1) + _sum(a2) + _sum(a3)) / (4 * H)
    d0, d1 = tl.where(m, a0 - mean, 0.0), tl.where(m, a1 - mean, 0.0)
    d2, d3 = tl.where(m, a2 - mean, 0.0), tl.where(m, a3 - mean, 0.0)
    var = (_sum(d0 * d0) + _sum(d1 * d1) + _sum(d2 * d2) + _sum(d3 * d3)) / (4 * H)
    r = 1.0 / tl.sqrt(var + eps)
    n0, n1, n2, n3 = d0 * r, d1 * r, d2 * r, d3 * r
    _store4(hw_hat, row4, j, m, H, n0, n1, n2, n3)
    tl.store(rstd_hh + b, r)
    z0, z1, z2, z3 = _load4(base, row4, j, m, H)
    k0, k1, k2, k3 = _load4(gain_hh, 0, j, m, H)
    i, f, g, o = _sigmoid(z0 + n0 * k0), _sigmoid(z1 + n1 * k1), _tanh(z2 + n2 * k2), _sigmoid(z3 + n3 * k3)
    _store4(gates, row4, j, m, H, i, f, g, o)
    cp = tl.load(c_prev + row + j, mask=m, other=0.0)
    c = f * cp + i * g
    c_mean = _sum(tl.where(m, c, 0.0)) / H
    cd = tl.where(m, c - c_mean, 0.0)
    rc = 1.0 / tl.sqrt(_sum(cd * cd) / H + eps)
    ch = cd * rc
    tl.store(c_hat + row + j, ch, mask=m)
    tl.store(rstd_c + b, rc)
    y = _tanh(ch * tl.load(gain_cell + j, mask=m, other=0.0) + tl.load(bias_cell + j, mask=m, other=0.0))
    tl.store(tanh_y + row + j, y, mask=m)
    h = o * y
    if HAS_MASK:
        a = tl.load(alive + b) != 0
        c = tl.where(a, c, cp)
        h = tl.where(a, h, tl.load(h_prev + row + j, mask=m, other=0.0))
    tl.store(c_out + row + j, c, mask=m)
    tl.store(h_out + row + j, h, mask=m)


@triton.jit
def _backward_row(gates, hw_hat, rstd_hh, c_hat, rstd_c, tanh_y, c_prev, gain_hh, gain_cell, d_out, dh, dc, alive,
                  dz, d_hw, d_y, dc_out, H, HAS_MASK: tl.constexpr, BLOCK_H: tl.constexpr):
    b = tl.program_id(0)
    j = tl.arange(0, BLOCK_H)
    m = j < H
    row4, row = b * 4 * H, b * H
    i, f, g, o = _load4(gates, row4, j, m, H)
    y = tl.load(tanh_y + row + j, mask=m, other=0.0)
    dh_t = tl.load(d_out + row + j, mask=m, other=0.0) + tl.load(dh + row + j, mask=m, other=0.0)
    dc_carry = tl.load(dc + row + j, mask=m, other=0.0)
    dc_in = dc_carry
    if HAS_MASK:
        a = tl.load(alive + b) != 0
        dh_t = tl.where(a, dh_t, 0.0)
        dc_in = tl.where(a, dc_in, 0.0)
    dyv = dh_t * o * (1.0 - y * y)
    tl.store(d_y + row + j, dyv, mask=m)
    # back through LN(c): rstd * (d - mean(d) - c_hat * mean(d * c_hat)), d the gained gradient
    ch = tl.load(c_hat + row + j, mask=m, other=0.0)
    dd = tl.where(m, dyv * tl.load(gain_cell + j, mask=m, other=0.0), 0.0)
    dc_t = tl.load(rstd_c + b) * (dd - _sum(dd) / H - ch * (_sum(dd * ch) / H)) + dc_in
    cp = tl.load(c_prev + row + j, mask=m, other=0.0)
    z0 = dc_t * g * i * (1.0 - i)
    z1 = dc_t * cp * f * (1.0 - f)
    z2 = dc_t * i * (1.0 - g * g)
    z3 = dh_t * y * o * (1.0 - o)
    _store4(dz, row4, j, m, H, z0, z1, z2, z3)
    # back through LN(W h) over the 4H gate rows
    k0, k1, k2, k3 = _load4(gain_hh, 0, j, m, H)
    e0, e1 = tl.where(m, z0 * k0, 0.0), tl.where(m, z1 * k1, 0.0)
    e2, e3 = tl.where(m, z2 * k2, 0.0), tl.where(m, z3 * k3, 0.0)
    n0, n1, n2, n3 = _load4(hw_hat, row4, j, m, H)
    mean_e = (_sum(e0) + _sum(e1) + _sum(e2) + _sum(e3)) / (4 * H)
    mean_en = (_sum(e0 * n0) + _sum(e1 * n1) + _sum(e2 * n2) + _sum(e3 * n3)) / (4 * H)
    r = tl.load(rstd_hh + b)
    _store4(d_hw, row4, j, m, H, r * (e0 - mean_e - n0 * mean_en), r * (e1 - mean_e - n1 * mean_en),
            r * (e2 - mean_e - n2 * mean_en), r * (e3 - mean_e - n3 * mean_en))
    dc_next = dc_t * f
    if HAS_MASK:
        dc_next = tl.where(a, dc_next, dc_carry)
    tl.store(dc_out + row + j, dc_next, mask=m)


def _alive(mask, t, like):
    return mask[t, :, 0].to(torch.int8).contiguous() if mask is not None else like


class TritonLayerNormLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, gain_ih, gain_hh, gain_cell, bias_cell, mask, eps):
        T, B, _ = x.shape
        H = h0.shape[-1]
        block = triton.next_power_of_2(H)
        xw_hat, rstd_ih, base = input_side(x, w_ih, b_ih, b_hh, gain_ih, eps)
        hs, cs = x.new_empty((T + 1, B, H)), x.new_empty((T + 1, B, H))
        hs[0], cs[0] = h0, c0
        gates, hw_hat = x.new_empty((T, B, 4 * H)), x.new_empty((T, B, 4 * H))
        rstd_hh, rstd_c = x.new_empty((T, B, 1)), x.new_empty((T, B, 1))
        c_hat, tanh_y = x.new_empty((T, B, H)), x.new_empty((T, B, H))
        w_hh_t = w_hh.t().contiguous()
        for t in range(T):
            hw = torch.mm(hs[t], w_hh_t)  # cuBLAS
            _forward_row[(B,)](hw, base[t], gain_hh, gain_cell, bias_cell, cs[t], hs[t], _alive(mask, t, hw), gates[t],
                               hw_hat[t], rstd_hh[t], c_hat[t], rstd_c[t], tanh_y[t], cs[t + 1], hs[t + 1], H, eps,
                               HAS_MASK=mask is not None, BLOCK_H=block)
        keep_for_backward(ctx, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, gain_ih, gain_hh, gain_cell, bias_cell, mask), hs, cs,
                          (xw_hat, rstd_ih, gates, hw_hat, rstd_hh, c_hat, rstd_c, tanh_y))
        ctx.mark_non_differentiable(gates, cs)
        return (hs[1:] if mask is None else hs[1:] * mask), hs[-1].clone(), cs[-1].clone(), gates, cs

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn, _d_gates, _d_cs):
        recomputed, kept = saved_or_recomputed(ctx, (d_out, d_hn, d_cn))
        if recomputed is not None:
            return recomputed
        k, mask = kept, kept.mask
        T, B, H4 = k.gates.shape
        H = H4 // 4
        block = triton.next_power_of_2(H)
        dh, dc = state_grad(d_hn, k.hs[0]), state_grad(d_cn, k.cs[0])
        d_out = output_grad(d_out, k.hs[1:])
        dz, d_hw, d_y = k.x.new_empty((T, B, H4)), k.x.new_empty((T, B, H4)), k.x.new_empty((T, B, H))
        dc_next = torch.empty_like(dc)
        for t in range(T - 1, -1, -1):
            _backward_row[(B,)](k.gates[t], k.hw_hat[t], k.rstd_hh[t], k.c_hat[t], k.rstd_c[t], k.tanh_y[t], k.cs[t],
                                k.gain_hh, k.gain_cell, d_out[t], dh, dc, _alive(mask, t, dc), dz[t], d_hw[t], d_y[t],
                                dc_next, H, HAS_MASK=mask is not None, BLOCK_H=block)
            dc, dc_next = dc_next, dc
            dh_prev = torch.mm(d_hw[t], k.w_hh)  # cuBLAS
            dh = dh_prev if mask is None else torch.where(mask[t], dh_prev, dh)
        return parameter_grads(ctx, kept, dz, d_hw, d_y, dh, dc)
