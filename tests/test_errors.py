"""Bad input gets one clear message naming the expected and the actual values."""

import pytest
import torch

import whiteboard


@pytest.mark.parametrize("cls", [whiteboard.RNN, whiteboard.LSTM, whiteboard.GRU])
def test_wrong_input_rank(cls):
    with pytest.raises(ValueError, match=r"3 dimensions.*got 4 with shape \(2, 3, 4, 5\)"):
        cls(5, 7)(torch.randn(2, 3, 4, 5))


@pytest.mark.parametrize("cls", [whiteboard.RNN, whiteboard.LSTM, whiteboard.GRU])
def test_wrong_feature_size(cls):
    with pytest.raises(ValueError, match="input_size.* 5, got 3"):
        cls(5, 7)(torch.randn(4, 2, 3))


@pytest.mark.parametrize("cls", [whiteboard.RNN, whiteboard.GRU])
def test_wrong_initial_state_shape(cls):
    layer = cls(5, 7, num_layers=2)
    with pytest.raises(ValueError, match=r"expected h_0 of shape \(2, 3, 7\), got \(1, 3, 7\)"):
        layer(torch.randn(4, 3, 5), torch.zeros(1, 3, 7))


def test_wrong_lstm_cell_state_shape():
    layer = whiteboard.LSTM(5, 7)
    with pytest.raises(ValueError, match=r"expected c_0 of shape \(1, 3, 7\), got \(1, 3, 8\)"):
        layer(torch.randn(4, 3, 5), (torch.zeros(1, 3, 7), torch.zeros(1, 3, 8)))


def test_lstm_state_must_be_a_pair():
    with pytest.raises(ValueError, match=r"tuple \(h_0, c_0\)"):
        whiteboard.LSTM(5, 7)(torch.randn(4, 3, 5), torch.zeros(1, 3, 7))


def test_state_dtype_mismatch():
    with pytest.raises(ValueError, match="dtype torch.float32, got torch.float64"):
        whiteboard.GRU(5, 7)(torch.randn(4, 3, 5), torch.zeros(1, 3, 7, dtype=torch.float64))


def test_mismatched_state_dict_keys_are_named():
    ours = whiteboard.LSTM(5, 7, num_layers=2)
    with pytest.raises(RuntimeError, match="Missing key.*weight_ih_l1"):
        ours.load_state_dict(torch.nn.LSTM(5, 7, num_layers=1).state_dict())
    with pytest.raises(RuntimeError, match=r"size mismatch for weight_ih_l0.*\[28, 4\].*\[28, 5\]"):
        ours.load_state_dict(torch.nn.LSTM(4, 7, num_layers=2).state_dict())


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="hidden_size must be a positive integer, got 0"):
        whiteboard.LSTM(5, 0)
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\], got 1.5"):
        whiteboard.GRU(5, 7, num_layers=2, dropout=1.5)
    with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'"):
        whiteboard.RNN(5, 7, nonlinearity="gelu")
    with pytest.raises(ValueError, match="implementation must be one of"):
        whiteboard.RNN(5, 7, implementation="cuda-magic")
    with pytest.raises(ValueError, match="proj_size"):
        whiteboard.LSTM(5, 7, proj_size=3)


def test_bad_lengths():
    layer = whiteboard.GRU(5, 7)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 4\], got min 0, max 4"):
        layer(torch.randn(4, 2, 5), lengths=torch.tensor([4, 0]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\), got \(3,\)"):
        layer(torch.randn(4, 2, 5), lengths=torch.tensor([4, 1, 1]))
