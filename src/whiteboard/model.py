"""A recurrent language model: Embedding -> RNN | LSTM | GRU stack -> Linear decoder.

The model knows nothing about training, corpora or files.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .layers import GRU, LSTM, RNN
from .regularizers import EmbeddingDropout, LockedDropout, WeightDrop

State = Tensor | tuple[Tensor, Tensor]


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
        self.dropout = LockedDropout(config.dropout) if config.variational else nn.Dropout(config.dropout)
        kwargs = dict(num_layers=config.num_layers, dropout=config.dropout if config.num_layers > 1 else 0.0)
        if config.cell == "lstm":
            self.recurrent = LSTM(config.embedding_size, config.hidden_size, **kwargs)
        elif config.cell == "gru":
            self.recurrent = GRU(config.embedding_size, config.hidden_size, **kwargs)
        else:
            self.recurrent = RNN(config.embedding_size, config.hidden_size, nonlinearity=config.nonlinearity, **kwargs)
        if config.weight_drop:
            self.recurrent = WeightDrop(self.recurrent, config.weight_drop)
        self.decoder = nn.Linear(config.hidden_size, vocab_size)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r = self.config.init_range
        if r > 0:
            for p in self.parameters():
                nn.init.uniform_(p, -r, r)
        else:
            nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
            self.layer.reset_parameters()
            if not self.config.tie_weights:
                nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
            nn.init.zeros_(self.decoder.bias)

    def init_state(self, batch_size: int) -> State:
        weight = self.decoder.weight
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        zeros = weight.new_zeros(shape)
        return (zeros, zeros.clone()) if self.config.cell == "lstm" else zeros

    @property
    def layer(self):
        """The whiteboard RNN/LSTM/GRU itself (inside any WeightDrop wrapper)."""
        return self.recurrent.layer if isinstance(self.recurrent, WeightDrop) else self.recurrent

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """tokens (T, B) -> logits (T, B, V) and the final state."""
        logits, state, _, _ = self.forward_with_outputs(tokens, state)
        return logits, state

    def forward_with_outputs(self, tokens: Tensor, state: State | None = None):
        """Also the last layer's raw and dropped-out outputs (T, B, H), for AR/TAR."""
        emb = self.dropout(self.embedding_dropout(self.embedding, tokens))  # (T, B, E)
        output, state = self.recurrent(emb, state)  # (T, B, H)
        dropped = self.dropout(output)
        return self.decoder(dropped), state, output, dropped  # logits (T, B, V)

    def step(self, token: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """One new token per sequence: token (B,) -> logits (B, V). O(1) work per token;
        the prompt is never fed again."""
        logits, state = self.forward(token.unsqueeze(0), state)
        return logits.squeeze(0), state

    def trace(self, tokens: Tensor, state: State | None = None):
        """Like forward, plus the recurrent stack's :class:`~whiteboard.layers.Trace`."""
        emb = self.dropout(self.embedding_dropout(self.embedding, tokens))
        output, state, trace = self.layer.trace(emb, state)
        return self.decoder(self.dropout(output)), state, trace

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
