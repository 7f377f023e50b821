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
- ``cudnn`` (:mod:`.cudnn`): torch's own recurrent ops, cuDNN on CUDA;
- ``triton`` (:mod:`.triton_loop`): fused Triton kernels on CUDA for traces and the sigmoid RNN;
- ``torch-loop`` (:mod:`.torch_loop`): the same hand-written backward on plain PyTorch ops,
  any device and dtype;
- ``reference`` (:mod:`.reference`): the loop over :mod:`whiteboard.nn.cells`, autograd's
  backward; the only one that records a trace or mixes in zoneout.

``implementation="native"`` names ``compiled`` and ``"fused"`` names ``torch-loop``, as
they always have. A new backend is one module with a :class:`Backend` object (``name``,
``implementation``, ``supports``, ``run``) registered with :func:`register`.
"""

from whiteboard.backends import ops  # noqa: F401 (registers torch.ops.whiteboard.*)
from whiteboard.backends.base import Backend, Call, under_functorch
from whiteboard.backends.compiled.backend import COMPILED
from whiteboard.backends.cudnn import CUDNN
from whiteboard.backends.triton_loop import TRITON
from whiteboard.backends.reference import REFERENCE
from whiteboard.backends.registry import BACKENDS, Explanation, call_of, choose, explain, register, unregister
from whiteboard.backends.torch_loop import TORCH_LOOP

__all__ = ["Call", "Backend", "BACKENDS", "COMPILED", "CUDNN", "TRITON", "TORCH_LOOP", "REFERENCE", "choose", "explain", "Explanation",
           "call_of", "under_functorch", "register", "unregister", "direction_op"]

#: One layer and direction as a PyTorch custom operator (for torch.compile and torch.export).
direction_op = ops.direction
