"""Word- and character-level vocabularies, saved as JSON."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from whiteboard.errors import WhiteboardError
from whiteboard.files import atomic_write_text

UNK = "<unk>"
EOS = "<eos>"
LEVELS = ("word", "char")
#: How word-level text becomes words. "whitespace": split on white space alone, for corpora
#: that come tokenized (PTB, WikiText: "France ." already). "punctuation": punctuation is
#: split from the words too, for text as people type it ("France." -> "France", ".").
TOKENIZERS = ("whitespace", "punctuation")

# A special token (<unk>), a word with inner apostrophes, hyphens or decimal points (don't,
# well-known, 3.14), or any other single non-space character.
_WORD_OR_MARK = re.compile(r"<[A-Za-z]+>|\w+(?:['’.\-]\w+)*|[^\w\s]")


def tokenize_line(line: str, level: str, tokenizer: str = "whitespace") -> list[str]:
    """Words (see TOKENIZERS), or every character (newlines excluded)."""
    if level == "char":
        return list(line)
    return _WORD_OR_MARK.findall(line) if tokenizer == "punctuation" else line.split()


def tokenize_corpus(text: str, level: str, tokenizer: str = "whitespace") -> list[str]:
    """Corpus text as tokens: word level adds one ``<eos>`` per line (as the PTB and
    WikiText loaders do); char level keeps ``\\n`` as an ordinary character (char-rnn)."""
    if level == "char":
        return list(text)
    tokens: list[str] = []
    for line in text.splitlines():
        tokens.extend(tokenize_line(line, level, tokenizer))
        tokens.append(EOS)
    return tokens


def detect_tokenizer(text: str, sample_words: int = 200_000) -> str:
    """"whitespace" for text that comes tokenized, "punctuation" for text as typed. Typed
    text has punctuation attached to words: "further," "(see" or a sentence's last word
    before a capital ("France. She"). Tokenized corpora have none of that: measured on the
    first 200,000 words, PTB 0 % and WikiText-2 0 % (their "mr." and "U.S." are followed by
    lower case or are too rare), Tiny Shakespeare 19 %; the threshold is 1 %."""
    words = text[: sample_words * 8].split()[:sample_words]
    attached = 0
    for word, following in zip(words, words[1:] + [""]):
        if len(word) < 2 or not any(c.isalnum() for c in word):
            continue
        if word[-1] in ",;:!?)\"" or word[0] in "(\"" or (word[-1] == "." and following[:1].isupper()):
            attached += 1
    return "punctuation" if words and attached / len(words) >= 0.01 else "whitespace"


@dataclass
class Vocabulary:
    level: str
    tokens: list[str]
    #: How text is split into words (word level; see TOKENIZERS). Saved with the vocabulary, so
    #: prompts are always split the way the training text was; vocabularies saved before it
    #: existed were whitespace-split.
    tokenizer: str = "whitespace"

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise WhiteboardError(f"vocabulary level must be one of {LEVELS}, got {self.level!r}")
        if self.tokenizer not in TOKENIZERS:
            raise WhiteboardError(f"vocabulary tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
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
    def build(cls, text: str, level: str = "word", min_freq: int = 1, max_size: int | None = None,
              tokenizer: str = "whitespace") -> "Vocabulary":
        """Tokens by descending frequency (ties: first appearance), then ``<unk>``.

        Tokens seen fewer than ``min_freq`` times, or beyond ``max_size`` (which counts the
        special tokens too), map to ``<unk>``.
        """
        if level not in LEVELS:
            raise WhiteboardError(f"level must be one of {LEVELS}, got {level!r}")
        counts = Counter(tokenize_corpus(text, level, tokenizer))
        specials = [UNK] + ([EOS] if level == "word" else [])
        ordered = sorted(counts.items(), key=lambda kv: -kv[1])  # stable: first seen wins ties
        kept = [tok for tok, n in ordered if n >= min_freq and tok not in specials]
        if max_size is not None:
            if max_size < len(specials) + 1:
                raise WhiteboardError(f"max_size must leave room for at least one token, got {max_size}")
            kept = kept[: max_size - len(specials)]
        return cls(level, specials + kept, tokenizer)

    def encode(self, tokens: list[str]) -> list[int]:
        unk = self.unk_id
        return [self.index.get(tok, unk) for tok in tokens]

    def tokenize(self, text: str) -> list[str]:
        """A prompt's tokens, split as this vocabulary's training text was."""
        return tokenize_line(text, self.level, self.tokenizer)

    def encode_text(self, text: str, corpus: bool = False) -> list[int]:
        """A prompt (no ``<eos>`` added) or, with ``corpus=True``, a whole corpus text."""
        tokens = tokenize_corpus(text, self.level, self.tokenizer) if corpus else self.tokenize(text)
        return self.encode(tokens)

    def unknown(self, text: str) -> list[str]:
        """Tokens of a prompt that the vocabulary does not know (they become <unk>)."""
        return [tok for tok in self.tokenize(text) if tok not in self.index]

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
        return {"level": self.level, "tokenizer": self.tokenizer, "tokens": self.tokens}

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_json(), ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(data["level"], list(data["tokens"]), data.get("tokenizer", "whitespace"))
        except FileNotFoundError:
            raise WhiteboardError(f"vocabulary file not found: {path}") from None
        except UnicodeDecodeError as exc:
            raise WhiteboardError(f"vocabulary file {path} is not UTF-8 text (invalid byte at offset {exc.start})") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WhiteboardError(f"vocabulary file {path} is not a whiteboard vocabulary: {exc}") from None
