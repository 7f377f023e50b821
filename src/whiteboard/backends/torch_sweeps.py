"""The torch loop: each cell's whole time loop in plain PyTorch ops, forward and the
reverse sweep of its hand-written backward, one layer and one direction.

    forward:  XW = X @ W_ihᵀ + b           one GEMM for all T steps      (T, B, G·H)
              for t: Z_t = XW_t + h_{t-1} @ W_hhᵀ   one small GEMM per step
                     pointwise gate math, state update
    backward: pointwise derivative factors K for all steps at once       (T, B, G, H)
              for t = T-1 … 0: dZ_t = (dh_t, dc_t) ⊙ K_t;  dh_{t-1} = dZ_t @ W_hh
              dW_ih = dZᵀ X, dW_hh = dZᵀ H_prev, db = Σ dZ, dX = dZ @ W_ih
                                                   large GEMMs after the sweep

Why it is laid out like this:
- ``W_hhᵀ`` is copied to a contiguous tensor once per call: small GEMMs against a
  transposed view were 3-4x slower.
- Everything that does not depend on the reverse recurrence (the K factors) is computed
  in a few large ops before the loop, so the loop holds ~5 small ops per step.
- Weight gradients are single GEMMs over all T·B rows rather than T small ones.

Only device-agnostic torch ops are used, so this runs on every device and dtype. Optional
``mask`` (T, B, 1, bool) marks the valid steps of variable-length sequences: where it is
False the state is carried unchanged and the output is zero, as torch.nn does for packed
sequences. The autograd Functions that call these are in :mod:`whiteboard.backends.functions`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from whiteboard.backends.common import (WeightGrads, carry, input_projection, masked_output, output_grad, state_grad,
                                       sum_bias, weight_grads)
from whiteboard.backends.compiled import planning


def _relu(a: Tensor, out: Tensor | None = None) -> Tensor:
    return torch.clamp(a, min=0, out=out)  # torch.relu takes no out=


ACTIVATIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": _relu}


def _rnn_derivative(h: Tensor, nonlinearity: str) -> Tensor:
    """φ'(a) written in terms of the output h = φ(a), so a need not be saved."""
    if nonlinearity == "tanh":
        return 1 - h * h
    if nonlinearity == "sigmoid":
        return h * (1 - h)
    return (~(h <= 0)).to(h.dtype)  # as torch's threshold_backward: a NaN output passes the gradient


# --------------------------------------------------------------------------- RNN


def rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, mask, nonlinearity):
    """(states (T+1, B, H) with h0 at index 0, output (T, B, H))."""
    T, B, _ = x.shape
    phi = ACTIVATIONS[nonlinearity]
    hs = x.new_empty((T + 1,) + h0.shape)
    hs[0] = h0
    w_hh_t, _ = planning.step_weights(w_hh, B, None, T)  # (H, H)
    xw = input_projection(x, w_ih, sum_bias(b_ih, b_hh))  # (T, B, H)
    for t in range(T):
        a = torch.addmm(xw[t], hs[t], w_hh_t)  # (B, H)
        if mask is None:
            phi(a, out=hs[t + 1])
        else:
            torch.where(mask[t], phi(a), hs[t], out=hs[t + 1])
    return hs, masked_output(hs, mask)


def rnn_backward(d_out, d_hn, x, w_ih, w_hh, mask, hs, nonlinearity, needs, has_bias):
    """((dx, dw_ih, dw_hh), dh0, db) for ``needs`` = whether dx, dw_ih, dw_hh are wanted."""
    T = x.shape[0]
    deriv = _rnn_derivative(hs[1:], nonlinearity)  # (T, B, H)
    # A ReLU that is off selects 0 (torch's threshold_backward) rather than multiplying
    # by 0, which would let a NaN gradient through.
    off = (deriv == 0) if nonlinearity == "relu" else None
    dz = torch.empty_like(deriv)  # (T, B, H)
    dh = state_grad(d_hn, hs[0])
    d_out = output_grad(d_out, hs[1:])
    for t in range(T - 1, -1, -1):
        if mask is None:
            torch.mul(d_out[t] + dh, deriv[t], out=dz[t])
        else:
            torch.mul((d_out[t] + dh) * mask[t], deriv[t], out=dz[t])
        if off is not None:
            dz[t].masked_fill_(off[t], 0)
        dh_prev = torch.mm(dz[t], w_hh)
        dh = dh_prev if mask is None else torch.where(mask[t], dh_prev, dh)
    return weight_grads(dz, x, hs[:-1], w_ih, needs), dh, dz.sum((0, 1)) if has_bias else None


# --------------------------------------------------------------------------- LSTM


def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, keep_gates: bool):
    """(hs, cs, gates, output): hs, cs (T+1, B, H) with the initial state at index 0; gates
    (T, B, 4H) activated i|f|g|o where keep_gates, else None."""
    T, B, _ = x.shape
    H = h0.shape[-1]
    hs = x.new_empty((T + 1, B, H))
    cs = x.new_empty((T + 1, B, H))
    hs[0] = h0
    cs[0] = c0
    gates = x.new_empty((T if keep_gates else 1, B, 4 * H))
    xw = input_projection(x, w_ih, sum_bias(b_ih, b_hh))  # (T, B, 4H)
    w_hh_t, _ = planning.step_weights(w_hh, B, None, T)  # (H, 4H)
    for t in range(T):
        z = torch.addmm(xw[t], hs[t], w_hh_t)  # (B, 4H) pre-activations
        a = gates[t if keep_gates else 0]  # (B, 4H)
        # One sigmoid over the whole contiguous block beats three on strided slices;
        # the g columns are then overwritten with their tanh.
        torch.sigmoid(z, out=a)
        torch.tanh(z[:, 2 * H : 3 * H], out=a[:, 2 * H : 3 * H])
        i, f, g, o = a.chunk(4, dim=1)  # 4 x (B, H)
        if mask is None:
            c = torch.addcmul(f * cs[t], i, g, out=cs[t + 1])
            torch.mul(o, torch.tanh(c), out=hs[t + 1])
        else:
            m = mask[t]
            c = torch.addcmul(f * cs[t], i, g)
            torch.where(m, c, cs[t], out=cs[t + 1])
            torch.where(m, o * torch.tanh(c), hs[t], out=hs[t + 1])
    return hs, cs, (gates if keep_gates else None), masked_output(hs, mask)


def lstm_backward(d_out, d_hn, d_cn, x, w_ih, w_hh, mask, hs, cs, gates, needs, has_bias):
    """((dx, dw_ih, dw_hh), dh0, dc0, db)."""
    T, B, H4 = gates.shape
    i, f, g, o = gates.chunk(4, dim=2)  # 4 x (T, B, H)
    tanh_c = torch.tanh(cs[1:])  # (T, B, H)
    # dZ = [dc·K_i, dc·K_f, dc·K_g, dh·K_o]: every factor that does not depend on
    # the reverse recurrence is computed here, for all steps in a few large ops.
    k = torch.stack(
        (g * i * (1 - i), cs[:-1] * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)),
        dim=2,
    )  # (T, B, 4, H)
    dc_from_dh = o * (1 - tanh_c * tanh_c)  # (T, B, H)
    f = f.contiguous()
    dz = torch.empty_like(k)  # (T, B, 4, H)
    dh = state_grad(d_hn, hs[0])
    dc = state_grad(d_cn, cs[0])
    d_out = output_grad(d_out, tanh_c)
    for t in range(T - 1, -1, -1):
        m = None if mask is None else mask[t]
        if m is None:
            dh_t = d_out[t] + dh
            dc_t = torch.addcmul(dc, dh_t, dc_from_dh[t])
        else:
            dh_t = (d_out[t] + dh) * m
            dc_t = torch.addcmul(dc * m, dh_t, dc_from_dh[t])
        torch.mul(torch.stack((dc_t, dc_t, dc_t, dh_t), dim=1), k[t], out=dz[t])
        dh_prev = torch.mm(dz[t].view(B, H4), w_hh)  # (B, H)
        dh, dc = carry(m, dh_prev, dh), carry(m, dc_t * f[t], dc)
    dz = dz.view(T, B, H4)
    return weight_grads(dz, x, hs[:-1], w_ih, needs), dh, dc, dz.sum((0, 1)) if has_bias else None


# --------------------------------------------------------------------------- GRU


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, mask, keep: bool):
    """(hs, rz, n, hn, output): hs (T+1, B, H); where keep, rz (T, B, 2H) activated r|z, n
    (T, B, H) the candidate and hn (T, B, H) = W_hn h + b_hn (else None for those three)."""
    T, B, _ = x.shape
    H = h0.shape[-1]
    w_hh_t, _ = planning.step_weights(w_hh, B, None, T)  # (H, 3H)
    hs = x.new_empty((T + 1, B, H))
    hs[0] = h0
    steps = T if keep else 1
    rz = x.new_empty((steps, B, 2 * H))
    n = x.new_empty((steps, B, H))
    hn = x.new_empty((steps, B, H))
    xw = input_projection(x, w_ih, b_ih)  # (T, B, 3H)
    for t in range(T):
        s = t if keep else 0
        hw = torch.mm(hs[t], w_hh_t) if b_hh is None else torch.addmm(b_hh, hs[t], w_hh_t)
        torch.sigmoid(torch.add(xw[t, :, : 2 * H], hw[:, : 2 * H]), out=rz[s])
        r, z = rz[s].chunk(2, dim=1)  # 2 x (B, H)
        hn[s] = hw[:, 2 * H :]
        torch.tanh(torch.addcmul(xw[t, :, 2 * H :], r, hn[s]), out=n[s])
        h_new = torch.addcmul(n[s], z, hs[t] - n[s])  # (1-z)·n + z·h
        if mask is None:
            hs[t + 1] = h_new
        else:
            torch.where(mask[t], h_new, hs[t], out=hs[t + 1])
    out = masked_output(hs, mask)
    return (hs, rz, n, hn, out) if keep else (hs, None, None, None, out)


def gru_backward(d_out, d_hn, x, w_ih, w_hh, mask, hs, rz, n, hn, needs, has_bias):
    """((dx, dw_ih, dw_hh), dh0, db_ih, db_hh) for ``needs`` = whether dx, dw_ih, dw_hh,
    db_ih, db_hh are wanted."""
    T, B, H = n.shape
    r, z = rz.chunk(2, dim=2)  # 2 x (T, B, H)
    k_n = (1 - z) * (1 - n * n)  # ∂h/∂(n pre-activation)
    k_z = (hs[:-1] - n) * z * (1 - z)  # ∂h/∂(z pre-activation)
    k_r = k_n * hn * r * (1 - r)  # ∂h/∂(r pre-activation)
    # Gradients w.r.t. the hidden projection differ from those w.r.t. the input
    # projection only in the n block, which r multiplies.
    k_h = torch.stack((k_r, k_z, k_n * r), dim=2)  # (T, B, 3, H)
    z = z.contiguous()
    dh_all = torch.empty_like(n)  # gradient reaching each new state, (T, B, H)
    dz_h = torch.empty_like(k_h)  # (T, B, 3, H)
    dh = state_grad(d_hn, hs[0])
    d_out = output_grad(d_out, n)
    for t in range(T - 1, -1, -1):
        m = None if mask is None else mask[t]
        if m is None:
            dh_t = torch.add(d_out[t], dh, out=dh_all[t])
        else:
            dh_t = torch.mul(d_out[t] + dh, m, out=dh_all[t])
        torch.mul(dh_t.unsqueeze(1), k_h[t], out=dz_h[t])
        dh_prev = torch.addmm(dh_t * z[t], dz_h[t].view(B, 3 * H), w_hh)  # (B, H)
        dh = carry(m, dh_prev, dh)
    dz_x = (dh_all.unsqueeze(2) * torch.stack((k_r, k_z, k_n), dim=2)).view(T, B, 3 * H)
    dz_h = dz_h.view(T, B, 3 * H)
    grads = weight_grads_gru(dz_x, dz_h, x, hs, w_ih, needs[:3])
    db_ih = dz_x.sum((0, 1)) if has_bias and needs[3] else None
    db_hh = dz_h.sum((0, 1)) if has_bias and needs[4] else None
    return grads, dh, db_ih, db_hh


def weight_grads_gru(dz_x, dz_h, x, hs, w_ih, needs):
    """dX, dW_ih, dW_hh from the gradients of the input projection dz_x and of the hidden
    projection dz_h (T, B, 3H)."""
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    grads = WeightGrads(x, hs[:-1], w_ih, H, needs)
    grads.add(dz_x, 0, T, [(slice(None), dz_h.reshape(T * B, 3 * H))])
    return grads.result()
