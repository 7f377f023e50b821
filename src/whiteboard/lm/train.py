"""Training a language model with truncated backpropagation through time.

Resumable to the token: a checkpoint holds the weights, the optimizer, both random
generators (dropout's and the data's), the hidden state carried across windows and the
position in the epoch, so ``--resume`` continues with exactly the losses an
uninterrupted run would have had.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from whiteboard.errors import WhiteboardError
from whiteboard.lm import checkpoint, distributed, rundir
from whiteboard.lm.config import RunConfig, check_device, resolve_device
from whiteboard.lm.data import batchify, check_long_enough, windows
from whiteboard.lm.hardware import settle_decoder_precision
from whiteboard.lm.evaluation import (PreparedData, bits_per_char, evaluate, evaluate_sums,  # noqa: F401
                                      loss_words, perplexity, prepare_data)
from whiteboard.lm.guards import (StopFlag, TrainingDiverged, check_loss,  # noqa: F401 (re-exported)
                                  check_parameters, check_updated_model)
from whiteboard.lm.model import LanguageModel, detach_state
from whiteboard.lm.vocab import Vocabulary
from whiteboard.lm.optim import (AveragedWeights, anneal_factor, make_optimizer,  # noqa: F401 (re-exported)
                                 ntasgd_should_switch, scheduled_lr)
from whiteboard.lm.records import (FORECAST_STEPS, MetricsLog, TrainingState, TrainResult,  # noqa: F401
                                   forecast_lines, nothing_to_train, read_metrics, result_of)
from whiteboard.nn.regularizers import activation_regularization, temporal_activation_regularization


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
    world = distributed.world(resolve_device(config.train.device))
    clean = False
    try:
        world.check_batch(config.train.batch_size)
        settle_decoder_precision(config, world.decide, log)  # before the run directory compares configs
        if not world.main:  # rank 0 alone claims the directory, logs and shows progress
            if not resume:
                resume = world.decide(False)
            result = _train(config, run_dir, resume, False, lambda message: None, world)
        else:
            with rundir.RunDirectoryClaim(run_dir):
                if not resume:
                    resume = world.decide(rundir.fresh_or_same_run(config.to_json(), run_dir, overwrite, log))
                result = _train(config, run_dir, resume, progress, log, world)
        clean = True
        return result
    finally:
        distributed.leave(world, clean)


class _Trainer:
    """One session of a run: the loop over windows as named steps (train_step, evaluate,
    save, the stop checks), with everything it carries in ``self.state``."""

    def __init__(self, config: RunConfig, run_dir: Path, data: PreparedData, device, progress: bool, log,
                 world: distributed.World) -> None:
        self.config, self.t, self.run_dir, self.data, self.device = config, config.train, run_dir, data, device
        self.vocab, self.progress_bar, self.log, self.world = data.vocab, progress, log, world
        torch.manual_seed(self.t.seed)
        self.data_generator = torch.Generator().manual_seed(self.t.seed)  # the same on every rank
        self.model = LanguageModel(len(self.vocab), config.model).to(device, getattr(torch, self.t.dtype))
        if world.distributed:
            # The same initial weights everywhere (DDP checks), then each rank its own dropout draws.
            torch.manual_seed(self.t.seed + world.rank)
        self.forward = DistributedDataParallel(self.model) if world.distributed else self.model
        self.optimizer = make_optimizer(self.model, config)
        self.metrics = MetricsLog(run_dir / rundir.METRICS, writer=world.main)
        self.state = TrainingState(world_size=world.size)
        self.hidden = None
        self.loss_fn = nn.CrossEntropyLoss()
        self.local_batch = self.t.batch_size // world.size
        # This rank's columns of the global batch's streams: together, one process's data.
        self.streams = batchify(data.ids["train"], self.t.batch_size)[:, world.columns(self.t.batch_size)].to(device)
        self.windows_per_epoch = math.ceil((self.streams.shape[0] - 1) / self.t.bptt)
        self.last_step = None  # (window, the hidden state it started from): what save() re-checks
        self.evaluated_at = -1
        self.session_started = time.monotonic()
        self.forecast_said = False
        self.wall_before = 0.0

    # ------------------------------------------------------------------ starting

    def resume(self) -> bool:
        """Load the resume point; False where the run has finished already."""
        counters = checkpoint.read_training_counters(self.run_dir)
        self.optimizer = make_optimizer(self.model, self.config, averaged=counters.get("asgd", False))
        counters, hidden = checkpoint.load_training_state(self.run_dir, self.model, self.optimizer,
                                                          self.data_generator, self.device, self.world.rank)
        columns = self.world.columns(self.t.batch_size)
        self.hidden = tuple(h[:, columns] for h in hidden) if isinstance(hidden, tuple) else hidden[:, columns]
        self.state = TrainingState.from_dict(counters)
        if self.state.world_size != self.world.size:
            # The streams and the hidden state carry over exactly (the batch divides); each
            # rank's dropout generator cannot: draw them afresh.
            torch.manual_seed(self.t.seed + self.world.rank + 7919 * self.state.step)
            self.log(f"resuming a run trained on {self.state.world_size} process(es) on {self.world.size}: the data "
                     "and hidden state continue exactly, dropout's random draws differ from an uninterrupted run's")
            self.state.world_size = self.world.size
        self.wall_before = self.state.wall_seconds
        if self.state.finished and nothing_to_train(self.t, counters):
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
        logits, self.hidden, raw_output, dropped_output = self.forward(window.inputs, self.hidden, with_outputs=True)
        loss = self.loss_fn(logits.flatten(0, 1), window.targets.flatten())
        value = loss.item()
        where = f"at step {s.step + 1} (epoch {s.epoch})"
        check_loss(value, len(self.vocab), "training loss", where, self.run_dir)
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
        # Over all ranks (one small all-reduce), so the log and tokens/s are the job's.
        loss_sum, tokens = self.world.all_sum([value * window.targets.numel(), window.targets.numel()])
        s.step += 1
        s.position = window.start + window.inputs.shape[0]
        s.log_loss += loss_sum
        s.log_tokens += int(tokens)
        s.train_tokens += int(tokens)
        s.train_seconds += time.perf_counter() - started
        return loss_sum / tokens

    def forecast(self) -> None:
        """Once per session, after FORECAST_STEPS steps of a time-budgeted run: what the budget
        will allow at this speed (records.forecast_lines)."""
        t, s = self.t, self.state
        if self.forecast_said or t.time_limit <= 0 or s.step < FORECAST_STEPS:
            return
        self.forecast_said = True
        remaining = max(0.0, t.time_limit * 60 - self.wall_seconds())
        for line in forecast_lines(s.train_tokens, self.tokens_per_second(), remaining, t.time_limit, t.tuned_tokens):
            self.log(line)

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
        with AveragedWeights(self.model, self.optimizer):
            valid_loss = self.evaluate_split(self.model, "valid")
            check_loss(valid_loss, len(vocab), "the validation loss", f"at step {s.step}", self.run_dir)
            improved = valid_loss < s.best_valid
            if improved and self.world.main:
                checkpoint.save_model(self.run_dir, self.model, s.step)
        if t.optimizer == "ntasgd" and not s.asgd and ntasgd_should_switch(s.valid_history, valid_loss, t.nonmono):
            self.optimizer = make_optimizer(self.model, self.config, averaged=True)
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
        self.log(f"step {s.step} (epoch {s.epoch}): validation {loss_words(valid_loss, vocab.level)}"
                 + ("" if improved else " (no improvement)"))
        self.model.train()

    def evaluate_split(self, model: LanguageModel, split: str) -> float:
        """Mean loss over a split; in a distributed run each rank evaluates its columns of
        the evaluation batch and the sums are added up, so it equals one process's."""
        t = self.t
        total, count = evaluate_sums(model, self.data.ids[split], t.eval_batch_size, t.bptt, self.device,
                                     self.world.columns(t.eval_batch_size))
        total, count = self.world.all_sum([total, count])
        return total / count

    def save(self, hidden) -> None:
        """The resume point, after checking that what it would keep is sane. In a distributed
        run every rank takes part (the whole batch's hidden state and every rank's dropout
        generator are gathered) and rank 0 writes."""
        check_parameters(self.model, self.state, self.run_dir)
        if self.last_step is not None:
            check_updated_model(self.model, self.last_step, self.loss_fn, len(self.vocab), self.state, self.run_dir)
        self.state.wall_seconds = self.wall_seconds()
        states = list(hidden) if isinstance(hidden, tuple) else [hidden]
        whole = [self.world.gather_columns(h) for h in states]
        rng = self.world.gather_bytes(torch.get_rng_state()) if self.world.distributed else None
        if self.world.main:
            checkpoint.save_training_state(self.run_dir, self.model, self.optimizer, self.state.to_dict(),
                                           tuple(whole) if len(whole) == 2 else whole[0], self.data_generator, rng)

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        t, s = self.t, self.state
        interrupted = stop_early = time_up = False
        with StopFlag() as stop:
            while s.epoch <= t.epochs and not stop_early and not self.steps_done():
                epoch_lr = scheduled_lr(self.config, s.epoch, s.plateau)
                self.model.train()
                if s.position == 0 or self.hidden is None:
                    self.hidden = self.model.init_state(self.local_batch)
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
                        self.forecast()
                        if t.eval_every and s.step % t.eval_every == 0:
                            self.evaluate()
                            self.save(self.hidden)
                        elif t.checkpoint_every and s.step % t.checkpoint_every == 0:
                            self.save(self.hidden)
                        if self.stopping_early():
                            stop_early = True
                            break
                        # Every rank stops at the same step: the clock or a signal on any of them.
                        time_up, requested = self.world.any(self.time_is_up(), stop.requested)
                        if requested or self.steps_done() or time_up:
                            interrupted = requested
                            break
                if time_up and not interrupted:
                    self.log(f"time limit of {t.time_limit:g} minutes reached at step {s.step}")
                    if self.evaluated_at != s.step:
                        self.evaluate()
                if interrupted or self.steps_done() or stop_early or time_up:
                    self.save(self.hidden)
                    break
                if not t.eval_every:
                    self.evaluate()
                s.epoch += 1
                s.position = 0
                self.save(self.model.init_state(self.local_batch))
                if self.stopping_early():
                    break
        finished = not interrupted and (time_up or not (self.steps_done() and s.epoch <= t.epochs))
        test_loss = self.finish(finished)
        return result_of(s.to_dict(), test_loss, interrupted, self.vocab.level,
                       signal_number=stop.signal if interrupted else None)

    def finish(self, finished: bool) -> float | None:
        """A usable model in any case; for a finished run, the test split and the mark that
        keeps a resume from training or testing it again. Returns the test loss."""
        t, s = self.t, self.state
        if self.world.main and not (self.run_dir / rundir.MODEL).exists():
            # Stopped before the first evaluation: still leave a usable model (not logged as a
            # validation result, so a resumed run's metrics equal an uninterrupted run's).
            check_parameters(self.model, s, self.run_dir)
            checkpoint.save_model(self.run_dir, self.model, s.step)
        if not finished:
            return None
        test_loss = None
        test = self.data.ids.get("test")
        if test is not None and test.numel() // t.eval_batch_size >= 2:
            self.world.barrier()  # rank 0's best model is on disk for every rank to read
            best, _, _ = checkpoint.load_run(self.run_dir, str(self.device))
            test_loss = self.evaluate_split(best, "test")
            record = {"step": s.step, "epoch": s.epoch - 1, "split": "test", "loss": test_loss,
                      "ppl": perplexity(test_loss)}
            if self.vocab.level == "char":
                record["bpc"] = bits_per_char(test_loss)
            self.metrics.write(record)
        s.finished = True
        self.save(self.hidden if self.hidden is not None else self.model.init_state(self.local_batch))
        return test_loss


def _train(config: RunConfig, run_dir: Path, resume: bool, progress: bool, log, world: distributed.World) -> TrainResult:
    t = config.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    device = torch.device(resolve_device(t.device))
    if world.distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)  # one GPU per process
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
    trainer = _Trainer(config, run_dir, data, device, progress, log, world)
    if resume:
        if not trainer.resume():
            log(f"{run_dir} has finished its run already: nothing to train")
            return result_of(trainer.state.to_dict(), None, False, vocab.level, already_finished=True)
        if world.main:
            checkpoint.save_run_files(run_dir, config, vocab)  # the config this session trains with
        log(f"resuming {run_dir} at epoch {trainer.state.epoch}, step {trainer.state.step}")
    else:
        if world.main:
            checkpoint.save_run_files(run_dir, config, vocab)
        if world.distributed:
            log(f"training on {world.size} processes, {config.train.batch_size // world.size} of the batch's "
                f"{config.train.batch_size} streams each")
        log(f"{trainer.model.parameter_count():,} parameters; vocabulary {len(vocab):,} ({vocab.level} level); "
            f"{data.ids['train'].numel():,} training tokens")
    try:
        return trainer.run()
    finally:
        trainer.forward = trainer.model  # drop the DDP wrapper before the process group goes
