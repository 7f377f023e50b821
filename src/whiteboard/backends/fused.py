"""Fused forward and hand-written backward-through-time, one layer and one direction.

Each cell type gets a ``torch.autograd.Function`` whose forward runs the whole time loop
and saves what the backward needs, and whose backward is the reverse sweep written out:

    forward:  XW = X @ W_ihᵀ + b           one GEMM for all T steps      (T, B, G·H)
              for t: Z_t = XW_t + h_{t-1} @ W_hhᵀ   one small GEMM per step
                     pointwise gate math, state update
    backward: pointwise derivative factors K for all steps at once       (T, B, G, H)
              for t = T-1 … 0: dZ_t = (dh_t, dc_t) ⊙ K_t;  dh_{t-1} = dZ_t @ W_hh
              dW_ih = dZᵀ X, dW_hh = dZᵀ H_prev, db = Σ dZ, dX = dZ @ W_ih
                                                   large GEMMs after the sweep

Why it is laid out like this (measured on 2 CPU cores with torch 2.13):
- ``W_hhᵀ`` is copied to a contiguous tensor once per call: small GEMMs against a
  transposed view were 3-4x slower. The compiled loops instead take ``W_hh`` packed by
  oneDNN once per call for float32 (:func:`whiteboard.backends.compiled.build.packed_weight`).
- Everything that does not depend on the reverse recurrence (the K factors) is computed
  in a few large ops before the loop, so the loop holds ~5 small ops per step.
- Weight gradients are single GEMMs over all T·B rows rather than T small ones.

The torch loop uses only device-agnostic torch ops, so it runs on CPU and CUDA alike. Each
Function also drives the compiled loops (:mod:`whiteboard.backends.compiled.build`, CPU float32/float64)
where the backend boundary (:mod:`whiteboard.backends`) hands it the compiled module; how
those calls are planned (chunks, panels, packing, folding) is :mod:`whiteboard.backends.compiled.planning`.
They differ from the above:
- buffers come from a pool that spares large ones their page faults on every call;
- time is walked in chunks (``planning.CHUNK_BYTES``): each chunk's input projection is
  computed just before the loop reaches it, and the backward adds each chunk's weight-gradient
  GEMMs after sweeping it, so no (T, B, G·H) buffer beyond the saved ones exists;
- with a small input (I <= H/4) the LSTM and RNN skip the input projection and run each
  step's GEMM on [x_t, h_t] (``fold_input_max_ratio`` in :mod:`whiteboard.backends.compiled.build`);
- biases are added, and the bias gradient summed, inside the compiled gate passes.

Optional ``mask`` (T, B, 1, bool) marks valid steps of variable-length sequences: where
it is False the state is carried unchanged and the output is zero, as torch.nn does for
packed sequences.

Where the written-out sweeps cannot serve, each backward recomputes the forward with
:func:`reference_sequence` (the loop over :mod:`whiteboard.nn.cells`) and lets autograd
differentiate it: under ``create_graph=True`` (double backward: gradient penalties,
``gradgradcheck``) and for batched gradients (``torch.func.vmap``, ``gradcheck``'s
``check_batched_grad``), which neither the ``out=`` buffers of the torch sweep nor the
compiled calls can take part in.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from whiteboard.nn import cells
from whiteboard.backends.compiled import planning

__all__ = [
    "FusedRNN",
    "FusedLSTM",
    "FusedGRU",
    "FusedLayerNormLSTM",
    "rnn_sequence",
    "lstm_sequence",
    "gru_sequence",
    "layernorm_lstm_sequence",
    "reference_sequence",
]


def _input_projection(x: Tensor, w_ih: Tensor, bias: Tensor | None) -> Tensor:
    """X @ W_ihᵀ + b for all time steps in one GEMM. x (T, B, I) -> (T, B, G·H)."""
    T, B, I = x.shape
    x2 = x.reshape(T * B, I)
    out = torch.mm(x2, w_ih.t()) if bias is None else torch.addmm(bias, x2, w_ih.t())
    return out.view(T, B, w_ih.shape[0])  # not -1: a batch of 0 rows leaves it undetermined


def _sum_bias(b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor | None:
    if b_ih is None:
        return None
    return b_ih + b_hh


class _WeightGrads:
    """dX, dW_ih, dW_hh from pre-activation gradients dZ (steps, B, G·H) as large GEMMs over
    all steps x B rows, for all steps at once or a chunk of steps at a time."""

    def __init__(self, x: Tensor, h_prev: Tensor, w_ih: Tensor, hidden: int, needs: tuple, native=None):
        # From the compiled path's pool where there is one (see planning.empty): 58 MB of fresh
        # pages per step at config (d) otherwise.
        self.x, self.h_prev, self.w_ih, self.needs = x, h_prev, w_ih, needs
        self.dx = planning.empty(x.shape, x, native) if needs[0] else None  # (T, B, I)
        self.dw_ih = planning.empty(w_ih.shape, x, native) if needs[1] else None  # (G·H, I)
        self.dw_hh = planning.empty((w_ih.shape[0], hidden), x, native) if needs[2] else None  # (G·H, H)
        self.beta = 0  # the first chunk overwrites (beta 0 ignores what new_empty left there)

    def add(self, dz: Tensor, begin: int, end: int, hidden_blocks=None) -> None:
        """dz: steps [begin, end). hidden_blocks: [(rows of dW_hh, dZ_h block (rows, k))] where
        the hidden projection's gradient is not dz itself (the GRU's n block)."""
        # Sizes spelled out, not -1: a batch of 0 rows leaves -1 undetermined.
        count = (end - begin) * dz.shape[1]
        rows = dz.reshape(count, dz.shape[-1])  # ((end-begin)·B, G·H)
        if self.needs[0]:
            torch.mm(rows, self.w_ih, out=self.dx[begin:end].view(count, self.x.shape[-1]))
        if self.needs[1]:
            self.dw_ih.addmm_(rows.t(), self.x[begin:end].reshape(count, self.x.shape[-1]), beta=self.beta)
        if self.needs[2]:
            h_prev = self.h_prev[begin:end].reshape(count, self.h_prev.shape[-1])
            for target, block in hidden_blocks or [(slice(None), rows)]:
                self.dw_hh[target].addmm_(block.t(), h_prev, beta=self.beta)
        self.beta = 1

    def result(self) -> tuple:
        return self.dx, self.dw_ih, self.dw_hh


def _weight_grads(dz: Tensor, x: Tensor, h_prev: Tensor, w_ih: Tensor, needs: tuple) -> tuple:
    """dX, dW_ih, dW_hh from the pre-activation gradients dz (T, B, G·H) for all steps."""
    grads = _WeightGrads(x, h_prev, w_ih, h_prev.shape[-1], needs)
    grads.add(dz, 0, x.shape[0])
    return grads.result()


def reference_sequence(step, x: Tensor, initial: list[Tensor], weights, mask: Tensor | None):
    """The time loop over one of :mod:`whiteboard.nn.cells`' steps, in ordinary torch ops that
    autograd differentiates to any order and that vmap batches: (output (T, B, H), final
    states). ``initial`` is [h0] or [h0, c0]; a masked step (``mask`` (T, B, 1) False)
    carries the state and outputs zero, as the Functions do."""
    state = list(initial)
    outputs = []
    for t in range(x.shape[0]):
        step_result = step(x[t], *state, *weights)
        new = [step_result.hidden] if len(state) == 1 else [step_result.hidden, step_result.cell]
        if mask is None:
            state = new
            outputs.append(new[0])
        else:
            state = [torch.where(mask[t], n, old) for n, old in zip(new, state)]
            outputs.append(new[0] * mask[t])
    return torch.stack(outputs, 0), state  # (T, B, H)


def needs_autograd_backward(grads) -> bool:
    """Whether a backward must be made of differentiable, batchable ops: under
    ``create_graph=True`` (autograd runs a backward with grad mode on only then) or when
    an incoming gradient is batched by vmap (``torch.func.vmap``, ``gradcheck``'s
    ``check_batched_grad``: such a tensor has no storage for the compiled calls)."""
    return torch.is_grad_enabled() or any(g is not None and _is_batched(g) for g in grads)


def _is_batched(t: Tensor) -> bool:
    # autograd's is_grads_batched (gradcheck) uses the legacy batching; torch.func the other.
    functorch = torch._C._functorch
    return functorch.is_legacy_batchedtensor(t) or functorch.is_functorch_wrapped_tensor(t)


def autograd_backward(ctx, inputs: tuple, grads, run) -> tuple:
    """The gradients of a Function's tensor ``inputs`` (its forward's arguments, in order)
    by recomputing its outputs with ``run(*inputs)`` (a :func:`reference_sequence`) and
    letting autograd differentiate them. Under create_graph the recomputation starts from
    the saved inputs themselves, so the gradients it returns are differentiable again."""
    needs = ctx.needs_input_grad
    wanted = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and needs[i]]
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = list(inputs)
        if not create_graph:
            for i in wanted:
                leaves[i] = inputs[i].detach().requires_grad_()
        outputs = run(*leaves)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
        found = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in wanted], [g for _, g in pairs],
                                    create_graph=create_graph, allow_unused=True)
    result = [None] * len(needs)
    for i, grad in zip(wanted, found):
        result[i] = torch.zeros_like(inputs[i]) if grad is None else grad
    return tuple(result)


def _flat_reference(step, state_count: int):
    """run(x, *states, *weights, mask) for :func:`autograd_backward`: the reference loop's
    (output, final states...), in the order the Functions return them."""
    def run(x, *rest):
        states, weights, mask = rest[:state_count], rest[state_count:-1], rest[-1]
        output, finals = reference_sequence(step, x, list(states), weights, mask)
        return (output, *finals)
    return run


# --------------------------------------------------------------------------- RNN


def _rnn_derivative(h: Tensor, nonlinearity: str) -> Tensor:
    """φ'(a) written in terms of the output h = φ(a), so a need not be saved."""
    if nonlinearity == "tanh":
        return 1 - h * h
    if nonlinearity == "sigmoid":
        return h * (1 - h)
    return (~(h <= 0)).to(h.dtype)  # as torch's threshold_backward: a NaN output passes the gradient


def _relu(a: Tensor, out: Tensor | None = None) -> Tensor:
    return torch.clamp(a, min=0, out=out)  # torch.relu takes no out=


_RNN_ACTIVATIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": _relu}


def finite_or_none(native, *tensors: Tensor | None):
    """``native`` where ``tensors`` are all finite, else None (the torch loop). For what the
    compiled forward's own check cannot see: it tests every pre-activation, which any NaN
    or Inf in x, h0, the weights or the biases reaches, but an LSTM's c0 enters no
    pre-activation."""
    if native is None:
        return None
    return native if native.all_finite([t for t in tensors if t is not None]) else None


def backward_native(ctx, *grads: Tensor | None):
    """The compiled module for this backward, or None for the torch sweep: the compiled one
    is built for finite numbers (it turned a NaN in the incoming gradient into zeros),
    the torch sweep propagates NaN and Inf as torch.nn does."""
    return finite_or_none(ctx.native, *grads)


def run_sequence(sequence, native, *args):
    """``sequence(*args, native)`` on the compiled loop; where that met a NaN or an Inf (it
    returns None: it is built for finite numbers, see recurrent.cpp's not_finite), again on
    the torch loop, which propagates them as torch.nn does. Returns (its result, the
    compiled module, or None where the torch loop ran)."""
    if native is not None:
        result = sequence(*args, native)
        if result is not None:
            return result, native
    return sequence(*args, None), None


def _state_grad(grad: Tensor | None, like: Tensor) -> Tensor:
    """The gradient reaching a final state, as a fresh buffer the reverse sweep may
    overwrite; zeros when that state was not used."""
    return torch.zeros_like(like) if grad is None else grad.contiguous().clone()


def _output_grad(grad: Tensor | None, like: Tensor) -> Tensor:
    """The gradient of the output sequence (contiguous); zeros when it was not used."""
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def _carry(alive: Tensor | None, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where the sequence is still running (alive, (B, 1) bool), ``old`` where it has
    ended: a finished sequence carries its state (or its gradient) through the step."""
    return new if alive is None else torch.where(alive, new, old)




def rnn_sequence(x, h0, w_ih, w_hh, b_ih, b_hh, mask, nonlinearity, native=None):
    """Forward only; returns (states (T+1, B, H), output (T, B, H)). ``native`` is the
    compiled loop module (:mod:`whiteboard.backends.compiled.build`) or None for the torch loop; the
    compiled loop returns None where it met a NaN or Inf (see run_sequence)."""
    T, B, _ = x.shape
    phi = _RNN_ACTIVATIONS[nonlinearity]
    bias = _sum_bias(b_ih, b_hh)
    hs = planning.empty((T + 1,) + h0.shape, x, native)  # (T+1, B, H)
    hs[0] = h0
    if planning.folds_input(x, h0.shape[-1], native):
        w_cat = torch.cat((w_ih, w_hh), 1)  # (H, I+H)
        packed = planning.rnn_panels(w_cat, B, native, T)
        if packed is not None:
            w_cat_t = w_cat  # unused beside the panels
        else:
            w_cat_t, packed = planning.step_weights(w_cat, B, native, T)  # (I+H, H)
        if not native.rnn_forward_folded(x, bias, w_cat_t, hs, planning.RNN_KINDS[nonlinearity], planning.native_mask(mask), packed):
            return None
        return hs, (hs[1:] if mask is None else hs[1:] * mask)
    packed = planning.rnn_panels(w_hh, B, native, T)
    if packed is not None:
        w_hh_t = w_hh  # unused beside the panels
    else:
        w_hh_t, packed = planning.step_weights(w_hh, B, native, T)  # (H, H); see module docstring
    if native is not None:
        for xw, begin in planning.projected_chunks(x, w_ih, native):
            if not native.rnn_forward(xw, bias, w_hh_t, hs, planning.RNN_KINDS[nonlinearity], planning.native_mask(mask), packed, begin):
                return None
        return hs, (hs[1:] if mask is None else hs[1:] * mask)
    xw = _input_projection(x, w_ih, bias)  # (T, B, H)
    for t in range(T):
        a = torch.addmm(xw[t], hs[t], w_hh_t)  # (B, H)
        if mask is None:
            phi(a, out=hs[t + 1])
        else:
            torch.where(mask[t], phi(a), hs[t], out=hs[t + 1])
    out = hs[1:] if mask is None else hs[1:] * mask
    return hs, out


class FusedRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, mask, nonlinearity, native=None):
        (hs, out), native = run_sequence(rnn_sequence, native, x, h0, w_ih, w_hh, b_ih, b_hh, mask, nonlinearity)
        ctx.native = native
        ctx.nonlinearity = nonlinearity
        ctx.has_bias = b_ih is not None
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, mask, hs)
        return out, hs[-1].clone()

    @staticmethod
    def backward(ctx, d_out, d_hn):
        x, h0, w_ih, w_hh, b_ih, b_hh, mask, hs = ctx.saved_tensors
        if needs_autograd_backward((d_out, d_hn)):
            step = partial(cells.rnn_step, nonlinearity=ctx.nonlinearity)
            return autograd_backward(ctx, (x, h0, w_ih, w_hh, b_ih, b_hh, mask), (d_out, d_hn),
                                     _flat_reference(step, 1))
        T = x.shape[0]
        native = backward_native(ctx, d_out, d_hn)
        dh = _state_grad(d_hn, hs[0])
        d_out = _output_grad(d_out, hs[1:])
        if native is not None:
            B, H = hs.shape[1], hs.shape[2]
            dz_buffer, chunks = planning.sweep_chunks(T, H, d_out, native)  # (steps, B, H)
            db = d_out.new_zeros(H)  # summed in the sweep
            w_hh, native_mask = w_hh.contiguous(), planning.native_mask(mask)
            needs = ctx.needs_input_grad
            grads = _WeightGrads(x, hs[:-1], w_ih, H, (needs[0], needs[2], needs[3]), native)
            panels = planning.backward_panels(w_hh, B, native, T)
            for begin, end in chunks:
                dz = dz_buffer[: end - begin]
                native.rnn_backward(d_out, hs, w_hh, dh, dz, db, planning.RNN_KINDS[ctx.nonlinearity], native_mask,
                                    begin, end, panels)
                grads.add(dz, begin, end)
            return _rnn_grads(ctx, grads.result(), dh, db)
        deriv = _rnn_derivative(hs[1:], ctx.nonlinearity)  # (T, B, H)
        # A ReLU that is off selects 0 (torch's threshold_backward) rather than multiplying
        # by 0, which would let a NaN gradient through.
        off = (deriv == 0) if ctx.nonlinearity == "relu" else None
        dz = torch.empty_like(deriv)  # (T, B, H)
        for t in range(T - 1, -1, -1):
            if mask is None:
                torch.mul(d_out[t] + dh, deriv[t], out=dz[t])
            else:
                torch.mul((d_out[t] + dh) * mask[t], deriv[t], out=dz[t])
            if off is not None:
                dz[t].masked_fill_(off[t], 0)
            dh_prev = torch.mm(dz[t], w_hh)
            dh = dh_prev if mask is None else torch.where(mask[t], dh_prev, dh)
        needs = ctx.needs_input_grad
        weight_grads = _weight_grads(dz, x, hs[:-1], w_ih, (needs[0], needs[2], needs[3]))
        return _rnn_grads(ctx, weight_grads, dh, dz.sum((0, 1)) if ctx.has_bias else None)


def _rnn_grads(ctx, weight_grads, dh, db):
    dx, dw_ih, dw_hh = weight_grads
    needs = ctx.needs_input_grad
    db = db if ctx.has_bias and (needs[4] or needs[5]) else None
    return dx, dh, dw_ih, dw_hh, db, db, None, None, None


# --------------------------------------------------------------------------- LSTM


def lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, keep_gates: bool, native=None):
    """Forward only. Returns (hs, cs, gates, output): hs, cs (T+1, B, H) with the initial
    state at index 0; gates (T, B, 4H) activated i|f|g|o (only when keep_gates, else None).
    None from the compiled loop where it met a NaN or Inf (see run_sequence).
    """
    T, B, _ = x.shape
    H = h0.shape[-1]
    bias = _sum_bias(b_ih, b_hh)
    hs = planning.empty((T + 1, B, H), x, native)
    cs = planning.empty((T + 1, B, H), x, native)
    hs[0] = h0
    cs[0] = c0
    gates = planning.empty((T if keep_gates else 1, B, 4 * H), x, native)
    if native is not None:
        if planning.folds_input(x, H, native):
            packed = planning.gate_panels((w_ih, w_hh), 4, B, native, T)
            if packed is not None:
                w_cat_t = w_hh  # unused beside the panels
            else:
                w_cat_t, packed = planning.step_weights(torch.cat((w_ih, w_hh), 1), B, native, T)  # (I+H, 4H)
            if not native.lstm_forward_folded(x, bias, w_cat_t, hs, cs, gates, planning.native_mask(mask), packed):
                return None
        else:
            packed = planning.gate_panels((w_hh,), 4, B, native, T)
            if packed is not None:
                w_hh_t = w_hh  # unused beside the panels
            else:
                w_hh_t, packed = planning.step_weights(w_hh, B, native, T)
            for xw, begin in planning.projected_chunks(x, w_ih, native):  # (steps, B, 4H)
                if not native.lstm_forward(xw, bias, w_hh_t, hs, cs, gates, planning.native_mask(mask), packed, begin):
                    return None
        return hs, cs, (gates if keep_gates else None), (hs[1:] if mask is None else hs[1:] * mask)
    xw = _input_projection(x, w_ih, bias)  # (T, B, 4H)
    w_hh_t, _ = planning.step_weights(w_hh, B, None, T)  # (H, 4H); see module docstring
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
    out = hs[1:] if mask is None else hs[1:] * mask
    return hs, cs, (gates if keep_gates else None), out


class FusedLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, native=None):
        native = finite_or_none(native, c0)
        (hs, cs, gates, out), native = run_sequence(lstm_sequence, native, x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, True)
        ctx.native = native
        ctx.has_bias = b_ih is not None
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, hs, cs, gates)
        return out, hs[-1].clone(), cs[-1].clone()

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, hs, cs, gates = ctx.saved_tensors
        if needs_autograd_backward((d_out, d_hn, d_cn)):
            return autograd_backward(ctx, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask), (d_out, d_hn, d_cn),
                                     _flat_reference(cells.lstm_step, 2))
        T, B, H4 = gates.shape
        H = H4 // 4
        native = backward_native(ctx, d_out, d_hn, d_cn)
        if native is not None:
            # The compiled sweep recomputes the few factors it needs per element instead of
            # keeping a (T, B, 4, H) K tensor: less memory, one pass per step.
            dh = _state_grad(d_hn, hs[0])
            dc = _state_grad(d_cn, cs[0])
            d_out = _output_grad(d_out, hs[1:])
            dz_buffer, chunks = planning.sweep_chunks(T, H4, gates, native, planning.LSTM_SWEEP_CHUNK_BYTES)  # (steps, B, 4H)
            w_hh, native_mask = w_hh.contiguous(), planning.native_mask(mask)
            db = gates.new_zeros(H4)  # summed in the sweep
            needs = ctx.needs_input_grad
            grads = _WeightGrads(x, hs[:-1], w_ih, H, (needs[0], needs[3], needs[4]), native)
            panels = planning.backward_panels(w_hh, B, native, T)
            for begin, end in chunks:
                dz = dz_buffer[: end - begin]
                native.lstm_backward(d_out, gates, cs, w_hh, dh, dc, dz, db, native_mask, begin, end, panels)
                grads.add(dz, begin, end)
            return _lstm_grads(ctx, grads.result(), dh, dc, db)
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
        dh = _state_grad(d_hn, hs[0])
        dc = _state_grad(d_cn, cs[0])
        d_out = _output_grad(d_out, tanh_c)
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
            dh, dc = _carry(m, dh_prev, dh), _carry(m, dc_t * f[t], dc)
        dz = dz.view(T, B, H4)
        needs = ctx.needs_input_grad
        weight_grads = _weight_grads(dz, x, hs[:-1], w_ih, (needs[0], needs[3], needs[4]))
        return _lstm_grads(ctx, weight_grads, dh, dc, dz.sum((0, 1)) if ctx.has_bias else None)


def _lstm_grads(ctx, weight_grads, dh, dc, db):
    dx, dw_ih, dw_hh = weight_grads
    needs = ctx.needs_input_grad
    db = db if ctx.has_bias and (needs[5] or needs[6]) else None
    return dx, dh, dc, dw_ih, dw_hh, db, db, None, None


# --------------------------------------------------------------------------- GRU


def gru_sequence(x, h0, w_ih, w_hh, b_ih, b_hh, mask, keep: bool, native=None):
    """Forward only. Returns (hs, rz, n, hn, output): hs (T+1, B, H); when keep, rz
    (T, B, 2H) activated r|z, n (T, B, H) the candidate and hn (T, B, H) = W_hn h + b_hn.
    None from the compiled loop where it met a NaN or Inf (see run_sequence).
    """
    T, B, _ = x.shape
    H = h0.shape[-1]
    # Panels in training too: with the epilogue's line requests spread over the K loop for
    # large steps (recurrent.cpp's spread_lines), its stores of r|z, n and W_hn h for backward
    # no longer cost more than the panels gain (benchmarks/README.md, "what each change bought").
    packed = planning.gate_panels((w_hh,), 3, B, native, T)
    if packed is not None:
        w_hh_t = w_hh  # unused beside the panels
    else:
        w_hh_t, packed = planning.step_weights(w_hh, B, native, T)  # (H, 3H)
    hs = planning.empty((T + 1, B, H), x, native)
    hs[0] = h0
    steps = T if keep else 1
    rz = planning.empty((steps, B, 2 * H), x, native)
    n = planning.empty((steps, B, H), x, native)
    hn = planning.empty((steps, B, H), x, native)
    if native is not None:
        for xw, begin in planning.projected_chunks(x, w_ih, native, planning.GRU_CHUNK_BYTES):  # (steps, B, 3H)
            if not native.gru_forward(xw, b_ih, w_hh_t, b_hh, hs, rz, n, hn, planning.native_mask(mask), packed, begin):
                return None
        out = hs[1:] if mask is None else hs[1:] * mask
        return (hs, rz, n, hn, out) if keep else (hs, None, None, None, out)
    xw = _input_projection(x, w_ih, b_ih)  # (T, B, 3H)
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
    out = hs[1:] if mask is None else hs[1:] * mask
    if not keep:
        return hs, None, None, None, out
    return hs, rz, n, hn, out


class FusedGRU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, mask, native=None):
        (hs, rz, n, hn, out), native = run_sequence(gru_sequence, native, x, h0, w_ih, w_hh, b_ih, b_hh, mask, True)
        ctx.native = native
        ctx.has_bias = b_ih is not None
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, mask, hs, rz, n, hn)
        return out, hs[-1].clone()

    @staticmethod
    def backward(ctx, d_out, d_hn):
        x, h0, w_ih, w_hh, b_ih, b_hh, mask, hs, rz, n, hn = ctx.saved_tensors
        if needs_autograd_backward((d_out, d_hn)):
            return autograd_backward(ctx, (x, h0, w_ih, w_hh, b_ih, b_hh, mask), (d_out, d_hn),
                                     _flat_reference(cells.gru_step, 1))
        T, B, H = n.shape
        native = backward_native(ctx, d_out, d_hn)
        if native is not None:
            dh = _state_grad(d_hn, hs[0])
            d_out = _output_grad(d_out, n)
            # dz_x (steps, B, 3H) and dn_h, the n block of dZ_h (its r, z blocks are dz_x's),
            # share one pooled buffer per chunk of steps.
            buffer, chunks = planning.sweep_chunks(T, 4 * H, x, native, planning.GRU_CHUNK_BYTES)
            w_hh, native_mask = w_hh.contiguous(), planning.native_mask(mask)
            db = x.new_zeros(4 * H)  # [b_ir, b_iz, b_in | b_hn] summed in the sweep
            needs = ctx.needs_input_grad
            grads = _WeightGrads(x, hs[:-1], w_ih, H, (needs[0], needs[2], needs[3]), native)
            panels = planning.backward_panels(w_hh, B, native, T)
            for begin, end in chunks:
                steps = end - begin
                dz_x = buffer.view(-1)[: steps * B * 3 * H].view(steps, B, 3 * H)
                dn_h = buffer.view(-1)[steps * B * 3 * H : steps * B * 4 * H].view(steps, B, H)
                native.gru_backward(d_out, hs, rz, n, hn, w_hh, dh, dz_x, dn_h, db, native_mask, begin, end, panels)
                rows = dz_x.view(steps * B, 3 * H)
                grads.add(dz_x, begin, end, [(slice(0, 2 * H), rows[:, : 2 * H]), (slice(2 * H, None), dn_h.view(-1, H))])
            dx, dw_ih, dw_hh = grads.result()
            db_ih = db[: 3 * H] if ctx.has_bias and needs[4] else None
            db_hh = torch.cat((db[: 2 * H], db[3 * H :])) if ctx.has_bias and needs[5] else None
            return dx, dh, dw_ih, dw_hh, db_ih, db_hh, None, None
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
        dh = _state_grad(d_hn, hs[0])
        d_out = _output_grad(d_out, n)
        for t in range(T - 1, -1, -1):
            m = None if mask is None else mask[t]
            if m is None:
                dh_t = torch.add(d_out[t], dh, out=dh_all[t])
            else:
                dh_t = torch.mul(d_out[t] + dh, m, out=dh_all[t])
            torch.mul(dh_t.unsqueeze(1), k_h[t], out=dz_h[t])
            dh_prev = torch.addmm(dh_t * z[t], dz_h[t].view(B, 3 * H), w_hh)  # (B, H)
            dh = _carry(m, dh_prev, dh)
        dz_x = dh_all.unsqueeze(2) * torch.stack((k_r, k_z, k_n), dim=2)  # (T, B, 3, H)
        return _gru_grads(ctx, dz_x.view(T, B, 3 * H), dz_h.view(T, B, 3 * H), dh, x, w_ih, hs)


def _gru_grads(ctx, dz_x, dz_h, dh, x, w_ih, hs):
    """The torch sweep's gradients from dz_x and dz_h (T, B, 3H), those of the input and of
    the hidden projection (they differ in the n block, which r multiplies)."""
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    needs = ctx.needs_input_grad
    grads = _WeightGrads(x, hs[:-1], w_ih, H, (needs[0], needs[2], needs[3]))
    grads.add(dz_x, 0, T, [(slice(None), dz_h.reshape(T * B, 3 * H))])
    dx, dw_ih, dw_hh = grads.result()
    db_ih = dz_x.sum((0, 1)) if ctx.has_bias and needs[4] else None
    db_hh = dz_h.sum((0, 1)) if ctx.has_bias and needs[5] else None
    return dx, dh, dw_ih, dw_hh, db_ih, db_hh, None, None


# --------------------------------------------------------------------------- layer-norm LSTM


def _normalize(z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(z - mean) * rstd over the last dimension, and rstd (..., 1), in one ATen call."""
    normalized, _, rstd = torch.native_layer_norm(z, (z.shape[-1],), None, None, eps)
    return normalized, rstd.view(*z.shape[:-1], 1)


def _normalize_backward(d_normalized: Tensor, normalized: Tensor, rstd: Tensor) -> Tensor:
    """Gradient through z -> (z - mean) * rstd, given the normalized values."""
    mean_d = d_normalized.mean(-1, keepdim=True)
    mean_dn = (d_normalized * normalized).mean(-1, keepdim=True)
    return rstd * (d_normalized - mean_d - normalized * mean_dn)


def layernorm_lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, gain_ih, gain_hh, gain_cell, bias_cell, mask,
                            keep: bool, eps: float):
    """Forward only, see :func:`whiteboard.nn.cells.layernorm_lstm_step`. Returns (hs, cs, out,
    saved): hs, cs (T+1, B, H); saved (when keep) holds what the backward sweep needs."""
    T, B, _ = x.shape
    H = h0.shape[-1]
    xw_hat, rstd_ih = _normalize(_input_projection(x, w_ih, None), eps)  # (T, B, 4H), (T, B, 1)
    base = xw_hat * gain_ih  # (T, B, 4H)
    bias = _sum_bias(b_ih, b_hh)
    if bias is not None:
        base = base + bias
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
        ctx.has_bias = b_ih is not None
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, gain_ih, gain_hh, gain_cell, bias_cell, mask,
                              hs, cs, *saved)
        return out, hs[-1].clone(), cs[-1].clone()

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, gain_ih, gain_hh, gain_cell, bias_cell, mask, hs, cs, *saved = \
            ctx.saved_tensors
        if needs_autograd_backward((d_out, d_hn, d_cn)):
            inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, gain_ih, gain_hh, gain_cell, bias_cell, mask)
            return autograd_backward(ctx, inputs, (d_out, d_hn, d_cn), _flat_reference(cells.layernorm_lstm_step, 2))
        xw_hat, rstd_ih, gates, hw_hat, rstd_hh, c_hat, rstd_c, tanh_y = saved
        T, B, H4 = gates.shape
        i, f, g, o = gates.chunk(4, dim=2)  # 4 x (T, B, H)
        # Factors that do not depend on the reverse recurrence, for all steps at once.
        k = torch.stack((g * i * (1 - i), cs[:-1] * f * (1 - f), i * (1 - g * g)), dim=2)  # (T, B, 3, H)
        k_o = tanh_y * o * (1 - o)  # (T, B, H)
        dy_from_dh = o * (1 - tanh_y * tanh_y)  # d tanh(LN(c)) / d LN(c), times o
        f = f.contiguous()
        dz = x.new_empty((T, B, H4))
        d_hw = x.new_empty((T, B, H4))  # gradient of W h_{t-1}, before its normalization
        d_y = x.new_empty((T, B, gain_cell.shape[0]))  # gradient of LN(c_t)
        dh = _state_grad(d_hn, hs[0])
        dc = _state_grad(d_cn, cs[0])
        d_out = _output_grad(d_out, tanh_y)
        for t in range(T - 1, -1, -1):
            m = None if mask is None else mask[t]
            dh_t = d_out[t] + dh if m is None else (d_out[t] + dh) * m
            torch.mul(dh_t, dy_from_dh[t], out=d_y[t])
            dc_t = _normalize_backward(d_y[t] * gain_cell, c_hat[t], rstd_c[t])
            dc_t += dc if m is None else dc * m
            dz_t = dz[t].view(B, 4, H4 // 4)
            torch.mul(dc_t.unsqueeze(1), k[t], out=dz_t[:, :3])
            torch.mul(dh_t, k_o[t], out=dz_t[:, 3])
            d_hw[t] = _normalize_backward(dz[t] * gain_hh, hw_hat[t], rstd_hh[t])
            dh_prev = torch.mm(d_hw[t], w_hh)  # (B, H)
            dh, dc = _carry(m, dh_prev, dh), _carry(m, dc_t * f[t], dc)
        needs = ctx.needs_input_grad
        rows = lambda t: t.reshape(T * B, t.shape[-1])  # noqa: E731
        d_xw = _normalize_backward(dz * gain_ih, xw_hat, rstd_ih)  # (T, B, 4H)
        dx = torch.mm(rows(d_xw), w_ih).view(T, B, w_ih.shape[1]) if needs[0] else None
        dw_ih = torch.mm(rows(d_xw).t(), rows(x)) if needs[3] else None
        dw_hh = torch.mm(rows(d_hw).t(), rows(hs[:-1])) if needs[4] else None
        db = dz.sum((0, 1)) if ctx.has_bias and (needs[5] or needs[6]) else None
        d_gain_ih = (dz * xw_hat).sum((0, 1)) if needs[7] else None
        d_gain_hh = (dz * hw_hat).sum((0, 1)) if needs[8] else None
        d_gain_cell = (d_y * c_hat).sum((0, 1)) if needs[9] else None
        d_bias_cell = d_y.sum((0, 1)) if needs[10] else None
        return dx, dh, dc, dw_ih, dw_hh, db, db, d_gain_ih, d_gain_hh, d_gain_cell, d_bias_cell, None, None
