import json

import pytest

from whiteboard.errors import WhiteboardError
from whiteboard.vocab import EOS, UNK, Vocabulary, tokenize_corpus


def test_word_vocabulary_round_trip_and_eos_per_line(tmp_path):
    text = "the cat sat\nthe dog\n"
    vocab = Vocabulary.build(text, "word")
    assert vocab.tokens[:2] == [UNK, EOS]
    assert tokenize_corpus(text, "word") == ["the", "cat", "sat", EOS, "the", "dog", EOS]
    ids = vocab.encode_text(text, corpus=True)
    assert vocab.decode(ids) == "the cat sat\nthe dog\n"
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded.tokens == vocab.tokens and loaded.level == "word"
    assert json.loads((tmp_path / "vocab.json").read_text())["level"] == "word"


def test_char_vocabulary_keeps_newlines_and_round_trips():
    text = "To be,\nor not.\n"
    vocab = Vocabulary.build(text, "char")
    assert "\n" in vocab.index and EOS not in vocab.index
    assert vocab.decode(vocab.encode_text(text, corpus=True)) == text


def test_min_freq_and_max_size_map_rare_words_to_unk():
    text = "a a a b b c\n"
    assert Vocabulary.build(text, min_freq=2).tokens == [UNK, EOS, "a", "b"]
    assert Vocabulary.build(text, max_size=3).tokens == [UNK, EOS, "a"]
    vocab = Vocabulary.build(text, min_freq=3)
    assert vocab.encode_text("a c zebra") == [vocab.index["a"], vocab.unk_id, vocab.unk_id]
    assert vocab.unknown("a c zebra") == ["c", "zebra"]


def test_bad_vocabulary_files_are_named(tmp_path):
    with pytest.raises(WhiteboardError, match="vocabulary file not found"):
        Vocabulary.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(WhiteboardError, match="not a whiteboard vocabulary"):
        Vocabulary.load(tmp_path / "bad.json")
