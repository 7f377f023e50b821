"""The reference cells against torch.nn's own single-step cells."""

import pytest
import torch

from whiteboard.nn import cells


def _copy_cell(ref, bias=True):
    return (ref.weight_ih, ref.weight_hh, ref.bias_ih if bias else None, ref.bias_hh if bias else None)


@pytest.mark.parametrize("bias", [True, False])
def test_lstm_step_matches_torch_lstm_cell(bias):
    ref = torch.nn.LSTMCell(4, 6, bias=bias).double()
    x, h, c = torch.randn(3, 4).double(), torch.randn(3, 6).double(), torch.randn(3, 6).double()
    expected_h, expected_c = ref(x, (h, c))
    step = cells.lstm_step(x, h, c, *_copy_cell(ref, bias))
    torch.testing.assert_close(step.hidden, expected_h)
    torch.testing.assert_close(step.cell, expected_c)
    for gate in (step.input_gate, step.forget_gate, step.output_gate):
        assert gate.min() >= 0 and gate.max() <= 1
    assert step.cell_candidate.abs().max() <= 1


@pytest.mark.parametrize("bias", [True, False])
def test_gru_step_matches_torch_gru_cell(bias):
    ref = torch.nn.GRUCell(4, 6, bias=bias).double()
    x, h = torch.randn(3, 4).double(), torch.randn(3, 6).double()
    step = cells.gru_step(x, h, *_copy_cell(ref, bias))
    torch.testing.assert_close(step.hidden, ref(x, h))


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_step_matches_torch_rnn_cell(nonlinearity):
    ref = torch.nn.RNNCell(4, 6, nonlinearity=nonlinearity).double()
    x, h = torch.randn(3, 4).double(), torch.randn(3, 6).double()
    step = cells.rnn_step(x, h, *_copy_cell(ref), nonlinearity=nonlinearity)
    torch.testing.assert_close(step.hidden, ref(x, h))


def test_rnn_step_sigmoid_is_the_seeds_equation():
    w_ih, w_hh, b = torch.randn(6, 4), torch.randn(6, 6), torch.randn(6)
    x, s = torch.randn(3, 4), torch.randn(3, 6)
    step = cells.rnn_step(x, s, w_ih, w_hh, b, torch.zeros(6), nonlinearity="sigmoid")
    torch.testing.assert_close(step.hidden, torch.sigmoid(x @ w_ih.T + s @ w_hh.T + b))
    torch.testing.assert_close(step.preactivation, x @ w_ih.T + s @ w_hh.T + b)


def test_lstm_step_gate_order_is_i_f_g_o():
    """Drive one gate block at a time to a huge value and watch which gate saturates."""
    H = 2
    x, h, c = torch.zeros(1, 1), torch.zeros(1, H), torch.ones(1, H)
    w_ih, w_hh = torch.zeros(4 * H, 1), torch.zeros(4 * H, H)
    names = ["input_gate", "forget_gate", "cell_candidate", "output_gate"]
    for block, name in enumerate(names):
        b = torch.zeros(4 * H)
        b[block * H : (block + 1) * H] = 50.0
        step = cells.lstm_step(x, h, c, w_ih, w_hh, b, torch.zeros(4 * H))
        for other in names:
            value = getattr(step, other)
            expected = 1.0 if other == name else (0.0 if other == "cell_candidate" else 0.5)
            torch.testing.assert_close(value, torch.full_like(value, expected))
