"""Gradients beyond one plain backward: batched (vmap, gradcheck's check_batched_grad, the
default in PyTorch's own module tests), of second order (gradient penalties,
gradgradcheck) and through torch.func's transforms, on every implementation, T = 1 included."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import whiteboard
from whiteboard.backends import functions as fused
from whiteboard.backends.compiled import build as native
from helpers import MODES, TOLERANCES, initial_state, make_pair

LAYERS = {
    "lstm": whiteboard.LSTM,
    "gru": whiteboard.GRU,
    "rnn": whiteboard.RNN,
    "layernorm_lstm": whiteboard.LayerNormLSTM,
}
IMPLEMENTATIONS = ["native", "fused", "reference"]
#: Every layer on every implementation it has (LayerNormLSTM has no compiled loop).
CASES = [(name, implementation) for name in LAYERS for implementation in IMPLEMENTATIONS
         if (name, implementation) != ("layernorm_lstm", "native")]


def _layer(name, implementation, **kwargs):
    return LAYERS[name](3, 4, dtype=torch.float64, implementation=implementation, **kwargs)


def _outputs(layer):
    """The layer as a function of its input: output and final states, for gradcheck."""
    def run(x):
        output, state = layer(x)
        return (output, *state) if isinstance(state, tuple) else (output, state)
    return run


@pytest.mark.parametrize("name, implementation", CASES)
@pytest.mark.parametrize("steps", [1, 3])
def test_gradcheck_with_batched_gradients(name, implementation, steps):
    layer = _layer(name, implementation, num_layers=2, bidirectional=True)
    x = torch.randn(steps, 2, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(_outputs(layer), (x,), check_batched_grad=True)


@pytest.mark.parametrize("name, implementation", CASES)
@pytest.mark.parametrize("steps", [1, 3])
def test_gradgradcheck(name, implementation, steps):
    layer = _layer(name, implementation, num_layers=2)
    x = torch.randn(steps, 2, 3, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(_outputs(layer), (x,))


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("masked", [False, True])
def test_each_function_passes_gradcheck_with_batched_gradients_at_one_step(backend, masked):
    """The Functions themselves, with every tensor argument checked (mask: one sequence of
    length 0 steps at T = 1 would be no sequence; the mask marks the second row's only step)."""
    compiled = None if backend == "torch" else native.load()
    B, H = 2, 4
    mask = torch.tensor([[True], [False]]).view(1, B, 1) if masked else None

    def tensor(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, h0, c0 = tensor(1, B, 3), tensor(B, H), tensor(B, H)
    for gates, function, extra in [(4, fused.FusedLSTM, None), (3, fused.FusedGRU, None), (1, fused.FusedRNN, "tanh")]:
        weights = (tensor(gates * H, 3), tensor(gates * H, H), tensor(gates * H), tensor(gates * H))
        states = (h0, c0) if gates == 4 else (h0,)
        args = (x, *states, *weights, mask) + ((extra,) if extra else ()) + (compiled,)
        assert gradcheck(function.apply, args, check_batched_grad=True), function.__name__


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("steps", [1, 4])
def test_a_gradient_penalty_matches_torch_nn_s(mode, implementation, steps):
    """Double backward as a gradient penalty uses it: d/dθ ||d loss / d x||², equal to torch.nn's."""
    ours, reference = make_pair(mode, 3, 4, implementation=implementation, num_layers=2)
    x = torch.randn(steps, 2, 3, dtype=torch.float64, requires_grad=True)
    hx = initial_state(mode, (2, 2, 4), torch.float64, "cpu")
    weights = torch.randn(steps, 2, 4, dtype=torch.float64)

    def penalty_gradients(layer):
        output, _ = layer(x, hx)
        (dx,) = torch.autograd.grad((output * weights).sum(), x, create_graph=True)
        return torch.autograd.grad(dx.pow(2).sum(), [*layer.parameters(), x])

    ours_grads, ref_grads = penalty_gradients(ours), penalty_gradients(reference)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])
    # Nonzero, so that a silent zero would fail: every parameter and x; through a ReLU
    # (piecewise linear, the x-gradient depends on x and the biases only through which units
    # are on) the input weights alone.
    names = [name for name, _ in reference.named_parameters()] + ["input"]
    reached = [b for name, b in zip(names, ref_grads) if mode != "rnn_relu" or name.startswith("weight_ih")]
    assert all(b.abs().sum() > 0 for b in reached)


def _per_sample(layer, batch):
    return torch.stack([layer(x)[0] for x in batch])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_torch_func_grad_matches_torch_nn_and_vmap_matches_a_loop(mode, implementation):
    ours, reference = make_pair(mode, 3, 4, implementation=implementation, num_layers=2, bidirectional=True)
    x = torch.randn(1, 2, 3, dtype=torch.float64)
    params = {name: p.detach() for name, p in reference.named_parameters()}

    def loss(layer):
        return lambda p, x: torch.func.functional_call(layer, p, (x,))[0].pow(2).sum()

    ours_grads = torch.func.grad(loss(ours), argnums=(0, 1))(params, x)
    ref_grads = torch.func.grad(loss(reference), argnums=(0, 1))(params, x)
    torch.testing.assert_close(ours_grads, ref_grads, **TOLERANCES[torch.float64])
    # torch.nn's layers have no batching rule ("Batching rule not implemented for
    # aten::lstm.input"): vmap over ours is compared with a loop over the samples.
    batch = torch.randn(5, 3, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(lambda x: ours(x)[0])(batch), _per_sample(reference, batch),
                               **TOLERANCES[torch.float64])
