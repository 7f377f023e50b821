"""The torch-loop backend: the autograd Functions on plain PyTorch ops
(:mod:`whiteboard.backends.torch_sweeps`, :mod:`whiteboard.backends.layer_norm`). It runs
every cell on every device and dtype; what it cannot do is what only the reference can
(a trace, zoneout, a torch.func transform)."""

from __future__ import annotations

from torch import Tensor

from whiteboard.backends import functions
from whiteboard.backends.base import Backend, Call, reference_only


class _TorchLoop(Backend):
    name, implementation = "torch-loop", "fused"

    def supports(self, call: Call) -> str | None:
        return reference_only(call)

    def run(self, call: Call, x: Tensor, initial: list[Tensor], weights: tuple, mask: Tensor | None):
        return functions.run_direction(call, x.contiguous(), initial, weights, mask, None)


TORCH_LOOP = _TorchLoop()
