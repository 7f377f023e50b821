"""Tiny trained-looking runs for the explorer's tests: the demo's vocabulary and model shapes
at a few units, written as ordinary run directories."""

from __future__ import annotations

from pathlib import Path

import torch

from whiteboard import experiments as ex
from whiteboard.explorer import analysis
from whiteboard.explorer.corpus import Corpus
from whiteboard.lm.checkpoint import save_model, save_run_files
from whiteboard.lm.config import RunConfig

CELLS = ("rnn", "lstm", "gru")
STORY_TEXT = "Alice lives in France. She is an artist. She likes to cook. She speaks"


def write_runs(folder: Path, cells=CELLS, hidden: int = 6, layers: int = 1) -> list[Path]:
    vocab = ex.story_vocabulary()
    paths = []
    for index, cell in enumerate(cells):
        torch.manual_seed(index)
        model = ex.story_model(cell, len(vocab), hidden, embedding=5)
        if layers > 1:
            config = model.config
            config.num_layers = layers
            model = type(model)(len(vocab), config)
        config = RunConfig()
        config.model = model.config
        config.data.corpus = "stories"
        path = folder / cell
        save_run_files(path, config, vocab)
        save_model(path, model, 0)
        paths.append(path)
    return paths


def served(paths: list[Path]):
    from whiteboard.explorer.server import load_served

    return load_served(paths)


def story_corpus(count: int = 12) -> Corpus:
    stories = ex.tasks.make_stories(count, 4, 30, seed=3, split="test")
    return Corpus("stories.txt", "".join(" ".join(s.tokens) + "\n" for s in stories))


def unpack(packed):
    return torch.from_numpy(analysis.unpack(packed).copy())
