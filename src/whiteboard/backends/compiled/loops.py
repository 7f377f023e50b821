"""The compiled loop's side of each cell's forward and reverse sweep: the same sweeps as
:mod:`whiteboard.backends.torch_sweeps`, each time loop one call into the C++ module
(``compiled``, from :func:`whiteboard.backends.compiled.build.load`), as
:mod:`.planning` plans it. They differ from the torch loop's:

- buffers come from a pool that spares large ones their page faults on every call;
- time is walked in chunks (``planning.CHUNK_BYTES``): each chunk's input projection is
  computed just before the loop reaches it, and the backward adds each chunk's
  weight-gradient GEMMs after sweeping it, so no (T, B, G·H) buffer beyond the saved ones
  exists;
- with a small input the LSTM and RNN skip the input projection and run each step's GEMM
  on [x_t, h_t] (``planning.folds_input``);
- biases are added, and the bias gradient summed, inside the compiled gate passes;
- the reverse sweep recomputes the few factors it needs per element instead of keeping a
  (T, B, G, H) tensor of them.

The compiled loops are built for finite numbers: a forward returns None where it met a NaN
or an Inf, and the caller runs the torch loop instead (see
:func:`whiteboard.backends.functions.run_sequence`).
"""

from __future__ import annotations

import torch

from whiteboard.backends.common import WeightGrads, masked_output, output_grad, state_grad, sum_bias
from whiteboard.backends.compiled import planning

# --------------------------------------------------------------------------- RNN


def rnn_forward(compiled, x, h0, w_ih, w_hh, b_ih, b_hh, mask, nonlinearity):
    """(states (T+1, B, H), output (T, B, H)), or None where a NaN or Inf was met."""
    T, B, _ = x.shape
    bias = sum_bias(b_ih, b_hh)
    kind = planning.RNN_KINDS[nonlinearity]
    hs = planning.empty((T + 1,) + h0.shape, x, compiled)  # (T+1, B, H)
    hs[0] = h0
    if planning.folds_input(x, h0.shape[-1], compiled):
        w_cat = torch.cat((w_ih, w_hh), 1)  # (H, I+H)
        packed = planning.rnn_panels(w_cat, B, compiled, T)
        if packed is not None:
            w_cat_t = w_cat  # unused beside the panels
        else:
            w_cat_t, packed = planning.step_weights(w_cat, B, compiled, T)  # (I+H, H)
        if not compiled.rnn_forward_folded(x, bias, w_cat_t, hs, kind, planning.native_mask(mask), packed):
            return None
        return hs, masked_output(hs, mask)
    packed = planning.rnn_panels(w_hh, B, compiled, T)
    if packed is not None:
        w_hh_t = w_hh  # unused beside the panels
    else:
        w_hh_t, packed = planning.step_weights(w_hh, B, compiled, T)  # (H, H)
    for xw, begin in planning.projected_chunks(x, w_ih, compiled):
        if not compiled.rnn_forward(xw, bias, w_hh_t, hs, kind, planning.native_mask(mask), packed, begin):
            return None
    return hs, masked_output(hs, mask)


def rnn_backward(compiled, d_out, d_hn, x, w_ih, w_hh, mask, hs, nonlinearity, needs, has_bias):
    """((dx, dw_ih, dw_hh), dh0, db), as :func:`whiteboard.backends.torch_sweeps.rnn_backward`."""
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    dh = state_grad(d_hn, hs[0])
    d_out = output_grad(d_out, hs[1:])
    dz_buffer, chunks = planning.sweep_chunks(T, H, d_out, compiled)  # (steps, B, H)
    db = d_out.new_zeros(H)  # summed in the sweep
    w_hh, compiled_mask = w_hh.contiguous(), planning.native_mask(mask)
    grads = WeightGrads(x, hs[:-1], w_ih, H, needs, compiled)
    panels = planning.backward_panels(w_hh, B, compiled, T)
    for begin, end in chunks:
        dz = dz_buffer[: end - begin]
        compiled.rnn_backward(d_out, hs, w_hh, dh, dz, db, planning.RNN_KINDS[nonlinearity], compiled_mask,
                              begin, end, panels)
        grads.add(dz, begin, end)
    return grads.result(), dh, db if has_bias else None


# --------------------------------------------------------------------------- LSTM


def lstm_forward(compiled, x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, keep_gates: bool):
    """(hs, cs, gates, output) as the torch loop's, or None where a NaN or Inf was met."""
    T, B, _ = x.shape
    H = h0.shape[-1]
    bias = sum_bias(b_ih, b_hh)
    hs = planning.empty((T + 1, B, H), x, compiled)
    cs = planning.empty((T + 1, B, H), x, compiled)
    hs[0] = h0
    cs[0] = c0
    gates = planning.empty((T if keep_gates else 1, B, 4 * H), x, compiled)
    compiled_mask = planning.native_mask(mask)
    if planning.folds_input(x, H, compiled):
        packed = planning.gate_panels((w_ih, w_hh), 4, B, compiled, T)
        if packed is not None:
            w_cat_t = w_hh  # unused beside the panels
        else:
            w_cat_t, packed = planning.step_weights(torch.cat((w_ih, w_hh), 1), B, compiled, T)  # (I+H, 4H)
        if not compiled.lstm_forward_folded(x, bias, w_cat_t, hs, cs, gates, compiled_mask, packed):
            return None
    else:
        packed = planning.gate_panels((w_hh,), 4, B, compiled, T)
        if packed is not None:
            w_hh_t = w_hh  # unused beside the panels
        else:
            w_hh_t, packed = planning.step_weights(w_hh, B, compiled, T)
        for xw, begin in planning.projected_chunks(x, w_ih, compiled):  # (steps, B, 4H)
            if not compiled.lstm_forward(xw, bias, w_hh_t, hs, cs, gates, compiled_mask, packed, begin):
                return None
    return hs, cs, (gates if keep_gates else None), masked_output(hs, mask)


def lstm_backward(compiled, d_out, d_hn, d_cn, x, w_ih, w_hh, mask, hs, cs, gates, needs, has_bias):
    """((dx, dw_ih, dw_hh), dh0, dc0, db)."""
    T, B, H4 = gates.shape
    dh = state_grad(d_hn, hs[0])
    dc = state_grad(d_cn, cs[0])
    d_out = output_grad(d_out, hs[1:])
    dz_buffer, chunks = planning.sweep_chunks(T, H4, gates, compiled, planning.LSTM_SWEEP_CHUNK_BYTES)  # (steps, B, 4H)
    w_hh, compiled_mask = w_hh.contiguous(), planning.native_mask(mask)
    db = gates.new_zeros(H4)  # summed in the sweep
    grads = WeightGrads(x, hs[:-1], w_ih, H4 // 4, needs, compiled)
    panels = planning.backward_panels(w_hh, B, compiled, T)
    for begin, end in chunks:
        dz = dz_buffer[: end - begin]
        compiled.lstm_backward(d_out, gates, cs, w_hh, dh, dc, dz, db, compiled_mask, begin, end, panels)
        grads.add(dz, begin, end)
    return grads.result(), dh, dc, db if has_bias else None


# --------------------------------------------------------------------------- GRU


def gru_forward(compiled, x, h0, w_ih, w_hh, b_ih, b_hh, mask, keep: bool):
    """(hs, rz, n, hn, output) as the torch loop's, or None where a NaN or Inf was met."""
    T, B, _ = x.shape
    H = h0.shape[-1]
    # Panels in training too: with the epilogue's line requests spread over the K loop for
    # large steps (the C++ spread_lines), its stores of r|z, n and W_hn h for backward no
    # longer cost more than the panels gain (benchmarks/README.md, "what each change bought").
    packed = planning.gate_panels((w_hh,), 3, B, compiled, T)
    if packed is not None:
        w_hh_t = w_hh  # unused beside the panels
    else:
        w_hh_t, packed = planning.step_weights(w_hh, B, compiled, T)  # (H, 3H)
    hs = planning.empty((T + 1, B, H), x, compiled)
    hs[0] = h0
    steps = T if keep else 1
    rz = planning.empty((steps, B, 2 * H), x, compiled)
    n = planning.empty((steps, B, H), x, compiled)
    hn = planning.empty((steps, B, H), x, compiled)
    for xw, begin in planning.projected_chunks(x, w_ih, compiled, planning.GRU_CHUNK_BYTES):  # (steps, B, 3H)
        if not compiled.gru_forward(xw, b_ih, w_hh_t, b_hh, hs, rz, n, hn, planning.native_mask(mask), packed, begin):
            return None
    out = masked_output(hs, mask)
    return (hs, rz, n, hn, out) if keep else (hs, None, None, None, out)


def gru_backward(compiled, d_out, d_hn, x, w_ih, w_hh, mask, hs, rz, n, hn, needs, has_bias):
    """((dx, dw_ih, dw_hh), dh0, db_ih, db_hh)."""
    T, B, H = n.shape
    dh = state_grad(d_hn, hs[0])
    d_out = output_grad(d_out, n)
    # dz_x (steps, B, 3H) and dn_h, the n block of dZ_h (its r, z blocks are dz_x's),
    # share one pooled buffer per chunk of steps.
    buffer, chunks = planning.sweep_chunks(T, 4 * H, x, compiled, planning.GRU_CHUNK_BYTES)
    w_hh, compiled_mask = w_hh.contiguous(), planning.native_mask(mask)
    db = x.new_zeros(4 * H)  # [b_ir, b_iz, b_in | b_hn] summed in the sweep
    grads = WeightGrads(x, hs[:-1], w_ih, H, needs[:3], compiled)
    panels = planning.backward_panels(w_hh, B, compiled, T)
    for begin, end in chunks:
        steps = end - begin
        dz_x = buffer.view(-1)[: steps * B * 3 * H].view(steps, B, 3 * H)
        dn_h = buffer.view(-1)[steps * B * 3 * H : steps * B * 4 * H].view(steps, B, H)
        compiled.gru_backward(d_out, hs, rz, n, hn, w_hh, dh, dz_x, dn_h, db, compiled_mask, begin, end, panels)
        rows = dz_x.view(steps * B, 3 * H)
        grads.add(dz_x, begin, end, [(slice(0, 2 * H), rows[:, : 2 * H]), (slice(2 * H, None), dn_h.view(-1, H))])
    db_ih = db[: 3 * H] if has_bias and needs[3] else None
    db_hh = torch.cat((db[: 2 * H], db[3 * H :])) if has_bias and needs[4] else None
    return grads.result(), dh, db_ih, db_hh
