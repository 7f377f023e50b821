"""Tiny corpora and configs for the language-modelling tests (no network, no shared data)."""

import random
from pathlib import Path

from whiteboard import config as cfg

WORDS = "the cat sat on a mat dog ran to park big small red blue house tree".split()


def write_corpus(path: Path, lines: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) for _ in range(lines)) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def tiny_config(corpus: Path, **train):
    sets = [
        f"data.corpus={corpus}",
        "model.embedding_size=16",
        "model.hidden_size=16",
        "model.num_layers=1",
        "train.epochs=2",
        "train.batch_size=4",
        "train.bptt=8",
        "train.eval_batch_size=2",
        "train.log_every=5",
    ] + [f"train.{k}={v}" for k, v in train.items()]
    return cfg.resolve(sets=sets)
