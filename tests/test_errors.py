"""Bad input raises what torch.nn raises: the same exception type and the same words, so
code written against torch.nn catches it. Each case runs torch.nn's layer beside ours."""

import pytest
import torch

import whiteboard

PAIRS = {
    "LSTM": (whiteboard.LSTM, torch.nn.LSTM),
    "GRU": (whiteboard.GRU, torch.nn.GRU),
    "RNN": (whiteboard.RNN, torch.nn.RNN),
}


def _state(mode, shape, dtype=torch.float32):
    if mode == "LSTM":
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


# name: (constructor kwargs, call(layer, mode))
CALLS = {
    "input of rank 4": ({}, lambda layer, mode: layer(torch.randn(2, 3, 4, 5))),
    "input of rank 1": ({}, lambda layer, mode: layer(torch.randn(5))),
    "wrong feature size": ({}, lambda layer, mode: layer(torch.randn(4, 2, 3))),
    "no time steps": ({}, lambda layer, mode: layer(torch.randn(0, 2, 5))),
    "float64 input into float32": ({}, lambda layer, mode: layer(torch.randn(4, 2, 5, dtype=torch.float64))),
    "half input into float32": ({}, lambda layer, mode: layer(torch.randn(4, 2, 5).half())),
    "integer input": ({}, lambda layer, mode: layer(torch.ones(4, 2, 5, dtype=torch.long))),
    "float32 input into float64": ({"dtype": torch.float64}, lambda layer, mode: layer(torch.randn(4, 2, 5))),
    "h_0 of the wrong batch": ({}, lambda layer, mode: layer(torch.randn(4, 3, 5), _state(mode, (1, 2, 7)))),
    "h_0 of the wrong layer count": ({"num_layers": 2},
                                     lambda layer, mode: layer(torch.randn(4, 3, 5), _state(mode, (1, 3, 7)))),
    "2-D h_0 for a batch": ({}, lambda layer, mode: layer(torch.randn(4, 3, 5), _state(mode, (1, 7)))),
    "3-D h_0 for one sequence": ({}, lambda layer, mode: layer(torch.randn(4, 5), _state(mode, (1, 3, 7)))),
    "wrong unbatched h_0": ({}, lambda layer, mode: layer(torch.randn(4, 5), _state(mode, (2, 7)))),
    "batch_first h_0 of the wrong batch": ({"batch_first": True},
                                           lambda layer, mode: layer(torch.randn(3, 4, 5), _state(mode, (1, 4, 7)))),
}


def _raised(call):
    with pytest.raises(Exception) as caught:
        call()
    return type(caught.value), str(caught.value)


@pytest.mark.parametrize("mode", list(PAIRS))
@pytest.mark.parametrize("case", list(CALLS))
@pytest.mark.parametrize("implementation", ["auto", "fused", "reference"])
def test_bad_calls_raise_torch_nn_s_exception_and_words(mode, case, implementation):
    ours_cls, torch_cls = PAIRS[mode]
    kwargs, call = CALLS[case]
    ours = ours_cls(5, 7, implementation=implementation, **kwargs)
    theirs = torch_cls(5, 7, **kwargs)
    assert _raised(lambda: call(ours, mode)) == _raised(lambda: call(theirs, mode))


def test_a_wrong_lstm_cell_state_is_named_as_torch_nn_names_it():
    call = lambda layer: layer(torch.randn(4, 3, 5), (torch.zeros(1, 3, 7), torch.zeros(1, 3, 8)))  # noqa: E731
    assert _raised(lambda: call(whiteboard.LSTM(5, 7))) == _raised(lambda: call(torch.nn.LSTM(5, 7)))
    assert "hidden[1]" in _raised(lambda: call(whiteboard.LSTM(5, 7)))[1]


def test_lstm_state_must_be_a_pair():
    with pytest.raises(TypeError, match=r"tuple of two Tensors \(h_0, c_0\)"):
        whiteboard.LSTM(5, 7)(torch.randn(4, 3, 5), torch.zeros(1, 3, 7))


def test_state_dtype_mismatch_names_both_dtypes():
    # torch.nn fails here inside its GEMM ("mat1 and mat2 must have the same dtype"); we name both.
    with pytest.raises(ValueError, match="dtype torch.float32, got torch.float64"):
        whiteboard.GRU(5, 7)(torch.randn(4, 3, 5), torch.zeros(1, 3, 7, dtype=torch.float64))


# name: constructor kwargs over LSTM(5, 7)
CONSTRUCTIONS = {
    "bias=0": {"bias": 0},
    "batch_first='False'": {"batch_first": "False"},
    "input_size=5.0": {"input_size": 5.0},
    "hidden_size=7.0": {"hidden_size": 7.0},
    "hidden_size=0": {"hidden_size": 0},
    "hidden_size=-5": {"hidden_size": -5},
    "input_size=0": {"input_size": 0},
    "num_layers=0": {"num_layers": 0},
    "dropout=1.5": {"num_layers": 2, "dropout": 1.5},
    "dropout=True": {"num_layers": 2, "dropout": True},
    "dropout='0.1'": {"num_layers": 2, "dropout": "0.1"},
}


@pytest.mark.parametrize("case", list(CONSTRUCTIONS))
@pytest.mark.parametrize("mode", list(PAIRS))
def test_bad_constructor_arguments_raise_torch_nn_s_exception_and_words(case, mode):
    ours_cls, torch_cls = PAIRS[mode]
    kwargs = {"input_size": 5, "hidden_size": 7, **CONSTRUCTIONS[case]}
    assert _raised(lambda: ours_cls(**kwargs)) == _raised(lambda: torch_cls(**kwargs))


@pytest.mark.parametrize("kwargs, words", [
    # torch.nn lets these through: a string "False" would mean True, 2.0 layers fail in range().
    ({"bidirectional": "False"}, "bidirectional should be of type bool, got: str"),
    ({"bidirectional": 1}, "bidirectional should be of type bool, got: int"),
    ({"num_layers": 2.0}, "num_layers should be of type int, got: float"),
    ({"input_size": True}, "input_size should be of type int, got: bool"),
])
def test_arguments_of_the_wrong_type_are_refused_where_torch_nn_is_lax(kwargs, words):
    with pytest.raises(TypeError, match=words):
        whiteboard.GRU(**{"input_size": 5, "hidden_size": 7, **kwargs})


def test_our_own_arguments_are_checked():
    with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'"):
        whiteboard.RNN(5, 7, nonlinearity="gelu")
    with pytest.raises(ValueError, match="implementation must be one of"):
        whiteboard.RNN(5, 7, implementation="cuda-magic")
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        whiteboard.LSTM(5, 7, proj_size=7)


def test_mismatched_state_dict_keys_are_named():
    ours = whiteboard.LSTM(5, 7, num_layers=2)
    with pytest.raises(RuntimeError, match="Missing key.*weight_ih_l1"):
        ours.load_state_dict(torch.nn.LSTM(5, 7, num_layers=1).state_dict())
    with pytest.raises(RuntimeError, match=r"size mismatch for weight_ih_l0.*\[28, 4\].*\[28, 5\]"):
        ours.load_state_dict(torch.nn.LSTM(4, 7, num_layers=2).state_dict())


def test_bad_lengths():
    layer = whiteboard.GRU(5, 7)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 4\], got min 0, max 4"):
        layer(torch.randn(4, 2, 5), lengths=torch.tensor([4, 0]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\), got \(3,\)"):
        layer(torch.randn(4, 2, 5), lengths=torch.tensor([4, 1, 1]))
