"""``torch.ops.whiteboard.direction`` in ONNX: each layer and direction becomes one of ONNX's
own recurrent operators (LSTM, GRU, RNN), which every ONNX runtime runs as a loop over the
sequence, whatever its length.

    onnx_program = torch.onnx.export(model, args, dynamo=True,
                                     custom_translation_table=whiteboard.backends.onnx.TRANSLATIONS)

ONNX orders the gates differently (LSTM i, o, f, c where torch has i, f, g, o; GRU z, r, h
where torch has r, z, n), so the weights are reordered in the graph; the GRU uses
``linear_before_reset=1``, which is torch's candidate gate. The seed's sigmoid RNN is ONNX's
RNN with a Sigmoid activation. The layer-norm LSTM has no ONNX operator and is refused with
a clear error. Needs ``onnxscript`` (``pip install whiteboard[onnx]``), imported only here.
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op

__all__ = ["TRANSLATIONS", "OnnxExportError"]


class OnnxExportError(RuntimeError):
    """A layer that ONNX has no operator for."""


_ACTIVATIONS = {"tanh": "Tanh", "relu": "Relu", "sigmoid": "Sigmoid"}


def _gates(weight, count: int, order: list[int]):
    """The row blocks of ``weight`` ((count·H, K) or (count·H,)), reordered."""
    if count == 1:
        return weight
    blocks = op.Split(weight, num_outputs=count, axis=0)
    return op.Concat(*[blocks[i] for i in order], axis=0)


def _direction(cell: str, nonlinearity: str, implementation: str, x, states, weights, mask):
    if cell == "layernorm-lstm":
        raise OnnxExportError("LayerNormLSTM has no ONNX operator; export a model with cell lstm, gru or rnn")
    if len(weights) == 5:
        raise OnnxExportError("ONNX's LSTM operator has no projection (proj_size); export a model without one")
    w_ih, w_hh, b_ih, b_hh = weights
    hidden = w_hh.shape[1]
    if not isinstance(hidden, int):
        raise OnnxExportError("the hidden size must be known when exporting")
    count, order = {"lstm": (4, [0, 3, 1, 2]), "gru": (3, [1, 0, 2]), "rnn": (1, [0])}[cell]
    W = op.Unsqueeze(_gates(w_ih, count, order), [0])  # (1, G·H, I)
    R = op.Unsqueeze(_gates(w_hh, count, order), [0])  # (1, G·H, H)
    B = None
    if b_ih.shape[0] != 0:  # an empty tensor stands for a missing bias
        B = op.Unsqueeze(op.Concat(_gates(b_ih, count, order), _gates(b_hh, count, order), axis=0), [0])  # (1, 2·G·H)
    lengths = None
    if mask is not None:  # (T, B, 1) bool -> (B,) int32
        lengths = op.Reshape(op.ReduceSum(op.Cast(mask, to=6), [0], keepdims=0), [-1])
    initial = [op.Unsqueeze(s, [0]) for s in states]  # (1, B, H) each
    if cell == "lstm":
        y, y_h, y_c = op.LSTM(x, W, R, B, lengths, initial[0], initial[1], hidden_size=hidden)
        finals = [y_h, y_c]
    elif cell == "gru":
        y, y_h = op.GRU(x, W, R, B, lengths, initial[0], hidden_size=hidden, linear_before_reset=1)
        finals = [y_h]
    else:
        y, y_h = op.RNN(x, W, R, B, lengths, initial[0], hidden_size=hidden,
                        activations=[_ACTIVATIONS[nonlinearity]])
        finals = [y_h]
    output = op.Squeeze(y, [1])  # (T, 1, B, H) -> (T, B, H)
    return [output, *(op.Squeeze(f, [0]) for f in finals)]


#: For ``torch.onnx.export(..., custom_translation_table=TRANSLATIONS)``.
TRANSLATIONS = {torch.ops.whiteboard.direction.default: _direction}
