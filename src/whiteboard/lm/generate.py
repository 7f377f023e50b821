"""Next-token prediction and text generation.

A recurrent model's advantage is O(1) work per new token: the prompt is fed once, then
each new token is one step with the carried state. Sampling is a chain of small pure
functions: temperature -> top-k -> top-p -> sample; temperature 0 means greedy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from whiteboard.errors import WhiteboardError
from whiteboard.lm.model import LanguageModel, State
from whiteboard.lm.vocab import EOS, Vocabulary


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature, shifted so that the largest is 0 first: a tiny temperature
    (1e-45) then tends to greedy instead of overflowing every logit to inf (and NaN)."""
    if not 0 < temperature < math.inf:
        raise ValueError("temperature must be a finite number > 0 here; temperature 0 is handled as greedy")
    return (logits - logits.max(-1, keepdim=True).values) / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits (0 = all); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability sums to >= p."""
    if p >= 1.0:
        return logits
    if p <= 0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # Drop a token when the tokens before it already reach p (the first always stays).
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> token ids (B,)."""
    if temperature == 0:
        return logits.argmax(-1)
    filtered = top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)
    return torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass
class Prediction:
    token: str
    probability: float


def _prompt_ids(vocab: Vocabulary, text: str) -> list[int]:
    ids = vocab.encode_text(text)
    if not ids:
        raise WhiteboardError("the prompt is empty: give at least one token")
    return ids


@torch.no_grad()
def feed(model: LanguageModel, ids: list[int], state: State | None = None) -> tuple[Tensor, State]:
    """Run the prompt once; return the logits after its last token (V,) and the state."""
    device = model.decoder.weight.device
    tokens = torch.tensor(ids, dtype=torch.long, device=device).unsqueeze(1)  # (T, 1)
    logits, state = model(tokens, state)
    return logits[-1, 0], state


@torch.no_grad()
def predict_next(model: LanguageModel, vocab: Vocabulary, text: str, top_k: int = 5) -> list[Prediction]:
    """The ``top_k`` most likely next tokens after ``text`` with their probabilities."""
    model.eval()
    logits, _ = feed(model, _prompt_ids(vocab, text))
    probs = logits.softmax(-1)
    values, indices = torch.topk(probs, min(top_k, probs.numel()))
    return [Prediction(vocab.tokens[int(i)], float(v)) for v, i in zip(values, indices)]


#: Generation streams its tokens, so any length can be watched as it comes; past this many
#: it is refused (a billion tokens would run for days at one token per step).
MAX_LENGTH = 10_000_000


def generate(model: LanguageModel, vocab: Vocabulary, prompt: str = "", length: int = 100, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> str:
    """Continue ``prompt`` by ``length`` tokens; returns only the new text."""
    return "".join(generate_pieces(model, vocab, prompt, length, temperature, top_k, top_p, seed))


def generate_pieces(model: LanguageModel, vocab: Vocabulary, prompt: str = "", length: int = 100,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
    """:func:`generate`'s text one token at a time, as each is sampled: the pieces join into
    exactly what :func:`generate` returns (a word after the prompt or a word gets a space)."""
    if not 0 <= length <= MAX_LENGTH:
        raise WhiteboardError(f"length must be in [0, {MAX_LENGTH:,}], got {length:,}")
    model.eval()
    generator = torch.Generator(device=model.decoder.weight.device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    with torch.no_grad():
        if prompt:
            logits, state = feed(model, _prompt_ids(vocab, prompt))
        else:
            # No prompt: start as after a line break (word level) or from the empty state.
            start = vocab.index.get("<eos>", vocab.index.get("\n", vocab.unk_id))
            logits, state = feed(model, [start])
    previous = None  # the last piece yielded
    for _ in range(length):
        with torch.no_grad():
            token = sample_next(logits.unsqueeze(0), temperature, top_k, top_p, generator)  # (1,)
        word = vocab.tokens[int(token)]
        if vocab.level == "char":
            piece = word
        elif word == EOS:
            piece = "\n"
        elif previous is None:
            piece = " " + word if prompt else word
        else:
            piece = word if previous == "\n" else " " + word
        previous = piece
        yield piece
        with torch.no_grad():
            step_logits, state = model.step(token, state)
        logits = step_logits[0]
