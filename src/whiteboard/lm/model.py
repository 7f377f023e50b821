"""A recurrent language model: Embedding -> RNN | LSTM | GRU stack -> Linear decoder.

The model knows nothing about training, corpora or files.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from whiteboard.lm.config import ModelConfig
from whiteboard.nn.layers import GRU, LSTM, RNN, LayerNormLSTM, Trace
from whiteboard.nn.regularizers import EmbeddingDropout, LockedDropout, WeightDrop

State = Tensor | tuple[Tensor, Tensor]


def layer_sizes(config: ModelConfig) -> list[int]:
    """Hidden units per layer. Every layer has ``hidden_size`` except, with tied weights
    and ``embedding_size != hidden_size``, the last one, which has ``embedding_size`` so
    that its output can feed the tied decoder (AWD-LSTM's 400-1150-1150-400 shape)."""
    sizes = [config.hidden_size] * config.num_layers
    if config.tie_weights:
        sizes[-1] = config.embedding_size
    return sizes


def _recurrent_layer(config: ModelConfig, input_size: int, hidden_size: int, **kwargs):
    kwargs["recurrent_init"] = config.recurrent_init
    forget_bias = config.forget_bias or None  # 0: not set
    if config.cell == "lstm":
        return LSTM(input_size, hidden_size, forget_bias=forget_bias, **kwargs)
    if config.cell == "layernorm-lstm":
        return LayerNormLSTM(input_size, hidden_size, forget_bias=forget_bias, **kwargs)
    if config.cell == "gru":
        return GRU(input_size, hidden_size, **kwargs)
    return RNN(input_size, hidden_size, nonlinearity=config.nonlinearity, **kwargs)


def _with_weight_drop(layer, p: float):
    return WeightDrop(layer, p) if p else layer


def _inner(layer):
    return layer.layer if isinstance(layer, WeightDrop) else layer


class RecurrentStack(nn.Module):
    """Single-layer recurrent modules one above the other, with their own sizes and a
    dropout between them that may be variational (one mask per sequence, AWD-LSTM's
    ``dropouth``), each layer with its own weight drop.

    Takes and returns the state like a multi-layer torch.nn layer: (L, B, max H) tensors,
    each layer's state in its first H_l features and zeros after, so that detaching,
    checkpointing and generation treat it like any other state.
    """

    def __init__(self, config: ModelConfig, input_size: int, sizes: list[int], dropout: float, weight_drop: float):
        super().__init__()
        inputs = [input_size, *sizes[:-1]]
        self.layers = nn.ModuleList(
            _with_weight_drop(_recurrent_layer(config, i, h), weight_drop) for i, h in zip(inputs, sizes)
        )
        self.sizes = list(sizes)
        self.mode = _inner(self.layers[0]).mode
        self.dropout = LockedDropout(dropout) if config.variational else nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        for layer in self.layers:
            _inner(layer).reset_parameters()

    def _layer_states(self, state: State | None, index: int):
        if state is None:
            return None
        size = self.sizes[index]
        if isinstance(state, tuple):
            return tuple(s[index : index + 1, :, :size] for s in state)
        return state[index : index + 1, :, :size]

    def _pack(self, finals: list) -> State:
        width = max(self.sizes)

        def pad(t: Tensor) -> Tensor:
            return nn.functional.pad(t, (0, width - t.shape[-1]))

        if isinstance(finals[0], tuple):
            return tuple(torch.cat([pad(f[k]) for f in finals], 0) for k in range(2))
        return torch.cat([pad(f) for f in finals], 0)

    def _run(self, x: Tensor, state: State | None, trace: bool):
        finals, steps = [], []
        for index, layer in enumerate(self.layers):
            if index > 0:
                x = self.dropout(x)
            initial = self._layer_states(state, index)
            if trace:
                x, final, layer_trace = _inner(layer).trace(x, initial)
                steps.append(layer_trace.steps[0])
            else:
                x, final = layer(x, initial)
            finals.append(final)
        return x, self._pack(finals), Trace(self.mode, steps) if trace else None

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        output, state, _ = self._run(x, state, trace=False)
        return output, state

    def trace(self, x: Tensor, state: State | None = None):
        return self._run(x, state, trace=True)


def detach_state(state: State) -> State:
    """Cut the graph at a window boundary, or backpropagation spans the whole corpus."""
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


class LanguageModel(nn.Module):
    """Next-token model over a vocabulary of size V.

    tokens (T, B) -> Embedding (T, B, E) -> dropout -> recurrent stack (T, B, H)
    -> dropout -> Linear (T, B, V) logits, with the decoder's weight tied to the
    embedding when ``tie_weights`` (Press & Wolf 2017; needs E == H).
    """

    def __init__(self, vocab_size: int, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, config.embedding_size)
        self.embedding_dropout = EmbeddingDropout(config.embedding_dropout)
        dropout_type = LockedDropout if config.variational else nn.Dropout
        self.dropout = dropout_type(config.dropout)  # before the decoder
        input_p = config.dropout if config.input_dropout < 0 else config.input_dropout
        self.input_dropout = dropout_type(input_p)  # on the embeddings
        hidden_p = config.dropout if config.hidden_dropout < 0 else config.hidden_dropout
        self.sizes = layer_sizes(config)
        if len(set(self.sizes)) == 1 and not (config.variational and config.num_layers > 1):
            # One multi-layer module: torch.nn's layout, and its own dropout between layers.
            kwargs = dict(num_layers=config.num_layers, dropout=hidden_p if config.num_layers > 1 else 0.0)
            self.recurrent = _with_weight_drop(
                _recurrent_layer(config, config.embedding_size, config.hidden_size, **kwargs), config.weight_drop
            )
        else:
            self.recurrent = RecurrentStack(config, config.embedding_size, self.sizes, hidden_p, config.weight_drop)
        self.decoder = nn.Linear(self.sizes[-1], vocab_size)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r = self.config.init_range
        if r > 0:
            for p in self.parameters():
                nn.init.uniform_(p, -r, r)
            for module in self.modules():
                if isinstance(module, LayerNormLSTM):
                    module.reset_normalization()
                if isinstance(module, (LSTM, GRU, RNN)):
                    module.apply_init_options()  # forget_bias, recurrent_init: after init_range
        else:
            nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
            self.layer.reset_parameters()
            if not self.config.tie_weights:
                nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
            nn.init.zeros_(self.decoder.bias)

    def init_state(self, batch_size: int) -> State:
        weight = self.decoder.weight
        shape = (self.config.num_layers, batch_size, max(self.sizes))
        zeros = weight.new_zeros(shape)
        return (zeros, zeros.clone()) if self.config.cell in ("lstm", "layernorm-lstm") else zeros

    @property
    def layer(self):
        """The recurrent stack itself (inside any WeightDrop wrapper): a whiteboard
        RNN/LSTM/GRU, or a :class:`RecurrentStack`; both have ``trace``."""
        return _inner(self.recurrent)

    def forward(self, tokens: Tensor, state: State | None = None, with_outputs: bool = False):
        """tokens (T, B) -> logits (T, B, V) and the final state; ``with_outputs``: also the
        last layer's raw and dropped-out outputs (what forward_with_outputs returns), so
        that a DistributedDataParallel wrapper, which hooks forward() alone, sees them."""
        logits, state, raw, dropped = self.forward_with_outputs(tokens, state)
        return (logits, state, raw, dropped) if with_outputs else (logits, state)

    def forward_with_outputs(self, tokens: Tensor, state: State | None = None):
        """Also the last layer's raw and dropped-out outputs (T, B, H), for AR/TAR."""
        emb = self.input_dropout(self.embedding_dropout(self.embedding, tokens))  # (T, B, E)
        output, state = self.recurrent(emb, state)  # (T, B, H)
        dropped = self.dropout(output)
        return self.decode(dropped), state, output, dropped  # logits (T, B, V)

    def decode(self, output: Tensor) -> Tensor:
        """(T, B, H) -> float32 logits (T, B, V); the matmul in bfloat16 when the config asks
        for it and the model is training (the softmax and loss stay float32)."""
        if self.training and self.config.decoder_precision == "bfloat16":
            with torch.autocast(output.device.type, dtype=torch.bfloat16):
                return self.decoder(output).float()
        return self.decoder(output)

    def step(self, token: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """One new token per sequence: token (B,) -> logits (B, V). O(1) work per token;
        the prompt is never fed again."""
        logits, state = self.forward(token.unsqueeze(0), state)
        return logits.squeeze(0), state

    def trace(self, tokens: Tensor, state: State | None = None):
        """Like forward, plus the recurrent stack's :class:`~whiteboard.nn.layers.Trace`."""
        emb = self.input_dropout(self.embedding_dropout(self.embedding, tokens))
        output, state, trace = self.layer.trace(emb, state)
        return self.decode(self.dropout(output)), state, trace

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
