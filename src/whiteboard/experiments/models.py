"""The models the experiments compare: each cell with its literature's initialisation
(the identity-initialised ReLU RNN, the orthogonal tanh RNN, the LSTM's forget bias of 1),
hidden sizes matched by parameter count, and the story language model with its vocabulary."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from whiteboard.experiments import tasks
from whiteboard.lm.config import ModelConfig
from whiteboard.lm.model import LanguageModel
from whiteboard.lm.vocab import EOS, UNK, Vocabulary
from whiteboard.nn.layers import GRU, LSTM, RNN

__all__ = [
    "CELLS",
    "STORY_LR",
    "STORY_DISTANCES",
    "identity_recurrence",
    "orthogonal_recurrence",
    "RNN_VARIANTS",
    "set_forget_bias",
    "matched_hidden",
    "hidden_sizes",
    "story_vocabulary",
    "story_model",
    "encode_stories",
    "recurrent_layer",
    "SequenceRegressor",
    "SequenceTagger",
]

CELLS = ("rnn", "lstm", "gru", "rnn-tanh")


_LAYERS = {"rnn": RNN, "lstm": LSTM, "gru": GRU, "rnn-tanh": RNN}


#: Adam learning rates for the stories, each model's best of the sweep 5e-4, 1e-3, 2e-3, 5e-3
#: by mean validation accuracy over distances 5-150 (1400 steps, seed 0; benchmarks/README.md,
#: "Learning-rate sweep"). The one used where a run does not sweep (the demo).
STORY_LR = {"rnn": 1e-3, "lstm": 5e-3, "gru": 2e-3, "rnn-tanh": 2e-3}


#: The stories' default grid: log-spaced from the shortest possible lag (4) to 150.
STORY_DISTANCES = [4, 6, 10, 16, 25, 40, 63, 100, 150]


def identity_recurrence(layer: nn.Module) -> None:
    """Le, Jaitly & Hinton 2015 (IRNN): W_hh = I and zero biases, for a ReLU RNN. At the start
    the state is carried unchanged and the input is added to it, so the gradient neither
    vanishes nor explodes through time; the recommended initialisation for a vanilla RNN on
    long-range tasks. The RNN's deviation from torch.nn's initialisation in the experiments."""
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.startswith("weight_hh"):
                param.copy_(torch.eye(param.shape[0], param.shape[1]))
            elif name.startswith("bias"):
                param.zero_()


def orthogonal_recurrence(layer: nn.Module) -> None:
    """Saxe et al. 2014: an orthogonal W_hh (and zero biases) for a tanh RNN, whose
    singular values of 1 keep the signal's norm through time at the start."""
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.startswith("weight_hh"):
                nn.init.orthogonal_(param)
            elif name.startswith("bias"):
                param.zero_()


#: Each cell as the experiments build it, with its literature's initialisation:
#: LSTM: forget-gate bias 1 (Gers et al. 2000; Jozefowicz et al. 2015); GRU: torch.nn's
#: uniform initialisation (Cho et al. 2014's own is of the same kind); RNN: the IRNN, ReLU
#: with identity recurrence (Le et al. 2015). "rnn-tanh" is the seed's tanh RNN with an
#: orthogonal recurrence, kept for comparison: on stories it fails even at short lags
#: (benchmarks/README.md, "Why the RNN failed").
RNN_VARIANTS = {"rnn": ("relu", identity_recurrence), "rnn-tanh": ("tanh", orthogonal_recurrence)}


def set_forget_bias(layer: nn.Module, value: float) -> None:
    """Start an LSTM's forget gates open (Gers et al. 2000; Jozefowicz et al. 2015): the
    board is kept by default and erased only when learned. A deviation from torch.nn's
    initialisation, used by the task models here."""
    if not isinstance(layer, LSTM):
        return
    H = layer.hidden_size
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.startswith("bias_hh"):
                param[H : 2 * H].fill_(value)
            elif name.startswith("bias_ih"):
                param[H : 2 * H].zero_()


def matched_hidden(build: Callable[[int], nn.Module], target: int, low: int = 2, high: int = 4096) -> int:
    """The hidden size whose model has the parameter count closest to ``target``."""
    def count(h: int) -> int:
        return sum(p.numel() for p in build(h).parameters())

    while high - low > 1:  # counts grow with h: bisect
        mid = (low + high) // 2
        if count(mid) < target:
            low = mid
        else:
            high = mid
    return min((low, high), key=lambda h: abs(count(h) - target))


def hidden_sizes(cells: list[str], base_hidden: int, match: str, build: Callable[[str, int], nn.Module]) -> dict[str, int]:
    if match == "hidden":
        return {cell: base_hidden for cell in cells}
    target = sum(p.numel() for p in build("lstm", base_hidden).parameters())
    return {cell: base_hidden if cell == "lstm" else matched_hidden(lambda h, c=cell: build(c, h), target) for cell in cells}


def story_vocabulary() -> Vocabulary:
    # Split as people type: the seed's "France. She speaks" reads as the stories' "France . She speaks".
    return Vocabulary("word", [UNK, EOS] + tasks.story_vocabulary_tokens(), tokenizer="punctuation")


def story_model(cell: str, vocab_size: int, hidden: int, embedding: int = 32) -> LanguageModel:
    """A one-layer language model of ``cell`` (see CELLS) with its literature's initialisation."""
    nonlinearity, recurrence_init = RNN_VARIANTS.get(cell, ("tanh", None))
    config = ModelConfig(cell="rnn" if cell in RNN_VARIANTS else cell, embedding_size=embedding, hidden_size=hidden,
                         num_layers=1, dropout=0.0, tie_weights=False, init_range=0.0, nonlinearity=nonlinearity)
    model = LanguageModel(vocab_size, config)
    set_forget_bias(model.recurrent, 1.0)
    if recurrence_init is not None:
        recurrence_init(model.recurrent)
    return model


def encode_stories(stories: list[tasks.Story], vocab: Vocabulary) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (T, B) inputs and targets (pad target -100) and the (B,) input
    positions at which the answer is predicted (the 'speaks' token)."""
    ids = [vocab.encode(list(s.tokens) + [EOS]) for s in stories]
    T = max(len(x) for x in ids) - 1
    inputs = torch.full((T, len(ids)), vocab.index[EOS], dtype=torch.long)
    targets = torch.full((T, len(ids)), -100, dtype=torch.long)
    for b, seq in enumerate(ids):
        inputs[: len(seq) - 1, b] = torch.tensor(seq[:-1])
        targets[: len(seq) - 1, b] = torch.tensor(seq[1:])
    answer_positions = torch.tensor([s.answer_index - 1 for s in stories])
    return inputs, targets, answer_positions


def recurrent_layer(cell: str, input_size: int, hidden: int) -> nn.Module:
    """One layer of ``cell`` (see CELLS) with its literature's initialisation."""
    if cell in RNN_VARIANTS:
        nonlinearity, recurrence_init = RNN_VARIANTS[cell]
        layer = RNN(input_size, hidden, nonlinearity=nonlinearity)
        recurrence_init(layer)
        return layer
    layer = _LAYERS[cell](input_size, hidden)
    set_forget_bias(layer, 1.0)
    return layer


class SequenceRegressor(nn.Module):
    """Recurrent layer + linear read-out of the last state (adding problem)."""

    def __init__(self, cell: str, hidden: int, inputs: int = 2):
        super().__init__()
        self.recurrent = recurrent_layer(cell, inputs, hidden)
        self.readout = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:  # (T, B, 2) -> (B,)
        output, _ = self.recurrent(x)
        return self.readout(output[-1]).squeeze(-1)


class SequenceTagger(nn.Module):
    """Embedding + recurrent layer + per-step classifier (copy task)."""

    def __init__(self, cell: str, hidden: int, vocab: int = tasks.COPY_VOCAB, embedding: int = 16):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding)
        self.recurrent = recurrent_layer(cell, embedding, hidden)
        self.classifier = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:  # (T, B) -> (T, B, V)
        output, _ = self.recurrent(self.embedding(x))
        return self.classifier(output)
