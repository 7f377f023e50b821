"""What stops a training run before it does harm: SIGINT and SIGTERM stop it at the next
step with a checkpoint, and a loss, gradient or weight that turns non-finite (or absurd)
stops it with the last good checkpoint kept."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import torch
from torch import nn

from whiteboard.errors import WhiteboardError
from whiteboard.lm.model import LanguageModel

class TrainingDiverged(WhiteboardError):
    pass


#: A loss above this many times ln(V), the loss of a uniform guess over the vocabulary, is
#: taken as divergence (train.lr=1e30 gave a validation loss of 1.6e30, which was reported
#: as a result). High enough that no recovering run passes it: lr 30 on a 17-word corpus
#: peaks at 6.5 times ln(V) and recovers.
ABSURD_LOSS_FACTOR = 100.0


def check_loss(value: float, vocab_size: int, what: str, where: str, run_dir: Path) -> None:
    """Stop with TrainingDiverged where a loss is NaN, infinite or absurd."""
    if math.isfinite(value) and value <= ABSURD_LOSS_FACTOR * math.log(max(2, vocab_size)):
        return
    raise TrainingDiverged(
        f"{what} became {value:.4g} {where}; stopped, the last good checkpoint in {run_dir} is kept "
        "(try a lower train.lr or train.clip)"
    )


class StopFlag:
    """The first Ctrl-C, or a SIGTERM (what schedulers and ``timeout`` send), asks the loop
    to checkpoint and stop after the current step; a second one interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        for number in self.SIGNALS:
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: no handler, signals behave as usual
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signum

    def __exit__(self, *exc):
        for number, previous in self._previous.items():
            signal.signal(number, previous)


def check_updated_model(model: LanguageModel, last_step, loss_fn, vocab_size: int, state,
                         run_dir: Path) -> None:
    """Before a checkpoint is written: the last window's loss under the updated weights is
    sane. A finite but absurd update (train.lr=1e30) leaves finite weights that only the next
    step's loss would show, after they had been checkpointed. Run in eval mode, which draws
    no random numbers, so an exact resume is unaffected."""
    window, hidden = last_step
    model.eval()
    with torch.no_grad():
        logits, _ = model(window.inputs, hidden)
        loss = float(loss_fn(logits.flatten(0, 1), window.targets.flatten()))
    model.train()
    check_loss(loss, vocab_size, "the loss after the update", f"at step {state.step}", run_dir)


def check_parameters(model: nn.Module, state, run_dir: Path) -> None:
    """Before any checkpoint is written: every weight finite, or stop and keep the last one."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(
            f"the weights became non-finite ({', '.join(bad[:3])}) by step {state.step}; stopped, the last "
            f"good checkpoint in {run_dir} is kept (try a lower train.lr or train.clip)"
        )
