import json

import pytest

from whiteboard.errors import WhiteboardError
from whiteboard.lm.vocab import EOS, UNK, Vocabulary, tokenize_corpus


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


def test_punctuation_is_split_from_words_as_people_type_them():
    from whiteboard.lm.vocab import tokenize_line

    typed = "Alice lives in France. She is an artist. She likes to cook. She speaks"
    assert tokenize_line(typed, "word", "punctuation") == \
        "Alice lives in France . She is an artist . She likes to cook . She speaks".split()
    assert tokenize_line("I don't know, it's 3.14 (well-known) <unk>!", "word", "punctuation") == \
        ["I", "don't", "know", ",", "it's", "3.14", "(", "well-known", ")", "<unk>", "!"]
    assert tokenize_line("France. She", "word", "whitespace") == ["France.", "She"]


def test_the_tokenizer_is_detected_from_the_text():
    from whiteboard.lm.vocab import detect_tokenizer

    assert detect_tokenizer("Alice lives in France. She is an artist. She likes to cook.\n" * 20) == "punctuation"
    assert detect_tokenizer("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20) == "punctuation"
    # tokenized corpora: PTB's lower-case abbreviations, WikiText's spaced punctuation
    assert detect_tokenizer("the company mr. <unk> said N million , up from $ N .\n" * 20) == "whitespace"
    assert detect_tokenizer(" = Valkyria Chronicles III = \n The game @-@ play , as in U.S. states .\n" * 20) == \
        "whitespace"


def test_the_tokenizer_is_saved_and_old_vocabularies_load_as_whitespace(tmp_path):
    vocab = Vocabulary.build("Alice lives in France.\nShe cooks.\n", tokenizer="punctuation")
    assert "France" in vocab.index and "." in vocab.index and "France." not in vocab.index
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded.tokenizer == "punctuation"
    assert loaded.encode_text("She lives in France.") == vocab.encode(["She", "lives", "in", "France", "."])
    (tmp_path / "old.json").write_text(json.dumps({"level": "word", "tokens": [UNK, EOS, "France", "."]}))
    old = Vocabulary.load(tmp_path / "old.json")
    assert old.tokenizer == "whitespace" and old.unknown("France.") == ["France."]
