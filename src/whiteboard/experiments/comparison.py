"""The seed's experiment: train RNN, LSTM and GRU on long-range tasks and measure how
well each remembers as the distance between clue and answer grows.

Budget rule for comparisons: every model gets the same number of training steps on the
same data stream, and (by default) the same number of parameters - the RNN and GRU get
larger hidden sizes to match the LSTM's count (``match="params"``). ``match="hidden"``
gives every model the same hidden size instead.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from whiteboard.experiments import horizon as memory_horizon
from whiteboard.experiments import tasks
from whiteboard.lm.config import ModelConfig
from whiteboard.files import atomic_write_text
from whiteboard.nn.layers import GRU, LSTM, RNN
from whiteboard.lm.model import LanguageModel
from whiteboard.inspect.plots import band_plot
from whiteboard.lm.vocab import EOS, UNK, Vocabulary

__all__ = [
    "CELLS",
    "STORY_LR",
    "STORY_DISTANCES",
    "identity_recurrence",
    "orthogonal_recurrence",
    "RNN_VARIANTS",
    "set_forget_bias",
    "matched_hidden",
    "hidden_sizes",
    "story_vocabulary",
    "story_model",
    "encode_stories",
    "StoryScore",
    "score_stories",
    "Curriculum",
    "train_story_model",
    "lm_logits",
    "recurrent_layer",
    "SequenceRegressor",
    "SequenceTagger",
    "AddingScore",
    "length_curriculum",
    "train_adding",
    "score_adding",
    "train_copy",
    "score_copy",
    "METRICS",
    "CompareResult",
    "default_curriculum",
    "compare",
    "write_compare",
    "chance_level",
]

CELLS = ("rnn", "lstm", "gru", "rnn-tanh")
_LAYERS = {"rnn": RNN, "lstm": LSTM, "gru": GRU, "rnn-tanh": RNN}

#: Adam learning rates for the stories, each model's best of the sweep 5e-4, 1e-3, 2e-3, 5e-3
#: by mean validation accuracy over distances 5-150 (1400 steps, seed 0; benchmarks/README.md,
#: "Learning-rate sweep"). The one used where a run does not sweep (the demo).
STORY_LR = {"rnn": 1e-3, "lstm": 5e-3, "gru": 2e-3, "rnn-tanh": 2e-3}
#: The stories' default grid: log-spaced from the shortest possible lag (4) to 150.
STORY_DISTANCES = [4, 6, 10, 16, 25, 40, 63, 100, 150]


def identity_recurrence(layer: nn.Module) -> None:
    """Le, Jaitly & Hinton 2015 (IRNN): W_hh = I and zero biases, for a ReLU RNN. At the start
    the state is carried unchanged and the input is added to it, so the gradient neither
    vanishes nor explodes through time; the recommended initialisation for a vanilla RNN on
    long-range tasks. The RNN's deviation from torch.nn's initialisation in the experiments."""
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.startswith("weight_hh"):
                param.copy_(torch.eye(param.shape[0], param.shape[1]))
            elif name.startswith("bias"):
                param.zero_()


def orthogonal_recurrence(layer: nn.Module) -> None:
    """Saxe et al. 2014: an orthogonal W_hh (and zero biases) for a tanh RNN, whose
    singular values of 1 keep the signal's norm through time at the start."""
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.startswith("weight_hh"):
                nn.init.orthogonal_(param)
            elif name.startswith("bias"):
                param.zero_()


#: Each cell as the experiments build it, with its literature's initialisation:
#: LSTM: forget-gate bias 1 (Gers et al. 2000; Jozefowicz et al. 2015); GRU: torch.nn's
#: uniform initialisation (Cho et al. 2014's own is of the same kind); RNN: the IRNN, ReLU
#: with identity recurrence (Le et al. 2015). "rnn-tanh" is the seed's tanh RNN with an
#: orthogonal recurrence, kept for comparison: on stories it fails even at short lags
#: (benchmarks/README.md, "Why the RNN failed").
RNN_VARIANTS = {"rnn": ("relu", identity_recurrence), "rnn-tanh": ("tanh", orthogonal_recurrence)}


def set_forget_bias(layer: nn.Module, value: float) -> None:
    """Start an LSTM's forget gates open (Gers et al. 2000; Jozefowicz et al. 2015): the
    board is kept by default and erased only when learned. A deviation from torch.nn's
    initialisation, used by the task models here."""
    if not isinstance(layer, LSTM):
        return
    H = layer.hidden_size
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.startswith("bias_hh"):
                param[H : 2 * H].fill_(value)
            elif name.startswith("bias_ih"):
                param[H : 2 * H].zero_()


def matched_hidden(build: Callable[[int], nn.Module], target: int, low: int = 2, high: int = 4096) -> int:
    """The hidden size whose model has the parameter count closest to ``target``."""
    def count(h: int) -> int:
        return sum(p.numel() for p in build(h).parameters())

    while high - low > 1:  # counts grow with h: bisect
        mid = (low + high) // 2
        if count(mid) < target:
            low = mid
        else:
            high = mid
    return min((low, high), key=lambda h: abs(count(h) - target))


def hidden_sizes(cells: list[str], base_hidden: int, match: str, build: Callable[[str, int], nn.Module]) -> dict[str, int]:
    if match == "hidden":
        return {cell: base_hidden for cell in cells}
    target = sum(p.numel() for p in build("lstm", base_hidden).parameters())
    return {cell: base_hidden if cell == "lstm" else matched_hidden(lambda h, c=cell: build(c, h), target) for cell in cells}


# --------------------------------------------------------------------------- stories


def story_vocabulary() -> Vocabulary:
    # Split as people type: the seed's "France. She speaks" reads as the stories' "France . She speaks".
    return Vocabulary("word", [UNK, EOS] + tasks.story_vocabulary_tokens(), tokenizer="punctuation")


def story_model(cell: str, vocab_size: int, hidden: int, embedding: int = 32) -> LanguageModel:
    """A one-layer language model of ``cell`` (see CELLS) with its literature's initialisation."""
    nonlinearity, recurrence_init = RNN_VARIANTS.get(cell, ("tanh", None))
    config = ModelConfig(cell="rnn" if cell in RNN_VARIANTS else cell, embedding_size=embedding, hidden_size=hidden,
                         num_layers=1, dropout=0.0, tie_weights=False, init_range=0.0, nonlinearity=nonlinearity)
    model = LanguageModel(vocab_size, config)
    set_forget_bias(model.recurrent, 1.0)
    if recurrence_init is not None:
        recurrence_init(model.recurrent)
    return model


def encode_stories(stories: list[tasks.Story], vocab: Vocabulary) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (T, B) inputs and targets (pad target -100) and the (B,) input
    positions at which the answer is predicted (the 'speaks' token)."""
    ids = [vocab.encode(list(s.tokens) + [EOS]) for s in stories]
    T = max(len(x) for x in ids) - 1
    inputs = torch.full((T, len(ids)), vocab.index[EOS], dtype=torch.long)
    targets = torch.full((T, len(ids)), -100, dtype=torch.long)
    for b, seq in enumerate(ids):
        inputs[: len(seq) - 1, b] = torch.tensor(seq[:-1])
        targets[: len(seq) - 1, b] = torch.tensor(seq[1:])
    answer_positions = torch.tensor([s.answer_index - 1 for s in stories])
    return inputs, targets, answer_positions


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
        at_answer = logits[positions, torch.arange(len(chunk))]  # (B, V)
        answers = torch.tensor([vocab.index[s.answer] for s in chunk])
        correct += int((at_answer.argmax(-1) == answers).sum())
        prob_sum += float(at_answer.softmax(-1)[torch.arange(len(chunk)), answers].sum())
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
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    model.train()
    bar = tqdm(total=curriculum.total_steps, desc=desc, disable=None if progress else True, leave=True,
               dynamic_ncols=True, unit="step")
    step = 0
    for max_distance, steps in curriculum.stages:
        for _ in range(steps):
            stories = [tasks.make_story(rng, curriculum.draw(rng, max_distance)) for _ in range(batch_size)]
            inputs, targets, positions = encode_stories(stories, vocab)
            weights = (targets != -100).float()
            if answer_share is None:
                weights[positions, torch.arange(batch_size)] = answer_weight
            else:  # the answer carries answer_share of its story's weight, however long the story
                others = weights.sum(0) - 1  # (B,)
                weights[positions, torch.arange(batch_size)] = others * answer_share / (1 - answer_share)
            logits, _ = model(inputs)
            ce = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
            loss = (ce * weights.flatten()).sum() / weights.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            answer_ce = float(ce.detach().view_as(targets)[positions, torch.arange(batch_size)].mean())
            bar.update(1)
            bar.set_postfix(max_dist=max_distance, loss=f"{loss.item():.3f}", answer_loss=f"{answer_ce:.3f}")
            if step % 25 == 0:
                history.append({"step": step, "max_distance": max_distance, "loss": loss.item(), "answer_loss": answer_ce})
    bar.close()
    model.eval()
    return history


def lm_logits(model: LanguageModel) -> Callable[[Tensor], Tensor]:
    return lambda inputs: model(inputs)[0]


# --------------------------------------------------------------------------- adding / copy


def recurrent_layer(cell: str, input_size: int, hidden: int) -> nn.Module:
    """One layer of ``cell`` (see CELLS) with its literature's initialisation."""
    if cell in RNN_VARIANTS:
        nonlinearity, recurrence_init = RNN_VARIANTS[cell]
        layer = RNN(input_size, hidden, nonlinearity=nonlinearity)
        recurrence_init(layer)
        return layer
    layer = _LAYERS[cell](input_size, hidden)
    set_forget_bias(layer, 1.0)
    return layer


class SequenceRegressor(nn.Module):
    """Recurrent layer + linear read-out of the last state (adding problem)."""

    def __init__(self, cell: str, hidden: int, inputs: int = 2):
        super().__init__()
        self.recurrent = recurrent_layer(cell, inputs, hidden)
        self.readout = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:  # (T, B, 2) -> (B,)
        output, _ = self.recurrent(x)
        return self.readout(output[-1]).squeeze(-1)


class SequenceTagger(nn.Module):
    """Embedding + recurrent layer + per-step classifier (copy task)."""

    def __init__(self, cell: str, hidden: int, vocab: int = tasks.COPY_VOCAB, embedding: int = 16):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding)
        self.recurrent = recurrent_layer(cell, embedding, hidden)
        self.classifier = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:  # (T, B) -> (T, B, V)
        output, _ = self.recurrent(self.embedding(x))
        return self.classifier(output)


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
    for step in bar:
        x, y = batch(generator, step)
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
    x, y = tasks.adding_batch(count, length, torch.Generator().manual_seed(seed))
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
    x, y = tasks.copy_batch(count, delay, torch.Generator().manual_seed(seed), length)
    predicted = model(x)[-length:].argmax(-1)
    model.train()
    return float((predicted == y[-length:]).float().mean())


# --------------------------------------------------------------------------- compare


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


def default_curriculum(max_distance: int, steps: int, first: int = 4) -> Curriculum:
    """30 % of the steps at the shortest lag (learn the country -> language mapping),
    then four equal stages up to ``max_distance`` (learn to hold it); in every stage the
    distances are log-uniform, so short lags stay in every batch."""
    opening = max(1, round(steps * 0.3))
    per = max(1, (steps - opening) // 4)
    marks = [max(first, round(max_distance * k / 4)) for k in range(1, 5)]
    return Curriculum([(min(first, max_distance), opening)] + [(m, per) for m in marks])


def _story_validation_score(model: LanguageModel, vocab: Vocabulary, distances: list[int], count: int) -> float:
    """Mean accuracy over ``distances`` on validation stories (never the test stories)."""
    scores = [score_stories(lm_logits(model), tasks.make_stories(count, d, d, 2, "valid"), vocab).accuracy
              for d in distances]
    return sum(scores) / len(scores)


def compare(task: str, cells: list[str], distances: list[int], steps: int, hidden: int = 64, match: str = "params",
            seed: int = 0, progress: bool = True, test_count: int = 300, log: Callable[[str], None] = print,
            learning_rates: list[float] | None = None, seeds: int = 1, train_max: int | None = None) -> CompareResult:
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
