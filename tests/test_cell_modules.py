"""RNNCell, LSTMCell, GRUCell and LayerNormLSTMCell against torch.nn's cells (and the layer-norm
one against a one-step LayerNormLSTM): outputs, every gradient, state dicts both ways,
unbatched input, torch.nn's exceptions, and the trace's gates."""

import pytest
import torch
from torch.autograd import gradcheck

import whiteboard
from helpers import error_of
from whiteboard.nn import cells

PAIRS = {
    "rnn": (whiteboard.RNNCell, torch.nn.RNNCell, {}),
    "rnn-relu": (whiteboard.RNNCell, torch.nn.RNNCell, {"nonlinearity": "relu"}),
    "lstm": (whiteboard.LSTMCell, torch.nn.LSTMCell, {}),
    "gru": (whiteboard.GRUCell, torch.nn.GRUCell, {}),
}
I, H = 5, 7


def _pair(name, bias=True, dtype=torch.float64):
    ours_class, theirs_class, kwargs = PAIRS[name]
    theirs = theirs_class(I, H, bias=bias, dtype=dtype, **kwargs)
    ours = ours_class(I, H, bias=bias, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _state(name, batch, dtype=torch.float64):
    shape = (batch, H) if batch is not None else (H,)
    if name == "lstm":
        return (torch.randn(shape, dtype=dtype, requires_grad=True), torch.randn(shape, dtype=dtype, requires_grad=True))
    return torch.randn(shape, dtype=dtype, requires_grad=True)


def _flat(result):
    return list(result) if isinstance(result, tuple) else [result]


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("batch", [0, 1, 3, None], ids=["batch0", "batch1", "batch3", "unbatched"])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_cells_match_torch_nn_in_outputs_and_every_gradient(name, batch, with_state, bias):
    ours, theirs = _pair(name, bias)
    x = torch.randn((batch, I) if batch is not None else (I,), dtype=torch.float64, requires_grad=True)
    hx = _state(name, batch) if with_state else None
    got, expected = _flat(ours(x, hx)), _flat(theirs(x, hx))
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e)
    if batch == 0:
        return
    weights = [torch.randn_like(e) for e in expected]
    inputs = [x, *([*_flat(hx)] if with_state else []), *theirs.parameters()]
    ours_inputs = [x, *([*_flat(hx)] if with_state else []), *ours.parameters()]
    expected_grads = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, weights)), inputs)
    got_grads = torch.autograd.grad(sum((g * w).sum() for g, w in zip(_flat(ours(x, hx)), weights)), ours_inputs)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru", "layernorm-lstm", "rnn-sigmoid"])
def test_gradcheck_float64(name):
    if name == "layernorm-lstm":
        cell = whiteboard.LayerNormLSTMCell(3, 4, dtype=torch.float64)
    elif name == "rnn-sigmoid":
        cell = whiteboard.RNNCell(3, 4, nonlinearity="sigmoid", dtype=torch.float64)
    else:
        cell = PAIRS[name][0](3, 4, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    if "lstm" in name:
        assert gradcheck(lambda x_, h_, c_, *p: torch.func.functional_call(cell, dict(zip(
            [n for n, _ in cell.named_parameters()], p)), (x_, (h_, c_))), (x, h, c, *cell.parameters()))
    else:
        assert gradcheck(lambda x_, h_, *p: torch.func.functional_call(cell, dict(zip(
            [n for n, _ in cell.named_parameters()], p)), (x_, h_)), (x, h, *cell.parameters()))


@pytest.mark.parametrize("name", list(PAIRS))
def test_state_dicts_load_both_ways_and_attributes_match(name):
    ours, theirs = _pair(name, dtype=torch.float32)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    fresh = PAIRS[name][1](I, H, **PAIRS[name][2])
    fresh.load_state_dict(ours.state_dict())
    for a, b in zip(fresh.parameters(), ours.parameters()):
        assert torch.equal(a, b)
    for attribute in ("input_size", "hidden_size", "bias"):
        assert getattr(ours, attribute) == getattr(theirs, attribute)
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]


def test_initialisation_is_torch_nns_uniform():
    torch.manual_seed(0)
    ours = whiteboard.LSTMCell(4, 100)
    bound = 1 / 100 ** 0.5
    for p in ours.parameters():
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound  # spread over the whole range



@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("case", ["rank3-input", "wrong-input-size", "wrong-batch", "wrong-hidden", "rank3-state"])
def test_errors_are_torch_nns(name, case):
    ours, theirs = _pair(name, dtype=torch.float32)
    x = torch.randn(3, I)
    state = (torch.randn(3, H), torch.randn(3, H)) if name == "lstm" else torch.randn(3, H)
    if case == "rank3-input":
        x = torch.randn(2, 3, I)
    elif case == "wrong-input-size":
        x = torch.randn(3, I + 1)
    elif case == "wrong-batch":
        state = (torch.randn(2, H), torch.randn(2, H)) if name == "lstm" else torch.randn(2, H)
    elif case == "wrong-hidden":
        state = (torch.randn(3, H), torch.randn(3, H + 1)) if name == "lstm" else torch.randn(3, H + 1)
    else:
        state = (torch.randn(1, 3, H), torch.randn(3, H)) if name == "lstm" else torch.randn(1, 3, H)
    expected = error_of(lambda: theirs(x, state))
    assert expected is not None
    assert error_of(lambda: ours(x, state)) == expected


def test_unknown_nonlinearity_fails_where_torch_nns_does():
    ours, theirs = whiteboard.RNNCell(3, 4, nonlinearity="gelu"), torch.nn.RNNCell(3, 4, nonlinearity="gelu")
    x = torch.randn(2, 3)
    assert error_of(lambda: ours(x)) == error_of(lambda: theirs(x)) is not None


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("batched", [True, False])
def test_trace_returns_the_steps_gates_from_the_cell_equations(name, batched):
    ours, _ = _pair(name)
    x = torch.randn((2, I) if batched else (I,), dtype=torch.float64)
    result, fields = ours.trace(x)
    mode = ours.mode
    assert list(fields) == list(cells.TRACE_FIELDS[mode])
    x2 = x if batched else x.unsqueeze(0)
    zeros = x2.new_zeros(x2.shape[0], H)
    step = {"RNN": lambda: cells.rnn_step(x2, zeros, *ours._weights()),
            "LSTM": lambda: cells.lstm_step(x2, zeros, zeros, *ours._weights()),
            "GRU": lambda: cells.gru_step(x2, zeros, *ours._weights())}[mode]()
    for field, value in fields.items():
        expected = getattr(step, field)
        torch.testing.assert_close(value, expected if batched else expected.squeeze(0))
    torch.testing.assert_close(_flat(result)[0], fields["hidden"])


def test_layernorm_lstm_cell_is_one_step_of_the_layer():
    layer = whiteboard.LayerNormLSTM(I, H, dtype=torch.float64)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-0.5, 1.5)
    cell = whiteboard.LayerNormLSTMCell(I, H, dtype=torch.float64)
    cell.load_state_dict({name.removesuffix("_l0"): value for name, value in layer.state_dict().items()})
    x = torch.randn(3, I, dtype=torch.float64)
    h0, c0 = torch.randn(1, 3, H, dtype=torch.float64), torch.randn(1, 3, H, dtype=torch.float64)
    _, (h_n, c_n) = layer(x.unsqueeze(0), (h0, c0))
    h, c = cell(x, (h0[0], c0[0]))
    torch.testing.assert_close(h, h_n[0])
    torch.testing.assert_close(c, c_n[0])
    assert torch.equal(whiteboard.LayerNormLSTMCell(2, 3).gain_hh, torch.ones(12))


def test_a_decoder_loop_of_cells_equals_the_layer():
    """What the cells are for: a loop over time written by the caller."""
    layer = whiteboard.GRU(I, H)
    cell = whiteboard.GRUCell(I, H)
    cell.load_state_dict({name.removesuffix("_l0"): value for name, value in layer.state_dict().items()})
    x = torch.randn(6, 2, I)
    h = torch.zeros(2, H)
    outputs = []
    for t in range(6):
        h = cell(x[t], h)
        outputs.append(h)
    expected, _ = layer(x)
    torch.testing.assert_close(torch.stack(outputs), expected)
