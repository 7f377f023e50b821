"""The one place that decides which loop runs a layer call, and says why.

Each backend declares what it can run: given a :class:`Call` (what one layer call needs:
cell, device, dtype, trace, lengths, grad, a torch.func transform, zoneout) its
``supports`` returns None where it can run it, or a short reason where it cannot.
:func:`choose` picks the backend for a call from the layer's ``implementation=``;
:func:`explain` answers "why is this slow?" for a layer and an input::

    >>> print(whiteboard.backends.explain(lstm, x))
    compiled     runs this call
    torch-loop   could run it
    reference    could run it

Registered, in order of preference:

- ``compiled`` (:mod:`.compiled`): C++ time loops for CPU float32/float64;
- ``torch-loop`` (:mod:`.torch_loop`): the same hand-written backward on plain PyTorch ops,
  any device and dtype;
- ``reference`` (:mod:`.reference`): the loop over :mod:`whiteboard.nn.cells`, autograd's
  backward; the only one that records a trace or mixes in zoneout.

``implementation="native"`` names ``compiled`` and ``"fused"`` names ``torch-loop``, as
they always have. A new backend is one module with a :class:`Backend` object (``name``,
``implementation``, ``supports``, ``run``) put into :data:`BACKENDS` in its order of
preference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from whiteboard.backends.base import Backend, Call, reference_only, under_functorch
from whiteboard.backends.compiled.backend import COMPILED
from whiteboard.backends.reference import REFERENCE
from whiteboard.backends.torch_loop import TORCH_LOOP

__all__ = ["Call", "Backend", "BACKENDS", "COMPILED", "TORCH_LOOP", "REFERENCE", "choose", "explain", "Explanation",
           "call_of", "under_functorch"]

#: In order of preference for implementation="auto".
BACKENDS: list[Backend] = [COMPILED, TORCH_LOOP, REFERENCE]


def choose(call: Call, implementation: str = "auto") -> Backend:
    """The backend that runs ``call``. ``"auto"`` takes the first of BACKENDS that supports
    it; a named one runs it or, where it cannot, raises with its reason. A trace, zoneout or
    a torch.func transform runs on the reference whatever is named (only it can)."""
    if reference_only(call) is not None:
        return REFERENCE
    if implementation == "auto":
        return next(b for b in BACKENDS if b.supports(call) is None)
    backend = next(b for b in BACKENDS if b.implementation == implementation)
    why = backend.supports(call)
    if why is not None:
        layer = "LayerNormLSTM" if call.layer_norm else call.mode
        raise RuntimeError(f"{layer}: implementation={implementation!r} cannot run this call: {why} "
                           f"(got {call.dtype} on {call.device_type}); use 'auto'")
    return backend


@dataclass
class Explanation:
    """For one layer call: which backend runs it, and why each other one would or would not."""

    chosen: str
    reasons: dict[str, str | None]  # backend name -> why not (None: it could run the call)

    def __str__(self) -> str:
        width = max(len(name) for name in self.reasons)
        lines = []
        for name, why in self.reasons.items():
            verdict = "runs this call" if name == self.chosen else ("could run it" if why is None else f"no: {why}")
            lines.append(f"{name:<{width}}  {verdict}")
        return "\n".join(lines)


def call_of(layer, input, lengths=None, trace: bool = False) -> Call:
    """The Call a layer would make for ``input`` (a Tensor or PackedSequence)."""
    x = input.data if isinstance(input, PackedSequence) else input
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    parameters = list(layer.parameters())
    return Call(
        mode=layer.mode, layer_norm=layer.layer_norm, device_type=x.device.type, dtype=x.dtype, trace=trace,
        zoneout=layer._zoneout, lengths=lengths is not None or isinstance(input, PackedSequence),
        functorch=wrapped(x) or any(wrapped(p) for p in parameters), nonlinearity=getattr(layer, "nonlinearity", "tanh"),
    )


def explain(layer, input: Tensor | PackedSequence, lengths=None, trace: bool = False) -> Explanation:
    """Which backend ``layer(input)`` would run on, and why each backend would or would not:
    what to look at when a call is slower than expected."""
    call = call_of(layer, input, lengths, trace)
    try:
        chosen = choose(call, layer.implementation).name
    except RuntimeError as exc:
        chosen = f"none ({exc})"
    return Explanation(chosen, {b.name: b.supports(call) for b in BACKENDS})
