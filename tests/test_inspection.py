"""Inspection: the numbers shown are the model's own, and the report stands alone."""

import html.parser
import json
import re

import pytest
import torch

import whiteboard
from whiteboard.lm import config as cfg
from whiteboard.lm.generate import predict_next
from whiteboard.inspect.traces import (build_report, correlated_units, gradient_reach, lm_gradient_reach, pattern_signal,
                                   saturation, trace_text)
from whiteboard.lm.model import LanguageModel
from whiteboard.lm.vocab import Vocabulary

TEXT = 'the cat said " hello there " and the dog ran\nto the park'


@pytest.fixture(params=["lstm", "gru", "rnn"])
def lm(request):
    torch.manual_seed(0)
    vocab = Vocabulary.build(TEXT + "\n", "word")
    config = cfg.resolve(sets=[f"model.cell={request.param}", "model.embedding_size=8", "model.hidden_size=10",
                               "model.num_layers=2"])
    return LanguageModel(len(vocab), config.model).eval(), vocab


def test_traced_states_and_predictions_are_the_models_own(lm):
    model, vocab = lm
    text = "the cat said hello and the dog"
    traced = trace_text(model, vocab, text, top_k=3)
    ids = torch.tensor(vocab.encode_text(text)).unsqueeze(1)
    with torch.no_grad():
        emb = model.embedding(ids)
        output, _ = model.recurrent(emb)
    torch.testing.assert_close(traced.layers[-1]["hidden"], output[:, 0])
    words = text.split()
    for t in range(len(words)):
        expected = predict_next(model, vocab, " ".join(words[: t + 1]), 3)
        assert [p.token for p in traced.predictions[t]] == [p.token for p in expected]
        assert [p.probability for p in traced.predictions[t]] == pytest.approx([p.probability for p in expected], rel=1e-5)


def test_gradient_reach_of_a_linear_one_unit_rnn_is_w_to_the_k():
    """h_t = relu(u x_t + w h_{t-1}) is linear while everything is positive, so
    d h_t / d x_{t-k} = u w^k exactly."""
    w, u = 0.8, 1.5
    rnn = whiteboard.RNN(1, 1, nonlinearity="relu", bias=False).double()
    with torch.no_grad():
        rnn.weight_hh_l0.fill_(w)
        rnn.weight_ih_l0.fill_(u)
    x = torch.rand(12, 1, 1, dtype=torch.float64) + 0.1
    reach = gradient_reach(lambda inputs: rnn(inputs)[0], x, lambda out, t: out[t].sum())
    expected = torch.tensor([u * w**k for k in range(12)], dtype=torch.float64)
    torch.testing.assert_close(reach, expected)


def test_lstm_gradient_reaches_further_than_an_rnns_with_saturated_tanh():
    """The seed's claim in miniature: an RNN whose tanh saturates (weights scaled up 4x)
    passes back almost nothing from 20 tokens on; an LSTM with forget gates open passes back
    orders of magnitude more."""
    torch.manual_seed(0)
    vocab = Vocabulary.build(TEXT + "\n", "word")
    build = lambda cell: LanguageModel(len(vocab), cfg.resolve(sets=[f"model.cell={cell}", "model.embedding_size=8", "model.hidden_size=10"]).model)  # noqa: E731
    rnn, lstm = build("rnn"), build("lstm")
    with torch.no_grad():
        for name, param in rnn.recurrent.named_parameters():
            param.mul_(4.0)  # saturate the tanh
        for name, param in lstm.recurrent.named_parameters():
            if name.startswith("bias"):
                param[10:20] = 3.0  # forget gates open: the cell is carried
    text = " ".join(["the cat said hello and the dog ran to the park"] * 3)
    reach = {"rnn": lm_gradient_reach(rnn, vocab, text), "lstm": lm_gradient_reach(lstm, vocab, text)}
    assert reach["rnn"].shape == reach["lstm"].shape == (len(text.split()) - 1,)
    assert reach["rnn"][0] > 0 and reach["lstm"][0] > 0
    for lag in (20, 25):
        assert reach["lstm"][lag] > 100 * reach["rnn"][lag], (lag, reach["lstm"][lag], reach["rnn"][lag])


def test_saturation_shares_are_the_shares_of_gate_values_past_each_threshold(lm):
    model, vocab = lm
    traced = trace_text(model, vocab, TEXT)
    stats = saturation(traced)
    assert len(stats) == 2
    for layer, values in zip(stats, traced.layers):
        for gate, shares in layer.items():
            assert shares["below"] == pytest.approx(float((values[gate] < 0.1).float().mean()))
            assert shares["above"] == pytest.approx(float((values[gate] > 0.9).float().mean()))
    if traced.mode == "LSTM":  # forget gates forced shut and wide open: all below, then all above
        for value, side in ((-20.0, "below"), (20.0, "above")):
            with torch.no_grad():
                for name, param in model.recurrent.named_parameters():
                    if name.startswith("bias_hh"):
                        param[10:20] = value
            forced = saturation(trace_text(model, vocab, TEXT))
            assert all(layer["forget_gate"][side] == 1.0 for layer in forced)


def test_patterns_and_correlated_units():
    tokens = 'a " b c " d'.split()
    assert pattern_signal(tokens, "inside-quotes", "word").tolist() == [0, 1, 1, 1, 1, 0]
    assert pattern_signal(["a", "b", "<eos>", "c"], "line-position", "word").tolist() == [0, 1, 2, 0]
    assert pattern_signal(["She", "he", "She"], "regex:^She$", "word").tolist() == [1, 0, 1]
    signal = torch.tensor([0.0, 1, 0, 1, 0])
    values = torch.stack([torch.randn(5), signal * 3 + 1, -signal], dim=1)
    ranked = correlated_units(values, signal, 2)
    assert {ranked[0][0], ranked[1][0]} == {1, 2}
    assert ranked[0][1] == pytest.approx(1.0) or ranked[0][1] == pytest.approx(-1.0)


class _WellFormed(html.parser.HTMLParser):
    VOID = {"meta", "img", "br", "hr", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def test_report_is_self_contained_and_well_formed(lm, tmp_path):
    model, vocab = lm
    out = tmp_path / "report.html"
    result = build_report(model, vocab, TEXT, out, unit_count=4, pattern="inside-quotes", reach_models={"M": model})
    text = out.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", text), "every resource must be inlined"
    assert "http://" not in text and "https://" not in text
    parser = _WellFormed()
    parser.feed(text)
    assert parser.errors == [] and parser.stack == []
    data = json.loads(re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', text, re.S).group(1))
    tokens = TEXT.split()
    assert data["tokens"] == tokens
    fields = {"lstm": 4, "gru": 4, "rnn": 2}[model.config.cell]
    assert len(data["heatmaps"]) == 2 * fields
    # A heatmap's numbers are the traced ones.
    traced = result["trace"]
    first = data["heatmaps"][0]
    name = first["id"].split("-", 2)[2]
    expected = traced.layers[0][name][:, first["units"][0]]
    assert first["values"][0] == pytest.approx(expected.tolist(), abs=1e-4)
    for key in ("layer0", "layer1", "reach"):
        assert open(result["files"][key], "rb").read(4) == b"\x89PNG"


def test_inspect_and_reach_through_the_cli(tmp_path, capsys):
    from whiteboard.lm.checkpoint import save_model, save_run_files
    from whiteboard.cli import main

    vocab = Vocabulary.build(TEXT + "\n", "word")
    config = cfg.resolve(sets=["model.embedding_size=8", "model.hidden_size=6"])
    run = tmp_path / "run"
    save_run_files(run, config, vocab)
    save_model(run, LanguageModel(len(vocab), config.model), 0)
    assert main(["inspect", str(run), "the cat said zebra", "--out", str(tmp_path / "r.html"), "--units", "0,5"]) == 0
    assert "zebra" in capsys.readouterr().err
    assert main(["inspect", str(run), "the cat", "--out", str(tmp_path / "r.html"), "--units", "0,6"]) == 1
    assert "out of range" in capsys.readouterr().err
    assert main(["reach", str(run), "--text", "the cat said hello there", "--out", str(tmp_path / "reach.png"), "--json"]) == 0
    curves = json.loads(capsys.readouterr().out)
    assert len(curves["LSTM"]) == 4
