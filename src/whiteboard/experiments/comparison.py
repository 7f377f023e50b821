"""The seed's experiment: train RNN, LSTM and GRU on long-range tasks and measure how
well each remembers as the distance between clue and answer grows.

Budget rule for comparisons: every model gets the same number of training steps on the
same data stream, and (by default) the same number of parameters - the RNN and GRU get
larger hidden sizes to match the LSTM's count (``match="params"``). ``match="hidden"``
gives every model the same hidden size instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from whiteboard.experiments import horizon as memory_horizon
from whiteboard.experiments import tasks
from whiteboard.experiments.models import STORY_LR, SequenceRegressor, SequenceTagger, hidden_sizes, story_model, \
    story_vocabulary
from whiteboard.experiments.training import default_curriculum, lm_logits, score_adding, score_copy, score_stories, \
    train_adding, train_copy, train_story_model
from whiteboard.files import atomic_write_text
from whiteboard.inspect.plots import band_plot
from whiteboard.lm.model import LanguageModel
from whiteboard.lm.vocab import Vocabulary

__all__ = ['METRICS', 'CompareResult', 'compare', 'write_compare', 'chance_level']

METRICS = {"stories": ("accuracy", "top-1 accuracy of the language"), "adding": ("rmse", "RMSE of the sum"),
           "copy": ("accuracy", "per-symbol recall accuracy")}


@dataclass
class CompareResult:
    task: str
    budget: str
    hidden: dict[str, int]
    parameters: dict[str, int]
    rows: list[dict] = field(default_factory=list)  # {model, seed, distance, metric..., seconds}
    #: model -> {learning rate: validation score} where a sweep chose the rate
    sweeps: dict[str, dict[str, float]] = field(default_factory=dict)
    learning_rates: dict[str, float] = field(default_factory=dict)
    #: stories: model -> horizon.HorizonSummary as a dict (per seed, mean, interval)
    horizons: dict[str, dict] = field(default_factory=dict)

    def curve(self, model: str, seed: int | None = None) -> dict[int, float]:
        """Distance -> metric for one model, one seed or the mean over seeds."""
        metric = METRICS[self.task][0]
        values: dict[int, list[float]] = {}
        for r in self.rows:
            if r["model"] == model and (seed is None or r["seed"] == seed):
                values.setdefault(r["distance"], []).append(r[metric])
        return {d: sum(v) / len(v) for d, v in sorted(values.items())}

    def table(self) -> str:
        distances = sorted({r["distance"] for r in self.rows})
        models = list(self.hidden)
        seeds = len({r["seed"] for r in self.rows}) if self.rows else 0
        header = f"{'distance':>9} " + " ".join(f"{m:>10}" for m in models)
        over = f", mean of {seeds} seeds" if seeds > 1 else ""
        lines = [f"{self.task}: {METRICS[self.task][1]} by distance ({self.budget}{over})", header]
        curves = {m: self.curve(m) for m in models}
        for d in distances:
            lines.append(f"{d:>9} " + " ".join(f"{curves[m][d]:>10.4f}" if d in curves[m] else f"{'-':>10}"
                                               for m in models))
        if self.horizons:
            lines.append("horizon (distance where accuracy falls to half its value at <= 10 tokens): " + ", ".join(
                f"{m} {self.horizons[m]['text']}" for m in models if m in self.horizons))
        if self.learning_rates:
            lines.append("learning rates: " + ", ".join(f"{m} {lr:g}" for m, lr in self.learning_rates.items())
                         + (" (each model's best on validation)" if self.sweeps else ""))
        lines.append("parameters: " + ", ".join(f"{m} {self.parameters[m]:,} (hidden {self.hidden[m]})" for m in models))
        return "\n".join(lines)


def _story_build(vocab_size: int) -> Callable[[str, int], nn.Module]:
    return lambda cell, h: story_model(cell, vocab_size, h)


def _story_validation_score(model: LanguageModel, vocab: Vocabulary, distances: list[int], count: int) -> float:
    """Mean accuracy over ``distances`` on validation stories (never the test stories)."""
    scores = [score_stories(lm_logits(model), tasks.make_stories(count, d, d, 2, "valid"), vocab).accuracy
              for d in distances]
    return sum(scores) / len(scores)


def compare(task: str, cells: list[str], distances: list[int], steps: int, hidden: int = 64, match: str = "params",
            seed: int = 0, progress: bool = True, test_count: int = 300, log: Callable[[str], None] = print,
            learning_rates: list[float] | None = None, seeds: int = 1, train_max: int | None = None,
            device: str = "cpu") -> CompareResult:
    """Train every model with the same budget and evaluate it at every distance.

    stories: one model per cell and seed, trained over all distances up to the largest
    (curriculum), evaluated on test stories at each distance; each model's memory horizon
    (:mod:`whiteboard.experiments.horizon`) over the seeds. adding / copy: one model per cell, distance
    and seed (sequence length T for adding, blank delay for copy), each trained with the
    same :func:`length_curriculum` up to that distance.

    ``learning_rates``: every model first trains once per rate (seed ``seed``) and keeps the
    rate that scores best on validation data (stories: validation stories' mean accuracy;
    adding: RMSE, copy: accuracy on a validation batch drawn apart from the test batch);
    the budget is then steps x rates, the same for every model. Without a sweep the stories
    use :data:`STORY_LR` and the other tasks their trainers' default rate. ``train_max``
    (stories): train on lags up to this many tokens rather than the largest distance, so that
    distances beyond it measure how far what was learnt carries.
    """
    if task == "stories":
        vocab = story_vocabulary()
        build = _story_build(len(vocab))
    elif task == "adding":
        build = lambda cell, h: SequenceRegressor(cell, h)  # noqa: E731
    elif task == "copy":
        build = lambda cell, h: SequenceTagger(cell, h)  # noqa: E731
    else:
        raise ValueError(f"unknown task {task!r}")
    sizes = hidden_sizes(cells, hidden, match, build)
    params = {c: sum(p.numel() for p in build(c, sizes[c]).parameters()) for c in cells}
    sweep = f" x {len(learning_rates)} learning rates" if learning_rates else ""
    budget = f"{steps} steps{sweep} each, " + ("same parameter count" if match == "params" else "same hidden size")
    if task == "stories":
        budget += f", lags up to {train_max or max(distances)} in training"
    result = CompareResult(task, budget, sizes, params)
    unplaced = build
    build = lambda cell, h: unplaced(cell, h).to(device)  # noqa: E731 (every model on the device asked for)
    for cell in cells:
        if task == "stories":
            _compare_stories(result, cell, build, vocab, distances, steps, seed, seeds, learning_rates, progress,
                             test_count, train_max)
        else:
            _compare_sequences(result, task, cell, build, sizes[cell], distances, steps, seed, seeds, learning_rates,
                               progress)
        log(f"{cell}: done")
    return result


def _compare_stories(result: CompareResult, cell: str, build, vocab: Vocabulary, distances: list[int], steps: int,
                     seed: int, seeds: int, learning_rates: list[float] | None, progress: bool, test_count: int,
                     train_max: int | None) -> None:
    curriculum = default_curriculum(train_max or max(distances), steps)
    hidden = result.hidden[cell]

    def trained(lr: float, run_seed: int) -> tuple[LanguageModel, float]:
        torch.manual_seed(run_seed)  # the initial weights too: a model's result does not depend on which ran before
        model = build(cell, hidden)
        started = time.perf_counter()
        train_story_model(model, vocab, curriculum, lr=lr, seed=run_seed, progress=progress,
                          desc=f"{cell} stories lr={lr:g} seed={run_seed}")
        return model, time.perf_counter() - started

    kept: dict[int, tuple[LanguageModel, float]] = {}
    lr = STORY_LR[cell]
    if learning_rates:
        scores = {}
        for candidate in learning_rates:
            model, seconds = trained(candidate, seed)
            scores[candidate] = _story_validation_score(model, vocab, distances, max(50, test_count // 3))
            if scores[candidate] == max(scores.values()):
                kept[seed] = (model, seconds)
        lr = max(scores, key=scores.get)
        result.sweeps[cell] = {f"{k:g}": v for k, v in scores.items()}
    result.learning_rates[cell] = lr
    horizons = []
    for run_seed in range(seed, seed + seeds):
        model, seconds = kept.get(run_seed) or trained(lr, run_seed)
        for d in distances:
            score = score_stories(lm_logits(model), tasks.make_stories(test_count, d, d, run_seed + 1, "test"), vocab)
            result.rows.append({"model": cell, "seed": run_seed, "distance": d, "accuracy": score.accuracy,
                                "mean_probability": score.mean_probability, "seconds": seconds})
        horizons.append(memory_horizon.horizon(result.curve(cell, run_seed), floor=2 * chance_level("stories")))
    summary = memory_horizon.summarize(horizons, max(distances))
    result.horizons[cell] = {**asdict(summary), "text": summary.text()}


def _compare_sequences(result: CompareResult, task: str, cell: str, build, hidden: int, distances: list[int],
                       steps: int, seed: int, seeds: int, learning_rates: list[float] | None, progress: bool) -> None:
    train_fn, metric = (train_adding, "rmse") if task == "adding" else (train_copy, "accuracy")

    def trained(d: int, lr: float | None, run_seed: int) -> tuple[nn.Module, float]:
        torch.manual_seed(run_seed)
        model = build(cell, hidden)
        started = time.perf_counter()
        extra = {} if lr is None else {"lr": lr}
        train_fn(model, d, steps, seed=run_seed, progress=progress, desc=f"{cell} {task} {d} seed={run_seed}", **extra)
        return model, time.perf_counter() - started

    def scored(model: nn.Module, d: int, score_seed: int) -> dict:
        if task == "adding":
            score = score_adding(model, d, seed=score_seed)
            return {"rmse": score.rmse, "within_0_04": score.within_0_04}
        return {"accuracy": score_copy(model, d, seed=score_seed)}

    for d in distances:
        lr, kept = None, {}
        if learning_rates:  # validation batches (seed 777) apart from the test batch (12345)
            scores = {}
            better = min if metric == "rmse" else max
            for candidate in learning_rates:
                model, seconds = trained(d, candidate, seed)
                scores[candidate] = scored(model, d, 777)[metric]
                if better(scores.values()) == scores[candidate]:
                    kept[seed] = (model, seconds)
            lr = better(scores, key=scores.get)
            result.sweeps[f"{cell}@{d}"] = {f"{k:g}": v for k, v in scores.items()}
            result.learning_rates[f"{cell}@{d}"] = lr
        for run_seed in range(seed, seed + seeds):
            model, seconds = kept.get(run_seed) or trained(d, lr, run_seed)
            result.rows.append({"model": cell, "seed": run_seed, "distance": d, **scored(model, d, 12345),
                                "seconds": seconds})


def write_compare(result: CompareResult, out_dir) -> dict[str, str]:
    """results.json, results.csv and a plot (metric vs distance, one line per model, with
    the spread over seeds shaded; log distance for the stories)."""
    import csv
    import io
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(asdict(result), indent=2, default=str))
    keys = sorted({k for r in result.rows for k in r}, key=lambda k: (k not in ("model", "distance"), k))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(result.rows)
    atomic_write_text(out / "results.csv", buffer.getvalue())
    metric, label = METRICS[result.task]
    series = {}
    for m in result.hidden:
        by_distance: dict[int, list[float]] = {}
        for r in result.rows:
            if r["model"] == m:
                by_distance.setdefault(r["distance"], []).append(r[metric])
        name = f"{m} (horizon {result.horizons[m]['text']})" if m in result.horizons else m
        series[name] = [(d, sum(v) / len(v), min(v), max(v)) for d, v in by_distance.items()]
    band_plot(series, out / "plot.png", xlabel="distance between clue and answer (tokens / steps)", ylabel=label,
              title=f"{result.task}: {result.budget}", logx=result.task == "stories")
    return {"json": str(out / "results.json"), "csv": str(out / "results.csv"), "plot": str(out / "plot.png")}


def chance_level(task: str) -> float:
    return {"stories": 1 / len(set(tasks.COUNTRY_LANGUAGE.values())), "copy": 1 / tasks.COPY_SYMBOLS,
            "adding": math.sqrt(1 / 6)}[task]
