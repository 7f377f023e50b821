"""Held-out evaluation of a language model: the corpus prepared into batches, the mean
loss over a split, and that loss as perplexity or bits per character."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from whiteboard.lm.config import RunConfig
from whiteboard.errors import WhiteboardError
from whiteboard.lm.data import batchify, load_corpus, windows
from whiteboard.lm.model import LanguageModel
from whiteboard.lm.vocab import Vocabulary, detect_tokenizer

@dataclass
class PreparedData:
    vocab: Vocabulary
    ids: dict[str, torch.Tensor]  # split -> (N,) token ids


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def bits_per_char(loss: float) -> float:
    return loss / math.log(2)


def loss_words(loss: float, level: str) -> str:
    text = f"loss {loss:.4f}, perplexity {perplexity(loss):.2f}"
    if level == "char":
        text += f", {bits_per_char(loss):.4f} bits/char"
    return text


def prepare_data(config: RunConfig, vocab: Vocabulary | None = None) -> PreparedData:
    """Load the corpus, build (or reuse) the vocabulary and encode every split."""
    d = config.data
    if not d.corpus:
        raise WhiteboardError("no corpus given: pass a named corpus, a text file or a folder (data.corpus)")
    texts, corpus_level = load_corpus(d.corpus, Path(d.data_dir) if d.data_dir else None, d.download)
    level = d.level or corpus_level or "word"
    if vocab is None:
        # Named corpora come tokenized; a file or folder is read for how it was written.
        tokenizer = d.tokenizer or ("whitespace" if corpus_level else detect_tokenizer(texts["train"]))
        vocab = Vocabulary.build(texts["train"], level, min_freq=d.min_freq, max_size=d.max_vocab or None,
                                 tokenizer=tokenizer)
    elif vocab.level != level:
        raise WhiteboardError(f"the run's vocabulary is {vocab.level}-level but the corpus is read at {level} level")
    ids = {split: torch.tensor(vocab.encode_text(text, corpus=True), dtype=torch.long) for split, text in texts.items()}
    return PreparedData(vocab, ids)


def evaluate(model: LanguageModel, ids: torch.Tensor, batch_size: int, bptt: int, device) -> float:
    """Mean cross-entropy per token over a whole split, state carried across windows."""
    total, count = evaluate_sums(model, ids, batch_size, bptt, device)
    return total / count


def evaluate_sums(model: LanguageModel, ids: torch.Tensor, batch_size: int, bptt: int, device,
                  columns: slice = slice(None)) -> tuple[float, int]:
    """(summed cross-entropy, token count) over the split's ``columns`` of its
    ``batch_size`` streams: one process's share of a distributed evaluation, whose sums
    over the processes give the mean a single process would."""
    streams = batchify(ids, batch_size)[:, columns].to(device)
    total, count = 0.0, 0
    if streams.shape[1] == 0:
        return total, count
    model.eval()
    state = model.init_state(streams.shape[1])
    with torch.no_grad():
        for window in windows(streams, bptt):
            logits, state = model(window.inputs, state)
            total += nn.functional.cross_entropy(logits.flatten(0, 1), window.targets.flatten(), reduction="sum").item()
            count += window.targets.numel()
    return total, count
