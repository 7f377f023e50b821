"""The reference backend: the time loop over :mod:`whiteboard.nn.cells`' steps in ordinary
torch ops, which autograd differentiates to any order and torch.func transforms see
through. It is the only backend that records a trace or mixes zoneout into the states,
and every other backend is tested against it.

The other backends' hand-written backwards also fall back on it: where a sweep cannot serve
(double backward, batched gradients), :func:`autograd_backward` recomputes the forward here
and lets autograd differentiate it.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from whiteboard.backends.base import Backend, Call
from whiteboard.nn import cells


def step_function(mode: str, layer_norm: bool = False, nonlinearity: str = "tanh"):
    """The cell's one step: step(x_t, *states, *weights) -> its step record."""
    if mode == "RNN":
        return partial(cells.rnn_step, nonlinearity=nonlinearity)
    if mode == "GRU":
        return cells.gru_step
    return cells.layernorm_lstm_step if layer_norm else cells.lstm_step


def reference_sequence(step, x: Tensor, initial: list[Tensor], weights, mask: Tensor | None):
    """The time loop over one of :mod:`whiteboard.nn.cells`' steps, in ordinary torch ops that
    autograd differentiates to any order and that vmap batches: (output (T, B, H), final
    states). ``initial`` is [h0] or [h0, c0]; a masked step (``mask`` (T, B, 1) False)
    carries the state and outputs zero, as the Functions do."""
    output, state, _ = _loop(step, x, initial, weights, mask)
    return output, state


def _loop(step, x, initial, weights, mask, zoneout=None, trace_fields=None):
    state = list(initial)
    outputs, records = [], []
    for t in range(x.shape[0]):
        record = step(x[t], *state, *weights)
        new = [record.hidden] if len(state) == 1 else [record.hidden, record.cell]
        if zoneout:
            p_hidden, p_cell, training = zoneout
            new = [cells.zoneout_mix(n, old, p, training) for n, old, p in zip(new, state, (p_hidden, p_cell))]
            record = record._replace(hidden=new[0], **({"cell": new[1]} if len(new) == 2 else {}))
        if mask is None:
            outputs.append(new[0])
        else:
            new = [torch.where(mask[t], n, old) for n, old in zip(new, state)]
            outputs.append(record.hidden * mask[t])
        state = new
        if trace_fields:
            records.append(record)
    fields = None
    if trace_fields:
        fields = {}
        for name in trace_fields:
            values = torch.stack([getattr(r, name) for r in records], 0)  # (T, B, H)
            fields[name] = values if mask is None else values * mask
    return torch.stack(outputs, 0), state, fields  # (T, B, H)


class _Reference(Backend):
    name, implementation = "reference", "reference"

    def supports(self, call: Call) -> str | None:
        return None

    def run(self, call: Call, x: Tensor, initial: list[Tensor], weights: tuple, mask: Tensor | None):
        step = step_function(call.mode, call.layer_norm, call.nonlinearity)
        fields = cells.TRACE_FIELDS[call.mode] if call.trace else None
        return _loop(step, x, initial, weights, mask, call.zoneout, fields)


REFERENCE = _Reference()


# ------------------------------------------------------- backward by recomputation


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


def flat_reference(step, state_count: int):
    """run(x, *states, *weights, mask) for :func:`autograd_backward`: the reference loop's
    (output, final states...), in the order the Functions return them."""
    def run(x, *rest):
        states, weights, mask = rest[:state_count], rest[state_count:-1], rest[-1]
        output, finals = reference_sequence(step, x, list(states), weights, mask)
        return (output, *finals)
    return run
