"""Training a language model with truncated backpropagation through time.

Resumable to the token: a checkpoint holds the weights, the optimizer, both random
generators (dropout's and the data's), the hidden state carried across windows and the
position in the epoch, so ``--resume`` continues with exactly the losses an
uninterrupted run would have had.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from whiteboard.lm import checkpoint
from whiteboard.lm import rundir
from whiteboard.lm.config import RunConfig, check_device
from whiteboard.lm.data import batchify, check_long_enough, load_corpus, windows
from whiteboard.errors import WhiteboardError
from whiteboard.lm.model import LanguageModel, detach_state
from whiteboard.nn.regularizers import activation_regularization, temporal_activation_regularization
from whiteboard.lm.vocab import Vocabulary, detect_tokenizer


class TrainingDiverged(WhiteboardError):
    pass


#: A loss above this many times ln(V), the loss of a uniform guess over the vocabulary, is
#: taken as divergence (train.lr=1e30 gave a validation loss of 1.6e30, which was reported
#: as a result). High enough that no recovering run passes it: lr 30 on a 17-word corpus
#: peaks at 6.5 times ln(V) and recovers.
ABSURD_LOSS_FACTOR = 100.0


def _check_loss(value: float, vocab_size: int, what: str, where: str, run_dir: Path) -> None:
    """Stop with TrainingDiverged where a loss is NaN, infinite or absurd."""
    if math.isfinite(value) and value <= ABSURD_LOSS_FACTOR * math.log(max(2, vocab_size)):
        return
    raise TrainingDiverged(
        f"{what} became {value:.4g} {where}; stopped, the last good checkpoint in {run_dir} is kept "
        "(try a lower train.lr or train.clip)"
    )


@dataclass
class PreparedData:
    vocab: Vocabulary
    ids: dict[str, torch.Tensor]  # split -> (N,) token ids


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
            text = f"best validation {_loss_words(self.best_valid_loss, self.level)}"
        else:
            text = "stopped before the first evaluation"
        if self.test_loss is not None:
            text += f"; test {_loss_words(self.test_loss, self.level)}"
        return text + f"; {self.steps} steps in {self.elapsed_s:.0f} s ({self.train_tokens_per_s:,.0f} tokens/s)"


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def bits_per_char(loss: float) -> float:
    return loss / math.log(2)


def _loss_words(loss: float, level: str) -> str:
    text = f"loss {loss:.4f}, perplexity {perplexity(loss):.2f}"
    if level == "char":
        text += f", {bits_per_char(loss):.4f} bits/char"
    return text


def prepare_data(config: RunConfig, vocab: Vocabulary | None = None) -> PreparedData:
    """Load the corpus, build (or reuse) the vocabulary and encode every split."""
    d = config.data
    if not d.corpus:
        raise WhiteboardError("no corpus given: pass a named corpus, a text file or a folder (data.corpus)")
    texts, corpus_level = load_corpus(d.corpus, Path(d.data_dir) if d.data_dir else None, d.download)
    level = d.level or corpus_level or "word"
    if vocab is None:
        # Named corpora come tokenized; a file or folder is read for how it was written.
        tokenizer = d.tokenizer or ("whitespace" if corpus_level else detect_tokenizer(texts["train"]))
        vocab = Vocabulary.build(texts["train"], level, min_freq=d.min_freq, max_size=d.max_vocab or None,
                                 tokenizer=tokenizer)
    elif vocab.level != level:
        raise WhiteboardError(f"the run's vocabulary is {vocab.level}-level but the corpus is read at {level} level")
    ids = {split: torch.tensor(vocab.encode_text(text, corpus=True), dtype=torch.long) for split, text in texts.items()}
    return PreparedData(vocab, ids)


def evaluate(model: LanguageModel, ids: torch.Tensor, batch_size: int, bptt: int, device) -> float:
    """Mean cross-entropy per token over a whole split, state carried across windows."""
    streams = batchify(ids, batch_size).to(device)
    model.eval()
    total, count = 0.0, 0
    state = model.init_state(streams.shape[1])
    with torch.no_grad():
        for window in windows(streams, bptt):
            logits, state = model(window.inputs, state)
            total += nn.functional.cross_entropy(logits.flatten(0, 1), window.targets.flatten(), reduction="sum").item()
            count += window.targets.numel()
    return total / count


def ntasgd_should_switch(previous: list[float], current: float, nonmono: int) -> bool:
    """Merity et al.'s non-monotone trigger: switch to averaged SGD once the validation loss
    is worse than the best of all evaluations before the last ``nonmono``."""
    return len(previous) > nonmono and current > min(previous[:-nonmono])


class _AveragedWeights:
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


def _make_optimizer(model: nn.Module, config: RunConfig, averaged: bool = False) -> torch.optim.Optimizer:
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


def _scheduled_lr(config: RunConfig, epoch: int, plateau_factor: float) -> float:
    """Zaremba et al.: constant, then multiplied by lr_decay each epoch after decay_start."""
    t = config.train
    factor = t.lr_decay ** max(0, epoch - t.decay_start) if t.decay_start > 0 else 1.0
    return t.lr * factor * plateau_factor


class _StopFlag:
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


class _Metrics:
    def __init__(self, path: Path):
        self.path = path

    def keep_up_to(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (they will be logged again)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        checkpoint.atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
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


def train(
    config: RunConfig,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> TrainResult:
    """Train (or with ``resume`` continue) the run in ``run_dir``, which it claims for its
    whole life (see :mod:`whiteboard.lm.rundir`). A new run refuses a directory that holds
    anything but the same run (which it continues), unless ``overwrite`` replaces it."""
    run_dir = Path(run_dir)
    check_device(config.train.device)
    with rundir.RunDirectoryClaim(run_dir):
        if not resume:
            resume = _fresh_or_same_run(config, run_dir, overwrite, log)
        return _train(config, run_dir, resume, progress, log)


def _fresh_or_same_run(config: RunConfig, run_dir: Path, overwrite: bool, log) -> bool:
    """For a new run: True where ``run_dir`` holds a resumable run of this very config (it
    is continued), False where the directory is empty (or emptied by ``overwrite``)."""
    present = rundir.run_files_in(run_dir)
    if not present:
        return False
    if overwrite:
        log(f"--overwrite: replacing the run in {run_dir}")
        rundir.remove_run_files(run_dir)
        leftover = rundir.run_files_in(run_dir)
        if leftover:
            log(f"kept what is not a whiteboard run file: {', '.join(leftover)}")
        return False
    saved = _saved_config(run_dir)
    if (run_dir / rundir.TRAINING_STATE).exists() and saved == json.loads(config.to_json()):
        log(f"{run_dir} holds this run (same config): continuing it")
        return True
    what = "a run with another config" if saved is not None else f"other files ({', '.join(present[:5])})"
    raise WhiteboardError(
        f"{run_dir} is not empty: it holds {what}. Choose another --run-dir, continue a run with "
        f"--resume {run_dir}, or pass --overwrite to replace it"
    )


def _saved_config(run_dir: Path) -> dict | None:
    try:
        saved = json.loads((run_dir / rundir.CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainingState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class _Trainer:
    """One session of a run: the loop over windows as named steps (train_step, evaluate,
    save, the stop checks), with everything it carries in ``self.state``."""

    def __init__(self, config: RunConfig, run_dir: Path, data: PreparedData, device, progress: bool, log) -> None:
        self.config, self.t, self.run_dir, self.data, self.device = config, config.train, run_dir, data, device
        self.vocab, self.progress_bar, self.log = data.vocab, progress, log
        torch.manual_seed(self.t.seed)
        self.data_generator = torch.Generator().manual_seed(self.t.seed)
        self.model = LanguageModel(len(self.vocab), config.model).to(device)
        self.optimizer = _make_optimizer(self.model, config)
        self.metrics = _Metrics(run_dir / rundir.METRICS)
        self.state = TrainingState()
        self.hidden = None
        self.loss_fn = nn.CrossEntropyLoss()
        self.streams = batchify(data.ids["train"], self.t.batch_size).to(device)
        self.windows_per_epoch = math.ceil((self.streams.shape[0] - 1) / self.t.bptt)
        self.last_step = None  # (window, the hidden state it started from): what save() re-checks
        self.evaluated_at = -1
        self.session_started = time.monotonic()
        self.wall_before = 0.0

    # ------------------------------------------------------------------ starting

    def resume(self) -> bool:
        """Load the resume point; False where the run has finished already."""
        counters = checkpoint.read_training_counters(self.run_dir)
        self.optimizer = _make_optimizer(self.model, self.config, averaged=counters.get("asgd", False))
        counters, self.hidden = checkpoint.load_training_state(self.run_dir, self.model, self.optimizer,
                                                               self.data_generator, self.device)
        self.state = TrainingState.from_dict(counters)
        self.wall_before = self.state.wall_seconds
        if self.state.finished and _nothing_to_train(self.t, counters):
            return False
        self.state.finished = False
        self.metrics.keep_up_to(self.state.step)
        return True

    # ------------------------------------------------------------------ clocks and stops

    def wall_seconds(self) -> float:
        return self.wall_before + time.monotonic() - self.session_started

    def time_is_up(self) -> bool:
        return self.t.time_limit > 0 and self.wall_seconds() >= self.t.time_limit * 60

    def steps_done(self) -> bool:
        return bool(self.t.max_steps) and self.state.step >= self.t.max_steps

    def stopping_early(self) -> bool:
        if self.t.early_stop and self.state.bad_evals >= self.t.early_stop:
            self.log(f"no improvement in {self.t.early_stop} evaluations: stopping early")
            return True
        return False

    def progress(self) -> float:
        """How far through the run we are, in [0, 1], for the anneal schedule."""
        t, s = self.t, self.state
        if t.time_limit > 0:
            return self.wall_seconds() / (t.time_limit * 60)
        if t.max_steps:
            return s.step / t.max_steps
        return (s.epoch - 1 + s.position / max(1, self.streams.shape[0] - 1)) / t.epochs

    # ------------------------------------------------------------------ the named steps

    def train_step(self, window, lr: float) -> float:
        """Forward, backward and update on one window; returns its loss. Stops the run
        (TrainingDiverged) before any update a NaN, Inf or absurd loss or gradient would make."""
        t, s, model = self.t, self.state, self.model
        started = time.perf_counter()
        self.hidden = detach_state(self.hidden)
        self.last_step = (window, self.hidden)
        logits, self.hidden, raw_output, dropped_output = model.forward_with_outputs(window.inputs, self.hidden)
        loss = self.loss_fn(logits.flatten(0, 1), window.targets.flatten())
        value = loss.item()
        where = f"at step {s.step + 1} (epoch {s.epoch})"
        _check_loss(value, len(self.vocab), "training loss", where, self.run_dir)
        self.optimizer.zero_grad(set_to_none=True)
        objective = loss * window.inputs.shape[0] if t.loss_per == "sequence" else loss
        if t.ar_alpha:
            objective = objective + activation_regularization(dropped_output, t.ar_alpha)
        if t.tar_beta:
            objective = objective + temporal_activation_regularization(raw_output, t.tar_beta)
        objective.backward()
        # The norm clip_grad_norm_ returns anyway: an update from a NaN or Inf gradient
        # would turn every weight into NaN, and a checkpoint would keep them.
        if t.clip > 0:
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), t.clip))
        else:
            grad_norm = float(nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(
                f"the gradient norm became {grad_norm} {where}; stopped before the update, the last good "
                f"checkpoint in {self.run_dir} is kept (try a lower train.lr or train.clip)"
            )
        # AWD-LSTM: a shorter window gets a proportionally smaller step.
        scale = window.inputs.shape[0] / t.bptt if t.variable_bptt else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = lr * scale
        self.optimizer.step()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tokens = window.targets.numel()
        s.step += 1
        s.position = window.start + window.inputs.shape[0]
        s.log_loss += value * tokens
        s.log_tokens += tokens
        s.train_tokens += tokens
        s.train_seconds += time.perf_counter() - started
        return value

    def log_training(self, lr: float) -> None:
        s = self.state
        if self.t.log_every and s.step % self.t.log_every == 0:
            mean = s.log_loss / s.log_tokens
            self.metrics.write({"step": s.step, "epoch": s.epoch, "split": "train", "loss": mean, "ppl": perplexity(mean),
                                "lr": lr, "tokens_per_s": self.tokens_per_second()})
            s.log_loss, s.log_tokens = 0.0, 0

    def tokens_per_second(self) -> float:
        return self.state.train_tokens / max(self.state.train_seconds, 1e-9)

    def evaluate(self) -> None:
        """Validation loss; the best model saved; NT-ASGD's switch and plateau decay decided."""
        t, s, vocab = self.t, self.state, self.vocab
        self.evaluated_at = s.step
        with _AveragedWeights(self.model, self.optimizer):
            valid_loss = evaluate(self.model, self.data.ids["valid"], t.eval_batch_size, t.bptt, self.device)
            _check_loss(valid_loss, len(vocab), "the validation loss", f"at step {s.step}", self.run_dir)
            improved = valid_loss < s.best_valid
            if improved:
                checkpoint.save_model(self.run_dir, self.model, s.step)
        if t.optimizer == "ntasgd" and not s.asgd and ntasgd_should_switch(s.valid_history, valid_loss, t.nonmono):
            self.optimizer = _make_optimizer(self.model, self.config, averaged=True)
            s.asgd = True
            self.log(f"step {s.step}: validation stopped improving, switching to averaged SGD (NT-ASGD)")
        s.valid_history.append(valid_loss)
        if improved:
            s.best_valid, s.bad_evals = valid_loss, 0
        else:
            s.bad_evals += 1
            if t.plateau_decay > 0:
                s.plateau *= t.plateau_decay
        record = {"step": s.step, "epoch": s.epoch, "split": "valid", "loss": valid_loss, "ppl": perplexity(valid_loss),
                  "lr": self.optimizer.param_groups[0]["lr"]}
        if t.optimizer == "ntasgd":
            record["optimizer"] = "asgd" if s.asgd else "sgd"
        if vocab.level == "char":
            record["bpc"] = bits_per_char(valid_loss)
        self.metrics.write(record)
        self.log(f"step {s.step} (epoch {s.epoch}): validation {_loss_words(valid_loss, vocab.level)}"
                 + ("" if improved else " (no improvement)"))
        self.model.train()

    def save(self, hidden) -> None:
        """The resume point, after checking that what it would keep is sane."""
        _check_parameters(self.model, self.state, self.run_dir)
        if self.last_step is not None:
            _check_updated_model(self.model, self.last_step, self.loss_fn, len(self.vocab), self.state, self.run_dir)
        self.state.wall_seconds = self.wall_seconds()
        checkpoint.save_training_state(self.run_dir, self.model, self.optimizer, self.state.to_dict(), hidden,
                                       self.data_generator)

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        t, s = self.t, self.state
        interrupted = stop_early = time_up = False
        with _StopFlag() as stop:
            while s.epoch <= t.epochs and not stop_early and not self.steps_done():
                epoch_lr = _scheduled_lr(self.config, s.epoch, s.plateau)
                self.model.train()
                if s.position == 0 or self.hidden is None:
                    self.hidden = self.model.init_state(t.batch_size)
                bar = tqdm(total=self.windows_per_epoch, initial=min(self.windows_per_epoch, s.position // t.bptt),
                           desc=f"epoch {s.epoch}/{t.epochs}", disable=None if self.progress_bar else True,
                           leave=False, unit="win", dynamic_ncols=True)
                with bar:
                    for window in windows(self.streams, t.bptt, s.position, self.data_generator, t.variable_bptt):
                        lr = epoch_lr * anneal_factor(t.anneal, self.progress())
                        value = self.train_step(window, lr)
                        bar.update(1)
                        bar.set_postfix(loss=f"{value:.3f}", ppl=f"{perplexity(value):.1f}",
                                        tok_s=f"{self.tokens_per_second():,.0f}", lr=f"{lr:.3g}")
                        self.log_training(lr)
                        if t.eval_every and s.step % t.eval_every == 0:
                            self.evaluate()
                            self.save(self.hidden)
                        elif t.checkpoint_every and s.step % t.checkpoint_every == 0:
                            self.save(self.hidden)
                        if self.stopping_early():
                            stop_early = True
                            break
                        time_up = self.time_is_up()
                        if stop.requested or self.steps_done() or time_up:
                            interrupted = stop.requested
                            break
                if time_up and not interrupted:
                    self.log(f"time limit of {t.time_limit:g} minutes reached at step {s.step}")
                    if self.evaluated_at != s.step:
                        self.evaluate()
                if stop.requested or self.steps_done() or stop_early or time_up:
                    self.save(self.hidden)
                    break
                if not t.eval_every:
                    self.evaluate()
                s.epoch += 1
                s.position = 0
                self.save(self.model.init_state(t.batch_size))
                if self.stopping_early():
                    break
        finished = not interrupted and (time_up or not (self.steps_done() and s.epoch <= t.epochs))
        test_loss = self.finish(finished)
        return _result(s.to_dict(), test_loss, interrupted, self.vocab.level,
                       signal_number=stop.signal if interrupted else None)

    def finish(self, finished: bool) -> float | None:
        """A usable model in any case; for a finished run, the test split and the mark that
        keeps a resume from training or testing it again. Returns the test loss."""
        t, s = self.t, self.state
        if not (self.run_dir / rundir.MODEL).exists():
            # Stopped before the first evaluation: still leave a usable model (not logged as a
            # validation result, so a resumed run's metrics equal an uninterrupted run's).
            _check_parameters(self.model, s, self.run_dir)
            checkpoint.save_model(self.run_dir, self.model, s.step)
        if not finished:
            return None
        test_loss = None
        test = self.data.ids.get("test")
        if test is not None and test.numel() // t.eval_batch_size >= 2:
            best, _, _ = checkpoint.load_run(self.run_dir, str(self.device))
            test_loss = evaluate(best, test, t.eval_batch_size, t.bptt, self.device)
            record = {"step": s.step, "epoch": s.epoch - 1, "split": "test", "loss": test_loss,
                      "ppl": perplexity(test_loss)}
            if self.vocab.level == "char":
                record["bpc"] = bits_per_char(test_loss)
            self.metrics.write(record)
        s.finished = True
        self.save(self.hidden if self.hidden is not None else self.model.init_state(t.batch_size))
        return test_loss


def _train(config: RunConfig, run_dir: Path, resume: bool, progress: bool, log) -> TrainResult:
    t = config.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    device = torch.device(t.device)
    state_path = run_dir / rundir.TRAINING_STATE
    if resume:
        if not state_path.exists():
            raise WhiteboardError(f"nothing to resume: {state_path} not found")
        data = prepare_data(config, Vocabulary.load(run_dir / rundir.VOCAB))
    else:
        data = prepare_data(config)
    vocab = data.vocab
    check_long_enough(data.ids["train"], t.batch_size, "train")
    check_long_enough(data.ids["valid"], t.eval_batch_size, "valid")
    trainer = _Trainer(config, run_dir, data, device, progress, log)
    if resume:
        if not trainer.resume():
            log(f"{run_dir} has finished its run already: nothing to train")
            return _result(trainer.state.to_dict(), None, False, vocab.level, already_finished=True)
        checkpoint.save_run_files(run_dir, config, vocab)  # the config this session trains with
        log(f"resuming {run_dir} at epoch {trainer.state.epoch}, step {trainer.state.step}")
    else:
        checkpoint.save_run_files(run_dir, config, vocab)
        log(f"{trainer.model.parameter_count():,} parameters; vocabulary {len(vocab):,} ({vocab.level} level); "
            f"{data.ids['train'].numel():,} training tokens")
    return trainer.run()


def _result(counters: dict, test_loss: float | None, interrupted: bool, level: str, signal_number: int | None = None,
            already_finished: bool = False) -> TrainResult:
    seconds = counters["train_seconds"]
    return TrainResult(
        steps=counters["step"], epochs_done=counters["epoch"] - 1, best_valid_loss=counters["best_valid"],
        test_loss=test_loss, interrupted=interrupted, elapsed_s=seconds,
        train_tokens_per_s=counters["train_tokens"] / max(seconds, 1e-9), level=level, signal=signal_number,
        already_finished=already_finished,
    )


def _nothing_to_train(t, counters: dict) -> bool:
    """Whether the config leaves a resumed run nothing to do (a run resumed with more epochs
    or steps than it had goes on)."""
    return (counters["epoch"] > t.epochs or bool(t.max_steps and counters["step"] >= t.max_steps)
            or bool(t.time_limit and counters.get("wall_seconds", 0.0) >= t.time_limit * 60)
            or bool(t.early_stop and counters["bad_evals"] >= t.early_stop))


def _check_updated_model(model: LanguageModel, last_step, loss_fn, vocab_size: int, state: "TrainingState",
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
    _check_loss(loss, vocab_size, "the loss after the update", f"at step {state.step}", run_dir)


def _check_parameters(model: nn.Module, state: "TrainingState", run_dir: Path) -> None:
    """Before any checkpoint is written: every weight finite, or stop and keep the last one."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(
            f"the weights became non-finite ({', '.join(bad[:3])}) by step {state.step}; stopped, the last "
            f"good checkpoint in {run_dir} is kept (try a lower train.lr or train.clip)"
        )
