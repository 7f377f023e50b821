"""The layers' time loops as PyTorch custom operators, for ``torch.compile`` and
``torch.export``.

Eagerly, a layer calls its backend directly (:mod:`whiteboard.backends`). While torch.compile
or torch.export traces a model, it calls ``torch.ops.whiteboard.direction`` instead: one
operator per layer and direction, which Dynamo and export see as a single node with a fake
(meta) kernel for its shapes. At run time the operator's kernel picks the backend as an eager
call would (compiled loops on CPU, the torch loop elsewhere), so a compiled model runs the
same loops.

Its gradient is ``torch.ops.whiteboard.direction_backward``, another operator: its kernel
recomputes the forward with the backend's autograd Function and lets autograd run that
Function's hand-written backward. That costs one more forward per backward than eager mode
(measured in benchmarks/README.md, "torch.compile"), and it is first-order only: double
backward through a compiled layer is not supported (eager mode supports it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from whiteboard.backends.base import Call
from whiteboard.backends.registry import choose

__all__ = ["direction"]


def _call(cell: str, nonlinearity: str, x: Tensor, mask: Optional[Tensor], weights) -> Call:
    return Call(mode="LSTM" if cell == "layernorm-lstm" else cell.upper(), layer_norm=cell == "layernorm-lstm",
                device_type=x.device.type, dtype=x.dtype, lengths=mask is not None, nonlinearity=nonlinearity,
                projection=cell == "lstm" and len(weights) == 5)  # an LSTMP's weights end with W_hr


def _state_count(cell: str) -> int:
    return 2 if cell in ("lstm", "layernorm-lstm") else 1


def _weights(weights: list[Tensor]) -> tuple:
    """The layer's weights, a missing bias passed as an empty tensor: a list of optional
    tensors as an operator's argument trips torch's autograd registration (it takes a list
    holding None for a single value, and a list of gradients holding None for several)."""
    return tuple(None if w is None or w.numel() == 0 else w for w in weights)


def _run(cell, nonlinearity, implementation, x, states, weights, mask):
    call = _call(cell, nonlinearity, x, mask, weights)
    output, finals, _ = choose(call, implementation).run(call, x, list(states), _weights(weights), mask)
    return output, finals


@torch.library.custom_op("whiteboard::direction", mutates_args=())
def direction(cell: str, nonlinearity: str, implementation: str, x: Tensor, states: list[Tensor],
              weights: list[Tensor], mask: Optional[Tensor]) -> list[Tensor]:
    """One layer, one direction: [output (T, B, H), final states (B, H)...]. ``cell`` is
    "rnn", "lstm", "gru" or "layernorm-lstm"; ``weights`` the layer's, in its order, with an
    empty tensor for a missing bias."""
    with torch.no_grad():
        output, finals = _run(cell, nonlinearity, implementation, x, states, weights, mask)
    return _unshared([output, *finals], [x, *states, *weights])


@direction.register_fake
def _direction_fake(cell, nonlinearity, implementation, x, states, weights, mask):
    hidden = states[0].shape[-1]
    return [x.new_empty((x.shape[0], x.shape[1], hidden)), *(s.new_empty(s.shape) for s in states)]


@torch.library.custom_op("whiteboard::direction_backward", mutates_args=())
def direction_backward(cell: str, nonlinearity: str, implementation: str, grads: list[Tensor], x: Tensor,
                       states: list[Tensor], weights: list[Tensor], mask: Optional[Tensor]) -> list[Tensor]:
    """The gradients of x, the states and every weight (an empty tensor for a missing bias),
    given those of direction()'s outputs, by recomputing it with autograd."""
    leaves = [x.detach().requires_grad_(), *(s.detach().requires_grad_() for s in states)]
    weight_leaves = [None if w is None else w.detach().requires_grad_() for w in _weights(weights)]
    with torch.enable_grad():
        output, finals = _run(cell, nonlinearity, implementation, leaves[0], leaves[1:], weight_leaves, mask)
        wanted = leaves + [w for w in weight_leaves if w is not None]
        found = torch.autograd.grad([output, *finals], wanted, grads, allow_unused=True)
    found = _unshared([torch.zeros_like(t) if g is None else g for g, t in zip(found, wanted)],
                      [x, *states, *weights, *grads])
    by_weight = iter(found[len(leaves):])
    return found[: len(leaves)] + [x.new_empty(0) if w is None else next(by_weight) for w in weight_leaves]


def _unshared(tensors: list[Tensor], inputs: list[Tensor]) -> list[Tensor]:
    """``tensors`` as a custom operator must return them, and as the fake kernels describe
    them: contiguous, each in its own memory from offset 0, sharing none with the inputs
    (the loops return views of their state buffers, and the Functions give both biases one
    gradient)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    result = []
    for t in tensors:
        pointer = t.untyped_storage().data_ptr()
        if t.numel() and (pointer in seen or t.storage_offset() != 0 or not t.is_contiguous()
                          or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone(memory_format=torch.contiguous_format)
            pointer = t.untyped_storage().data_ptr()
        seen.add(pointer)
        result.append(t)
    return result


@direction_backward.register_fake
def _direction_backward_fake(cell, nonlinearity, implementation, grads, x, states, weights, mask):
    return [x.new_empty(x.shape), *(s.new_empty(s.shape) for s in states),
            *(w.new_empty(w.shape) for w in weights)]


def _setup_context(ctx, inputs, output):
    cell, nonlinearity, implementation, x, states, weights, mask = inputs
    ctx.cell, ctx.nonlinearity, ctx.implementation = cell, nonlinearity, implementation
    ctx.state_count = len(states)
    ctx.save_for_backward(x, mask, *states, *weights)


def _backward(ctx, grads):
    x, mask, *rest = ctx.saved_tensors
    states, weights = rest[: ctx.state_count], list(rest[ctx.state_count:])
    outputs = [x.new_zeros((x.shape[0], x.shape[1], states[0].shape[-1])), *(torch.zeros_like(s) for s in states)]
    grads = [o if g is None else g for g, o in zip(grads, outputs)]
    found = torch.ops.whiteboard.direction_backward(ctx.cell, ctx.nonlinearity, ctx.implementation, grads, x,
                                                     list(states), weights, mask)
    return None, None, None, found[0], list(found[1: 1 + ctx.state_count]), list(found[1 + ctx.state_count:]), None


torch.library.register_autograd("whiteboard::direction", _backward, setup_context=_setup_context)
