"""What ``layer.trace(input)`` returns: every gate and state of every step, and the seed's
whiteboard words for their standard names."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from whiteboard.nn.cells import TRACE_FIELDS

__all__ = ["Trace", "TRACE_FIELDS", "SEED_NAMES"]

#: The seed's whiteboard words for the standard names (see the README's glossary).
SEED_NAMES: dict[str, str] = {
    "input_gate": "selective read",
    "forget_gate": "selective forget",
    "output_gate": "selective write",
    "cell_candidate": "what could be written",
    "cell": "the whiteboard",
    "hidden": "what is shown to the next step",
}


@dataclass
class Trace:
    """Per-step internals of a recurrent layer.

    ``steps[layer][direction][name]`` is a tensor of shape (T, B, H), or (B, T, H) when the
    layer is ``batch_first`` (unbatched input: (T, H)); names are ``TRACE_FIELDS[mode]``.
    Direction 0 is forward in time, 1 (bidirectional only) is backward; both are indexed
    by the input's time step. Steps beyond a sequence's length are zero.
    """

    mode: str
    steps: list[list[dict[str, Tensor]]] = field(default_factory=list)

    def __getitem__(self, layer: int) -> list[dict[str, Tensor]]:
        return self.steps[layer]

    def get(self, name: str, layer: int = -1, direction: int = 0) -> Tensor:
        """One traced quantity, e.g. ``trace.get("forget_gate", layer=0)``."""
        if name not in TRACE_FIELDS[self.mode]:
            raise KeyError(f"{self.mode} traces record {TRACE_FIELDS[self.mode]}, not {name!r}")
        return self.steps[layer][direction][name]
