"""Tensors and settings shared by the tests of the autograd Functions, their planning and
the compiled runtime (test_fused.py, test_planning.py, test_native_runtime.py)."""

import torch

from whiteboard.backends.compiled import build as native
from helpers import MODES

T, B, I, H = 4, 2, 3, 5


def function_weights(gates, bias=True):
    shape = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    w_ih, w_hh = shape(gates * H, I), shape(gates * H, H)
    b_ih, b_hh = (shape(gates * H), shape(gates * H)) if bias else (None, None)
    return w_ih, w_hh, b_ih, b_hh


def function_inputs():
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    return x, h0


BACKENDS = ["torch", "native"]


def compiled_or_none(name):
    """None selects the torch loop; the compiled module the C++ loop."""
    if name == "torch":
        return None
    module = native.load()
    assert module is not None, f"the compiled loops must build here: {native._failed}"
    return module


MASKS = {
    "full": None,
    "ragged": (torch.arange(T).unsqueeze(1) < torch.tensor([2, 4]).unsqueeze(0)).unsqueeze(-1),
}


def value_sites(*sites):
    """(mode, where) pairs: every mode at every site, c0 for the LSTM only."""
    return [(mode, where) for mode in MODES for where in sites if where != "c0" or mode == "lstm"]
