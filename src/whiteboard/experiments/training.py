"""Training and scoring for the experiments: the stories' curriculum and language-model
training, and the adding and copy tasks' loops, each with its score."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from whiteboard.experiments import tasks
from whiteboard.experiments.models import SequenceRegressor, SequenceTagger, encode_stories
from whiteboard.lm.model import LanguageModel
from whiteboard.lm.vocab import Vocabulary

__all__ = [
    "StoryScore",
    "score_stories",
    "Curriculum",
    "train_story_model",
    "lm_logits",
    "AddingScore",
    "length_curriculum",
    "train_adding",
    "score_adding",
    "train_copy",
    "score_copy",
    "default_curriculum",
]

@dataclass
class StoryScore:
    accuracy: float  # top-1 over the whole vocabulary at the position after 'speaks'
    mean_probability: float  # of the right language
    count: int


@torch.no_grad()
def score_stories(logits_fn: Callable[[Tensor], Tensor], stories: list[tasks.Story], vocab: Vocabulary,
                  batch_size: int = 256) -> StoryScore:
    """Accuracy and mean probability of the language right after 'speaks'.

    ``logits_fn`` maps (T, B) input ids to (T, B, V) logits, position t predicting t+1.
    """
    correct, prob_sum = 0, 0.0
    for start in range(0, len(stories), batch_size):
        chunk = stories[start : start + batch_size]
        inputs, _, positions = encode_stories(chunk, vocab)
        logits = logits_fn(inputs)  # (T, B, V)
        at_answer = logits[positions.to(logits.device), torch.arange(len(chunk), device=logits.device)]  # (B, V)
        answers = torch.tensor([vocab.index[s.answer] for s in chunk], device=logits.device)
        correct += int((at_answer.argmax(-1) == answers).sum())
        prob_sum += float(at_answer.softmax(-1)[torch.arange(len(chunk), device=logits.device), answers].sum())
    return StoryScore(correct / len(stories), prob_sum / len(stories), len(stories))


@dataclass
class Curriculum:
    """Stages of (max distance, steps): each stage trains on distances drawn from
    [min_distance, max distance], so short lags are learnt first. ``sampling`` "log-uniform"
    gives every octave of distance the same share of a batch, so short lags stay in every
    batch however long the longest one grows; "uniform" lets them fade (at a maximum of
    150, 1.4 % of stories have a lag of 5 or less)."""

    stages: list[tuple[int, int]]
    min_distance: int = 3
    sampling: str = "log-uniform"

    @property
    def total_steps(self) -> int:
        return sum(steps for _, steps in self.stages)

    def draw(self, rng: random.Random, max_distance: int) -> int:
        low, high = self.min_distance, max(self.min_distance, max_distance)
        if self.sampling == "uniform":
            return rng.randint(low, high)
        return min(high, int(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))


def train_story_model(model: LanguageModel, vocab: Vocabulary, curriculum: Curriculum, batch_size: int = 32,
                      lr: float = 5e-3, answer_weight: float = 20.0, seed: int = 0, progress: bool = True,
                      desc: str = "", answer_share: float | None = None) -> list[dict]:
    """Language-model training on stories (every next token counts), with the answer
    token weighted ``answer_weight`` times: it is the one token that needs memory."""
    rng = random.Random(f"stories-train-{seed}")
    torch.manual_seed(seed)
    device = _device_of(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    model.train()
    bar = tqdm(total=curriculum.total_steps, desc=desc, disable=None if progress else True, leave=True,
               dynamic_ncols=True, unit="step")
    step = 0
    for max_distance, steps in curriculum.stages:
        for _ in range(steps):
            stories = [tasks.make_story(rng, curriculum.draw(rng, max_distance)) for _ in range(batch_size)]
            inputs, targets, positions = (t.to(device) for t in encode_stories(stories, vocab))
            weights = (targets != -100).float()
            rows = torch.arange(batch_size, device=device)
            if answer_share is None:
                weights[positions, rows] = answer_weight
            else:  # the answer carries answer_share of its story's weight, however long the story
                others = weights.sum(0) - 1  # (B,)
                weights[positions, rows] = others * answer_share / (1 - answer_share)
            logits, _ = model(inputs)
            ce = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
            loss = (ce * weights.flatten()).sum() / weights.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            answer_ce = float(ce.detach().view_as(targets)[positions, rows].mean())
            bar.update(1)
            bar.set_postfix(max_dist=max_distance, loss=f"{loss.item():.3f}", answer_loss=f"{answer_ce:.3f}")
            if step % 25 == 0:
                history.append({"step": step, "max_distance": max_distance, "loss": loss.item(), "answer_loss": answer_ce})
    bar.close()
    model.eval()
    return history


def lm_logits(model: LanguageModel) -> Callable[[Tensor], Tensor]:
    return lambda inputs: model(inputs.to(_device_of(model)))[0]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class AddingScore:
    rmse: float
    within_0_04: float  # share of answers with |error| < 0.04 (Hochreiter & Schmidhuber's criterion)


def length_curriculum(length: int, steps: int) -> Callable[[int], int]:
    """Step -> sequence length: a quarter of the steps each at length/8, /4, /2 and the
    full length. Long lags are learnt far faster once short ones are (measured: an LSTM
    on the adding problem at T = 200 went from RMSE 0.42, no better than guessing, to
    0.016 in the same 3000 steps)."""
    marks = [max(2, length // 8), max(2, length // 4), max(2, length // 2), length]
    per = max(1, steps // 4)
    return lambda step: marks[min(step // per, 3)]


def _train_steps(model: nn.Module, batch: Callable[[torch.Generator, int], tuple[Tensor, Tensor]],
                 loss_fn: Callable[[Tensor, Tensor], Tensor], steps: int, lr: float, seed: int, progress: bool,
                 desc: str, metric: str) -> list[dict]:
    """Adam, clipping at norm 1, a fresh batch each step from a seeded generator;
    ``batch(generator, step)`` may grow the sequences as training goes on."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    bar = tqdm(range(steps), desc=desc, disable=None if progress else True, dynamic_ncols=True, unit="step")
    device = _device_of(model)
    for step in bar:
        x, y = (t.to(device) for t in batch(generator, step))
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = loss.item() ** 0.5 if metric == "rmse" else loss.item()
        bar.set_postfix({metric: f"{value:.4f}"})
        if (step + 1) % 50 == 0:
            history.append({"step": step + 1, metric: value})
    return history


def train_adding(model: SequenceRegressor, length: int, steps: int, batch_size: int = 64, lr: float = 3e-3,
                 seed: int = 0, progress: bool = True, desc: str = "") -> list[dict]:
    """Trained with :func:`length_curriculum` up to ``length``; scored at ``length``."""
    schedule = length_curriculum(length, steps)
    return _train_steps(model, lambda g, step: tasks.adding_batch(batch_size, schedule(step), g),
                        nn.functional.mse_loss, steps, lr, seed, progress, desc, "rmse")


@torch.no_grad()
def score_adding(model: SequenceRegressor, length: int, count: int = 1000, seed: int = 12345) -> AddingScore:
    model.eval()
    x, y = (t.to(_device_of(model)) for t in tasks.adding_batch(count, length, torch.Generator().manual_seed(seed)))
    error = model(x) - y
    model.train()
    return AddingScore(float(error.pow(2).mean().sqrt()), float((error.abs() < 0.04).float().mean()))


def train_copy(model: SequenceTagger, delay: int, steps: int, batch_size: int = 64, lr: float = 3e-3,
               seed: int = 0, progress: bool = True, desc: str = "") -> list[dict]:
    schedule = length_curriculum(delay, steps)
    return _train_steps(model, lambda g, step: tasks.copy_batch(batch_size, schedule(step), g),
                        lambda logits, y: nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()),
                        steps, lr, seed, progress, desc, "loss")


@torch.no_grad()
def score_copy(model: SequenceTagger, delay: int, count: int = 500, seed: int = 12345, length: int = 10) -> float:
    """Per-symbol accuracy over the recalled part (chance is 1/8)."""
    model.eval()
    x, y = (t.to(_device_of(model)) for t in tasks.copy_batch(count, delay, torch.Generator().manual_seed(seed), length))
    predicted = model(x)[-length:].argmax(-1)
    model.train()
    return float((predicted == y[-length:]).float().mean())


def default_curriculum(max_distance: int, steps: int, first: int = 4) -> Curriculum:
    """30 % of the steps at the shortest lag (learn the country -> language mapping),
    then four equal stages up to ``max_distance`` (learn to hold it); in every stage the
    distances are log-uniform, so short lags stay in every batch."""
    opening = max(1, round(steps * 0.3))
    per = max(1, (steps - opening) // 4)
    marks = [max(first, round(max_distance * k / 4)) for k in range(1, 5)]
    return Curriculum([(min(first, max_distance), opening)] + [(m, per) for m in marks])
