"""LSTMVis's select and match over a whole corpus, and its file layout.

* :func:`select_units` - the units whose activation tracks a pattern (``regex:``, word
  position, inside quotes; see :func:`whiteboard.inspect.traces.pattern_signal`);
* :func:`units_on_span` - LSTMVis's own selection: the units on throughout a span of a text
  and off just before it;
* :func:`match_spans` - the corpus spans where every chosen unit is on;
* :func:`export_states` - a corpus's states in the files LSTMVis reads.

A corpus is read in chunks with the state carried across them, so its states are never all
in memory: selection keeps running sums, matching keeps one flag and one value per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from whiteboard.errors import WhiteboardError
from whiteboard.experiments import tasks
from whiteboard.explorer.analysis import ServedRun
from whiteboard.files import atomic_output, atomic_write_text
from whiteboard.inspect.traces import pattern_signal
from whiteboard.lm.vocab import tokenize_corpus

#: A corpus longer than this is refused (about 10 MB of text at word level); its scan would
#: take minutes on two cores.
MAX_CORPUS_TOKENS = 2_000_000
CHUNK = 2048
SPANS_LISTED = 30
CONTEXT = 8
DEMO_CORPUS = "demo stories (held out)"

Progress = Callable[[float], None]


@dataclass
class Corpus:
    """A corpus the explorer may scan, by name: the server never takes a path from a request."""

    name: str
    text: str

    @classmethod
    def from_file(cls, path: Path, name: str | None = None) -> "Corpus":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise WhiteboardError(f"corpus file not found: {path}") from None
        except UnicodeDecodeError as exc:
            raise WhiteboardError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise WhiteboardError(f"cannot read {path}: {exc.strerror or exc}") from None
        return cls(name or path.name, text)

    def tokens(self, run: ServedRun) -> list[str]:
        """The corpus's tokens as this model splits them (line ends are <eos> at word level)."""
        vocab = run.vocab
        tokens = tokenize_corpus(self.text, vocab.level, vocab.tokenizer)
        if not tokens:
            raise WhiteboardError(f"the corpus {self.name} is empty")
        if len(tokens) > MAX_CORPUS_TOKENS:
            raise WhiteboardError(f"the corpus {self.name} has {len(tokens):,} tokens for {run.name}; "
                                  f"the explorer scans at most {MAX_CORPUS_TOKENS:,}")
        return tokens


def demo_corpus(count: int = 400) -> Corpus:
    """Held-out stories of the demo's task (clue-answer distances 4..150), so that a page
    serving the demo's models has a corpus to scan without any file."""
    stories = tasks.make_stories(count, 4, 150, seed=11, split="test")
    return Corpus(DEMO_CORPUS, "".join(story.text() + "\n" for story in stories))


def check_choice(run: ServedRun, layer: int, field: str) -> None:
    from whiteboard.nn.cells import TRACE_FIELDS

    if not 0 <= layer < run.layers:
        raise WhiteboardError(f"{run.name} has {run.layers} layer(s) (0..{run.layers - 1}), not layer {layer}")
    if field not in TRACE_FIELDS[run.mode]:
        raise WhiteboardError(f"{run.name} ({run.mode}) records {', '.join(TRACE_FIELDS[run.mode])}, not {field!r}")


def stream_states(run: ServedRun, tokens: list[str], layer: int, field: str, progress: Progress | None = None):
    """Yield (offset, values (n, H)) of one traced field of one layer over the corpus, chunk
    by chunk, with the state carried from each chunk to the next."""
    check_choice(run, layer, field)
    ids = torch.tensor(run.vocab.encode(tokens), device=run.model.decoder.weight.device)
    state = None
    for offset in range(0, len(ids), CHUNK):
        with run.lock, torch.no_grad():
            _, state, trace = run.model.trace(ids[offset : offset + CHUNK].unsqueeze(1), state)
        yield offset, trace.steps[layer][0][field][:, 0].float().cpu()
        if progress:
            progress(min(1.0, (offset + CHUNK) / len(ids)))


def select_units(run: ServedRun, corpus: Corpus, layer: int, field: str, pattern: str, count: int = 10,
                 progress: Progress | None = None) -> dict:
    """The units whose activation correlates most with the pattern over the whole corpus
    (Pearson's r from running sums in float64)."""
    tokens = corpus.tokens(run)
    signal = pattern_signal(tokens, pattern, run.vocab.level).double()
    if signal.std() == 0:
        raise WhiteboardError(f"the pattern {pattern!r} is the same at every token of {corpus.name}: "
                              "nothing to correlate with")
    sums = None
    for offset, values in stream_states(run, tokens, layer, field, progress):
        v = values.double()
        s = signal[offset : offset + len(v)].unsqueeze(1)
        part = torch.stack([v.sum(0), (v * v).sum(0), (v * s).sum(0)])
        sums = part if sums is None else sums + part
    n = len(tokens)
    mean_v, mean_s = sums[0] / n, signal.mean()
    covariance = sums[2] / n - mean_v * mean_s
    spread = (sums[1] / n - mean_v**2).clamp_min(0).sqrt() * signal.std(correction=0)
    r = torch.where(spread > 0, covariance / spread.clamp_min(1e-300), torch.zeros_like(spread))
    order = torch.argsort(r.abs(), descending=True)[:count]
    return {"corpus": corpus.name, "model": run.name, "layer": layer, "field": field, "pattern": pattern,
            "tokens": n, "pattern_share": float((signal > 0).double().mean()),
            "units": [{"unit": int(u), "r": round(float(r[u]), 4)} for u in order]}


def units_on_span(values: Tensor, start: int, end: int, threshold: float) -> list[dict]:
    """LSTMVis's selection on a text's trace ``values`` (T, H): the units at or above
    ``threshold`` at every token of [start, end] and below it just before ``start``, most
    strongly on first."""
    T = values.shape[0]
    if not 0 <= start <= end < T:
        raise WhiteboardError(f"the span {start}..{end} is not within the text's {T} tokens")
    inside = values[start : end + 1]
    on = (inside >= threshold).all(0)
    if start > 0:
        on &= values[start - 1] < threshold
    strength = inside.min(0).values
    units = torch.nonzero(on).flatten().tolist()
    return [{"unit": u, "min": round(float(strength[u]), 4)} for u in sorted(units, key=lambda u: -float(strength[u]))]


def match_spans(run: ServedRun, corpus: Corpus, layer: int, field: str, units: list[int], threshold: float,
                progress: Progress | None = None, listed: int = SPANS_LISTED) -> dict:
    """The corpus spans where every unit in ``units`` is at or above ``threshold``: the
    longest first (ties: the higher mean), each with its tokens and some context."""
    hidden = run.model.sizes[layer] if 0 <= layer < run.layers else 0
    if not units or any(not 0 <= u < hidden for u in units):
        raise WhiteboardError(f"choose units of layer {layer} of {run.name}, 0..{hidden - 1}; got {units}")
    tokens = corpus.tokens(run)
    on = torch.zeros(len(tokens), dtype=torch.bool)
    mean = torch.zeros(len(tokens))
    for offset, values in stream_states(run, tokens, layer, field, progress):
        chosen = values[:, units]
        on[offset : offset + len(chosen)] = (chosen >= threshold).all(1)
        mean[offset : offset + len(chosen)] = chosen.mean(1)
    spans = _runs(on)
    ranked = sorted(spans, key=lambda se: (-(se[1] - se[0]), -float(mean[se[0] : se[1]].mean())))
    listed_spans = [{"start": s, "end": e - 1, "length": e - s, "mean": round(float(mean[s:e].mean()), 4),
                     "before": tokens[max(0, s - CONTEXT) : s], "inside": tokens[s:e],
                     "after": tokens[e : e + CONTEXT]} for s, e in ranked[:listed]]
    return {"corpus": corpus.name, "model": run.name, "layer": layer, "field": field, "units": units,
            "threshold": threshold, "tokens": len(tokens), "on_share": float(on.float().mean()),
            "span_count": len(spans), "spans": listed_spans}


def _runs(flags: Tensor) -> list[tuple[int, int]]:
    """[start, end) of every run of True."""
    padded = torch.cat([torch.tensor([False]), flags, torch.tensor([False])]).int()
    edges = torch.diff(padded)
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return list(zip(starts, ends))


# --------------------------------------------------------------------------- LSTMVis files

#: How a token that LSTMVis's "word id" dictionary lines cannot hold is written there.
_DICT_NAMES = {" ": "<space>", "\t": "<tab>", "\n": "<newline>", "\r": "<return>"}


def lstmvis_files(out: Path) -> dict[str, Path]:
    """The files an export writes: the states, the word ids, their dictionary, and lstm.yml."""
    out = Path(out)
    return {"states": out, "words": out.with_name(f"{out.stem}-words.h5"), "dict": out.with_suffix(".dict"),
            "config": out.with_name("lstm.yml")}


def export_states(run: ServedRun, corpus: Corpus, out: Path, progress: Progress | None = None) -> dict[str, Path]:
    """Write the corpus's states in the layout LSTMVis reads (its ``lstm.yml`` names them):
    ``states{L}`` (the cell state of an LSTM, else the hidden state) and, for an LSTM,
    ``output{L}`` (its hidden output) per layer L counted from 1, each (tokens, units); the
    word ids in a second HDF5 file; their dictionary as "word id" lines. Nothing is
    overwritten, and every file appears whole or not at all."""
    import h5py

    files = lstmvis_files(out)
    if Path(out).suffix not in (".h5", ".hdf5"):
        raise WhiteboardError(f"--export-states {out}: LSTMVis reads HDF5 files named .h5 or .hdf5")
    existing = [str(p) for p in files.values() if p.exists()]
    if existing:
        raise WhiteboardError(f"--export-states would overwrite {', '.join(existing)}; choose another name or folder")
    tokens = corpus.tokens(run)
    fields = [("states", "cell" if run.mode == "LSTM" else "hidden")] + ([("output", "hidden")] if run.mode == "LSTM" else [])
    with atomic_output(files["states"]) as (_, states_path), h5py.File(states_path, "w") as h5:
        steps = run.layers * len(fields)
        for index, (layer, (prefix, field)) in enumerate((l, f) for l in range(run.layers) for f in fields):
            dataset = h5.create_dataset(f"{prefix}{layer + 1}", (len(tokens), run.model.sizes[layer]), dtype="float32")
            done = lambda f, i=index: progress((i + f) / steps) if progress else None  # noqa: E731
            for offset, values in stream_states(run, tokens, layer, field, done):
                dataset[offset : offset + len(values)] = values.numpy()
    with atomic_output(files["words"]) as (_, words_path), h5py.File(words_path, "w") as h5:
        h5.create_dataset("words", data=run.vocab.encode(tokens), dtype="int64")
    atomic_write_text(files["dict"], "".join(f"{_DICT_NAMES.get(t, t)} {i}\n" for i, t in enumerate(run.vocab.tokens)))
    atomic_write_text(files["config"], _lstmvis_config(run, corpus, files, fields))
    return files


def _lstmvis_config(run: ServedRun, corpus: Corpus, files: dict[str, Path], fields) -> str:
    types = []
    for layer in range(run.layers):
        for prefix, _ in fields:
            kind = "state" if prefix == "states" else "output"
            extra = "" if kind == "state" else ", transform: none"
            types.append(f"    - {{type: {kind}, layer: {layer + 1}, path: {prefix}{layer + 1}{extra}}}")
    return (f"name: {run.name} on {corpus.name}\n"
            f"description: {run.mode} states of the whiteboard run {run.name} over {corpus.name}\n"
            "files:\n"
            f"  states: {files['states'].name}\n"
            f"  words: {files['words'].name}\n"
            f"  words_dict: {files['dict'].name}\n"
            "word_sequence:\n"
            "  file: words\n"
            "  path: words\n"
            "  dict_file: words_dict\n"
            "states:\n"
            "  file: states\n"
            "  types:\n" + "\n".join(types) + "\n")
