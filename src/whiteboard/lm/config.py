"""Run configuration: dataclasses with layered defaults < preset < file < ``--set``.

Unknown keys and type changes are refused with a message naming the key. The resolved
configuration is saved as ``config.json`` beside every checkpoint. Config files are TOML
read with ``tomllib``; nothing is ever executed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from whiteboard.errors import UsageError, WhiteboardError


@dataclass
class ModelConfig:
    cell: str = "lstm"  # lstm | layernorm-lstm | gru | rnn
    embedding_size: int = 200
    hidden_size: int = 200
    num_layers: int = 2
    dropout: float = 0.0  # before the decoder, and on embeddings / between layers unless set below
    input_dropout: float = -1.0  # on the embeddings (AWD's dropouti); < 0 = same as dropout
    hidden_dropout: float = -1.0  # between layers (AWD's dropouth); < 0 = same as dropout
    # The decoder shares the embedding matrix (Press & Wolf 2017). If embedding_size differs
    # from hidden_size, the last layer gets embedding_size units (AWD-LSTM's rule).
    tie_weights: bool = False
    nonlinearity: str = "tanh"  # rnn only: tanh | relu | sigmoid
    init_range: float = 0.1  # all weights ~ U(-r, r) as in Zaremba et al.; 0 = torch.nn defaults
    # LSTMs: the forget gates' starting bias (Jozefowicz et al. 2015 use 1); 0 = leave it to
    # init_range / torch.nn's uniform initialisation.
    forget_bias: float = 0.0
    recurrent_init: str = "uniform"  # uniform | orthogonal (each gate's block of W_hh)
    # AWD-LSTM's regularizers (whiteboard.nn.regularizers), each its own knob; 0 / false = off.
    variational: bool = False  # the embedding and output dropouts use one mask per sequence
    embedding_dropout: float = 0.0  # drop whole words from the embedding matrix
    weight_drop: float = 0.0  # DropConnect on the hidden-to-hidden weights
    # "bfloat16": in training the decoder's matmul runs under bfloat16 autocast (fast on CPUs
    # with AMX or AVX512-BF16, and on GPUs); evaluation and generation stay float32. "auto":
    # bfloat16 where the machine computes it natively, else float32 (whiteboard.lm.hardware),
    # decided when a run starts and saved in its config.
    decoder_precision: str = "float32"


@dataclass
class DataConfig:
    corpus: str = ""  # a named corpus (ptb, wikitext-2, tinyshakespeare), a file or a folder
    data_dir: str = ""  # where named corpora live; "" = $WHITEBOARD_DATA_DIR or ~/.cache/whiteboard
    level: str = ""  # word | char; "" = the corpus's own (word for files)
    # word level: whitespace | punctuation (split "France." into "France" "."); "" = named
    # corpora (tokenized already) whitespace, files and folders detected from their text.
    tokenizer: str = ""
    min_freq: int = 1
    max_vocab: int = 0  # 0 = no limit
    download: bool = False


@dataclass
class TrainConfig:
    epochs: int = 13
    batch_size: int = 20
    bptt: int = 35
    variable_bptt: bool = False
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 1.0
    weight_decay: float = 0.0
    momentum: float = 0.0
    lr_decay: float = 0.5  # multiply lr by this each epoch after decay_start
    decay_start: int = 0  # 0 = no fixed schedule
    plateau_decay: float = 0.0  # >0: multiply lr by this when validation stops improving
    early_stop: int = 0  # >0: stop after this many evaluations without improvement
    clip: float = 5.0  # max gradient norm; 0 = no clipping
    # What the optimized loss averages over. "token": the mean over every token of the
    # window (pytorch/examples). "sequence": summed over the window's steps, averaged over
    # the batch (Zaremba et al.'s Lua and TensorFlow code); gradients are bptt times larger,
    # which is why their published lr 1 / clip 5 equal lr 20 / clip 0.25 under "token".
    loss_per: str = "token"
    eval_every: int = 0  # steps between evaluations; 0 = once per epoch
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at each evaluation
    eval_batch_size: int = 10
    log_every: int = 100  # steps between training-loss lines in metrics.jsonl
    max_steps: int = 0  # >0: stop after this many steps
    # >0: end the run after this many minutes of wall time (training and evaluation, summed
    # over resumes); it then ends like a finished run: a last evaluation, then the test split.
    time_limit: float = 0.0
    # The training tokens a time-budgeted recipe was tuned with (0 = not stated): the run
    # forecasts its own from its first steps and says so where it will see far fewer.
    tuned_tokens: int = 0
    # >0: over this last fraction of the run (by time_limit, else max_steps, else epochs) the
    # lr falls linearly to 0: a constant lr, then a cooldown (Hägele et al. 2024, "WSD").
    anneal: float = 0.0
    ar_alpha: float = 0.0  # activation regularization on the last layer's dropped output
    tar_beta: float = 0.0  # temporal activation regularization on its raw output
    nonmono: int = 5  # ntasgd: switch to averaged SGD when validation is worse than the best of all but the last N
    seed: int = 1234
    device: str = "auto"  # auto: CUDA where this machine has it, else the CPU
    dtype: str = "float32"  # float32 | float64 (the weights and the recurrence; tests of exactness)
    threads: int = 0  # 0 = torch's default


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


CHOICES = {
    ("model", "cell"): ("lstm", "layernorm-lstm", "gru", "rnn"),
    ("model", "nonlinearity"): ("tanh", "relu", "sigmoid"),
    ("model", "decoder_precision"): ("float32", "bfloat16", "auto"),
    ("data", "level"): ("", "word", "char"),
    ("data", "tokenizer"): ("", "whitespace", "punctuation"),
    ("train", "optimizer"): ("sgd", "adam", "adamw", "ntasgd"),
    ("train", "loss_per"): ("token", "sequence"),
}


def _sections(config: RunConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _coerce(key: str, value: Any, current: Any) -> Any:
    """``value`` as the type of the field's default; a different type is refused."""
    expected = type(current)
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif expected in (int, float):
        # An int key takes only ints; a float key takes ints too (TOML writes 1, not 1.0).
        numeric = (int,) if expected is int else (int, float)
        if isinstance(value, numeric) and not isinstance(value, bool):
            return expected(value)
        if isinstance(value, str):
            try:
                return expected(value)
            except ValueError:
                pass
    elif expected is str:
        if isinstance(value, str):
            return value
    raise UsageError(f"config key {key} takes a {expected.__name__}, got {value!r}")


def apply(config: RunConfig, values: dict, origin: str) -> None:
    """Merge a nested dict ({section: {key: value}}) into ``config`` in place."""
    sections = _sections(config)
    for section, entries in values.items():
        if section not in sections:
            raise UsageError(f"{origin}: unknown config section {section!r} (sections: {', '.join(sections)})")
        if not isinstance(entries, dict):
            raise UsageError(f"{origin}: [{section}] must be a table of keys")
        target = sections[section]
        known = {f.name for f in dataclasses.fields(target)}
        for key, value in entries.items():
            if key not in known:
                raise UsageError(f"{origin}: unknown config key {section}.{key} (known: {', '.join(sorted(known))})")
            coerced = _coerce(f"{section}.{key}", value, getattr(target, key))
            choices = CHOICES.get((section, key))
            if choices and coerced not in choices:
                allowed = ", ".join(repr(c) for c in choices)
                raise UsageError(f"{origin}: {section}.{key} must be one of {allowed}, got {coerced!r}")
            setattr(target, key, coerced)


def parse_set(assignments: list[str]) -> dict:
    """``["train.lr=0.5", "model.cell=gru"]`` -> nested dict (values stay strings)."""
    nested: dict = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise UsageError(f"--set takes section.key=value (e.g. train.lr=0.5), got {item!r}")
        nested.setdefault(section, {})[name] = value.strip()
    return nested


def preset_names() -> list[str]:
    folder = resources.files("whiteboard.lm") / "presets"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_toml(path: Path, origin: str | None = None) -> dict:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder, not a config file") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{origin or path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{origin or path}: not valid TOML: {exc}") from None


def resolve(preset: str | None = None, file: Path | None = None, sets: list[str] | None = None, base: dict | None = None) -> RunConfig:
    """Defaults < base (a saved config.json) < preset < file < --set."""
    config = RunConfig()
    if base:
        apply(config, base, "saved config")
    if preset:
        if preset not in preset_names():
            raise UsageError(f"unknown preset {preset!r}; presets: {', '.join(preset_names())}")
        path = resources.files("whiteboard.lm") / "presets" / f"{preset}.toml"
        apply(config, tomllib.loads(path.read_text(encoding="utf-8")), f"preset {preset}")
    if file:
        apply(config, load_toml(Path(file)), str(file))
    if sets:
        apply(config, parse_set(sets), "--set")
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    m, t = config.model, config.train
    for name in ("embedding_size", "hidden_size", "num_layers"):
        if getattr(m, name) <= 0:
            raise UsageError(f"model.{name} must be positive, got {getattr(m, name)}")
    for name in ("dropout", "embedding_dropout", "weight_drop"):
        if not 0 <= getattr(m, name) < 1:
            raise UsageError(f"model.{name} must be in [0, 1), got {getattr(m, name)}")
    for name in ("input_dropout", "hidden_dropout"):
        if not getattr(m, name) < 1:
            raise UsageError(f"model.{name} must be below 1 (negative = same as model.dropout), got {getattr(m, name)}")
    if not -math.inf < m.forget_bias < math.inf:
        raise UsageError(f"model.forget_bias must be a finite number, got {m.forget_bias}")
    if m.recurrent_init not in ("uniform", "orthogonal"):
        raise UsageError(f"model.recurrent_init must be uniform or orthogonal, got {m.recurrent_init!r}")
    if not 0 <= m.init_range < math.inf:
        raise UsageError(f"model.init_range must be a finite number >= 0, got {m.init_range}")
    for name in ("epochs", "batch_size", "bptt", "eval_batch_size"):
        if getattr(t, name) <= 0:
            raise UsageError(f"train.{name} must be positive, got {getattr(t, name)}")
    for name in ("tuned_tokens", "max_steps", "eval_every", "checkpoint_every", "log_every", "early_stop", "decay_start", "threads",
                 "nonmono"):
        if getattr(t, name) < 0:
            raise UsageError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    # `not x > 0` is also true for NaN: every float below is checked that way.
    if not 0 < t.lr < math.inf:
        raise UsageError(f"train.lr must be a finite number > 0, got {t.lr}")
    for name in ("time_limit", "weight_decay", "momentum", "clip", "ar_alpha", "tar_beta", "plateau_decay"):
        if not 0 <= getattr(t, name) < math.inf:
            raise UsageError(f"train.{name} must be a finite number >= 0, got {getattr(t, name)}")
    if not 0 < t.lr_decay < math.inf:
        raise UsageError(f"train.lr_decay must be a finite number > 0, got {t.lr_decay}")
    if not 0 <= t.anneal <= 1:
        raise UsageError(f"train.anneal must be a fraction in [0, 1], got {t.anneal}")
    if config.data.min_freq < 1 or config.data.max_vocab < 0:
        raise UsageError("data.min_freq must be >= 1 and data.max_vocab >= 0")
    if t.dtype not in ("float32", "float64"):
        raise UsageError(f"train.dtype must be float32 or float64, got {t.dtype!r}")
    try:
        torch.device(resolve_device(t.device))
    except (RuntimeError, ValueError):
        raise UsageError(f"train.device must be a torch device such as 'cpu' or 'cuda', got {t.device!r}") from None


def resolve_device(device: str) -> str:
    """``auto`` as this machine's device (CUDA where present, else the CPU); others as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_device(device: str, option: str = "train.device") -> None:
    """The device exists on this machine, or one clear line (a config may come from another)."""
    try:
        kind = torch.device(resolve_device(device)).type
    except (RuntimeError, ValueError):
        raise WhiteboardError(f"{option} must be a torch device such as 'cpu', 'cuda' or 'auto', got {device!r}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise WhiteboardError(f"{option} is {device!r} but this machine has no CUDA device; use cpu (or auto)")


def from_json(data: dict, origin: str = "config.json") -> RunConfig:
    """A saved config, checked as a command line's is: a config.json edited by hand (a
    hidden size of 0, a list instead of an object) is refused with its name."""
    if not isinstance(data, dict):
        raise UsageError(f"{origin} must hold a JSON object of config sections, got a {type(data).__name__}")
    config = RunConfig()
    apply(config, data, origin)
    validate(config)
    return config
