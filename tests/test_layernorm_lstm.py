"""The layer-normalized LSTM: its reference step, the fused path against it, gradcheck."""

import pytest
import torch
from torch.autograd import gradcheck
from torch.nn import functional as F

import whiteboard
from whiteboard.nn import cells
from whiteboard.backends import functions as fused

from helpers import loss_of, tolerance


def _randomize_normalization(layer):
    """Gains and shifts away from their 1 / 0 start, so a wrong gradient for them shows."""
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if name.startswith(("gain_", "bias_cell")):
                parameter.copy_(torch.randn_like(parameter) * 0.5 + (1.0 if name.startswith("gain_") else 0.0))


def test_layer_norm_matches_torch():
    z = torch.randn(5, 12, dtype=torch.float64) * 3 + 1
    gain, bias = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    expected = F.layer_norm(z, (12,), gain, bias, eps=cells.LAYER_NORM_EPS)
    torch.testing.assert_close(cells.layer_norm(z, gain, bias), expected)


def test_step_is_the_papers_equations():
    """Written out again with torch's own layer_norm: an independent oracle for the step."""
    B, I, H = 3, 4, 5
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, h, c = r(B, I), r(B, H), r(B, H)
    w_ih, w_hh, b_ih, b_hh = r(4 * H, I), r(4 * H, H), r(4 * H), r(4 * H)
    gain_ih, gain_hh, gain_cell, bias_cell = r(4 * H), r(4 * H), r(H), r(H)
    step = cells.layernorm_lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh, gain_ih, gain_hh, gain_cell, bias_cell)
    z = F.layer_norm(x @ w_ih.T, (4 * H,), gain_ih) + F.layer_norm(h @ w_hh.T, (4 * H,), gain_hh) + b_ih + b_hh
    i, f, gg, o = z.chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
    h_new = torch.sigmoid(o) * torch.tanh(F.layer_norm(c_new, (H,), gain_cell, bias_cell))
    torch.testing.assert_close(step.cell, c_new)
    torch.testing.assert_close(step.hidden, h_new)
    torch.testing.assert_close(step.forget_gate, torch.sigmoid(f))


def _pair(dtype, device, **kwargs):
    fused_layer = whiteboard.LayerNormLSTM(4, 5, implementation="fused", **kwargs).to(device=device, dtype=dtype)
    _randomize_normalization(fused_layer)
    reference = whiteboard.LayerNormLSTM(4, 5, implementation="reference", **kwargs).to(device=device, dtype=dtype)
    reference.load_state_dict(fused_layer.state_dict())
    return fused_layer, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"num_layers": 2}, {"bias": False}, {"bidirectional": True, "num_layers": 2}, {"batch_first": True}],
    ids=["plain", "two-layers", "no-bias", "bidirectional", "batch-first"],
)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
def test_fused_matches_reference_forward_and_gradients(dtype, kwargs, with_state, device):
    fused_layer, reference = _pair(dtype, device, **kwargs)
    T, B = 7, 3
    shape = (B, T, 4) if kwargs.get("batch_first") else (T, B, 4)
    x = torch.randn(shape, dtype=dtype, device=device)
    layers = fused_layer.num_layers * fused_layer.num_directions
    state = None
    if with_state:
        state = tuple(torch.randn(layers, B, 5, dtype=dtype, device=device) for _ in range(2))
    results = []
    for layer in (fused_layer, reference):
        x_in = x.clone().requires_grad_()
        s_in = None if state is None else tuple(s.clone().requires_grad_() for s in state)
        output, final = layer(x_in, s_in)
        loss_of(output, final).backward()
        grads = [x_in.grad] + ([] if s_in is None else [s.grad for s in s_in])
        grads += [p.grad for p in layer.parameters()]
        results.append((output, final, grads))
    (out_f, state_f, grads_f), (out_r, state_r, grads_r) = results
    tol = tolerance(dtype, device)
    torch.testing.assert_close(out_f, out_r, **tol)
    for a, b in zip(state_f, state_r):
        torch.testing.assert_close(a, b, **tol)
    names = ["input"] + (["h_0", "c_0"] if with_state else []) + [n for n, _ in fused_layer.named_parameters()]
    for name, a, b in zip(names, grads_f, grads_r):
        assert a is not None, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_fused_matches_reference_with_lengths(device):
    fused_layer, reference = _pair(torch.float64, device)
    x = torch.randn(6, 3, 4, dtype=torch.float64, device=device)
    lengths = torch.tensor([6, 2, 4])
    results = []
    for layer in (fused_layer, reference):
        x_in = x.clone().requires_grad_()
        output, final = layer(x_in, lengths=lengths)
        loss_of(output, final).backward()
        results.append((output, final, [x_in.grad] + [p.grad for p in layer.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][0][2:, 1].abs().max() == 0  # beyond its length a sequence outputs zeros
    for a, b in zip(results[0][1] + tuple(results[0][2]), results[1][1] + tuple(results[1][2])):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_gradcheck(bias, masked):
    g = torch.Generator().manual_seed(3)
    T, B, I, H = 4, 2, 3, 2
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    mask = None
    if masked:
        mask = (torch.arange(T).unsqueeze(1) < torch.tensor([4, 2]).unsqueeze(0)).unsqueeze(-1)
    args = (
        r(T, B, I), r(B, H), r(B, H), r(4 * H, I), r(4 * H, H),
        r(4 * H) if bias else None, r(4 * H) if bias else None,
        r(4 * H), r(4 * H), r(H), r(H), mask, cells.LAYER_NORM_EPS,
    )
    assert gradcheck(fused.FusedLayerNormLSTM.apply, args)


def test_outputs_do_not_depend_on_the_scale_of_the_weights():
    """What layer normalization buys: scaling W_ih or W_hh changes (almost) nothing."""
    layer = whiteboard.LayerNormLSTM(4, 6, dtype=torch.float64)
    with torch.no_grad():  # projections well above eps = 1e-5 in variance, where invariance holds
        layer.weight_hh_l0.mul_(10.0)
    x = torch.randn(9, 2, 4, dtype=torch.float64)
    before, _ = layer(x)
    with torch.no_grad():
        layer.weight_ih_l0.mul_(10.0)
        layer.weight_hh_l0.mul_(3.0)
    after, _ = layer(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    plain = whiteboard.LSTM(4, 6, dtype=torch.float64)
    plain_before, _ = plain(x)
    with torch.no_grad():
        plain.weight_ih_l0.mul_(10.0)
    assert (plain(x)[0] - plain_before).abs().max() > 0.1  # the test can tell the difference


def test_parameters_initial_values_and_torch_nn_weights_load():
    layer = whiteboard.LayerNormLSTM(4, 5, num_layers=2)
    names = dict(layer.named_parameters())
    assert names["gain_ih_l1"].shape == (20,) and names["gain_cell_l1"].shape == (5,)
    assert torch.all(names["gain_hh_l0"] == 1) and torch.all(names["bias_cell_l0"] == 0)
    reference = torch.nn.LSTM(4, 5, num_layers=2)
    missing, unexpected = layer.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and all(n.startswith(("gain_", "bias_cell")) for n in missing)
    torch.testing.assert_close(layer.weight_hh_l1, reference.weight_hh_l1)


def test_trace_records_the_lstm_fields_and_matches_forward():
    layer = whiteboard.LayerNormLSTM(4, 5)
    _randomize_normalization(layer)
    x = torch.randn(6, 2, 4)
    output, state = layer(x)
    traced_output, traced_state, trace = layer.trace(x)
    torch.testing.assert_close(traced_output, output, **tolerance(torch.float32))
    assert set(trace[0][0]) == set(whiteboard.TRACE_FIELDS["LSTM"])
    torch.testing.assert_close(trace.get("cell")[-1], state[1][0], **tolerance(torch.float32))


def test_native_is_refused_and_auto_runs():
    with pytest.raises(RuntimeError, match="no compiled loop"):
        whiteboard.LayerNormLSTM(4, 5, implementation="native")(torch.randn(3, 2, 4))
    output, _ = whiteboard.LayerNormLSTM(4, 5)(torch.randn(3, 2, 4))
    assert output.shape == (3, 2, 5)
