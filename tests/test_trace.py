"""Per-step traces: every gate and state, consistent with the layer's own outputs."""

import pytest
import torch

import whiteboard
from whiteboard import TRACE_FIELDS
from helpers import MODES, make_pair, state_tensors

T, B, I, H = 6, 3, 4, 5


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_trace_shapes_ranges_and_hidden_equal_outputs(mode, bidirectional, batch_first):
    layer, _ = make_pair(mode, I, H, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64)
    output, state = layer(x)
    traced_output, traced_state, trace = layer.trace(x)
    torch.testing.assert_close(traced_output, output)
    for a, b in zip(state_tensors(traced_state), state_tensors(state)):
        torch.testing.assert_close(a, b)
    directions = 2 if bidirectional else 1
    assert len(trace.steps) == 2 and all(len(layer_steps) == directions for layer_steps in trace.steps)
    expected_shape = (B, T, H) if batch_first else (T, B, H)
    for layer_steps in trace.steps:
        for fields in layer_steps:
            assert tuple(fields) == TRACE_FIELDS[layer.mode]
            for name, values in fields.items():
                assert values.shape == expected_shape, name
                if name.endswith("_gate"):
                    assert values.min() >= 0 and values.max() <= 1, name
    # The last layer's traced hidden states are the layer's output, direction by direction.
    last = trace.steps[-1]
    for direction in range(directions):
        torch.testing.assert_close(last[direction]["hidden"], output[..., direction * H : (direction + 1) * H])
    # The traced last step (forward direction) is the final state.
    final_index = -1 if not batch_first else (slice(None), -1)
    torch.testing.assert_close(trace.get("hidden", layer=-1)[final_index], state_tensors(state)[0][-directions])


def test_lstm_trace_cell_follows_the_whiteboard_equation():
    layer = whiteboard.LSTM(I, H).double()
    _, _, trace = layer.trace(torch.randn(T, B, I, dtype=torch.float64))
    f = trace.get("forget_gate")
    i = trace.get("input_gate")
    g = trace.get("cell_candidate")
    c = trace.get("cell")
    o = trace.get("output_gate")
    c_prev = torch.cat([torch.zeros(1, B, H, dtype=torch.float64), c[:-1]])
    torch.testing.assert_close(c, f * c_prev + i * g)
    torch.testing.assert_close(trace.get("hidden"), o * torch.tanh(c))


def test_trace_respects_lengths_and_is_differentiable():
    layer = whiteboard.GRU(I, H).double()
    x = torch.randn(T, 2, I, dtype=torch.float64, requires_grad=True)
    _, _, trace = layer.trace(x, lengths=torch.tensor([T, 2]))
    hidden = trace.get("hidden")
    assert torch.all(hidden[2:, 1] == 0)
    hidden[-1, 0].sum().backward()
    assert x.grad[0, 0].abs().sum() > 0


def test_trace_get_rejects_unknown_names():
    _, _, trace = whiteboard.RNN(I, H).trace(torch.randn(T, B, I))
    with pytest.raises(KeyError, match="preactivation"):
        trace.get("forget_gate")


def test_unbatched_trace_has_no_batch_dimension():
    _, _, trace = whiteboard.LSTM(I, H).trace(torch.randn(T, I))
    assert trace.get("cell").shape == (T, H)
