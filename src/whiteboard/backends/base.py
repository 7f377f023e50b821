"""What every backend shares: the :class:`Call` that decides which backend runs a layer
call, and the :class:`Backend` each one is."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Call:
    """What decides the backend of one layer call, and what a backend needs to know of the
    cell to run it."""

    mode: str  # "RNN", "LSTM", "GRU"
    layer_norm: bool  # a LayerNormLSTM
    device_type: str
    dtype: torch.dtype
    trace: bool = False  # gates and states of every step are wanted
    zoneout: tuple | None = None  # (p_hidden, p_cell, training) where zoneout mixes states
    lengths: bool = False  # a PackedSequence or lengths=
    functorch: bool = False  # tensors wrapped by a torch.func transform (grad, vjp, vmap)
    nonlinearity: str = "tanh"  # the RNN's
    projection: bool = False  # an LSTM with projections (proj_size > 0): weights end with W_hr


def reference_only(call: Call) -> str | None:
    """Why only the reference can run a call (None where others can too)."""
    if call.trace:
        return "a trace is requested: only the reference loop records every gate"
    if call.zoneout:
        return "zoneout mixes states inside the step: only the reference loop runs it"
    if call.functorch:
        return "under a torch.func transform: only the reference loop's plain torch ops are transformed"
    return None


class Backend:
    """One way to run a layer's time loop. ``supports`` says whether it can run a call
    (None) or why not (a short reason for :func:`whiteboard.backends.explain`); ``run``
    runs one layer in one direction; ``run_stack`` may run a whole stack at once, where
    that pays (None: the layer runs its layers one by one)."""

    name = ""
    implementation = ""  # the implementation= value that names it

    def supports(self, call: Call) -> str | None:
        raise NotImplementedError

    def run(self, call: Call, x: Tensor, initial: list[Tensor], weights: tuple, mask: Tensor | None):
        """One layer, one direction over x (T, B, I): (output (T, B, H), final states,
        the trace's fields (a dict of (T, B, H)) or None)."""
        raise NotImplementedError

    def run_stack(self, call: Call, x: Tensor, states: list[Tensor], weights: list[tuple], bidirectional: bool,
                  dropout: float) -> list[Tensor] | None:
        """All layers and directions of a stack in one call: [output, h_n (, c_n)] with the
        states (L·D, B, H), or None (the layer then runs them one by one). ``weights``: one
        tuple per layer and direction, in torch.nn's order; ``dropout``: between layers."""
        return None


def under_functorch(*tensors: Tensor | None) -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap) wraps any of ``tensors``: the
    call then runs the reference loop, plain torch ops every transform sees through (the
    compiled calls need real storage, and the Functions' backward has no vmap rule)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(t is not None and wrapped(t) for t in tensors)


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will want a backward through a call on ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
