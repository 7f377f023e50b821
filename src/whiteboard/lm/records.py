"""What a training run records: its state between steps (saved with every checkpoint),
its metrics log (one JSON line per logged step, cut back to the checkpoint on resume)
and its result."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from whiteboard.files import atomic_write_text
from whiteboard.lm import rundir
from whiteboard.lm.evaluation import loss_words

class MetricsLog:
    """metrics.jsonl. ``writer``: whether this process writes it (rank 0 of a distributed run)."""

    def __init__(self, path: Path, writer: bool = True):
        self.path, self.writer = path, writer

    def keep_up_to(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (they will be logged again)."""
        if not self.writer or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        if not self.writer:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / rundir.METRICS
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


@dataclass
class TrainResult:
    steps: int
    epochs_done: int
    best_valid_loss: float
    test_loss: float | None
    interrupted: bool
    elapsed_s: float
    train_tokens_per_s: float
    level: str
    #: The signal that interrupted the run (SIGINT, SIGTERM), if one did.
    signal: int | None = None
    #: The run had already finished before this call: nothing was trained or evaluated.
    already_finished: bool = False

    def summary(self) -> str:
        if math.isfinite(self.best_valid_loss):
            text = f"best validation {loss_words(self.best_valid_loss, self.level)}"
        else:
            text = "stopped before the first evaluation"
        if self.test_loss is not None:
            text += f"; test {loss_words(self.test_loss, self.level)}"
        return text + f"; {self.steps} steps in {self.elapsed_s:.0f} s ({self.train_tokens_per_s:,.0f} tokens/s)"


@dataclass
class TrainingState:
    """What a run carries from step to step and saves at every checkpoint (as JSON in the
    training state's metadata; keys a checkpoint lacks keep their defaults, so older
    checkpoints load)."""

    epoch: int = 1
    position: int = 0  # token offset of the next window in the epoch's streams
    step: int = 0
    best_valid: float = math.inf
    bad_evals: int = 0  # evaluations since the last improvement
    plateau: float = 1.0  # the lr factor plateau decay has reached
    log_loss: float = 0.0  # summed since the last training-loss line
    log_tokens: int = 0
    train_tokens: int = 0
    train_seconds: float = 0.0
    asgd: bool = False  # NT-ASGD has switched to averaging
    valid_history: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0  # over every session of the run
    finished: bool = False
    world_size: int = 1  # processes the run last trained on (whiteboard.lm.distributed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainingState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def result_of(counters: dict, test_loss: float | None, interrupted: bool, level: str, signal_number: int | None = None,
            already_finished: bool = False) -> TrainResult:
    """The TrainResult of a run's counters (a TrainingState's dict)."""
    seconds = counters["train_seconds"]
    return TrainResult(
        steps=counters["step"], epochs_done=counters["epoch"] - 1, best_valid_loss=counters["best_valid"],
        test_loss=test_loss, interrupted=interrupted, elapsed_s=seconds,
        train_tokens_per_s=counters["train_tokens"] / max(seconds, 1e-9), level=level, signal=signal_number,
        already_finished=already_finished,
    )


#: A time-budgeted run forecasts its tokens after this many steps (warm caches, a fair speed).
FORECAST_STEPS = 20


def forecast_lines(tokens_so_far: int, tokens_per_s: float, remaining_s: float, minutes: float,
                   tuned_tokens: int) -> list[str]:
    """What a time-budgeted run says of its budget once its speed is known: the training tokens
    it will see, and a warning where that is under half of what the recipe was tuned with
    (a slower machine would otherwise quietly get a weaker model)."""
    tokens = tokens_so_far + tokens_per_s * remaining_s
    line = f"forecast: {tokens / 1e6:.1f} M training tokens in the {minutes:g}-minute budget ({tokens_per_s:,.0f} tokens/s)"
    if not tuned_tokens:
        return [line]
    lines = [line + f"; the recipe was tuned with {tuned_tokens / 1e6:.1f} M"]
    if tokens < tuned_tokens / 2:
        lines.append(f"warning: this machine will train on {tokens / tuned_tokens:.0%} of the tokens the recipe was tuned "
                     "with; expect a weaker model (a longer budget, a CPU with AMX or AVX512-BF16, or a GPU gets closer)")
    return lines


def nothing_to_train(t, counters: dict) -> bool:
    """Whether the config leaves a resumed run nothing to do (a run resumed with more epochs
    or steps than it had goes on)."""
    return (counters["epoch"] > t.epochs or bool(t.max_steps and counters["step"] >= t.max_steps)
            or bool(t.time_limit and counters.get("wall_seconds", 0.0) >= t.time_limit * 60)
            or bool(t.early_stop and counters["bad_evals"] >= t.early_stop))
