"""The optimizer and its schedule: SGD or Adam, NT-ASGD's switch to averaging (Merity et
al. 2018) and the averaged weights used for evaluation, and the learning rate over the
run (step decay, plateau decay, annealing with the wall clock)."""

from __future__ import annotations

import torch
from torch import nn

from whiteboard.lm.config import RunConfig

def ntasgd_should_switch(previous: list[float], current: float, nonmono: int) -> bool:
    """Merity et al.'s non-monotone trigger: switch to averaged SGD once the validation loss
    is worse than the best of all evaluations before the last ``nonmono``."""
    return len(previous) > nonmono and current > min(previous[:-nonmono])


class AveragedWeights:
    """While active, the model holds ASGD's averaged weights (for evaluation and saving)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.pairs = []
        if isinstance(optimizer, torch.optim.ASGD):
            self.pairs = [(p, optimizer.state[p]["ax"]) for p in model.parameters() if "ax" in optimizer.state[p]]

    def __enter__(self):
        self.saved = [p.detach().clone() for p, _ in self.pairs]
        with torch.no_grad():
            for p, ax in self.pairs:
                p.copy_(ax)

    def __exit__(self, *exc):
        with torch.no_grad():
            for (p, _), saved in zip(self.pairs, self.saved):
                p.copy_(saved)


def make_optimizer(model: nn.Module, config: RunConfig, averaged: bool = False) -> torch.optim.Optimizer:
    t = config.train
    if averaged:
        return torch.optim.ASGD(model.parameters(), lr=t.lr, t0=0, lambd=0.0, weight_decay=t.weight_decay)
    if t.optimizer in ("sgd", "ntasgd"):
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def anneal_factor(anneal: float, progress: float) -> float:
    """1 until the last ``anneal`` fraction of the run, then linearly down to 0 at its end."""
    if anneal <= 0:
        return 1.0
    return min(1.0, max(0.0, (1.0 - progress) / anneal))


def scheduled_lr(config: RunConfig, epoch: int, plateau_factor: float) -> float:
    """Zaremba et al.: constant, then multiplied by lr_decay each epoch after decay_start."""
    t = config.train
    factor = t.lr_decay ** max(0, epoch - t.decay_start) if t.decay_start > 0 else 1.0
    return t.lr * factor * plateau_factor
