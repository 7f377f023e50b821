import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from whiteboard.lm import data
from whiteboard.errors import WhiteboardError


def test_batchify_makes_parallel_columns():
    streams = data.batchify(torch.arange(26), 4)
    assert streams.shape == (6, 4)
    assert streams[:, 0].tolist() == list(range(6))
    assert streams[:, 1].tolist() == list(range(6, 12))


def test_windows_shift_targets_by_one_token_and_cover_the_stream():
    streams = data.batchify(torch.arange(40), 2)  # (20, 2)
    seen = []
    for window in data.windows(streams, 6):
        assert torch.equal(window.targets, streams[window.start + 1 : window.start + 1 + window.inputs.shape[0]])
        assert window.inputs.shape == window.targets.shape
        seen.extend(window.inputs[:, 0].tolist())
    assert seen == list(range(19))  # every position but the last has a target


def test_windows_resume_mid_stream_and_variable_length_is_seeded():
    streams = data.batchify(torch.arange(400), 2)
    full = [w.start for w in data.windows(streams, 10)]
    assert [w.start for w in data.windows(streams, 10, start=full[3])] == full[3:]
    lengths = lambda seed: [w.inputs.shape[0] for w in data.windows(streams, 10, generator=torch.Generator().manual_seed(seed), variable=True)]  # noqa: E731
    assert lengths(1) == lengths(1)
    assert lengths(1) != lengths(2)
    assert all(n >= 5 for n in lengths(1)[:-1])


def test_split_text_is_contiguous_and_deterministic():
    text = "".join(f"line {i}\n" for i in range(100))
    parts = data.split_text(text, (0.8, 0.1, 0.1))
    assert parts["train"].splitlines()[-1] == "line 79"
    assert parts["valid"].splitlines()[0] == "line 80"
    assert "".join(parts.values()) == text


def test_folder_with_split_files_and_folder_of_txt(tmp_path):
    (tmp_path / "a").mkdir()
    for split in ("train", "valid", "test"):
        (tmp_path / "a" / f"{split}.txt").write_text(f"{split} words\n")
    texts, level = data.load_corpus(str(tmp_path / "a"))
    assert texts["valid"] == "valid words\n" and level is None
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "1.txt").write_text("".join(f"x{i}\n" for i in range(10)))
    (tmp_path / "b" / "2.txt").write_text("".join(f"y{i}\n" for i in range(10)))
    texts, _ = data.load_corpus(str(tmp_path / "b"))
    assert texts["train"].startswith("x0\n") and texts["test"].endswith("y9\n")


def test_a_folder_with_two_sets_of_split_files_is_refused_not_guessed(tmp_path):
    """Like PTB's own folder: ptb.train.txt beside ptb.char.train.txt."""
    for prefix in ("ptb", "ptb.char"):
        for split in ("train", "valid", "test"):
            (tmp_path / f"{prefix}.{split}.txt").write_text(f"{prefix} {split}\n")
    with pytest.raises(WhiteboardError, match=r"2 train files \(ptb.char.train.txt, ptb.train.txt\)"):
        data.load_corpus(str(tmp_path))
    (tmp_path / "ptb.char.train.txt").unlink()
    (tmp_path / "ptb.char.valid.txt").unlink()
    (tmp_path / "ptb.char.test.txt").unlink()
    texts, _ = data.load_corpus(str(tmp_path))
    assert texts["train"] == "ptb train\n"


def test_non_utf8_input_names_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("fine\nalso fine\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(WhiteboardError, match="not UTF-8 text: invalid byte 0xe9 on line 3"):
        data.read_utf8(path)


def test_missing_corpus_and_unknown_name(tmp_path):
    with pytest.raises(WhiteboardError, match="corpus not found"):
        data.load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(WhiteboardError, match="ptb.train.txt not found in"):
        data.locate_named("ptb", tmp_path)


def _fake_corpus(monkeypatch, tmp_path, url="http://127.0.0.1:1/none", content=b"hello world\n"):
    sha = hashlib.sha256(content).hexdigest()
    fake = data.NamedCorpus("fake", "word", {"all": data.CorpusFile("fake.txt", sha, url)})
    monkeypatch.setitem(data.CORPORA, "fake", fake)
    return sha


def test_named_corpus_checksum_is_verified(monkeypatch, tmp_path):
    _fake_corpus(monkeypatch, tmp_path)
    (tmp_path / "fake.txt").write_bytes(b"tampered\n")
    with pytest.raises(WhiteboardError, match="checksum mismatch for .*fake.txt: expected sha256"):
        data.locate_named("fake", tmp_path)
    (tmp_path / "fake.txt").write_bytes(b"hello world\n")
    assert data.locate_named("fake", tmp_path)["all"] == tmp_path / "fake.txt"


@pytest.fixture
def loopback_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_from_loopback_server_is_verified_and_atomic(monkeypatch, tmp_path, loopback_server):
    served, base = loopback_server
    (served / "fake.txt").write_bytes(b"hello world\n")
    _fake_corpus(monkeypatch, tmp_path, url=base + "fake.txt")
    cache = tmp_path / "cache"
    paths = data.locate_named("fake", cache, download=True)
    assert paths["all"].read_bytes() == b"hello world\n"
    # A corrupted download is refused and leaves nothing behind.
    (served / "fake.txt").write_bytes(b"corrupted\n")
    other = tmp_path / "cache2"
    with pytest.raises(WhiteboardError, match="checksum mismatch"):
        data.locate_named("fake", other, download=True)
    assert not [p for p in Path(other).rglob("*") if p.is_file()]


def test_too_short_corpus_is_refused():
    with pytest.raises(WhiteboardError, match="too short for batch size 4"):
        data.check_long_enough(torch.arange(7), 4, "train")
