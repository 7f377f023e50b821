"""The fused autograd Functions: float64 gradcheck, agreement with the reference loop, and
NaN and Inf propagated as torch.nn propagates them."""

import pytest
import torch
from torch.autograd import gradcheck

from whiteboard.backends import functions as fused
from helpers import MODES, TOLERANCES, initial_state, loss_of, make_pair, state_tensors
from function_helpers import B, BACKENDS, H, I, MASKS, T, compiled_or_none, function_inputs, function_weights, value_sites


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask", list(MASKS))
def test_fused_lstm_gradcheck(bias, mask, backend):
    x, h0 = function_inputs()
    c0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    args = (x, h0, c0, *function_weights(4, bias), MASKS[mask], compiled_or_none(backend))
    assert gradcheck(fused.FusedLSTM.apply, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask", list(MASKS))
def test_fused_gru_gradcheck(bias, mask, backend):
    x, h0 = function_inputs()
    assert gradcheck(fused.FusedGRU.apply, (x, h0, *function_weights(3, bias), MASKS[mask], compiled_or_none(backend)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nonlinearity", ["tanh", "sigmoid", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask", list(MASKS))
def test_fused_rnn_gradcheck(nonlinearity, bias, mask, backend):
    x, h0 = function_inputs()
    w_ih, w_hh, b_ih, b_hh = function_weights(1, bias)
    if nonlinearity == "relu":
        # Keep pre-activations away from the kink at 0, where finite differences lie.
        with torch.no_grad():
            w_hh.mul_(0.1)
            if b_ih is not None:
                b_ih.add_(3.0)
            x.abs_()
            w_ih.abs_()
    args = (x, h0, w_ih, w_hh, b_ih, b_hh, MASKS[mask], nonlinearity, compiled_or_none(backend))
    assert gradcheck(fused.FusedRNN.apply, args)


@pytest.mark.parametrize("mode", list(MODES) + ["rnn_sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("implementation", ["auto", "fused"])
def test_fused_path_matches_reference_loop(mode, dtype, implementation, device):
    """The oracle for modes torch.nn lacks (sigmoid RNN) is our own reference loop."""
    import whiteboard

    kwargs = dict(num_layers=2, bidirectional=True)
    if mode == "rnn_sigmoid":
        make = lambda impl: whiteboard.RNN(I, H, nonlinearity="sigmoid", implementation=impl, **kwargs)  # noqa: E731
        fast, slow = make(implementation), make("reference")
        slow.load_state_dict(fast.state_dict())
        fast, slow = fast.to(device, dtype), slow.to(device, dtype)
        state_mode = "rnn"
    else:
        fast, torch_layer = make_pair(mode, I, H, dtype=dtype, device=device, implementation=implementation, **kwargs)
        slow, _ = make_pair(mode, I, H, dtype=dtype, device=device, implementation="reference", **kwargs)
        slow.load_state_dict(fast.state_dict())
        state_mode = mode
    x = torch.randn(T, B, I, dtype=dtype, device=device, requires_grad=True)
    hx = initial_state(state_mode, (4, B, H), dtype, device)
    out_fast, st_fast = fast(x, hx)
    out_slow, st_slow = slow(x, hx)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out_fast, out_slow, **tol)
    inputs = [x, *state_tensors(hx)]
    g_fast = torch.autograd.grad(loss_of(out_fast, st_fast), inputs + list(fast.parameters()))
    g_slow = torch.autograd.grad(loss_of(out_slow, st_slow), inputs + list(slow.parameters()))
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("mode", list(MODES))
def test_inference_without_grad_matches_training_forward(mode):
    layer, _ = make_pair(mode, I, H, num_layers=2)
    x = torch.randn(T, B, I, dtype=torch.float64)
    with_grad = layer(x)
    with torch.no_grad():
        without_grad = layer(x)
    torch.testing.assert_close(with_grad[0], without_grad[0])
    assert without_grad[0].grad_fn is None


def test_fused_backward_handles_unused_outputs():
    """Only h_n is used: d_out arrives as None and must count as zeros."""
    layer, reference = make_pair("lstm", I, H)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    (_, (h_ours, _)), (_, (h_ref, _)) = layer(x), reference(x)
    g_ours = torch.autograd.grad(h_ours.sum(), x)[0]
    g_ref = torch.autograd.grad(h_ref.sum(), x)[0]
    torch.testing.assert_close(g_ours, g_ref)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("where", ["input", "weight"])
def test_nan_propagates_like_torch_nn(mode, where):
    """The compiled loops assume finite numbers; a NaN must still come out as torch.nn's does."""
    layer, reference = make_pair(mode, I, H, dtype=torch.float32)
    x = torch.randn(T, B, I)
    if where == "input":
        x[2, 1, 0] = float("nan")
    else:
        with torch.no_grad():
            for module in (layer, reference):
                module.weight_hh_l0[0, 0] = float("nan")
    with torch.no_grad():
        ours, theirs = layer(x)[0], reference(x)[0]
    torch.testing.assert_close(torch.isnan(ours), torch.isnan(theirs))
    assert torch.isnan(ours).any()


@pytest.mark.parametrize("mode", list(MODES))
def test_inf_input_matches_torch_nn(mode):
    """An infinite input takes the torch loop (the compiled one assumes finite numbers)."""
    layer, reference = make_pair(mode, I, H, dtype=torch.float32)
    x = torch.randn(T, B, I)
    x[1, 0, 0] = float("inf")
    with torch.no_grad():
        ours, theirs = layer(x)[0], reference(x)[0]
    torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("mode, where", value_sites("input", "weight_ih", "weight_hh", "bias", "h0", "c0"))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_anywhere_come_out_as_torch_nn_s(mode, where, value):
    """The compiled forward checks every pre-activation for NaN and Inf (it is built for
    finite numbers) and then reruns the call on the torch loop: outputs and gradients must
    be torch.nn's, NaN for NaN, wherever the bad value entered (c0: an LSTM's only input
    that reaches no pre-activation, checked before the loop)."""
    layer, reference = make_pair(mode, I, H, dtype=torch.float32, implementation="native")
    x = torch.randn(T, B, I)
    state = initial_state(mode, (1, B, H), torch.float32, "cpu")
    state = tuple(s.detach() for s in state_tensors(state))
    if where == "input":
        x[1, 0, 2] = value
    elif where in ("h0", "c0"):
        state[0 if where == "h0" else 1][0, 1, 3] = value
    else:
        name = {"weight_ih": "weight_ih_l0", "weight_hh": "weight_hh_l0", "bias": "bias_hh_l0"}[where]
        with torch.no_grad():
            for module in (layer, reference):
                getattr(module, name).view(-1)[4] = value
    state = state if mode == "lstm" else state[0]
    results = []
    for module in (layer, reference):
        x_in = x.clone().requires_grad_()
        output, final = module(x_in, state)
        grad = torch.autograd.grad(output.sum(), x_in)[0]
        results.append((output, grad))
    (ours, ours_grad), (theirs, theirs_grad) = results
    if value != value:  # NaN always reaches the output (an Inf may only saturate gates)
        assert not torch.isfinite(theirs).all()
    torch.testing.assert_close(ours, theirs, equal_nan=True, **TOLERANCES[torch.float32])
    torch.testing.assert_close(ours_grad, theirs_grad, equal_nan=True, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("where", ["output", "final state"])
def test_a_nan_gradient_flows_back_as_in_torch_nn(mode, where):
    """A NaN in the incoming gradient (a diverged loss) must reach the input and weight
    gradients where torch.nn's does; the compiled sweep once turned it into zeros."""
    layer, reference = make_pair(mode, I, H, dtype=torch.float32, implementation="native")
    x = torch.randn(T, B, I)
    grad_out = torch.randn(T, B, H)
    grad_final = torch.randn(1, B, H)
    (grad_out[2, 1, 3:4] if where == "output" else grad_final[0, 1, 3:4]).fill_(float("nan"))
    results = []
    for module in (layer, reference):
        x_in = x.clone().requires_grad_()
        output, state = module(x_in)
        final = state[0] if mode == "lstm" else state
        torch.autograd.backward([output, final], [grad_out, grad_final])
        results.append([x_in.grad] + [p.grad for p in module.parameters()])
    if mode != "rnn_relu":  # (a ReLU unit that is off stops the NaN, in torch.nn too)
        assert all(torch.isnan(theirs).any() for theirs in results[1])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, equal_nan=True, **TOLERANCES[torch.float32])
