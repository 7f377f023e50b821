"""The compiled backend: the C++ time loops (:mod:`.build`) for CPU float32 and float64,
with a hand-written backward (:mod:`whiteboard.backends.functions` on :mod:`.loops`),
planned per call by :mod:`.planning`. Without grad, a call that fits runs as one compiled
call: one layer's whole loop (``planning.one_call``) or a whole stack of layers for a few
rows (generation, one token at a time)."""

from __future__ import annotations

import torch
from torch import Tensor

from whiteboard.backends import functions
from whiteboard.backends.base import Backend, Call, needs_grad, reference_only, under_functorch
from whiteboard.backends.compiled import build, planning, tuning

COMPILED_DTYPES = (torch.float32, torch.float64)
#: The C++ stack_inference's cell numbers.
_STACK_CELLS = {"RNN": 0, "LSTM": 1, "GRU": 2}
_GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}


class _Compiled(Backend):
    name, implementation = "compiled", "native"

    def supports(self, call: Call) -> str | None:
        if call.layer_norm:
            return "there is no compiled loop for the layer-norm LSTM"
        if call.projection:
            return "projections (proj_size): the compiled loops have none"
        if call.device_type != "cpu":
            return f"on {call.device_type}: the compiled loops are CPU-only"
        if call.dtype not in COMPILED_DTYPES:
            return f"{str(call.dtype).replace('torch.', '')}: the compiled loops cover float32 and float64"
        if not build.enabled():
            return "turned off (WHITEBOARD_NATIVE=0)"
        if build.load() is None:
            return f"could not be built ({build.failure()})"
        return reference_only(call)

    def run(self, call: Call, x: Tensor, initial: list[Tensor], weights: tuple, mask: Tensor | None):
        compiled = build.load()
        x = x.contiguous()
        if not needs_grad(x, *initial, *weights):
            plan = planning.one_call(x, initial[0].shape[-1], _GATES[call.mode], mask, compiled)
            if plan is not None:
                result = _inference(compiled, call, x, initial, weights, plan)
                if result:
                    return result[0], list(result[1:]), None
                compiled = None  # a NaN or Inf: the torch loop propagates it as torch.nn does
        return functions.run_direction(call, x, initial, weights, mask, compiled)

    def run_stack(self, call: Call, x: Tensor, states: list[Tensor], weights: list[tuple], bidirectional: bool,
                  dropout: float) -> list[Tensor] | None:
        """All layers in one compiled call (the C++ stack_inference) where a call without
        grad covers a few rows in all (generation: one token at a time, where the per-layer
        Python cost about as much as the layers' compiled calls). None where a NaN or an Inf
        was met, or the call does not fit: the layers then run one by one."""
        T, B = x.shape[0], x.shape[1]
        flat = [w for layer in weights for w in layer]
        if bidirectional or dropout or T * B > tuning.transpose_max_rows or B == 0:
            return None
        if needs_grad(x, *states, *flat) or under_functorch(x, *states, *flat):
            return None
        kind = planning.RNN_KINDS[call.nonlinearity] if call.mode == "RNN" else 0
        return build.load().stack_inference(_STACK_CELLS[call.mode], x.contiguous(), states, flat, kind) or None


def _inference(compiled, call: Call, x, initial, weights, plan):
    if call.mode == "RNN":
        return compiled.rnn_inference(x, initial[0], *weights, planning.RNN_KINDS[call.nonlinearity], *plan)
    if call.mode == "GRU":
        return compiled.gru_inference(x, initial[0], *weights, *plan)
    return compiled.lstm_inference(x, initial[0], initial[1], *weights, *plan)


COMPILED = _Compiled()
