"""Mixed precision: what a layer call computes in under ``torch.autocast``, as torch.nn's
recurrent layers do."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor


def autocast_dtype(layer, x: Tensor, hx) -> torch.dtype | None:
    """The dtype a call computes in under ``torch.autocast``, as torch.nn's does, or None
    outside autocast. On CUDA autocast casts every recurrent op to its dtype; on the CPU it
    casts the RNN and LSTM ops (torch's CPU policy lists them) and leaves the GRU's alone,
    which then computes in the dtype of the state it is given (else the input's)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return None
    if device == "cpu" and layer.mode == "GRU":
        given = hx[0] if isinstance(hx, (tuple, list)) else hx
        dtype = given.dtype if isinstance(given, Tensor) else x.dtype
        return None if dtype == x.dtype == layer._weight("weight_ih_l0").dtype else dtype
    return torch.get_autocast_dtype(device)


@contextmanager
def computing_in(layer, dtype: torch.dtype | None, device: str):
    """For one call under autocast: the weights cast to ``dtype`` and autocast off inside
    (the loops run in one dtype, as a cast torch.nn op does)."""
    if dtype is None:
        yield
        return
    layer._compute_dtype = dtype
    try:
        with torch.autocast(device, enabled=False):
            yield
    finally:
        layer._compute_dtype = None
