"""LSTM with projections (proj_size, LSTMP: Sak et al. 2014) against torch.nn.LSTM: outputs,
states and every gradient on each implementation that runs it, state dicts both ways,
torch.nn's argument and state checks, and the backends' reasons."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.utils.rnn import pack_padded_sequence

import whiteboard
from helpers import error_of
from whiteboard import backends
from whiteboard.backends.projection import FusedLSTMP

I, H, P = 4, 7, 3


def _pair(implementation, dtype=torch.float64, **kwargs):
    theirs = torch.nn.LSTM(I, H, proj_size=P, dtype=dtype, **kwargs)
    ours = whiteboard.LSTM(I, H, proj_size=P, dtype=dtype, implementation=implementation, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _compare(ours, theirs, x, hx=None, lengths=None):
    def run(layer, x_, hx_):
        inputs = pack_padded_sequence(x_, lengths, enforce_sorted=False) if lengths is not None else x_
        output, (h, c) = layer(inputs, hx_)
        return [output.data if lengths is not None else output, h, c]

    x2 = x.detach().clone().requires_grad_()
    hx2 = None if hx is None else tuple(s.detach().clone().requires_grad_() for s in hx)
    got, expected = run(ours, x, hx), run(theirs, x2, hx2)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    if x.shape[1] == 0:
        return
    weights = [torch.randn_like(e) for e in expected]
    ours_inputs = [x, *(hx or ()), *ours.parameters()]
    theirs_inputs = [x2, *(hx2 or ()), *theirs.parameters()]
    got_grads = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), ours_inputs)
    expected_grads = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, weights)), theirs_inputs)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("implementation", ["auto", "fused", "reference"])
@pytest.mark.parametrize("T", [1, 2, 6])
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("shape", ["plain", "2-layers-bidirectional", "no-bias-batch-first"])
def test_projected_lstm_matches_torch_nn(implementation, T, batch, shape):
    kwargs = {"plain": {}, "2-layers-bidirectional": {"num_layers": 2, "bidirectional": True},
              "no-bias-batch-first": {"bias": False}}[shape]
    ours, theirs = _pair(implementation, **kwargs)
    x = torch.randn(T, batch, I, dtype=torch.float64, requires_grad=True)
    _compare(ours, theirs, x)
    if batch:
        D = 2 if kwargs.get("bidirectional") else 1
        L = kwargs.get("num_layers", 1)
        hx = (torch.randn(L * D, batch, P, dtype=torch.float64, requires_grad=True),
              torch.randn(L * D, batch, H, dtype=torch.float64, requires_grad=True))
        _compare(ours, theirs, x, hx)


@pytest.mark.parametrize("implementation", ["auto", "fused", "reference"])
def test_packed_and_unbatched_projected_lstm_match_torch_nn(implementation):
    ours, theirs = _pair(implementation, num_layers=2)
    x = torch.randn(6, 3, I, dtype=torch.float64, requires_grad=True)
    _compare(ours, theirs, x, lengths=torch.tensor([6, 2, 4]))
    single = torch.randn(5, I, dtype=torch.float64)
    for g, e in zip(ours(single)[1], theirs(single)[1]):
        torch.testing.assert_close(g, e)


def test_the_projected_function_passes_gradcheck_and_gradgradcheck():
    x = torch.randn(3, 2, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, P, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, H, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(shape, dtype=torch.float64, requires_grad=True)
               for shape in ((4 * H, I), (4 * H, P), (4 * H,), (4 * H,), (P, H))]
    mask = torch.tensor([[True, True], [True, False], [True, False]]).unsqueeze(-1)
    for m in (None, mask):
        assert gradcheck(lambda *a: FusedLSTMP.apply(*a, m), (x, h0, c0, *weights))
    assert gradgradcheck(lambda *a: FusedLSTMP.apply(*a, None), (x, h0, c0, *weights))


def test_state_dicts_names_shapes_and_repr_are_torch_nns():
    ours, theirs = _pair("auto", dtype=torch.float32, num_layers=2, bidirectional=True)
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert repr(ours) == repr(theirs).replace("LSTM(", "LSTM(", 1)
    assert ours.proj_size == P and whiteboard.LSTM(I, H, 1, True, False, 0.0, False, 2).proj_size == 2  # positional



@pytest.mark.parametrize("build", [
    lambda nn: nn.LSTM(I, H, proj_size=-1),
    lambda nn: nn.LSTM(I, H, proj_size=H),
    lambda nn: nn.GRU(I, H, proj_size=2),
    lambda nn: nn.RNN(I, H, proj_size=0),
], ids=["negative", "not-smaller", "gru", "rnn"])
def test_constructor_errors_are_torch_nns(build):
    expected = error_of(lambda: build(torch.nn))
    assert expected is not None and error_of(lambda: build(whiteboard)) == expected


@pytest.mark.parametrize("case", ["h-hidden-size", "c-projected-size"])
def test_state_size_errors_are_torch_nns(case):
    ours, theirs = _pair("auto", dtype=torch.float32)
    x = torch.randn(5, 2, I)
    hx = (torch.randn(1, 2, H), torch.randn(1, 2, H)) if case == "h-hidden-size" else \
        (torch.randn(1, 2, P), torch.randn(1, 2, P))
    expected = error_of(lambda: theirs(x, hx))
    assert expected is not None and error_of(lambda: ours(x, hx)) == expected


def test_layer_norm_lstm_refuses_a_projection():
    with pytest.raises(ValueError, match="proj_size"):
        whiteboard.LayerNormLSTM(I, H, proj_size=2)


def test_the_compiled_backend_says_why_it_does_not_run_a_projection():
    ours, _ = _pair("auto", dtype=torch.float32)
    explanation = backends.explain(ours, torch.randn(5, 2, I))
    assert explanation.chosen == "torch-loop"
    assert "proj_size" in explanation.reasons["compiled"]
    with pytest.raises(RuntimeError, match="proj_size"):
        _pair("native", dtype=torch.float32)[0](torch.randn(5, 2, I))


def test_a_trace_of_a_projected_lstm_has_projected_hidden_states():
    ours, theirs = _pair("auto")
    x = torch.randn(5, 2, I, dtype=torch.float64)
    output, _, trace = ours.trace(x)
    assert trace.get("hidden", layer=0).shape == (5, 2, P) and trace.get("cell", layer=0).shape == (5, 2, H)
    torch.testing.assert_close(output, theirs(x)[0])


@pytest.mark.slow
def test_full_graph_compile_and_export_of_a_projected_lstm():
    ours, theirs = _pair("auto", dtype=torch.float32, num_layers=2)
    x = torch.randn(5, 2, I)
    compiled = torch.compile(ours, fullgraph=True)
    torch.testing.assert_close(compiled(x)[0], theirs(x)[0])
    exported = torch.export.export(ours, (x,))
    torch.testing.assert_close(exported.module()(x)[0], theirs(x)[0])
