"""The registry of backends, and the one choice of a backend per layer call."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from whiteboard.backends.base import Backend, Call, reference_only
from whiteboard.backends.compiled.backend import COMPILED
from whiteboard.backends.cudnn import CUDNN
from whiteboard.backends.triton_loop import TRITON
from whiteboard.backends.reference import REFERENCE
from whiteboard.backends.torch_loop import TORCH_LOOP

#: In order of preference for implementation="auto".
BACKENDS: list[Backend] = [COMPILED, CUDNN, TRITON, TORCH_LOOP, REFERENCE]


def register(backend: Backend, before: Backend | None = None) -> None:
    """Add a backend to BACKENDS, ahead of ``before`` (default: the torch loop, so that it is
    preferred to the portable loops but not to the compiled CPU one)."""
    if any(b.implementation == backend.implementation for b in BACKENDS):
        raise ValueError(f"a backend named by implementation={backend.implementation!r} is already registered")
    BACKENDS.insert(BACKENDS.index(before or TORCH_LOOP), backend)


def unregister(backend: Backend) -> None:
    BACKENDS.remove(backend)


def choose(call: Call, implementation: str = "auto") -> Backend:
    """The backend that runs ``call``. ``"auto"`` takes the first of BACKENDS that supports
    it; a named one runs it or, where it cannot, raises with its reason. A trace, zoneout or
    a torch.func transform that the named backend cannot run goes to the reference."""
    if implementation == "auto":
        return next(b for b in BACKENDS if b.supports(call) is None)
    backend = next(b for b in BACKENDS if b.implementation == implementation)
    why = backend.supports(call)
    if why is not None and reference_only(call) is not None:
        return REFERENCE  # a trace, zoneout or torch.func call the named backend cannot run
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
        projection=getattr(layer, "proj_size", 0) > 0,
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
