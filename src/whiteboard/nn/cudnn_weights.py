"""The layers' weights as one flat buffer for cuDNN, as torch.nn.RNNBase.flatten_parameters
keeps them: on CUDA with cuDNN every weight becomes a view of one buffer, in cuDNN's layout,
so a call passes them without a copy. Elsewhere nothing happens."""

from __future__ import annotations

import torch


def _cudnn_mode(layer) -> str | None:
    if layer.mode == "RNN":
        return {"tanh": "RNN_TANH", "relu": "RNN_RELU"}.get(layer.nonlinearity)  # cuDNN has no sigmoid RNN
    return None if layer.layer_norm else layer.mode


def flatten_for_cudnn(layer) -> None:
    weights = layer._flat_weights
    mode = _cudnn_mode(layer)
    if mode is None or not weights or not all(isinstance(w, torch.Tensor) for w in weights):
        return
    dtype = weights[0].dtype
    if any(w.dtype != dtype or not w.is_cuda or not torch.backends.cudnn.is_acceptable(w) for w in weights):
        return
    if len({w.data_ptr() for w in weights}) != len(weights):  # aliased weights: leave them (torch.nn does too)
        return
    import torch.backends.cudnn.rnn as cudnn_rnn

    with torch.cuda.device_of(weights[0]), torch.no_grad():
        if torch._use_cudnn_rnn_flatten_weight():
            per_direction = (4 if layer.bias else 2) + (1 if layer.proj_size > 0 else 0)
            torch._cudnn_rnn_flatten_weight(weights, per_direction, layer.input_size, cudnn_rnn.get_cudnn_mode(mode),
                                            layer.hidden_size, layer.proj_size, layer.num_layers, layer.batch_first,
                                            bool(layer.bidirectional))
