"""The Triton backend: fused per-step Triton kernels around cuBLAS GEMMs
(:mod:`whiteboard.backends.triton_kernels`) for what cuDNN cannot run on a GPU: a trace (the
kernels keep every step's gates and cell states, so tracing costs nothing more), zoneout
(a mask per step inside the kernels), the layer-norm LSTM (:mod:`.triton_layernorm`) and
the seed's sigmoid RNN; the LSTM and the tanh/relu RNN too, float32 and float64. ``triton`` comes with ``pip install 'whiteboard[gpu]'``
and is imported only when a call runs here.

With ``TRITON_INTERPRET=1`` Triton runs the kernels on the CPU; the backend then offers
itself for CPU calls too, which is how the tests prove the kernels correct without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from whiteboard.backends.base import Backend, Call
from whiteboard.nn.cells import LAYER_NORM_EPS, TRACE_FIELDS

_DTYPES = (torch.float32, torch.float64)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class _Triton(Backend):
    name, implementation = "triton", "triton"

    def supports(self, call: Call) -> str | None:
        if call.device_type != "cuda" and not interpreting():
            return f"on {call.device_type}: the Triton kernels run on CUDA (or under TRITON_INTERPRET=1)"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'whiteboard[gpu]')"
        if call.layer_norm and call.zoneout:
            return "zoneout is not in the layer-norm LSTM's Triton kernels: only the reference loop runs it"
        if call.mode == "GRU":
            return "no Triton kernel for the GRU yet (cuDNN runs it)"
        if call.projection:
            return "no Triton kernel for projections (proj_size)"
        if call.functorch:
            return "under a torch.func transform: only the reference loop's plain torch ops are transformed"
        if call.dtype not in _DTYPES:
            return f"{str(call.dtype).replace('torch.', '')}: the Triton kernels cover float32 and float64"
        return None

    def run(self, call: Call, x: Tensor, initial: list[Tensor], weights: tuple, mask: Tensor | None):
        from whiteboard.backends import triton_kernels as kernels  # triton itself: only where a call runs here

        x = x.contiguous()
        if call.layer_norm:
            from whiteboard.backends.triton_layernorm import TritonLayerNormLSTM

            out, h_n, c_n, gates, cs = TritonLayerNormLSTM.apply(x, initial[0], initial[1], *weights, mask,
                                                                 LAYER_NORM_EPS)
        elif call.mode == "LSTM":
            out, h_n, c_n, gates, cs = kernels.TritonLSTM.apply(x, initial[0], initial[1], *weights, mask, call.zoneout)
        if call.mode == "LSTM":
            fields = None
            if call.trace:
                i, f, g, o = gates.chunk(4, dim=2)
                values = (i, f, g, o, cs[1:], out)
                fields = _masked(dict(zip(TRACE_FIELDS["LSTM"], values)), mask)
            return out, [h_n, c_n], fields
        out, h_n, _, zs = kernels.TritonRNN.apply(x, initial[0], *weights, mask, call.nonlinearity, call.zoneout)
        fields = _masked({"preactivation": zs, "hidden": out}, mask) if call.trace else None
        return out, [h_n], fields


def _masked(fields: dict, mask: Tensor | None) -> dict:
    """A trace's fields with steps beyond each sequence's length zero, as the reference's."""
    if mask is None:
        return {k: v.contiguous() for k, v in fields.items()}
    return {k: v * mask for k, v in fields.items()}


TRITON = _Triton()
