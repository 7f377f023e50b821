"""whiteboard export: a trained run loads into plain torch.nn modules (with the loader script
it writes, in a process that never imports whiteboard) and into onnxruntime, and both give
the run's next-word probabilities."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from whiteboard.cli import main
from whiteboard.lm.checkpoint import load_run
from lm_helpers import TINY, write_corpus

pytestmark = pytest.mark.slow


def _train(tmp, *sets):
    corpus = write_corpus(tmp / "c.txt")
    run = tmp / "run"
    extra = [item for s in sets for item in ("--set", s)]
    assert main(["train", str(corpus), "--run-dir", str(run), "--set", "train.epochs=1", *TINY, *extra]) == 0
    return run


@pytest.fixture(scope="module")
def two_layer_lstm(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("export-lstm"), "model.num_layers=2")


def _probabilities(run, tokens):
    model, vocab, _ = load_run(run)
    ids = torch.tensor([[vocab.index[t]] for t in tokens])
    with torch.no_grad():
        logits, _ = model(ids)
    return torch.softmax(logits[:, 0], -1).numpy(), vocab


LOADER_CHECK = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
assert "whiteboard" not in sys.modules
from load_model import load
model, vocab = load(sys.argv[1])
ids = torch.tensor([[vocab.index(t)] for t in json.loads(sys.argv[2])])
with torch.no_grad():
    logits, _ = model(ids)
print(json.dumps(torch.softmax(logits[:, 0], -1).tolist()))
assert "whiteboard" not in sys.modules, "the loader must not need whiteboard"
"""


@pytest.mark.parametrize("setting", [["model.num_layers=2"], ["model.cell=gru"],
                                     ["model.cell=rnn", "model.nonlinearity=relu"],
                                     ["model.embedding_size=12", "model.tie_weights=true", "model.num_layers=2"]],
                         ids=["lstm-2-layers", "gru", "rnn-relu", "lstm-tied-stack-of-sizes"])
def test_torch_export_loads_into_torch_nn_without_whiteboard(setting, tmp_path, capsys):
    run = _train(tmp_path, *setting)
    out = tmp_path / "exported"
    assert main(["export", str(run), "--format", "torch", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "load_model.py", "model.safetensors"]
    assert len((out / "load_model.py").read_text().splitlines()) <= 35
    tokens = ["the", "cat", "sat"]
    expected, _ = _probabilities(run, tokens)
    env_free = subprocess.run([sys.executable, "-I", "-c", LOADER_CHECK, str(out), json.dumps(tokens)],
                              capture_output=True, text=True, timeout=300)
    assert env_free.returncode == 0, env_free.stderr
    np.testing.assert_allclose(np.array(json.loads(env_free.stdout)), expected, atol=1e-6, rtol=1e-5)


def test_onnx_export_gives_the_runs_probabilities_in_onnxruntime(two_layer_lstm, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    assert main(["export", str(two_layer_lstm), "--format", "onnx", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx"]
    tokens = ["the", "cat", "sat", "on"]
    expected, vocab = _probabilities(two_layer_lstm, tokens)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    names = [i.name for i in session.get_inputs()]
    assert names == ["tokens", "h", "c"]
    zeros = np.zeros((2, 1, 16), dtype=np.float32)
    ids = np.array([[vocab.index[t]] for t in tokens], dtype=np.int64)
    logits = session.run(None, {"tokens": ids, "h": zeros, "c": zeros})[0]
    probabilities = torch.softmax(torch.from_numpy(logits[:, 0]), -1).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-6, rtol=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab"] == vocab.tokens and config["sizes"] == [16, 16]


def test_export_refuses_what_it_cannot_write_in_one_line_and_writes_nothing(two_layer_lstm, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    assert main(["export", str(two_layer_lstm), "--out", str(taken)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("whiteboard: error:") and "not an empty folder" in err[0]
    assert [p.name for p in taken.iterdir()] == ["mine.txt"] and (taken / "mine.txt").read_text() == "keep me"
    (tmp_path / "ln").mkdir()
    layer_norm = _train(tmp_path / "ln", "model.cell=layernorm-lstm")
    assert main(["export", str(layer_norm), "--out", str(tmp_path / "ln-out")]) == 1
    assert "layer-normalized LSTM" in capsys.readouterr().err
    assert not (tmp_path / "ln-out").exists()
    assert not [p for p in tmp_path.iterdir() if ".export-" in p.name]  # no staging folder left behind
