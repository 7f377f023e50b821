"""Where PyTorch code takes a model besides eager mode: torch.compile (full graph), torch.export
and ONNX. Each layer call is one custom operator there (whiteboard.backends.ops), and a
compiled or exported model computes what the eager one does, gradients included."""

import copy

import numpy as np
import pytest
import torch

import whiteboard
from whiteboard.backends import ops
from whiteboard.lm import config as cfg
from whiteboard.lm.model import LanguageModel

pytestmark = pytest.mark.slow

LAYERS = {
    "lstm": lambda: whiteboard.LSTM(4, 6, num_layers=2),
    "gru-bidirectional": lambda: whiteboard.GRU(4, 6, bidirectional=True),
    "rnn-sigmoid-no-bias": lambda: whiteboard.RNN(4, 6, nonlinearity="sigmoid", bias=False),
    "layernorm-lstm-batch-first": lambda: whiteboard.LayerNormLSTM(4, 6, batch_first=True),
}


def _outputs(result):
    output, state = result
    return [output, *(state if isinstance(state, tuple) else (state,))]


@pytest.mark.parametrize("name", list(LAYERS))
def test_full_graph_compile_gives_eager_outputs_and_gradients(name):
    torch.manual_seed(0)
    eager = LAYERS[name]()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True)
    x = torch.randn(5, 3, 4, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    expected, got = _outputs(eager(x)), _outputs(compiled(x2))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)
    weights = [torch.randn_like(e) for e in expected]
    sum((e * w).sum() for e, w in zip(expected, weights)).backward()
    sum((g * w).sum() for g, w in zip(got, weights)).backward()
    torch.testing.assert_close(x2.grad, x.grad)
    for (name_, p), q in zip(eager.named_parameters(), compiled_layer.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name_)


def test_a_compiled_layer_keeps_its_graph_when_the_length_changes():
    """The operator's fake kernel gives shapes for any T: one graph, no recompilation."""
    torch._dynamo.reset()
    layer = whiteboard.LSTM(4, 6)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for T in (3, 7, 11):
        x = torch.randn(T, 2, 4)
        torch.testing.assert_close(compiled(x)[0], layer(x)[0])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "layernorm-lstm"])
def test_full_graph_compile_of_a_language_model_training_step_matches_eager(cell):
    torch.manual_seed(0)
    config = cfg.resolve(sets=[f"model.cell={cell}", "model.hidden_size=12", "model.embedding_size=12",
                               "model.num_layers=2"]).model
    eager = LanguageModel(30, config)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    tokens = torch.randint(0, 30, (6, 3))
    targets = torch.randint(0, 30, (6, 3))

    def loss_of(model):
        logits, _ = model(tokens, None)
        return torch.nn.functional.cross_entropy(logits.view(-1, 30), targets.view(-1))

    expected, got = loss_of(eager), loss_of(compiled)
    torch.testing.assert_close(got, expected)
    expected.backward()
    got.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_export_gives_one_operator_per_layer_and_direction_and_eager_outputs():
    layer = whiteboard.LSTM(4, 6, num_layers=2, bidirectional=True)
    T = torch.export.Dim("T", min=2)
    exported = torch.export.export(layer, (torch.randn(5, 3, 4),), dynamic_shapes=({0: T},))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count("whiteboard.direction.default") == 4
    x = torch.randn(9, 3, 4)
    for got, expected in zip(_outputs(exported.module()(x)), _outputs(layer(x))):
        torch.testing.assert_close(got, expected)


def test_the_custom_operator_passes_torchs_own_checks():
    """torch.library.opcheck: the fake kernel's shapes, the registered autograd, and that the
    operator is safe to trace (faketensor, aot_dispatch)."""
    torch.manual_seed(0)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    states = [torch.randn(2, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    weights = [torch.randn(20, 3, dtype=torch.float64, requires_grad=True),
               torch.randn(20, 5, dtype=torch.float64, requires_grad=True), torch.empty(0, dtype=torch.float64),
               torch.empty(0, dtype=torch.float64)]  # no bias
    torch.library.opcheck(ops.direction, ("lstm", "tanh", "auto", x, states, weights, None))
    gru_weights = [torch.randn(15, 3, dtype=torch.float64, requires_grad=True),
                   torch.randn(15, 5, dtype=torch.float64, requires_grad=True),
                   torch.randn(15, dtype=torch.float64, requires_grad=True),
                   torch.randn(15, dtype=torch.float64, requires_grad=True)]
    mask = torch.tensor([[True, True], [True, True], [True, False], [True, False]]).unsqueeze(-1)
    torch.library.opcheck(ops.direction, ("gru", "tanh", "auto", x, states[:1], gru_weights, mask))


def test_the_operators_gradient_is_the_eager_layers_in_float64():
    layer = whiteboard.GRU(3, 4, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    weights = list(layer.layer_weights(0, 0))
    assert torch.autograd.gradcheck(
        lambda x_, h_, *w: ops.direction("gru", "tanh", "auto", x_, [h_], list(w), None)[0], (x, h0, *weights))


# ------------------------------------------------------------------------------ ONNX

onnxruntime = pytest.importorskip("onnxruntime")


def _onnx_run(layer, example, inputs, tmp_path):
    from whiteboard.backends.onnx import TRANSLATIONS

    program = torch.onnx.export(layer, (example,), dynamo=True, custom_translation_table=TRANSLATIONS,
                                dynamic_shapes=({0: torch.export.Dim("T"), 1: torch.export.Dim("B")},), verbose=False)
    path = tmp_path / "layer.onnx"
    program.save(str(path))
    operators = [node.op_type for node in program.model_proto.graph.node]
    session = onnxruntime.InferenceSession(str(path))
    return session.run(None, {session.get_inputs()[0].name: inputs.numpy()}), operators


@pytest.mark.parametrize("name,op_type,count", [("lstm", "LSTM", 2), ("gru", "GRU", 2), ("rnn-relu", "RNN", 1),
                                                ("rnn-sigmoid", "RNN", 1)])
def test_onnx_export_uses_onnxs_recurrent_operators_and_matches_in_onnxruntime(name, op_type, count, tmp_path):
    torch.manual_seed(0)
    layer = {"lstm": lambda: whiteboard.LSTM(4, 6, num_layers=2),
             "gru": lambda: whiteboard.GRU(4, 6, bidirectional=True),
             "rnn-relu": lambda: whiteboard.RNN(4, 6, nonlinearity="relu", bias=False),
             "rnn-sigmoid": lambda: whiteboard.RNN(4, 6, nonlinearity="sigmoid")}[name]().eval()
    inputs = torch.randn(11, 2, 4)  # another length and batch than the example
    got, operators = _onnx_run(layer, torch.randn(5, 3, 4), inputs, tmp_path)
    assert operators.count(op_type) == count
    expected = _outputs(layer(inputs))
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e.detach().numpy(), atol=1e-5, rtol=1e-5)


def test_onnx_export_of_a_layer_norm_lstm_says_why_not(tmp_path):
    with pytest.raises(Exception, match="LayerNormLSTM has no ONNX operator"):
        _onnx_run(whiteboard.LayerNormLSTM(4, 6).eval(), torch.randn(5, 3, 4), torch.randn(5, 3, 4), tmp_path)


def test_onnx_export_of_a_projected_lstm_says_why_not(tmp_path):
    with pytest.raises(Exception, match="no projection"):
        _onnx_run(whiteboard.LSTM(4, 6, proj_size=2).eval(), torch.randn(5, 3, 4), torch.randn(5, 3, 4), tmp_path)
