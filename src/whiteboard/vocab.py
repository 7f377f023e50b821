"""Word- and character-level vocabularies, saved as JSON."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import WhiteboardError

UNK = "<unk>"
EOS = "<eos>"
LEVELS = ("word", "char")


def tokenize_line(line: str, level: str) -> list[str]:
    """Words split on whitespace, or every character (newlines excluded)."""
    return line.split() if level == "word" else list(line)


def tokenize_corpus(text: str, level: str) -> list[str]:
    """Corpus text as tokens: word level adds one ``<eos>`` per line (as the PTB and
    WikiText loaders do); char level keeps ``\\n`` as an ordinary character (char-rnn)."""
    if level == "char":
        return list(text)
    tokens: list[str] = []
    for line in text.splitlines():
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


@dataclass
class Vocabulary:
    level: str
    tokens: list[str]

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise WhiteboardError(f"vocabulary level must be one of {LEVELS}, got {self.level!r}")
        self.index = {token: i for i, token in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise WhiteboardError("vocabulary has duplicate tokens")
        if UNK not in self.index:
            raise WhiteboardError(f"vocabulary has no {UNK} token")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def unk_id(self) -> int:
        return self.index[UNK]

    @classmethod
    def build(cls, text: str, level: str = "word", min_freq: int = 1, max_size: int | None = None) -> "Vocabulary":
        """Tokens by descending frequency (ties: first appearance), then ``<unk>``.

        Tokens seen fewer than ``min_freq`` times, or beyond ``max_size`` (which counts the
        special tokens too), map to ``<unk>``.
        """
        if level not in LEVELS:
            raise WhiteboardError(f"level must be one of {LEVELS}, got {level!r}")
        counts = Counter(tokenize_corpus(text, level))
        specials = [UNK] + ([EOS] if level == "word" else [])
        ordered = sorted(counts.items(), key=lambda kv: -kv[1])  # stable: first seen wins ties
        kept = [tok for tok, n in ordered if n >= min_freq and tok not in specials]
        if max_size is not None:
            if max_size < len(specials) + 1:
                raise WhiteboardError(f"max_size must leave room for at least one token, got {max_size}")
            kept = kept[: max_size - len(specials)]
        return cls(level, specials + kept)

    def encode(self, tokens: list[str]) -> list[int]:
        unk = self.unk_id
        return [self.index.get(tok, unk) for tok in tokens]

    def encode_text(self, text: str, corpus: bool = False) -> list[int]:
        """A prompt (no ``<eos>`` added) or, with ``corpus=True``, a whole corpus text."""
        tokens = tokenize_corpus(text, self.level) if corpus else tokenize_line(text, self.level)
        return self.encode(tokens)

    def unknown(self, text: str) -> list[str]:
        """Tokens of a prompt that the vocabulary does not know (they become <unk>)."""
        return [tok for tok in tokenize_line(text, self.level) if tok not in self.index]

    def decode(self, ids) -> str:
        words = [self.tokens[int(i)] for i in ids]
        if self.level == "char":
            return "".join(words)
        pieces: list[str] = []
        for word in words:
            if word == EOS:
                pieces.append("\n")
            else:
                pieces.append(word if not pieces or pieces[-1] == "\n" else " " + word)
        return "".join(pieces)

    def to_json(self) -> dict:
        return {"level": self.level, "tokens": self.tokens}

    def save(self, path: Path) -> None:
        from .checkpoint import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_json(), ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(data["level"], list(data["tokens"]))
        except FileNotFoundError:
            raise WhiteboardError(f"vocabulary file not found: {path}") from None
        except UnicodeDecodeError as exc:
            raise WhiteboardError(f"vocabulary file {path} is not UTF-8 text (invalid byte at offset {exc.start})") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WhiteboardError(f"vocabulary file {path} is not a whiteboard vocabulary: {exc}") from None
