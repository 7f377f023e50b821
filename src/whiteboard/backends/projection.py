"""The LSTM with projections (LSTMP, Sak et al. 2014) on the torch loop: forward over the
whole sequence and its hand-written backward through time, as an autograd Function.

    z_t = W_ih x_t + b + W_hh h_{t-1}     (h is P wide, W_hh (4H, P))
    c_t = f ⊙ c_{t-1} + i ⊙ g ;   m_t = o ⊙ tanh(c_t) ;   h_t = W_hr m_t     (W_hr (P, H))

The reverse step is the LSTM's with one more product: the gradient reaching h_t (P wide)
reaches m_t through W_hr, and W_hr's gradient is one GEMM over all steps after the sweep.
The equations are :func:`whiteboard.nn.cells.lstm_step`'s with ``w_hr``.
"""

from __future__ import annotations

import torch

from whiteboard.backends.common import carry, input_projection, output_grad, state_grad, sum_bias, weight_grads
from whiteboard.backends.reference import autograd_backward, flat_reference, needs_autograd_backward
from whiteboard.nn import cells


def lstmp_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, mask, keep: bool):
    """(hs (T+1, B, P), cs (T+1, B, H), gates (T, B, 4H) or None, ms (T, B, H) or None, output)."""
    T, B, _ = x.shape
    H, P = c0.shape[-1], h0.shape[-1]
    hs = x.new_empty((T + 1, B, P))
    cs = x.new_empty((T + 1, B, H))
    hs[0], cs[0] = h0, c0
    steps = T if keep else 1
    gates = x.new_empty((steps, B, 4 * H))
    ms = x.new_empty((steps, B, H))  # o * tanh(c), before the projection
    xw = input_projection(x, w_ih, sum_bias(b_ih, b_hh))  # (T, B, 4H)
    w_hh_t, w_hr_t = w_hh.t().contiguous(), w_hr.t().contiguous()  # (P, 4H), (H, P)
    for t in range(T):
        s = t if keep else 0
        a = gates[s]
        z = torch.addmm(xw[t], hs[t], w_hh_t)  # (B, 4H)
        torch.sigmoid(z, out=a)
        torch.tanh(z[:, 2 * H : 3 * H], out=a[:, 2 * H : 3 * H])
        i, f, g, o = a.chunk(4, dim=1)
        c = torch.addcmul(f * cs[t], i, g)
        torch.mul(o, torch.tanh(c), out=ms[s])
        h = torch.mm(ms[s], w_hr_t)  # (B, P)
        if mask is None:
            cs[t + 1], hs[t + 1] = c, h
        else:
            torch.where(mask[t], c, cs[t], out=cs[t + 1])
            torch.where(mask[t], h, hs[t], out=hs[t + 1])
    out = hs[1:] if mask is None else hs[1:] * mask
    return hs, cs, (gates if keep else None), (ms if keep else None), out


class FusedLSTMP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, mask):
        hs, cs, gates, ms, out = lstmp_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, mask, True)
        ctx.has_bias = b_ih is not None
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, mask, hs, cs, gates, ms)
        return out, hs[-1].clone(), cs[-1].clone()

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, mask, hs, cs, gates, ms = ctx.saved_tensors
        if needs_autograd_backward((d_out, d_hn, d_cn)):
            return autograd_backward(ctx, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, mask), (d_out, d_hn, d_cn),
                                     flat_reference(cells.lstm_step, 2))
        T, B, H4 = gates.shape
        i, f, g, o = gates.chunk(4, dim=2)  # 4 x (T, B, H)
        tanh_c = torch.tanh(cs[1:])
        # Factors that do not depend on the reverse recurrence, for all steps at once.
        k = torch.stack((g * i * (1 - i), cs[:-1] * f * (1 - f), i * (1 - g * g)), dim=2)  # (T, B, 3, H)
        k_o = tanh_c * o * (1 - o)
        dc_from_dm = o * (1 - tanh_c * tanh_c)
        f = f.contiguous()
        dz = x.new_empty((T, B, 4, H4 // 4))
        dh_all = torch.empty_like(hs[1:])  # the gradient reaching each h_t, (T, B, P)
        dh = state_grad(d_hn, hs[0])
        dc = state_grad(d_cn, cs[0])
        d_out = output_grad(d_out, hs[1:])
        for t in range(T - 1, -1, -1):
            m = None if mask is None else mask[t]
            dh_t = torch.add(d_out[t], dh, out=dh_all[t]) if m is None else torch.mul(d_out[t] + dh, m, out=dh_all[t])
            dm = torch.mm(dh_t, w_hr)  # (B, H)
            dc_t = torch.addcmul(dc if m is None else dc * m, dm, dc_from_dm[t])
            torch.mul(dc_t.unsqueeze(1), k[t], out=dz[t, :, :3])
            torch.mul(dm, k_o[t], out=dz[t, :, 3])
            dh_prev = torch.mm(dz[t].view(B, H4), w_hh)  # (B, P)
            dh, dc = carry(m, dh_prev, dh), carry(m, dc_t * f[t], dc)
        dz = dz.view(T, B, H4)
        needs = ctx.needs_input_grad
        dx, dw_ih, dw_hh = weight_grads(dz, x, hs[:-1], w_ih, (needs[0], needs[3], needs[4]))
        db = dz.sum((0, 1)) if ctx.has_bias and (needs[5] or needs[6]) else None
        dw_hr = torch.mm(dh_all.reshape(T * B, -1).t(), ms.reshape(T * B, -1)) if needs[7] else None
        return dx, dh, dc, dw_ih, dw_hh, db, db, dw_hr, None


def run_lstmp(x, initial, weights, mask, grad: bool):
    """One layer, one direction: (output, [h_n, c_n])."""
    if grad:
        out, h_n, c_n = FusedLSTMP.apply(x, initial[0], initial[1], *weights, mask)
        return out, [h_n, c_n]
    hs, cs, _, _, out = lstmp_forward(x, initial[0], initial[1], *weights, mask, False)
    return out, [hs[-1], cs[-1]]
