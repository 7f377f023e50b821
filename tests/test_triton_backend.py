"""The Triton backend's kernels, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1):
forward, hand-written backward and trace against the reference loop, float32 and float64,
at sizes that straddle the kernels' block of 128 elements. This is the correctness proof CI
can run; on CUDA the same kernels run compiled (gpu-marked tests)."""

import importlib

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import whiteboard
from whiteboard import backends

pytest.importorskip("triton")
pytestmark = pytest.mark.slow


@pytest.fixture
def interpreted(monkeypatch):
    """The kernels module decorated under the interpreter, and the backend offered on the CPU
    for this test only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from whiteboard.backends import triton_kernels, triton_layernorm

    importlib.reload(triton_kernels)
    importlib.reload(triton_layernorm)  # after the kernels it calls
    yield triton_kernels


LAYERS = {
    "lstm": lambda **k: whiteboard.LSTM(3, 50, **k),
    "rnn-tanh": lambda **k: whiteboard.RNN(3, 50, **k),
    "rnn-relu": lambda **k: whiteboard.RNN(3, 50, nonlinearity="relu", **k),
    "rnn-sigmoid": lambda **k: whiteboard.RNN(3, 50, nonlinearity="sigmoid", **k),
    "layernorm-lstm": lambda **k: whiteboard.LayerNormLSTM(3, 50, **k),
}


def _flat(result):
    return [result[0], *(result[1] if isinstance(result[1], tuple) else (result[1],))]


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("T,batch,lengths", [(1, 1, None), (2, 3, None), (5, 3, [5, 2, 4])],
                         ids=["T1-B1", "T2-B3", "T5-lengths"])
def test_triton_kernels_match_the_reference_forward_and_backward(interpreted, name, dtype, T, batch, lengths):
    torch.manual_seed(0)
    ours = LAYERS[name](num_layers=2, dtype=dtype, implementation="triton")
    reference = LAYERS[name](num_layers=2, dtype=dtype, implementation="reference")
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(T, batch, 3, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    lengths = None if lengths is None else torch.tensor(lengths)
    assert backends.explain(ours, x).chosen == "triton"
    got, expected = _flat(ours(x, lengths=lengths)), _flat(reference(x2, lengths=lengths))
    # float32: the layer-norm LSTM's gradients reach ~100 through the normalizations, and the
    # torch loop differs from the reference by as much as the kernels do (~1e-4 absolute).
    tolerance = {} if dtype == torch.float64 else {"atol": 1e-4 if name == "layernorm-lstm" else 1e-5, "rtol": 1e-4}
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **tolerance)
    weights = [torch.randn_like(e) for e in expected]
    sum((g * w).sum() for g, w in zip(got, weights)).backward()
    sum((e * w).sum() for e, w in zip(expected, weights)).backward()
    torch.testing.assert_close(x.grad, x2.grad, **tolerance)
    for (n, p), q in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n, **tolerance)


@pytest.mark.parametrize("name", ["lstm", "rnn-sigmoid", "layernorm-lstm"])
def test_a_trace_runs_on_the_kernels_and_records_the_references_gates(interpreted, name):
    torch.manual_seed(0)
    ours = LAYERS[name](dtype=torch.float64, bidirectional=True)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    lengths = torch.tensor([4, 2])
    assert backends.explain(ours, x, trace=True).chosen == "triton"
    output, _, trace = ours.trace(x, lengths=lengths)
    ours.implementation = "reference"
    expected_output, _, expected = ours.trace(x, lengths=lengths)
    torch.testing.assert_close(output, expected_output)
    for direction in (0, 1):
        for field, value in expected[0][direction].items():
            torch.testing.assert_close(trace[0][direction][field], value, msg=f"{field} {direction}")


def test_the_triton_functions_pass_gradcheck_and_gradgradcheck(interpreted):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    h0, c0 = (torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    lstm = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((16, 3), (16, 4), (16,), (16,))]
    rnn = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((4, 3), (4, 4), (4,), (4,))]
    mask = torch.tensor([[True, True], [True, False], [True, False]]).unsqueeze(-1)
    for m in (None, mask):
        assert gradcheck(lambda *a: interpreted.TritonLSTM.apply(*a, m)[:3], (x, h0, c0, *lstm))
        assert gradcheck(lambda *a: interpreted.TritonRNN.apply(*a, m, "sigmoid")[:2], (x, h0, *rnn))
    assert gradgradcheck(lambda *a: interpreted.TritonLSTM.apply(*a, None)[0], (x, h0, c0, *lstm))


def test_what_the_triton_backend_declines_it_names():
    from whiteboard.backends.base import Call

    cpu = Call("LSTM", False, "cpu", torch.float32)
    assert "CUDA" in backends.TRITON.supports(cpu)
    cuda = dict(device_type="cuda")
    assert backends.TRITON.supports(Call("LSTM", True, dtype=torch.float32, **cuda)) is None
    assert "layer-norm" in backends.TRITON.supports(Call("LSTM", True, dtype=torch.float32, zoneout=(0.1, 0.1, True),
                                                         **cuda))
    assert "GRU" in backends.TRITON.supports(Call("GRU", False, dtype=torch.float32, **cuda))
    assert "float16" in backends.TRITON.supports(Call("RNN", False, dtype=torch.float16, **cuda))
    assert backends.TRITON.supports(Call("RNN", False, dtype=torch.float32, trace=True, nonlinearity="sigmoid",
                                         **cuda)) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", list(LAYERS))
def test_on_cuda_a_trace_and_the_sigmoid_rnn_run_on_triton(name):
    ours = LAYERS[name](num_layers=2, device="cuda")
    x = torch.randn(7, 3, 3, device="cuda")
    assert backends.explain(ours, x, trace=True).chosen == "triton"
    output, _, _ = ours.trace(x)
    reference = LAYERS[name](num_layers=2, device="cuda", implementation="reference")
    reference.load_state_dict(ours.state_dict())
    torch.testing.assert_close(output, reference(x)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["lstm", "rnn-sigmoid"])
@pytest.mark.parametrize("training", [True, False], ids=["training-masks", "evaluation-expectation"])
@pytest.mark.parametrize("lengths", [None, [5, 3]], ids=["full", "lengths"])
def test_zoneout_inside_the_kernels_matches_the_reference_draw_for_draw(interpreted, name, training, lengths):
    """The kernels draw zoneout's masks as the reference loop does (same generator, same
    order), so with one seed both compute the same thing, gradients included."""
    from whiteboard.nn.regularizers import Zoneout

    torch.manual_seed(0)
    layer = LAYERS[name](num_layers=2, dtype=torch.float64, implementation="triton")
    reference_layer = LAYERS[name](num_layers=2, dtype=torch.float64, implementation="reference")
    reference_layer.load_state_dict(layer.state_dict())
    ours, reference = Zoneout(layer, 0.3, 0.2), Zoneout(reference_layer, 0.3, 0.2)
    ours.train(training), reference.train(training)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    lengths = None if lengths is None else torch.tensor(lengths)
    assert backends.explain(layer, x).chosen == "triton" or not training
    torch.manual_seed(7)
    got = _flat(ours(x, lengths=lengths))
    torch.manual_seed(7)
    expected = _flat(reference(x2, lengths=lengths))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    sum(g.sum() for g in got).backward()
    sum(e.sum() for e in expected).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for (n, p), q in zip(layer.named_parameters(), reference_layer.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_zoneout_in_the_kernels_passes_gradgradcheck(interpreted):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    h0, c0 = (torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    lstm = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((16, 3), (16, 4), (16,), (16,))]
    # evaluation's mix (no randomness), so every recomputation sees the same weights
    assert gradcheck(lambda *a: interpreted.TritonLSTM.apply(*a, None, (0.3, 0.2, False))[0], (x, h0, c0, *lstm))
    assert gradgradcheck(lambda *a: interpreted.TritonLSTM.apply(*a, None, (0.3, 0.2, False))[0], (x, h0, c0, *lstm))


def test_the_layer_norm_kernels_pass_gradcheck_and_gradgradcheck(interpreted):
    from whiteboard.backends.triton_layernorm import TritonLayerNormLSTM

    torch.manual_seed(0)
    H = 3  # a block of 4 lanes, one of them masked off
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0, c0 = (torch.randn(2, H, dtype=torch.float64, requires_grad=True) for _ in range(2))
    shapes = ((4 * H, 2), (4 * H, H), (4 * H,), (4 * H,), (4 * H,), (4 * H,), (H,), (H,))
    weights = [(torch.randn(s, dtype=torch.float64) + (1.0 if k in (4, 5, 6) else 0.0)).requires_grad_()
               for k, s in enumerate(shapes)]
    mask = torch.tensor([[True, True], [True, False], [True, False]]).unsqueeze(-1)
    for m in (None, mask):
        assert gradcheck(lambda *a: TritonLayerNormLSTM.apply(*a, m, 1e-5)[:3], (x, h0, c0, *weights))
    assert gradgradcheck(lambda *a: TritonLayerNormLSTM.apply(*a, None, 1e-5)[0], (x, h0, c0, *weights))
