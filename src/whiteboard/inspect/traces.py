"""What a trained model writes, reads and forgets, step by step.

* :func:`trace_text` - every gate and state of every layer over a text, with the model's
  top predictions at each position;
* :func:`saturation` - how often gates are nearly shut (< 0.1) or wide open (> 0.9)
  (Karpathy, Johnson & Fei-Fei 2015, "Visualizing and Understanding Recurrent Networks");
* :func:`correlated_units` - the units whose activation follows a pattern in the text;
* :func:`gradient_reach` - the seed's "how much error was caused at t-k": the mean norm of
  d loss_t / d input_{t-k} as a function of the lag k.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from whiteboard.inspect import plots
from whiteboard.errors import WhiteboardError
from whiteboard.lm.generate import Prediction
from whiteboard.nn.layers import SEED_NAMES, TRACE_FIELDS
from whiteboard.lm.model import LanguageModel
from whiteboard.inspect.report import inspect_report
from whiteboard.lm.vocab import Vocabulary

GATES = {"LSTM": ("input_gate", "forget_gate", "output_gate"), "GRU": ("reset_gate", "update_gate"), "RNN": ()}
# What each layer type's heatmaps show, in order: the gates, then the state the seed calls the board.
HEATMAP_FIELDS = {
    "LSTM": ("input_gate", "forget_gate", "output_gate", "cell"),
    "GRU": ("reset_gate", "update_gate", "candidate", "hidden"),
    "RNN": ("preactivation", "hidden"),
}


@dataclass
class TextTrace:
    mode: str  # LSTM | GRU | RNN
    tokens: list[str]
    predictions: list[list[Prediction]]  # after each token: the top-k next tokens
    layers: list[dict[str, Tensor]]  # per layer: name -> (T, H), forward direction
    unknown: list[str] = field(default_factory=list)


def tokens_of(vocab: Vocabulary, text: str) -> list[str]:
    tokens = vocab.tokenize(text)
    if not tokens:
        raise WhiteboardError("the text is empty: give at least one token to inspect")
    return tokens


@torch.no_grad()
def trace_text(model: LanguageModel, vocab: Vocabulary, text: str, top_k: int = 3) -> TextTrace:
    model.eval()
    tokens = tokens_of(vocab, text)
    ids = torch.tensor(vocab.encode(tokens), device=model.decoder.weight.device).unsqueeze(1)  # (T, 1)
    logits, _, trace = model.trace(ids)  # (T, 1, V)
    probs = logits[:, 0].softmax(-1)  # (T, V)
    values, indices = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
    predictions = [[Prediction(vocab.tokens[int(i)], float(v)) for v, i in zip(vs, ix)] for vs, ix in zip(values, indices)]
    layers = [{name: t[:, 0].cpu() for name, t in layer_steps[0].items()} for layer_steps in trace.steps]
    return TextTrace(trace.mode, tokens, predictions, layers, vocab.unknown(text))


def select_units(values: Tensor, count: int) -> list[int]:
    """The ``count`` units that vary most over the text (the 'most active' ones)."""
    spread = values.std(dim=0) if values.shape[0] > 1 else values.abs()[0]
    return torch.argsort(spread, descending=True)[:count].tolist()


def saturation(text_trace: TextTrace, low: float = 0.1, high: float = 0.9) -> list[dict[str, dict[str, float]]]:
    """Per layer and gate: the share of values below ``low`` and above ``high``."""
    result = []
    for layer in text_trace.layers:
        result.append({gate: {"below": float((layer[gate] < low).float().mean()), "above": float((layer[gate] > high).float().mean())}
                       for gate in GATES[text_trace.mode]})
    return result


PATTERNS = ("inside-quotes", "line-position", "word-position", "regex:EXPR")


def pattern_signal(tokens: list[str], pattern: str, level: str) -> Tensor:
    """A number per token describing where it sits, for finding units that track it.

    inside-quotes: 1 inside a "..." quotation, else 0; line-position: tokens since the last
    line break; word-position: tokens since the last space (char level) or sentence end;
    regex:EXPR: 1 where the token matches EXPR.
    """
    signal = []
    if pattern == "inside-quotes":
        inside = False
        for tok in tokens:
            quotes = tok.count('"')
            signal.append(1.0 if inside or quotes else 0.0)
            if quotes % 2:
                inside = not inside
    elif pattern in ("line-position", "word-position"):
        breaks = {"\n", "<eos>"} if pattern == "line-position" else ({" ", "\n"} if level == "char" else {".", "<eos>", "!", "?"})
        position = 0
        for tok in tokens:
            signal.append(float(position))
            position = 0 if tok in breaks else position + 1
    elif pattern.startswith("regex:"):
        try:
            expr = re.compile(pattern[len("regex:"):])
        except re.error as exc:
            raise WhiteboardError(f"--pattern {pattern!r}: not a regular expression: {exc}") from None
        signal = [1.0 if expr.search(tok) else 0.0 for tok in tokens]
    else:
        raise WhiteboardError(f"unknown pattern {pattern!r}; patterns: {', '.join(PATTERNS)}")
    return torch.tensor(signal)


def correlated_units(values: Tensor, signal: Tensor, count: int = 5) -> list[tuple[int, float]]:
    """Units ranked by |Pearson correlation| between their activation and ``signal``."""
    if signal.std() == 0:
        return []
    v = values - values.mean(0)
    s = signal - signal.mean()
    denom = v.norm(dim=0) * s.norm()
    r = torch.where(denom > 0, (v * s.unsqueeze(1)).sum(0) / denom.clamp_min(1e-12), torch.zeros_like(denom))
    order = torch.argsort(r.abs(), descending=True)[:count]
    return [(int(u), float(r[u])) for u in order]


# --------------------------------------------------------------------------- gradient reach


def gradient_reach(run: Callable[[Tensor], Tensor], inputs: Tensor, loss_at: Callable[[Tensor, int], Tensor],
                   max_lag: int | None = None, positions: list[int] | None = None) -> Tensor:
    """Mean over positions t of ||d loss_t / d inputs[t-k]|| for k = 0 .. max_lag.

    ``run`` maps inputs (T, B, F) to outputs; ``loss_at(outputs, t)`` is the loss at step t.
    Entry k averages over the positions where t-k >= 0.
    """
    T = inputs.shape[0]
    max_lag = T - 1 if max_lag is None else min(max_lag, T - 1)
    positions = list(range(T)) if positions is None else positions
    totals = torch.zeros(max_lag + 1, dtype=torch.float64)
    counts = torch.zeros(max_lag + 1, dtype=torch.float64)
    x = inputs.detach().requires_grad_(True)
    outputs = run(x)
    for i, t in enumerate(positions):
        (grad,) = torch.autograd.grad(loss_at(outputs, t), x, retain_graph=i < len(positions) - 1)
        norms = grad.flatten(1).norm(dim=1).double()  # (T,) per input step
        lags = torch.arange(0, min(t, max_lag) + 1)
        totals[lags] += norms[t - lags]
        counts[lags] += 1
    return totals / counts.clamp_min(1)


def lm_gradient_reach(model: LanguageModel, vocab: Vocabulary, text: str, max_lag: int | None = None) -> Tensor:
    """Gradient reach of a language model on a text: the loss at step t is the
    cross-entropy of predicting token t+1; the inputs are the embedded tokens."""
    tokens = tokens_of(vocab, text)
    if len(tokens) < 3:
        raise WhiteboardError("gradient reach needs a text of at least 3 tokens")
    ids = torch.tensor(vocab.encode(tokens), device=model.decoder.weight.device).unsqueeze(1)  # (T, 1)
    model.eval()
    embedded = model.embedding(ids[:-1]).detach()  # (T-1, 1, E)
    targets = ids[1:, 0]

    def run(x: Tensor) -> Tensor:
        output, _ = model.recurrent(x)
        return model.decoder(output)  # (T-1, 1, V)

    def loss_at(logits: Tensor, t: int) -> Tensor:
        return nn.functional.cross_entropy(logits[t], targets[t : t + 1])

    return gradient_reach(run, embedded, loss_at, max_lag)


def heatmap_fields(mode: str) -> tuple[str, ...]:
    fields = HEATMAP_FIELDS[mode]
    assert all(f in TRACE_FIELDS[mode] for f in fields)
    return fields


def _state_field(mode: str) -> str:
    return "cell" if mode == "LSTM" else "hidden"


def build_report(model: LanguageModel, vocab: Vocabulary, text: str, out_path, units: list[int] | None = None,
                 unit_count: int = 12, pattern: str | None = None, reach_models: dict | None = None,
                 title: str | None = None) -> dict:
    """Trace ``text``, write the HTML report to ``out_path`` and one heatmap PNG per layer
    beside it. ``reach_models`` (name -> model) adds a gradient-reach plot of those models."""
    from pathlib import Path


    out_path = Path(out_path)
    text_trace = trace_text(model, vocab, text)
    hidden = model.config.hidden_size
    state = _state_field(text_trace.mode)
    if units:
        bad = [u for u in units if not 0 <= u < hidden]
        if bad:
            raise WhiteboardError(f"--units {bad} out of range: the model has {hidden} units per layer (0..{hidden - 1})")
        chosen = [list(units) for _ in text_trace.layers]
    else:
        chosen = [select_units(layer[state], min(unit_count, hidden)) for layer in text_trace.layers]

    correlations = None
    views = []
    if pattern:
        signal = pattern_signal(text_trace.tokens, pattern, vocab.level)
        ranked = []
        for layer_index, layer in enumerate(text_trace.layers):
            for name in (state, "hidden") if state != "hidden" else ("hidden",):
                for unit, r in correlated_units(layer[name], signal, 5):
                    ranked.append({"layer": layer_index, "unit": unit, "field": name, "r": r})
        correlations = sorted(ranked, key=lambda c: -abs(c["r"]))[:8]
        views = [(c["layer"], c["field"], c["unit"], f"layer {c['layer']} {c['field']} unit {c['unit']} (r = {c['r']:+.2f})")
                 for c in correlations]
    if not views:
        last = len(text_trace.layers) - 1
        views = [(last, state, u, f"layer {last} {state} unit {u}") for u in chosen[last][:8]]
    unit_views = []
    for layer_index, name, unit, label in views:
        values = text_trace.layers[layer_index][name][:, unit]
        unit_views.append({"label": label, "values": [round(float(v), 4) for v in values],
                           "scale": max(float(values.abs().max()), 1e-6)})

    files = {"html": str(out_path)}
    fields = heatmap_fields(text_trace.mode)
    for layer_index, layer in enumerate(text_trace.layers):
        panels = [(name.replace("_", " "), layer[name][:, chosen[layer_index]].t().tolist(), name.endswith("_gate"))
                  for name in fields]
        png_path = out_path.with_name(f"{out_path.stem}-layer{layer_index}.png")
        plots.heatmap_panels(panels, text_trace.tokens, chosen[layer_index], png_path,
                             title=f"{text_trace.mode} layer {layer_index}")
        files[f"layer{layer_index}"] = str(png_path)

    images = {}
    if reach_models:
        reach = {name: lm_gradient_reach(m, vocab, text) for name, m in reach_models.items()}
        png_path = out_path.with_name(f"{out_path.stem}-reach.png")
        images["Gradient reach: how much of the error at step t reaches step t-k"] = plots.line_plot(
            {name: list(enumerate(values.tolist())) for name, values in reach.items()}, png_path,
            xlabel="lag k (tokens back)", ylabel="mean ||d loss_t / d input_{t-k}||", logy=True)
        files["reach"] = str(png_path)

    data = inspect_report(out_path, text_trace, chosen, saturation(text_trace), unit_views, correlations, images,
                          title or f"whiteboard inspect: {text_trace.mode}", vocab.level, SEED_NAMES,
                          heatmap_fields(text_trace.mode))
    return {"files": files, "data": data, "trace": text_trace}
