"""The LSTM and GRU forward's own per-step GEMM: W packed into panels of 16 units, an
AVX-512 microkernel with the gate math as its epilogue (recurrent.cpp's gate_panels), and
the LSTM reverse sweep's dZ_t W_hh on W_hh in column panels. Float32 on CPUs with AVX-512
only; elsewhere the layers use oneDNN's or MKL's GEMM, which the rest of the suite covers."""

import pytest
import torch

from whiteboard import fused, native
from helpers import TOLERANCES, initial_state, loss_of, make_pair, state_tensors


@pytest.fixture
def module():
    compiled = native.load()
    if compiled is None or not compiled.has_panels():
        pytest.skip("the compiled loops are not built here, or built without AVX-512")
    return compiled


def _reference_panels(weights, gates=4):
    """gate_panels' layout from its definition: panel p, row k, column 16 g + u holds the
    weight of gate g of unit 16 p + u at k ([W_0, W_1, ...] joined along K), zero past H."""
    joined = torch.cat(weights, dim=1)
    H = joined.shape[0] // gates
    panels = -(-H // 16)
    out = torch.zeros(panels, joined.shape[1], 16 * gates)
    for p in range(panels):
        for g in range(gates):
            for u in range(16):
                if 16 * p + u < H:
                    out[p, :, 16 * g + u] = joined[g * H + 16 * p + u]
    return out


@pytest.mark.parametrize("gates", [4, 3], ids=["lstm", "gru"])
@pytest.mark.parametrize("H", [1, 16, 17, 40])
@pytest.mark.parametrize("ks", [(5,), (16,), (37,), (3, 16), (16, 21)], ids=str)
def test_panels_hold_each_weight_where_the_kernel_reads_it(module, gates, H, ks):
    weights = [torch.randn(gates * H, k) for k in ks]
    torch.testing.assert_close(module.gate_panels(weights, gates), _reference_panels(weights, gates), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 1), (5, 64), (7, 65), (12, 200)], ids=str)
def test_column_panels_hold_each_weight_where_the_kernel_reads_it(module, shape):
    """column_panels: panel p, row k, column c holds matrix[k, 64 p + c], zero past N."""
    matrix = torch.randn(shape)
    K, N = shape
    expected = torch.zeros(-(-N // 64), K, 64)
    for p in range(expected.shape[0]):
        columns = matrix[:, 64 * p : 64 * (p + 1)]
        expected[p, :, : columns.shape[1]] = columns
    assert torch.equal(module.column_panels(matrix), expected)
    assert torch.equal(module.column_panels(matrix.t().contiguous().t()), expected)  # a strided view


def test_panels_of_a_transposed_view_are_those_of_its_copy(module):
    weight = torch.randn(33, 4 * 20).t()  # (80, 33), not contiguous
    assert torch.equal(module.gate_panels([weight], 4), _reference_panels([weight.contiguous()]))


def test_panels_refuse_what_the_kernel_cannot_read(module):
    with pytest.raises(RuntimeError, match="float32"):
        module.gate_panels([torch.randn(8, 3, dtype=torch.float64)], 4)
    with pytest.raises(RuntimeError, match="one H"):
        module.gate_panels([torch.randn(8, 3), torch.randn(12, 3)], 4)
    with pytest.raises(RuntimeError, match="one H"):
        module.gate_panels([torch.randn(8, 3)], 3)  # 8 rows are not 3 gates
    with pytest.raises(RuntimeError, match="3 .GRU. or 4"):
        module.gate_panels([torch.randn(8, 3)], 2)
    with pytest.raises(RuntimeError, match="no weight"):
        module.gate_panels([], 4)


def test_panels_are_used_only_where_they_pay(module, monkeypatch):
    w = torch.randn(80, 20)
    assert fused._gate_panels((w,), 4, 8, module, 6) is not None
    assert fused._gate_panels((w,), 4, 40, module, 1) is not None  # one step repays packing from batch 40
    assert fused._gate_panels((w,), 4, 2, module, 6) is None  # a few rows in all: generation
    assert fused._gate_panels((w.double(),), 4, 8, module, 6) is None
    assert fused._gate_panels((torch.randn(60, 20),), 3, 8, module, 6).shape == (2, 20, 48)  # a GRU's
    assert fused._gate_panels((w,), 4, 8, None, 6) is None  # the torch loop
    assert fused._backward_panels(w, 8, module, 6) is not None  # the reverse sweep's, likewise
    large = torch.randn(2600, 650)  # 6.8 MB: over the row-block limit
    assert fused._backward_panels(large, 20, module, 35) is None  # MKL's sgemm won there
    assert fused._backward_panels(large, 32, module, 35) is not None
    assert fused._backward_panels(w, 2, module, 6) is None
    assert fused._backward_panels(w.double(), 8, module, 6) is None
    monkeypatch.setattr(native, "panel_gemm", False)
    assert fused._gate_panels((w,), 4, 8, module, 6) is None
    assert fused._backward_panels(w, 8, module, 6) is None


@pytest.fixture(params=["default", "units-over-threads", "row-blocks", "one-thread"])
def split(request, module):
    """How a step's work is shared: as the sizes choose; the panels of each step split
    over two threads even at tiny sizes; each thread running all steps on its own rows;
    one thread."""
    threads = torch.get_num_threads()
    minimum, limit = module.parallel_min_elements(), module.row_blocks_max_weight_bytes()
    torch.set_num_threads(1 if request.param == "one-thread" else 2)
    if request.param == "units-over-threads":
        module.set_parallel_min_elements(1)
        module.set_row_blocks_max_weight_bytes(0)
    elif request.param == "row-blocks":
        module.set_row_blocks_max_weight_bytes(1 << 40)
    yield request.param
    module.set_parallel_min_elements(minimum)
    module.set_row_blocks_max_weight_bytes(limit)
    torch.set_num_threads(threads)


@pytest.fixture
def panel_calls(module, monkeypatch):
    """The weights' shapes of every call that packed panels: from Python, or inside the
    one-call inference (which packs W_hh when asked to)."""
    calls = []
    original = fused._gate_panels

    def spy(weights, *args):
        packed = original(weights, *args)
        if packed is not None:
            calls.append(tuple(tuple(w.shape) for w in weights))
        return packed

    inference = module.lstm_inference

    def inference_spy(x, h0, c0, w_ih, w_hh, b_ih, b_hh, chunk_steps, panels):
        if panels:
            calls.append((tuple(w_hh.shape),))
        return inference(x, h0, c0, w_ih, w_hh, b_ih, b_hh, chunk_steps, panels)

    backward = fused._backward_panels

    def backward_spy(w_hh, *args):
        packed = backward(w_hh, *args)
        if packed is not None:
            calls.append(("backward", tuple(w_hh.shape)))
        return packed

    monkeypatch.setattr(fused, "_gate_panels", spy)
    monkeypatch.setattr(fused, "_backward_panels", backward_spy)
    monkeypatch.setattr(module, "lstm_inference", inference_spy, raising=False)
    return calls


# (hidden, batch): whole and ragged last panels (21 = 16 + 5); whole and ragged chunks of
# six rows (13 = 6 + 6 + 1; row blocks 6 and 7)
SIZES = [(16, 6), (21, 13), (5, 7), (40, 12)]


@pytest.mark.parametrize("hidden, batch", SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("fold", [0.0, 2.0], ids=["projected", "folded"])  # 2: the upper layer (2H in) folds too
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no-grad"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_panel_forward_matches_torch_nn(module, split, panel_calls, hidden, batch, fold, grad, lengths, monkeypatch):
    """Two layers, both directions, with an initial state: outputs, final states and (when
    training) every gradient as torch.nn's, however the work is split."""
    monkeypatch.setattr(native, "fold_input_max_ratio", fold)
    monkeypatch.setattr(native, "backward_panels_min_batch", 1)  # the reverse sweep's panels at every split
    steps, inputs = 6, 7
    layer, reference = make_pair("lstm", inputs, hidden, dtype=torch.float32, implementation="native",
                                 num_layers=2, bidirectional=True)
    x = torch.randn(steps, batch, inputs)
    state = initial_state("lstm", (4, batch, hidden), torch.float32, "cpu")
    step_counts = torch.randint(1, steps + 1, (batch,)) if lengths else None
    ours_in, ref_in = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        output, final = layer(ours_in, state, lengths=step_counts)
        if step_counts is None:
            ref_output, ref_final = reference(ref_in, state)
        else:
            packed = torch.nn.utils.rnn.pack_padded_sequence(ref_in, step_counts, enforce_sorted=False)
            ref_packed, ref_final = reference(packed, state)
            ref_output = torch.nn.utils.rnn.pad_packed_sequence(ref_packed, total_length=steps)[0]
    # every layer and direction packed its own panels: W_hh, or [W_ih, W_hh] when folded
    first_k, upper_k = ((inputs, hidden), (2 * hidden, hidden)) if fold else ((hidden,), (hidden,))
    expected = [tuple((4 * hidden, k) for k in first_k)] * 2 + [tuple((4 * hidden, k) for k in upper_k)] * 2
    assert sorted(panel_calls, key=str) == sorted(expected, key=str)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(output, ref_output, **tol)
    for a, b in zip(state_tensors(final), state_tensors(ref_final)):
        torch.testing.assert_close(a, b, **tol)
    if grad:
        wrt = [ours_in, *layer.parameters(), *state]
        panel_calls.clear()
        grads = torch.autograd.grad(loss_of(output, final), wrt)
        # every layer and direction ran its reverse sweep on W_hh in column panels
        assert panel_calls == [("backward", (4 * hidden, hidden))] * 4
        ref_grads = torch.autograd.grad(loss_of(ref_output, ref_final), [ref_in, *reference.parameters(), *state])
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("where", ["input", "weight_ih", "weight_hh", "bias", "h0", "c0"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_on_the_panel_path_come_out_as_torch_nn_s(module, split, panel_calls, where, value):
    """The epilogue's finite check must see a NaN or Inf wherever it enters, in any thread's
    share, and the call rerun on the torch loop."""
    steps, batch, inputs, hidden = 5, 9, 4, 21
    layer, reference = make_pair("lstm", inputs, hidden, dtype=torch.float32, implementation="native")
    x = torch.randn(steps, batch, inputs)
    h0, c0 = torch.randn(1, batch, hidden), torch.randn(1, batch, hidden)
    with torch.no_grad():
        if where == "input":
            x[3, batch - 1, 1] = value  # the last row: the second thread's share
        elif where == "h0":
            h0[0, batch - 1, hidden - 1] = value  # in the ragged last panel
        elif where == "c0":
            c0[0, 2, 17] = value
        else:
            for model in (layer, reference):
                getattr(model, f"{where}_l0" if where != "bias" else "bias_hh_l0")[4 * hidden - 1, ...] = value
        ours, (h_n, c_n) = layer(x, (h0, c0))
        theirs, (ref_h, ref_c) = reference(x, (h0, c0))
    # c0 reaches no pre-activation: it is checked before the call, which then never packs
    assert bool(panel_calls) == (where != "c0")
    if value != value:  # NaN must come out; an Inf may saturate a gate into finite values, as in torch.nn
        assert torch.isnan(ours).any()
    tol = TOLERANCES[torch.float32]
    for a, b in ((ours, theirs), (h_n, ref_h), (c_n, ref_c)):
        torch.testing.assert_close(a, b, equal_nan=True, **tol)


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 3 * 8 * 4 * 21 * 4], ids=["one-chunk", "chunks-of-3-steps"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("given_state", [True, False], ids=["state", "zeros"])
def test_one_call_inference_matches_torch_nn(module, split, chunk_bytes, bias, given_state, monkeypatch):
    """Without grad or lengths each layer and direction is one compiled call that projects
    the input in chunks of steps and runs the panel GEMM (recurrent.cpp's lstm_inference)."""
    monkeypatch.setattr(fused, "CHUNK_BYTES", chunk_bytes)
    calls = []
    original = module.lstm_inference
    monkeypatch.setattr(module, "lstm_inference", lambda *a: calls.append(a[-2:]) or original(*a), raising=False)
    steps, batch, inputs, hidden = 8, 8, 30, 21
    layer, reference = make_pair("lstm", inputs, hidden, dtype=torch.float32, num_layers=2, bidirectional=True,
                                 bias=bias)
    x = torch.randn(steps, batch, inputs)
    state = initial_state("lstm", (4, batch, hidden), torch.float32, "cpu") if given_state else None
    with torch.no_grad():
        output, final = layer(x, state)
        ref_output, ref_final = reference(x, state)
    chunk_steps = 3 if chunk_bytes < steps * batch * 4 * hidden * 4 else steps
    assert calls == [(chunk_steps, True)] * 4  # 2 layers x 2 directions
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(output, ref_output, **tol)
    for a, b in zip(state_tensors(final), state_tensors(ref_final)):
        torch.testing.assert_close(a, b, **tol)


def test_one_call_inference_is_taken_only_without_lengths_folding_or_float64(module):
    x = torch.randn(8, 8, 30)
    assert fused.lstm_one_call(x, 21, None, module) == (8, True)
    assert fused.lstm_one_call(x[:2, :4], 21, None, module) == (2, False)  # a few rows: no panels
    assert fused.lstm_one_call(x, 21, torch.ones(8, 8, 1, dtype=torch.bool), module) is None  # lengths
    assert fused.lstm_one_call(x, 200, None, module) is None  # 30 inputs, 200 units: folded
    assert fused.lstm_one_call(x.double(), 21, None, module) is None
    assert fused.lstm_one_call(x, 21, None, None) is None


@pytest.mark.parametrize("hidden, batch", [(16, 8), (21, 13), (5, 7), (40, 17)], ids=lambda v: str(v))
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no-grad"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("bias", [True, False])
def test_gru_panel_forward_matches_torch_nn(module, split, panel_calls, hidden, batch, grad, lengths, bias):
    """The GRU's panels hold 3 gates (8-row chunks: 13 rows are 8 + 5, 17 are 8 + 8 + 1):
    two layers, both directions, an initial state; outputs, final states and gradients as
    torch.nn's, however the work is split."""
    steps, inputs = 6, 7
    layer, reference = make_pair("gru", inputs, hidden, dtype=torch.float32, implementation="native",
                                 num_layers=2, bidirectional=True, bias=bias)
    x = torch.randn(steps, batch, inputs)
    state = initial_state("gru", (4, batch, hidden), torch.float32, "cpu")
    step_counts = torch.randint(1, steps + 1, (batch,)) if lengths else None
    ours_in, ref_in = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        output, final = layer(ours_in, state, lengths=step_counts)
        if step_counts is None:
            ref_output, ref_final = reference(ref_in, state)
        else:
            packed = torch.nn.utils.rnn.pack_padded_sequence(ref_in, step_counts, enforce_sorted=False)
            ref_packed, ref_final = reference(packed, state)
            ref_output = torch.nn.utils.rnn.pad_packed_sequence(ref_packed, total_length=steps)[0]
    # W_hh of every layer and direction, without grad (training keeps oneDNN's or MKL's GEMM)
    assert panel_calls == ([] if grad else [((3 * hidden, hidden),)] * 4)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(output, ref_output, **tol)
    torch.testing.assert_close(final, ref_final, **tol)
    if grad:
        grads = torch.autograd.grad(loss_of(output, final), [ours_in, *layer.parameters(), state])
        ref_grads = torch.autograd.grad(loss_of(ref_output, ref_final), [ref_in, *reference.parameters(), state])
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("where", ["input", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_on_the_gru_panel_path_come_out_as_torch_nn_s(module, split, panel_calls, where, value):
    """A NaN or Inf in any of the GRU's inputs, in the last row or the ragged last panel,
    is seen by the epilogue's check and the call rerun on the torch loop."""
    steps, batch, inputs, hidden = 5, 9, 4, 21
    layer, reference = make_pair("gru", inputs, hidden, dtype=torch.float32, implementation="native")
    x, h0 = torch.randn(steps, batch, inputs), torch.randn(1, batch, hidden)
    with torch.no_grad():
        if where == "input":
            x[3, batch - 1, 1] = value
        elif where == "h0":
            h0[0, batch - 1, hidden - 1] = value
        else:
            for model in (layer, reference):  # the n gate's last unit: r * (W_hn h + b_hn) too
                getattr(model, f"{where}_l0")[3 * hidden - 1, ...] = value
        ours, h_n = layer(x, h0)
        theirs, ref_h = reference(x, h0)
    assert panel_calls
    if value != value:
        assert torch.isnan(ours).any()
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(ours, theirs, equal_nan=True, **tol)
    torch.testing.assert_close(h_n, ref_h, equal_nan=True, **tol)


@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_gru_panel_forward_saves_what_backward_reads(module, split, lengths):
    """The GRU layers take panels without grad only, but the compiled forward also saves
    r|z, n and W_hn h + b_hn for backward on them: those must equal the plain path's."""
    steps, batch, hidden = 5, 13, 21
    xw = torch.randn(steps, batch, 3 * hidden)
    w_hh = torch.randn(3 * hidden, hidden) * 0.3
    b_ih, b_hh = torch.randn(3 * hidden), torch.randn(3 * hidden)
    mask = (torch.arange(steps).unsqueeze(1) < torch.randint(1, steps + 1, (batch,))).contiguous() if lengths else None
    results = []
    for packed in (module.gate_panels([w_hh], 3), None):
        hs = torch.zeros(steps + 1, batch, hidden)
        hs[0] = torch.randn(batch, hidden, generator=torch.Generator().manual_seed(2))
        saved = [torch.full((steps, batch, width), float("nan")) for width in (2 * hidden, hidden, hidden)]
        w = w_hh if packed is not None else w_hh.t().contiguous()
        assert module.gru_forward(xw, b_ih, w, b_hh, hs, *saved, mask, packed, 0)
        results.append([hs, *saved])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])


@pytest.fixture
def rnn_panel_calls(module, monkeypatch):
    """W_hh's shape for every call that packed the RNN's column panels."""
    calls = []
    original = fused._rnn_panels

    def spy(w_hh, *args):
        packed = original(w_hh, *args)
        if packed is not None:
            calls.append(tuple(w_hh.shape))
        return packed

    monkeypatch.setattr(fused, "_rnn_panels", spy)
    monkeypatch.setattr(native, "fold_input_max_ratio", 0.0)  # the folded RNN keeps the ATen GEMM
    return calls


@pytest.mark.parametrize("mode", ["rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("hidden, batch", [(16, 6), (21, 13), (70, 7)], ids=lambda v: str(v))
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no-grad"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_rnn_panel_forward_matches_torch_nn(module, split, rnn_panel_calls, mode, hidden, batch, grad, lengths):
    """The RNN's column panels hold 64 units (70 = 64 + 6: a ragged second panel): two
    layers, both directions, an initial state; outputs, final states and gradients as
    torch.nn's, however the work is split."""
    steps, inputs = 6, 7
    layer, reference = make_pair(mode, inputs, hidden, dtype=torch.float32, implementation="native",
                                 num_layers=2, bidirectional=True)
    x = torch.randn(steps, batch, inputs)
    state = initial_state(mode, (4, batch, hidden), torch.float32, "cpu")
    step_counts = torch.randint(1, steps + 1, (batch,)) if lengths else None
    ours_in, ref_in = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        output, final = layer(ours_in, state, lengths=step_counts)
        if step_counts is None:
            ref_output, ref_final = reference(ref_in, state)
        else:
            packed = torch.nn.utils.rnn.pack_padded_sequence(ref_in, step_counts, enforce_sorted=False)
            ref_packed, ref_final = reference(packed, state)
            ref_output = torch.nn.utils.rnn.pad_packed_sequence(ref_packed, total_length=steps)[0]
    assert rnn_panel_calls == [(hidden, hidden)] * 4  # W_hh of every layer and direction
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(output, ref_output, **tol)
    torch.testing.assert_close(final, ref_final, **tol)
    if grad:
        grads = torch.autograd.grad(loss_of(output, final), [ours_in, *layer.parameters(), state])
        ref_grads = torch.autograd.grad(loss_of(ref_output, ref_final), [ref_in, *reference.parameters(), state])
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, **tol)


def test_rnn_sigmoid_on_panels_matches_the_plain_gemm(module, rnn_panel_calls, monkeypatch):
    """torch.nn has no sigmoid RNN; the panel path must match the ATen-GEMM path."""
    import whiteboard

    layer = whiteboard.RNN(7, 70, nonlinearity="sigmoid", implementation="native")
    x = torch.randn(6, 9, 7)
    with torch.no_grad():
        ours = layer(x)[0]
        monkeypatch.setattr(native, "panel_gemm", False)
        plain = layer(x)[0]
    assert rnn_panel_calls == [(70, 70)]
    torch.testing.assert_close(ours, plain, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("where", ["input", "weight_ih", "weight_hh", "bias_hh", "h0"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_on_the_rnn_panel_path_come_out_as_torch_nn_s(module, split, rnn_panel_calls, where, value):
    steps, batch, inputs, hidden = 5, 9, 4, 70
    layer, reference = make_pair("rnn_tanh", inputs, hidden, dtype=torch.float32, implementation="native")
    x, h0 = torch.randn(steps, batch, inputs), torch.randn(1, batch, hidden)
    with torch.no_grad():
        if where == "input":
            x[3, batch - 1, 1] = value
        elif where == "h0":
            h0[0, batch - 1, hidden - 1] = value  # in the ragged last panel
        else:
            for model in (layer, reference):
                getattr(model, f"{where}_l0")[hidden - 1, ...] = value
        ours, h_n = layer(x, h0)
        theirs, ref_h = reference(x, h0)
    assert rnn_panel_calls
    if value != value:
        assert torch.isnan(ours).any()
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(ours, theirs, equal_nan=True, **tol)
    torch.testing.assert_close(h_n, ref_h, equal_nan=True, **tol)
