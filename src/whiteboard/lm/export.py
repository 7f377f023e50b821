"""A trained run for people without whiteboard: ``whiteboard export RUN --format torch|onnx``.

``torch`` writes a folder a plain PyTorch install can load: ``model.safetensors`` (a state
dict for torch.nn.Embedding, one torch.nn.LSTM / GRU / RNN per layer and torch.nn.Linear),
``config.json`` (the sizes and the vocabulary) and ``load_model.py``, a short loader with
the model class. ``onnx`` writes ``model.onnx`` (tokens and the recurrent state in, logits
and the new state out; any length and batch) and the same ``config.json``.

The folder is written beside its final name and renamed into place at the end, so a failed
export leaves nothing behind, and an existing folder is never written into.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from torch import nn

from whiteboard.errors import WhiteboardError
from whiteboard.files import atomic_write_bytes, atomic_write_text, umask
from whiteboard.lm.model import LanguageModel, RecurrentStack, _inner
from whiteboard.lm.vocab import Vocabulary

FORMATS = ("torch", "onnx")

#: What load_model.py holds: the model as torch.nn modules, and a loader. Needs only torch
#: and safetensors.
LOADER = '''"""Load the exported whiteboard language model with plain PyTorch: model, vocab = load(folder)."""
import json, pathlib, torch
from safetensors.torch import load_file


class LanguageModel(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        cell = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[c["cell"]]
        extra = {"nonlinearity": c["nonlinearity"]} if c["cell"] == "rnn" else {}
        self.embedding = torch.nn.Embedding(len(c["vocab"]), c["embedding_size"])
        inputs = [c["embedding_size"], *c["sizes"][:-1]]
        self.layers = torch.nn.ModuleList(cell(i, h, **extra) for i, h in zip(inputs, c["sizes"]))
        self.decoder = torch.nn.Linear(c["sizes"][-1], len(c["vocab"]))

    def forward(self, tokens, states=None):  # tokens (T, B) -> logits (T, B, V), one state per layer
        x, finals = self.embedding(tokens), []
        for layer, state in zip(self.layers, states or [None] * len(self.layers)):
            x, final = layer(x, state)
            finals.append(final)
        return self.decoder(x), finals


def load(folder="."):
    folder = pathlib.Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = LanguageModel(config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval(), config["vocab"]
'''


def _layers(model: LanguageModel) -> list[nn.Module]:
    """The recurrent layers, one whiteboard layer per entry (a stack of single layers, or one
    multi-layer layer)."""
    stack = model.layer
    if isinstance(stack, RecurrentStack):
        return [_inner(layer) for layer in stack.layers]
    return [stack]


def _description(model: LanguageModel, vocab: Vocabulary, fmt: str) -> dict:
    config = model.config
    if config.cell == "layernorm-lstm":
        raise WhiteboardError("torch.nn has no layer-normalized LSTM and ONNX no operator for it; "
                              "only lstm, gru and rnn runs can be exported")
    if config.cell == "rnn" and config.nonlinearity == "sigmoid" and fmt == "torch":
        raise WhiteboardError("torch.nn.RNN has no sigmoid nonlinearity: export this run with --format onnx")
    sizes = []
    for layer in _layers(model):
        if layer.bidirectional:
            raise WhiteboardError("a bidirectional language model cannot be exported")
        sizes += [layer.hidden_size] * layer.num_layers
    return {"format": "whiteboard-export-1", "cell": config.cell, "nonlinearity": config.nonlinearity,
            "embedding_size": config.embedding_size, "sizes": sizes, "level": vocab.level, "vocab": vocab.tokens}


def torch_state_dict(model: LanguageModel) -> dict[str, torch.Tensor]:
    """The model's weights under load_model.py's names: layer k's weights as its own
    single-layer torch.nn module's (``layers.k.weight_ih_l0``, ...)."""
    state = {"embedding.weight": model.embedding.weight, "decoder.weight": model.decoder.weight,
             "decoder.bias": model.decoder.bias}
    index = 0
    for layer in _layers(model):
        for k in range(layer.num_layers):
            for name in layer._all_weights[k]:
                state[f"layers.{index}.{name.removesuffix(f'_l{k}')}_l0"] = getattr(layer, name)
            index += 1
    # Each its own copy: safetensors stores no shared memory (the tied decoder shares the embedding's).
    return {name: tensor.detach().to("cpu", torch.float32).clone().contiguous() for name, tensor in state.items()}


class _ExplicitState(nn.Module):
    """The model with its state as plain tensors, for ONNX: (tokens, h[, c]) -> (logits, h[, c])."""

    def __init__(self, model: LanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens, h, c=None):
        logits, new = self.model(tokens, h if c is None else (h, c))
        return (logits, *new) if isinstance(new, tuple) else (logits, new)


def _write_onnx(model: LanguageModel, path: Path) -> None:
    try:
        from whiteboard.backends.onnx import TRANSLATIONS
    except ImportError as exc:
        raise WhiteboardError(f"--format onnx needs onnxscript and onnx: pip install 'whiteboard[onnx]' ({exc})") from None
    wrapper = _ExplicitState(model).eval()
    state = model.init_state(2)
    state = state if isinstance(state, tuple) else (state,)
    tokens = torch.zeros(3, 2, dtype=torch.long)
    T, B = torch.export.Dim("T"), torch.export.Dim("B")
    shapes = ({0: T, 1: B}, *({1: B} for _ in state))
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (tokens, *state), dynamo=True, custom_translation_table=TRANSLATIONS,
                                    dynamic_shapes=shapes, verbose=False,
                                    input_names=["tokens", *("h", "c")[: len(state)]],
                                    output_names=["logits", *("h_n", "c_n")[: len(state)]])
    program.save(str(path))


def export_run(model: LanguageModel, vocab: Vocabulary, out: Path, fmt: str) -> list[Path]:
    """Write the export folder ``out`` (which must not exist, or be empty); the files written."""
    if fmt not in FORMATS:
        raise WhiteboardError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WhiteboardError(f"--out {out} exists and is not an empty folder; exports never write into one")
    description = _description(model, vocab, fmt)
    model = model.to("cpu").float().eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        atomic_write_text(staging / "config.json", json.dumps(description, indent=1) + "\n")
        if fmt == "torch":
            atomic_write_bytes(staging / "model.safetensors", st_save(torch_state_dict(model)))
            atomic_write_text(staging / "load_model.py", LOADER)
        else:
            _write_onnx(model, staging / "model.onnx")
        staging.chmod(0o777 & ~umask())  # mkdtemp's folder is private; an export is for sharing
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(out.iterdir())
