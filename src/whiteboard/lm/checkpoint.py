"""Run directories: safetensors + JSON, every file written atomically, nothing pickled.

A run directory holds::

    config.json                  the resolved RunConfig
    vocab.json                   the vocabulary
    model.safetensors            weights, for evaluate / predict / generate / inspect
    training_state.safetensors   the self-contained resume point: weights, optimizer
                                 state, RNG states, the carried hidden state, counters
    metrics.jsonl                one JSON object per evaluation / log line

Each file is written to a temporary name in the same directory, flushed to disk and
renamed over the old one, so a kill at any moment leaves either the old or the new file,
never half of one. ``training_state`` carries its own copy of the weights so that resume
never mixes the weights of one step with the optimizer state of another.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from whiteboard.lm.config import RunConfig, from_json
from whiteboard.lm import rundir
from whiteboard.errors import WhiteboardError
from whiteboard.files import atomic_write_bytes, atomic_write_text  # noqa: F401 (the run files' writer, re-exported)
from whiteboard.lm.model import LanguageModel
from whiteboard.lm.vocab import Vocabulary

FORMAT = "whiteboard-lm-1"


def model_tensors(model: LanguageModel) -> dict[str, torch.Tensor]:
    """The state dict without the tied decoder weight (safetensors stores no aliases)."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_weights:
        tensors.pop("decoder.weight")
    return tensors


def load_model_tensors(model: LanguageModel, tensors: dict[str, torch.Tensor], origin: str) -> None:
    """Load weights into ``model``; one clear line where they do not fit its config (an edited
    hidden size, a vocabulary of another size, another cell) or are not finite."""
    nonfinite = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if nonfinite:
        raise WhiteboardError(f"{origin} holds non-finite weights ({', '.join(sorted(nonfinite)[:3])}): "
                              "it cannot give meaningful predictions")
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        mismatches = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        detail = mismatches[0] if mismatches else str(exc).splitlines()[0]
        raise WhiteboardError(f"{origin} does not fit the model in config.json: {detail}") from None
    allowed_missing = {"decoder.weight"} if model.config.tie_weights else set()
    if set(missing) - allowed_missing or unexpected:
        raise WhiteboardError(
            f"{origin} does not fit the model in config.json: missing {sorted(set(missing) - allowed_missing)}, "
            f"unexpected {sorted(unexpected)}"
        )


def save_model(run_dir: Path, model: LanguageModel, step: int) -> None:
    data = st_save(model_tensors(model), metadata={"format": FORMAT, "step": str(step)})
    atomic_write_bytes(Path(run_dir) / rundir.MODEL, data)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise WhiteboardError(f"{path} not found: is this a whiteboard run directory?") from None
    try:
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8 : 8 + header_len]).get("__metadata__", {})
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise WhiteboardError(f"{path} is not a readable safetensors file: {exc}") from None
    return tensors, metadata


def save_run_files(run_dir: Path, config: RunConfig, vocab: Vocabulary) -> None:
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / rundir.CONFIG, config.to_json())
    vocab.save(run_dir / rundir.VOCAB)


def read_config(config_path: Path) -> RunConfig:
    """A run's saved config.json, checked; one clear line for any way it can be wrong."""
    try:
        data = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WhiteboardError(f"{config_path} not found: is this a whiteboard run directory?") from None
    except UnicodeDecodeError as exc:
        raise WhiteboardError(f"{config_path} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise WhiteboardError(f"{config_path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise WhiteboardError(f"cannot read {config_path}: {exc.strerror}") from None
    return from_json(data, str(config_path))


def load_run(run_dir: Path, device: str = "cpu") -> tuple[LanguageModel, Vocabulary, RunConfig]:
    """The trained model (eval mode), its vocabulary and config from a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise WhiteboardError(f"run directory not found: {run_dir}")
    config = read_config(run_dir / rundir.CONFIG)
    vocab = Vocabulary.load(run_dir / rundir.VOCAB)
    model = LanguageModel(len(vocab), config.model)
    tensors, metadata = _read_safetensors(run_dir / rundir.MODEL)
    if metadata.get("format") != FORMAT:
        raise WhiteboardError(f"{run_dir / 'model.safetensors'} was not written by whiteboard (format {metadata.get('format')!r})")
    load_model_tensors(model, tensors, str(run_dir / rundir.MODEL))
    model.to(device).eval()
    return model, vocab, config


# --------------------------------------------------------------------------- resume point


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().contiguous().cpu()
            elif value is not None:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, entries in info["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = info["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def save_training_state(run_dir: Path, model, optimizer, counters: dict, hidden, data_generator: torch.Generator,
                        rank_rng_states: list[torch.Tensor] | None = None) -> None:
    """``rank_rng_states``: in a distributed run, every rank's torch generator state (rank
    0's is the usual ``rng.torch``, rank r's ``rng.torch.r``); ``hidden`` the whole batch's."""
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    opt_tensors, opt_info = _optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    for rank, state in list(enumerate(rank_rng_states or []))[1:]:
        tensors[f"rng.torch.{rank}"] = state
    tensors["rng.data"] = data_generator.get_state()
    hidden_list = list(hidden) if isinstance(hidden, tuple) else [hidden]
    for i, h in enumerate(hidden_list):
        tensors[f"hidden.{i}"] = h.detach().contiguous().cpu()
    metadata = {"format": FORMAT, "counters": json.dumps(counters), "optimizer": json.dumps(opt_info)}
    atomic_write_bytes(Path(run_dir) / rundir.TRAINING_STATE, st_save(tensors, metadata=metadata))


def read_training_counters(run_dir: Path) -> dict:
    """The counters of the resume point alone (to rebuild the right optimizer first)."""
    _, metadata = _read_safetensors(Path(run_dir) / rundir.TRAINING_STATE)
    return json.loads(metadata["counters"])


def load_training_state(run_dir: Path, model, optimizer, data_generator: torch.Generator, device, rank: int = 0):
    """Restore model, optimizer and RNGs (``rank``'s torch generator where the checkpoint has
    one for it); return (counters, hidden state of the whole batch)."""
    path = Path(run_dir) / rundir.TRAINING_STATE
    tensors, metadata = _read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise WhiteboardError(f"{path} was not written by whiteboard")
    load_model_tensors(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, str(path))
    optimizer.load_state_dict(_optimizer_state(tensors, json.loads(metadata["optimizer"])))
    torch.set_rng_state(tensors.get(f"rng.torch.{rank}", tensors["rng.torch"]) if rank else tensors["rng.torch"])
    data_generator.set_state(tensors["rng.data"])
    hidden = [tensors[f"hidden.{i}"].to(device) for i in range(2) if f"hidden.{i}" in tensors]
    state = tuple(hidden) if len(hidden) == 2 else hidden[0]
    return json.loads(metadata["counters"]), state
