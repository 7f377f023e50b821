"""Mixed precision on the CPU: under torch.autocast the layers return what torch.nn's return
(dtype of the output and the state, the hx dtypes accepted), and gradients reach the float32
weights; bfloat16 and float16 modules run on the torch loop."""

import pytest
import torch

import whiteboard
from whiteboard import backends


def _pair(name, **kwargs):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(4, 6, 2, **kwargs)
    ours = getattr(whiteboard, name)(4, 6, 2, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _first_state(result, name):
    return result[1][0] if name == "LSTM" else result[1]


@pytest.mark.parametrize("name", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("hx_dtype", [None, torch.float32, torch.bfloat16], ids=["no-hx", "float32-hx", "bf16-hx"])
def test_under_cpu_bfloat16_autocast_dtypes_are_torch_nns(name, hx_dtype):
    ours, theirs = _pair(name)
    x = torch.randn(5, 3, 4)
    hx = None if hx_dtype is None else torch.randn(2, 3, 6, dtype=hx_dtype)
    hx = (hx, hx) if name == "LSTM" and hx is not None else hx
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = theirs(x, hx), ours(x, hx)
    assert got[0].dtype == expected[0].dtype
    assert _first_state(got, name).dtype == _first_state(expected, name).dtype
    # bfloat16 keeps ~3 significant digits; torch.nn's GRU runs its GEMMs in bfloat16 even
    # where it returns float32, ours in float32.
    torch.testing.assert_close(got[0].float(), expected[0].float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("name", ["RNN", "GRU"])
def test_under_cpu_float16_autocast_dtypes_are_torch_nns(name):
    ours, theirs = _pair(name)
    x = torch.randn(5, 3, 4)
    with torch.autocast("cpu", dtype=torch.float16):
        expected, got = theirs(x), ours(x)
    assert got[0].dtype == expected[0].dtype and _first_state(got, name).dtype == _first_state(expected, name).dtype


def test_float16_autocast_lstm_computes_in_float16_where_torch_nns_cpu_kernel_fails():
    ours, _ = _pair("LSTM")
    with torch.autocast("cpu", dtype=torch.float16):
        output, (h, c) = ours(torch.randn(5, 3, 4))
    assert output.dtype == h.dtype == c.dtype == torch.float16


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU", "LayerNormLSTM"])
def test_gradients_under_autocast_reach_the_float32_weights(name):
    torch.manual_seed(0)
    layer = getattr(whiteboard, name)(4, 6, 2)
    x = torch.randn(5, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = layer(x)[0]
    if name != "GRU":
        assert output.dtype == torch.bfloat16
    output.float().pow(2).sum().backward()
    low = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    layer(x)[0].pow(2).sum().backward()
    for n, p in layer.named_parameters():
        assert low[n].dtype == torch.float32
        torch.testing.assert_close(low[n], p.grad, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU", "LayerNormLSTM"])
def test_low_precision_modules_run_on_the_torch_loop_near_float32(name, dtype):
    torch.manual_seed(0)
    layer = getattr(whiteboard, name)(4, 6, 2)
    x = torch.randn(5, 3, 4)
    expected = layer(x)[0]
    low = layer.to(dtype)
    x_low = x.to(dtype).requires_grad_()
    assert backends.explain(low, x_low).chosen == "torch-loop"
    output = low(x_low)[0]
    assert output.dtype == dtype
    # A layer norm in bfloat16 itself loses more (a whole low-precision module is the user's choice).
    tolerance = 0.1 if name == "LayerNormLSTM" else 3e-2
    torch.testing.assert_close(output.float(), expected, atol=tolerance, rtol=tolerance)
    output.float().sum().backward()
    assert x_low.grad.dtype == dtype and torch.isfinite(x_low.grad.float()).all()
