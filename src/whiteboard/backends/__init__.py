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

Registered today: ``compiled`` (the C++ time loops, :mod:`whiteboard.backends.compiled.build`),
``torch-loop`` (pure-PyTorch Functions with a hand-written backward,
:mod:`whiteboard.backends.fused`) and ``reference`` (the loop over :mod:`whiteboard.nn.cells`, autograd's
backward). ``implementation="native"`` names ``compiled`` and ``"fused"`` names
``torch-loop``, as they always have. A GPU backend is one more object with ``name`` and
``supports`` put into :data:`BACKENDS` in its order of preference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from whiteboard.backends.compiled import build as native

__all__ = ["Call", "Backend", "BACKENDS", "COMPILED", "TORCH_LOOP", "REFERENCE", "choose", "explain", "Explanation"]

_COMPILED_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Call:
    """What decides the backend of one layer call."""

    mode: str  # "RNN", "LSTM", "GRU"
    layer_norm: bool  # a LayerNormLSTM
    device_type: str
    dtype: torch.dtype
    trace: bool = False  # gates and states of every step are wanted
    zoneout: bool = False
    lengths: bool = False  # a PackedSequence or lengths=
    functorch: bool = False  # tensors wrapped by a torch.func transform (grad, vjp, vmap)


def _reference_only(call: Call) -> str | None:
    """Why only the reference can run a call (None where others can too)."""
    if call.trace:
        return "a trace is requested: only the reference loop records every gate"
    if call.zoneout:
        return "zoneout mixes states inside the step: only the reference loop runs it"
    if call.functorch:
        return "under a torch.func transform: only the reference loop's plain torch ops are transformed"
    return None


class Backend:
    name = ""
    implementation = ""  # the implementation= value that names it

    def supports(self, call: Call) -> str | None:
        raise NotImplementedError


class _Compiled(Backend):
    name, implementation = "compiled", "native"

    def supports(self, call: Call) -> str | None:
        if call.layer_norm:
            return "there is no compiled loop for the layer-norm LSTM"
        if call.device_type != "cpu":
            return f"on {call.device_type}: the compiled loops are CPU-only"
        if call.dtype not in _COMPILED_DTYPES:
            return f"{str(call.dtype).replace('torch.', '')}: the compiled loops cover float32 and float64"
        if not native.enabled():
            return "turned off (WHITEBOARD_NATIVE=0)"
        if native.load() is None:
            return f"could not be built ({native._failed})"
        return _reference_only(call)


class _TorchLoop(Backend):
    name, implementation = "torch-loop", "fused"

    def supports(self, call: Call) -> str | None:
        return _reference_only(call)


class _Reference(Backend):
    name, implementation = "reference", "reference"

    def supports(self, call: Call) -> str | None:
        return None


COMPILED, TORCH_LOOP, REFERENCE = _Compiled(), _TorchLoop(), _Reference()
#: In order of preference for implementation="auto".
BACKENDS: list[Backend] = [COMPILED, TORCH_LOOP, REFERENCE]


def choose(call: Call, implementation: str = "auto") -> Backend:
    """The backend that runs ``call``. ``"auto"`` takes the first of BACKENDS that supports
    it; a named one runs it or, where it cannot, raises with its reason. A trace, zoneout or
    a torch.func transform runs on the reference whatever is named (only it can)."""
    if _reference_only(call) is not None:
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
        zoneout=layer._zoneout is not None, lengths=lengths is not None or isinstance(input, PackedSequence),
        functorch=wrapped(x) or any(wrapped(p) for p in parameters),
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
