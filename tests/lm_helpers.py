"""Tiny corpora and configs for the language-modelling tests (no network, no shared data)."""

import random
from pathlib import Path

from whiteboard.lm import config as cfg

#: The CLI's options for a seconds-long model, for tests that train through main(argv).
TINY = ["--set", "model.embedding_size=16", "--set", "model.hidden_size=16", "--set", "model.num_layers=1",
        "--set", "train.batch_size=4", "--set", "train.bptt=8", "--set", "train.eval_batch_size=2", "--quiet"]

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


def start_training(folder: Path):
    """A long training run as its own process, returned once its first checkpoint exists:
    (the process, its run directory, its command line)."""
    import subprocess
    import sys
    import time

    corpus = write_corpus(folder / "c.txt", lines=2000)
    run = folder / "run"
    command = [sys.executable, "-m", "whiteboard", "train", str(corpus), "--run-dir", str(run),
               "--set", "train.epochs=1000", "--set", "train.checkpoint_every=10", *TINY]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / "training_state.safetensors").exists() and time.time() < deadline:
        time.sleep(0.1)
    return process, run, command
