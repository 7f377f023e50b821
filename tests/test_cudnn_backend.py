"""The cuDNN backend: torch's own recurrent ops behind the backend boundary. Its run() is
device-agnostic, so it is checked here on the CPU against torch.nn and the reference (on
CUDA the same calls reach cuDNN; those runs are the gpu-marked tests)."""

import pytest
import torch

import whiteboard
from whiteboard import backends
from whiteboard.backends.base import Call
from whiteboard.backends.cudnn import run_torch_op

CASES = {
    "lstm": (whiteboard.LSTM, {}),
    "lstm-proj": (whiteboard.LSTM, {"proj_size": 3}),
    "gru": (whiteboard.GRU, {}),
    "rnn-tanh": (whiteboard.RNN, {}),
    "rnn-relu-no-bias": (whiteboard.RNN, {"nonlinearity": "relu", "bias": False}),
}


def _on_torch_op(monkeypatch):
    """Every layer call on run_torch_op (as on CUDA), counted."""
    calls = []

    def run(call, x, initial, weights, mask):
        calls.append(call)
        return run_torch_op(call, x, initial, weights, mask)

    monkeypatch.setattr(backends.TORCH_LOOP, "run", lambda call, *a: run(call, *a))
    return calls


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("T", [1, 2, 5])
@pytest.mark.parametrize("lengths", [None, [5, 2, 4]], ids=["full", "lengths"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_torch_ops_match_the_reference_in_outputs_and_gradients(name, T, lengths, bidirectional, monkeypatch):
    layer_class, kwargs = CASES[name]
    torch.manual_seed(0)
    layer = layer_class(4, 6, num_layers=2, bidirectional=bidirectional, dtype=torch.float64, implementation="fused",
                        **kwargs)
    reference = layer_class(4, 6, num_layers=2, bidirectional=bidirectional, dtype=torch.float64,
                            implementation="reference", **kwargs)
    reference.load_state_dict(layer.state_dict())
    lengths = None if lengths is None else torch.tensor([min(n, T) for n in lengths])
    x = torch.randn(T, 3, 4, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    calls = _on_torch_op(monkeypatch)
    got = layer(x, lengths=lengths)
    assert len(calls) == 2 * (2 if bidirectional else 1)
    expected = reference(x2, lengths=lengths)
    flat = lambda r: [r[0], *(r[1] if isinstance(r[1], tuple) else (r[1],))]  # noqa: E731
    for g, e in zip(flat(got), flat(expected)):
        torch.testing.assert_close(g, e)
    weights = [torch.randn_like(e) for e in flat(expected)]
    sum((g * w).sum() for g, w in zip(flat(got), weights)).backward()
    sum((e * w).sum() for e, w in zip(flat(expected), weights)).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for (n, p), q in zip(layer.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_cudnn_is_offered_for_cuda_calls_only_and_says_what_it_lacks():
    cpu = Call("LSTM", False, "cpu", torch.float32)
    assert "CUDA-only" in backends.CUDNN.supports(cpu)
    cuda = dict(device_type="cuda", dtype=torch.float16)
    reasons = [backends.CUDNN.supports(Call("LSTM", True, **cuda)),
               backends.CUDNN.supports(Call("RNN", False, nonlinearity="sigmoid", **cuda)),
               backends.CUDNN.supports(Call("GRU", False, trace=True, **cuda))]
    if torch.backends.cudnn.is_available():
        assert "layer-norm" in reasons[0] and "sigmoid" in reasons[1] and "trace" in reasons[2]
        assert backends.CUDNN.supports(Call("GRU", False, **cuda)) is None
    assert [b.name for b in backends.BACKENDS] == ["compiled", "cudnn", "triton", "torch-loop", "reference"]
    explanation = backends.explain(whiteboard.LSTM(3, 4), torch.randn(2, 1, 3))
    assert explanation.chosen == "compiled" and "CUDA-only" in explanation.reasons["cudnn"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", list(CASES))
def test_on_cuda_auto_runs_cudnn_with_torch_nns_results(name):
    layer_class, kwargs = CASES[name]
    ours = layer_class(4, 6, num_layers=2, device="cuda", **kwargs)
    theirs = getattr(torch.nn, layer_class.__name__)(4, 6, num_layers=2, device="cuda", **kwargs)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(7, 3, 4, device="cuda")
    assert backends.explain(ours, x).chosen == "cudnn"
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_whole_stack_in_one_torch_op_call_is_torch_nns(name, bidirectional, monkeypatch):
    """run_stack: every layer and direction in one call of torch's op, as torch.nn makes it."""
    layer_class, kwargs = CASES[name]
    torch.manual_seed(0)
    ours = layer_class(4, 6, num_layers=2, bidirectional=bidirectional, dtype=torch.float64, implementation="fused",
                       **kwargs)
    theirs = getattr(torch.nn, layer_class.__name__)(4, 6, num_layers=2, bidirectional=bidirectional,
                                                     dtype=torch.float64, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    stacks = []

    def run_stack(call, x, states, weights, bidirectional_, dropout):
        stacks.append((len(weights), bidirectional_, dropout))
        return backends.CUDNN.run_stack(call, x, states, weights, bidirectional_, dropout)

    monkeypatch.setattr(backends.TORCH_LOOP, "run_stack", run_stack)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    got, expected = ours(x), theirs(x2)
    assert stacks == [(4 if bidirectional else 2, bidirectional, 0.0)]
    flat = lambda r: [r[0], *(r[1] if isinstance(r[1], tuple) else (r[1],))]  # noqa: E731
    for g, e in zip(flat(got), flat(expected)):
        torch.testing.assert_close(g, e)
    sum(g.sum() for g in flat(got)).backward()
    sum(e.sum() for e in flat(expected)).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_dropout_between_layers_reaches_the_stack_call_only_in_training(monkeypatch):
    ours = whiteboard.LSTM(4, 6, num_layers=3, dropout=0.5, implementation="fused")
    seen = []
    monkeypatch.setattr(backends.TORCH_LOOP, "run_stack", lambda call, x, s, w, b, dropout: seen.append(dropout))
    ours.train()(torch.randn(2, 1, 4))
    ours.eval()(torch.randn(2, 1, 4))
    assert seen == [0.5, 0.0]


def test_flatten_parameters_is_a_no_op_off_cuda_and_keeps_the_weights():
    layer = whiteboard.LSTM(4, 6, num_layers=2)
    before = [p.detach().clone() for p in layer.parameters()]
    pointers = [p.data_ptr() for p in layer.parameters()]
    layer.flatten_parameters()
    assert [p.data_ptr() for p in layer.parameters()] == pointers  # nothing moved on the CPU
    layer.to(torch.float64).to(torch.float32)  # _apply flattens again after a move: values kept
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_cuda_the_weights_share_one_flat_buffer_and_a_stack_is_one_call():
    layer = whiteboard.LSTM(4, 6, num_layers=2, bidirectional=True).cuda()
    storages = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    assert len(storages) == 1
    theirs = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True).cuda()
    theirs.load_state_dict(layer.state_dict())
    x = torch.randn(7, 3, 4, device="cuda")
    torch.testing.assert_close(layer(x)[0], theirs(x)[0])
