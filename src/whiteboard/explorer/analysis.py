"""What the explorer shows about a text, computed for each served model.

Every function takes a :class:`ServedRun` and returns plain data (lists, numbers and packed
arrays) that the server sends as JSON. Nothing here knows about the web.

A packed array is ``{"shape": [...], "data": BASE64}``: little-endian float32 values in
row-major order. A 200-token text has about 100,000 board values per model; as JSON numbers
they take longer to write than the models take to compute them, as float32 bytes they do
not, and the page reads them straight into a ``Float32Array``.
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from whiteboard.errors import WhiteboardError
from whiteboard.experiments import tasks
from whiteboard.lm.model import LanguageModel
from whiteboard.lm.vocab import UNK, Vocabulary

#: The longest text the explorer reads, in characters and in tokens (a longer one is
#: refused with 413). 2,000 tokens trace in well under a second on two cores.
MAX_TEXT_CHARS = 20_000
MAX_TEXT_TOKENS = 2_000
#: The most filler sentences the distance slider inserts (about 12 tokens each).
MAX_FILLERS = 60
MAX_TOP_K = 20


class TextTooLong(WhiteboardError):
    """A text beyond MAX_TEXT_CHARS or MAX_TEXT_TOKENS (the server answers 413)."""


@dataclass
class ServedRun:
    """One trained run the explorer serves. ``lock``: one call at a time per model, so that
    concurrent requests never share a module mid-call (different models still run at once)."""

    name: str
    path: Path
    model: LanguageModel
    vocab: Vocabulary
    mode: str  # LSTM | GRU | RNN: what its traces record (a layer-norm LSTM traces as an LSTM)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def cell(self) -> str:
        return self.model.config.cell

    @property
    def layers(self) -> int:
        return self.model.config.num_layers

    def describe(self) -> dict:
        sizes = list(self.model.sizes)
        return {"name": self.name, "cell": self.cell, "mode": self.mode, "layers": self.layers,
                "hidden": sizes, "level": self.vocab.level, "vocabulary": len(self.vocab),
                "parameters": self.model.parameter_count()}


def serve_run(name: str, path: Path, model: LanguageModel, vocab: Vocabulary) -> ServedRun:
    """A loaded run, ready to serve; its trace mode comes from tracing one token."""
    model.eval()
    with torch.no_grad():
        _, _, trace = model.trace(torch.zeros(1, 1, dtype=torch.long, device=model.decoder.weight.device))
    return ServedRun(name, Path(path), model, vocab, trace.mode)


def short_names(paths: list[Path]) -> list[str]:
    """Short unique names: each path's own name (demo-out/models/lstm -> lstm), with
    parent folders added only where two would share a name."""
    resolved = [Path(p).resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise WhiteboardError("the same path is named twice: " + ", ".join(str(p) for p in paths))
    depths = [1] * len(resolved)
    while True:
        names = ["/".join(p.parts[-d:]) for p, d in zip(resolved, depths)]
        clashing = [i for i, name in enumerate(names) if names.count(name) > 1]
        if not clashing:
            return names
        for i in clashing:
            depths[i] += 1


def pack(values: Tensor) -> dict:
    array = values.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return {"shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode("ascii")}


def unpack(packed: dict) -> np.ndarray:
    """The inverse of :func:`pack` (for tests and scripts that read the API)."""
    return np.frombuffer(base64.b64decode(packed["data"]), dtype="<f4").reshape(packed["shape"])


def text_tokens(run: ServedRun, text: str) -> list[str]:
    """The text's tokens as this model splits them, within the explorer's limits."""
    if len(text) > MAX_TEXT_CHARS:
        raise TextTooLong(f"the text has {len(text):,} characters; the explorer reads at most {MAX_TEXT_CHARS:,}")
    tokens = run.vocab.tokenize(text)
    if len(tokens) > MAX_TEXT_TOKENS:
        raise TextTooLong(f"the text has {len(tokens):,} tokens for {run.name}; the explorer reads at most "
                          f"{MAX_TEXT_TOKENS:,}")
    if not tokens:
        raise WhiteboardError("the text is empty: type at least one word")
    return tokens


def _ids(run: ServedRun, tokens: list[str]) -> Tensor:
    return torch.tensor(run.vocab.encode(tokens), device=run.model.decoder.weight.device).unsqueeze(1)  # (T, 1)


def token_view(run: ServedRun, tokens: list[str]) -> list[dict]:
    """Each token as the model reads it: an unknown word is shown as <unk>, its typed form kept."""
    known = run.vocab.index
    return [{"typed": tok, "shown": tok if tok in known else UNK, "unknown": tok not in known} for tok in tokens]


def analyze(run: ServedRun, text: str, top_k: int = 5) -> dict:
    """Predictions after every token and every traced gate and state (the boards)."""
    tokens = text_tokens(run, text)
    ids = _ids(run, tokens)
    with run.lock, torch.no_grad():
        logits, _, trace = run.model.trace(ids)
    probs = logits[:, 0].float().softmax(-1)  # (T, V)
    values, indices = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
    words = run.vocab.tokens
    predictions = [[{"token": words[i], "probability": round(v, 5)} for v, i in zip(vs, ix)]
                   for vs, ix in zip(values.tolist(), indices.tolist())]
    targets = ids[1:, 0]
    next_probability = probs[torch.arange(len(targets)), targets].tolist() + [None]
    layers = [{name: pack(values[:, 0]) for name, values in layer_steps[0].items()} for layer_steps in trace.steps]
    return {"tokens": token_view(run, tokens), "predictions": predictions,
            "next_probability": [None if p is None else round(p, 5) for p in next_probability],
            "layers": layers, "fields": list(trace.steps[0][0])}


def trace_values(run: ServedRun, text: str, layer: int, field: str) -> Tensor:
    """One traced field of one layer over a text: (T, H)."""
    ids = _ids(run, text_tokens(run, text))
    with run.lock, torch.no_grad():
        _, _, trace = run.model.trace(ids)
    return trace.steps[layer][0][field][:, 0].float().cpu()


def answer_id(run: ServedRun, answer: str) -> int | None:
    """The answer's vocabulary id, or None where this model does not know it as one token."""
    tokens = run.vocab.tokenize(answer)
    if len(tokens) != 1 or tokens[0] not in run.vocab.index:
        return None
    return run.vocab.index[tokens[0]]


def distance_curve(run: ServedRun, clue: str, question: str, answer: str, fillers: list[list[str]]) -> dict:
    """The probability of ``answer`` after clue + the first n filler sentences + question,
    for n = 0 .. len(fillers). The clue and fillers are read once; the question is asked
    from the state after each filler sentence."""
    target = answer_id(run, answer)
    if target is None:
        return {"probabilities": None, "note": f"{run.name} does not know {answer!r} as one word"}
    clue_ids = _ids(run, text_tokens(run, clue))
    question_ids = _ids(run, text_tokens(run, question))
    model = run.model
    probabilities = []
    with run.lock, torch.no_grad():
        _, state = model(clue_ids)
        for n in range(len(fillers) + 1):
            if n:
                _, state = model(_ids(run, run.vocab.tokenize(" ".join(fillers[n - 1]))), state)
            logits, _ = model(question_ids, state)
            probabilities.append(round(float(logits[-1, 0].float().softmax(-1)[target]), 5))
    return {"probabilities": probabilities, "note": ""}


def distance_prompts(clue: str, question: str, count: int) -> tuple[list[list[str]], list[int]]:
    """The filler sentences for the slider (the stories' own, from a fixed seed) and the
    number of filler tokens after each count."""
    if not 0 <= count <= MAX_FILLERS:
        raise WhiteboardError(f"the slider goes from 0 to {MAX_FILLERS} filler sentences, got {count}")
    pronoun = question.split()[0] if question.split() and question.split()[0] in ("He", "She") else "She"
    fillers = tasks.filler_sentences(count, pronoun, "His" if pronoun == "He" else "Her")
    lengths = [0]
    for sentence in fillers:
        lengths.append(lengths[-1] + len(sentence))
    return fillers, lengths


def answer_reach(run: ServedRun, text: str, answer: str = "") -> dict:
    """How much of the answer's gradient reaches each token: the norm of
    d(-log p(answer after the text)) / d(embedding of token t), for every t. Without an
    answer this model knows, the model's own top prediction is the answer."""
    tokens = text_tokens(run, text)
    ids = _ids(run, tokens)
    model = run.model
    with run.lock, torch.enable_grad():
        embedded = model.embedding(ids).detach().requires_grad_(True)  # (T, 1, E)
        output, _ = model.recurrent(embedded)
        log_probs = model.decode(output[-1:]).float().log_softmax(-1)[0, 0]
        wanted = answer_id(run, answer) if answer else None
        target = int(log_probs.argmax()) if wanted is None else wanted
        (grad,) = torch.autograd.grad(-log_probs[target], embedded)
    log_probs = log_probs.detach()
    norms = grad[:, 0].double().norm(dim=-1)
    total = float(norms.sum())
    return {"tokens": token_view(run, tokens), "target": run.vocab.tokens[target],
            "target_probability": round(float(log_probs[target].exp()), 5),
            "answer_known": wanted is not None or not answer,
            "norms": [float(v) for v in norms], "shares": [float(v) / total if total > 0 else 0.0 for v in norms]}


def demo_stories() -> list[dict]:
    """The texts the page offers: the seed's sentence, the same clue far back, and held-out
    stories at growing distances (up to 'speaks', so the next word is the answer)."""
    stories = [{"title": "The seed's sentence", "text": tasks.SEED_PROMPT_TYPED, "answer": tasks.SEED_ANSWER},
               {"title": "The same clue, 100 tokens back", "text": tasks.long_seed_prompt(100),
                "answer": tasks.SEED_ANSWER}]
    for distance in (20, 60, 150):
        story = tasks.make_stories(1, distance, distance, seed=distance, split="test")[0]
        stories.append({"title": f"A held-out story, clue {story.distance} tokens back",
                        "text": " ".join(story.prompt), "answer": story.answer})
    return stories
