"""The cuDNN backend: a CUDA call that needs nothing cuDNN lacks runs on torch's own recurrent
ops (``torch._VF.lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu``, what ``torch.nn.LSTM.forward``
calls), which dispatch to cuDNN on CUDA. Same weights, same results as torch.nn, and
torch's autograd formula for the backward.

A plain call runs the whole stack in one call of the op, as torch.nn's does (every layer
and direction, dropout between layers included); the layers' weights are one flat buffer
on CUDA (``flatten_parameters``, as torch.nn keeps them), so cuDNN does not copy them per
call. With variable lengths (a PackedSequence or ``lengths=``) it runs layer by layer,
packing for the op; projections (``proj_size``) are passed as torch.nn passes them. What it declines: the layer-norm LSTM
and the sigmoid RNN (cuDNN has neither), traces, zoneout and torch.func transforms.

The same ops run on the CPU too (torch's own CPU kernels): ``run`` is device-agnostic, which
is how the tests check it on a machine without a GPU; ``supports`` offers it for CUDA only.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from whiteboard.backends.base import Backend, Call, reference_only


def _op(call: Call):
    if call.mode == "LSTM":
        return torch._VF.lstm
    if call.mode == "GRU":
        return torch._VF.gru
    return torch._VF.rnn_relu if call.nonlinearity == "relu" else torch._VF.rnn_tanh


def run_torch_op(call: Call, x: Tensor, initial: list[Tensor], weights: tuple, mask: Tensor | None):
    """One layer and direction on torch's recurrent op: (output (T, B, H), finals, None)."""
    has_bias = weights[2] is not None
    params = [w for w in weights if w is not None]
    states = [s.unsqueeze(0) for s in initial]  # (1, B, H) each
    hx = tuple(states) if call.mode == "LSTM" else states[0]
    op = _op(call)
    training = torch.is_grad_enabled()
    if mask is None:
        result = op(x, hx, params, has_bias, 1, 0.0, training, False, False)
        output, finals = result[0], list(result[1:])
    else:
        lengths = mask[:, :, 0].sum(0).cpu()  # (B,)
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        order, back = packed.sorted_indices, packed.unsorted_indices
        hx = tuple(h.index_select(1, order) for h in hx) if call.mode == "LSTM" else hx.index_select(1, order)
        result = op(packed.data, packed.batch_sizes, hx, params, has_bias, 1, 0.0, training, False)
        output, _ = pad_packed_sequence(packed._replace(data=result[0]), total_length=x.shape[0])
        finals = [f.index_select(1, back) for f in result[1:]]
    return output, [f.squeeze(0) for f in finals], None


def run_torch_stack(call: Call, x: Tensor, states: list[Tensor], weights: list[tuple], bidirectional: bool,
                    dropout: float) -> list[Tensor]:
    """The whole stack in one call of torch's op, exactly as torch.nn makes it: every layer
    and direction, the dropout between layers included (cuDNN's own on CUDA).
    [output (T, B, D·H), h_n (L·D, B, H) (, c_n)]."""
    params = [w for group in weights for w in group if w is not None]
    has_bias = weights[0][2] is not None
    layers = len(weights) // (2 if bidirectional else 1)
    hx = (states[0], states[1]) if call.mode == "LSTM" else states[0]
    # train=True whenever a backward may follow: cuDNN keeps what its backward needs only
    # then. The dropout between layers is already 0 outside training (the layer sees to it).
    result = _op(call)(x, hx, params, has_bias, layers, dropout, torch.is_grad_enabled(), bidirectional, False)
    return [result[0], *result[1:]]


class _CuDNN(Backend):
    name, implementation = "cudnn", "cudnn"

    def supports(self, call: Call) -> str | None:
        if call.device_type != "cuda":
            return f"on {call.device_type}: cuDNN is CUDA-only"
        if not torch.backends.cudnn.is_available():
            return "this torch has no cuDNN"
        if call.layer_norm:
            return "cuDNN has no layer-norm LSTM"
        if call.mode == "RNN" and call.nonlinearity == "sigmoid":
            return "cuDNN's RNN has tanh and relu only"
        return reference_only(call)

    def run(self, call: Call, x: Tensor, initial: list[Tensor], weights: tuple, mask: Tensor | None):
        return run_torch_op(call, x, initial, weights, mask)

    def run_stack(self, call: Call, x: Tensor, states: list[Tensor], weights: list[tuple], bidirectional: bool,
                  dropout: float) -> list[Tensor] | None:
        return run_torch_stack(call, x, states, weights, bidirectional, dropout)


CUDNN = _CuDNN()
