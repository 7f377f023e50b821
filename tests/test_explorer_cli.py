"""`whiteboard serve` and `inspect --export-states` from the command line: a real server
answers at the URL it prints, a bad run stops it before it starts, and the LSTMVis files hold
the corpus's states."""

import json
import os
import subprocess
import sys
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
h5py = pytest.importorskip("h5py")
yaml = pytest.importorskip("yaml")

from whiteboard.cli import main  # noqa: E402

from explorer_helpers import served, story_corpus, write_runs  # noqa: E402


@pytest.fixture(scope="module")
def run_paths(tmp_path_factory):
    return write_runs(tmp_path_factory.mktemp("runs"))


def test_serve_prints_a_url_that_answers(run_paths, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "whiteboard", "serve", *map(str, run_paths), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.startswith("whiteboard: serving rnn, lstm, gru at http://127.0.0.1:"), line + process.stderr.read()
        url = line.split(" at ")[1].split()[0]
        page = urllib.request.urlopen(url, timeout=30).read().decode()
        assert '<script src="/static/app.js">' in page and "http" not in page.split("<body>")[1]
        info = json.load(urllib.request.urlopen(url + "api/models", timeout=30))
        assert [m["name"] for m in info["models"]] == ["rnn", "lstm", "gru"]
        assert info["corpora"] == ["demo stories (held out)"]
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.parametrize("make_bad, message", [
    (lambda d: d / "missing", "run directory not found"),
    (lambda d: d, "config.json"),
])
def test_a_bad_run_directory_stops_serve_at_start_up(run_paths, tmp_path, capsys, make_bad, message):
    bad = make_bad(tmp_path)
    assert main(["serve", str(run_paths[0]), str(bad), "--port", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("whiteboard: error:") and message in err[0]


def test_serve_refuses_a_bad_port_and_a_bad_corpus(run_paths, tmp_path, capsys):
    assert main(["serve", str(run_paths[0]), "--port", "70000"]) == 2
    assert "--port must be 0..65535" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert main(["serve", str(run_paths[0]), "--corpus", str(tmp_path / "latin1.txt")]) == 1
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_serve_reports_a_port_in_use(run_paths, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", str(run_paths[0]), "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def _trace(run, tokens):
    ids = torch.tensor(run.vocab.encode(tokens)).unsqueeze(1)
    with torch.no_grad():
        return run.model.trace(ids)[2]


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_export_states_writes_what_lstmvis_reads(tmp_path, capsys, monkeypatch, cell):
    from whiteboard.explorer import corpus as corpora

    monkeypatch.setattr(corpora, "CHUNK", 5)  # the states cross chunk boundaries
    (path,) = write_runs(tmp_path / "runs", cells=(cell,), layers=2)
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text(story_corpus(4).text)
    out = tmp_path / "lstmvis" / "states.h5"
    assert main(["inspect", str(path), "--corpus", str(corpus_file), "--export-states", str(out)]) == 0
    assert "lstm_server.py -dir" in capsys.readouterr().out

    (run,) = served([path])
    tokens = corpora.Corpus.from_file(corpus_file).tokens(run)
    trace = _trace(run, tokens)
    config = yaml.safe_load((out.parent / "lstm.yml").read_text())
    state_field = "cell" if cell == "lstm" else "hidden"
    with h5py.File(out, "r") as h5:
        for layer in range(2):
            torch.testing.assert_close(torch.from_numpy(h5[f"states{layer + 1}"][:]),
                                       trace.steps[layer][0][state_field][:, 0], rtol=0, atol=1e-6)
        assert ("output1" in h5) == (cell == "lstm")
        if cell == "lstm":
            torch.testing.assert_close(torch.from_numpy(h5["output2"][:]), trace.steps[1][0]["hidden"][:, 0],
                                       rtol=0, atol=1e-6)
        for entry in config["states"]["types"]:
            assert entry["path"] in h5 and h5[entry["path"]].shape[0] == len(tokens)
    words_file = out.parent / config["files"][config["word_sequence"]["file"]]
    with h5py.File(words_file, "r") as h5:
        ids = h5[config["word_sequence"]["path"]][:].tolist()
    assert ids == run.vocab.encode(tokens)
    # LSTMVis reads its dictionary as "word id" lines split on whitespace
    dict_file = out.parent / config["files"][config["word_sequence"]["dict_file"]]
    mapping = dict(line.split() for line in dict_file.read_text().splitlines())
    assert {int(i): w for w, i in mapping.items()}[ids[0]] == tokens[0]
    assert len(mapping) == len(run.vocab)


def test_export_states_never_overwrites(tmp_path, capsys):
    (path,) = write_runs(tmp_path / "runs", cells=("gru",))
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text(story_corpus(2).text)
    out = tmp_path / "states.h5"
    (tmp_path / "lstm.yml").write_text("mine\n")
    assert main(["inspect", str(path), "--corpus", str(corpus_file), "--export-states", str(out)]) == 1
    assert "would overwrite" in capsys.readouterr().err
    assert (tmp_path / "lstm.yml").read_text() == "mine\n" and not out.exists()
    assert main(["inspect", str(path), "--corpus", str(corpus_file)]) == 2
    assert "go together" in capsys.readouterr().err
    assert main(["inspect", str(path)]) == 2
    assert "give a text" in capsys.readouterr().err

