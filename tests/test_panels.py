"""The LSTM and GRU forward's own per-step GEMM: W packed into panels of 16 units, an
AVX-512 microkernel with the gate math as its epilogue (recurrent.cpp's gate_panels), the
RNN forward's on column panels, and every reverse sweep's dZ_t W_hh on W_hh in column panels. Float32 on CPUs with AVX-512
only; elsewhere the layers use oneDNN's or MKL's GEMM, which the rest of the suite covers."""

import pytest
import torch

from whiteboard.backends.compiled import build as native
from whiteboard.backends.compiled import tuning
from whiteboard.backends.compiled import planning
from helpers import TOLERANCES, initial_state, loss_of, make_pair, state_tensors, torch_nn_run


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
    assert planning.gate_panels((w,), 4, 8, module, 6) is not None
    assert planning.gate_panels((w,), 4, 40, module, 1) is not None  # one step repays packing from batch 40
    assert planning.gate_panels((w,), 4, 2, module, 6) is None  # a few rows in all: generation
    assert planning.gate_panels((w.double(),), 4, 8, module, 6) is None
    assert planning.gate_panels((torch.randn(60, 20),), 3, 8, module, 6).shape == (2, 20, 48)  # a GRU's
    assert planning.gate_panels((w,), 4, 8, None, 6) is None  # the torch loop
    assert planning.backward_panels(w, 8, module, 6) is not None  # the reverse sweep's, likewise
    large = torch.randn(2600, 650)  # 6.8 MB: over the row-block limit
    assert planning.backward_panels(large, 20, module, 35) is None  # MKL's sgemm won there
    assert planning.backward_panels(large, 32, module, 35) is not None
    assert planning.backward_panels(w, 2, module, 6) is None
    assert planning.backward_panels(w.double(), 8, module, 6) is None
    monkeypatch.setattr(tuning, "panel_gemm", False)
    assert planning.gate_panels((w,), 4, 8, module, 6) is None
    assert planning.backward_panels(w, 8, module, 6) is None


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


@pytest.fixture(params=["small-step-paths", "large-step-paths"])
def step_size_paths(request, module):
    """The ways taken only for large steps, off or on at every size: the LSTM and GRU
    forward's epilogue requesting its cache lines a few at a time during the K loop
    (recurrent.cpp's spread_lines; the GRU's in training), and the reverse sweeps'
    column-panel GEMM walking K in blocks (of 24 here: several, the last ragged, for the
    LSTM's 4H = 84, the GRU's 3H = 63, the RNN's H = 70; column_panel_product_blocked)."""
    saved = module.spread_lines_min_step_bytes(), module.column_blocks_min_bytes(), module.column_k_block()
    large = request.param == "large-step-paths"
    module.set_spread_lines_min_step_bytes(0 if large else 1 << 40)
    module.set_column_blocks_min_bytes(0 if large else 1 << 40)
    module.set_column_k_block(24)
    yield request.param
    module.set_spread_lines_min_step_bytes(saved[0])
    module.set_column_blocks_min_bytes(saved[1])
    module.set_column_k_block(saved[2])


@pytest.fixture
def panel_calls(module, monkeypatch):
    """The weights' shapes of every call that packed panels: from Python, or inside the
    one-call inference (which packs W_hh when asked to); the reverse sweep's and the RNN's
    marked as such."""
    calls = []

    def spying(original, record):
        def spy(*args):
            packed = original(*args)
            if packed is not None:
                calls.append(record(*args))
            return packed

        return spy

    def inference_spying(name, w_hh_at, record):
        original = getattr(module, name)

        def spy(*args):
            if args[-1]:  # packs its W_hh
                calls.append(record(args[w_hh_at].shape))
            return original(*args)

        monkeypatch.setattr(module, name, spy, raising=False)

    inference_spying("lstm_inference", 4, lambda shape: (tuple(shape),))
    inference_spying("gru_inference", 3, lambda shape: (tuple(shape),))
    inference_spying("rnn_inference", 3, lambda shape: ("rnn", tuple(shape)))
    monkeypatch.setattr(planning, "gate_panels",
                        spying(planning.gate_panels, lambda weights, *_: tuple(tuple(w.shape) for w in weights)))
    monkeypatch.setattr(planning, "backward_panels", spying(planning.backward_panels, lambda w, *_: ("backward", tuple(w.shape))))
    monkeypatch.setattr(planning, "rnn_panels", spying(planning.rnn_panels, lambda w, *_: ("rnn", tuple(w.shape))))
    return calls


class _TwoLayersBothWays:
    """Ours and torch.nn's `mode` layer (2 layers, both directions, an initial state, 6 steps
    of 7 inputs, ragged lengths when asked) run on the same input, forward only; then
    check_outputs and check_gradients compare them."""

    def __init__(self, mode, hidden, batch, grad, lengths, **kwargs):
        steps, inputs = 6, 7
        self.layer, self.reference = make_pair(mode, inputs, hidden, dtype=torch.float32, implementation="native",
                                               num_layers=2, bidirectional=True, **kwargs)
        x = torch.randn(steps, batch, inputs)
        self.state = initial_state(mode, (4, batch, hidden), torch.float32, "cpu")
        step_counts = torch.randint(1, steps + 1, (batch,)) if lengths else None
        self.ours_in, self.ref_in = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            self.output, self.final = self.layer(self.ours_in, self.state, lengths=step_counts)
            self.ref_output, self.ref_final = torch_nn_run(self.reference, self.ref_in, step_counts, self.state)

    def check_outputs(self):
        tol = TOLERANCES[torch.float32]
        torch.testing.assert_close(self.output, self.ref_output, **tol)
        for a, b in zip(state_tensors(self.final), state_tensors(self.ref_final)):
            torch.testing.assert_close(a, b, **tol)

    def check_gradients(self):
        """Of the input, every parameter and the initial state."""
        states = state_tensors(self.state)
        grads = torch.autograd.grad(loss_of(self.output, self.final), [self.ours_in, *self.layer.parameters(), *states])
        ref_grads = torch.autograd.grad(loss_of(self.ref_output, self.ref_final),
                                        [self.ref_in, *self.reference.parameters(), *states])
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])


# (hidden, batch): whole and ragged last panels (21 = 16 + 5); whole and ragged chunks of
# six rows (13 = 6 + 6 + 1; row blocks 6 and 7)
SIZES = [(16, 6), (21, 13), (5, 7), (40, 12)]


@pytest.mark.parametrize("hidden, batch", SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("fold", [0.0, 2.0], ids=["projected", "folded"])  # 2: the upper layer (2H in) folds too
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no-grad"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_panel_forward_matches_torch_nn(module, split, step_size_paths, panel_calls, hidden, batch, fold, grad, lengths,
                                        monkeypatch):
    """Outputs, final states and (when training) every gradient as torch.nn's, however the
    work is split."""
    monkeypatch.setattr(tuning, "fold_input_max_ratio", fold)
    monkeypatch.setattr(tuning, "backward_panels_min_batch", 1)  # the reverse sweep's panels at every split
    run = _TwoLayersBothWays("lstm", hidden, batch, grad, lengths)
    # every layer and direction packed its own panels: W_hh, or [W_ih, W_hh] when folded
    inputs = 7
    first_k, upper_k = ((inputs, hidden), (2 * hidden, hidden)) if fold else ((hidden,), (hidden,))
    expected = [tuple((4 * hidden, k) for k in first_k)] * 2 + [tuple((4 * hidden, k) for k in upper_k)] * 2
    assert sorted(panel_calls, key=str) == sorted(expected, key=str)
    run.check_outputs()
    if grad:
        panel_calls.clear()
        run.check_gradients()
        # every layer and direction ran its reverse sweep on W_hh in column panels
        assert panel_calls == [("backward", (4 * hidden, hidden))] * 4


INFERENCE_CALLS = {"lstm": ("lstm_inference", 4), "gru": ("gru_inference", 3), "rnn_tanh": ("rnn_inference", 1),
                   "rnn_relu": ("rnn_inference", 1)}


@pytest.mark.parametrize("mode", list(INFERENCE_CALLS))
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunks-of-3-steps"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("given_state", [True, False], ids=["state", "zeros"])
def test_one_call_inference_matches_torch_nn(module, split, step_size_paths, mode, chunked, bias, given_state,
                                             monkeypatch):
    """Without grad or lengths each layer and direction is one compiled call that projects
    the input in chunks of steps and runs the panel GEMM (recurrent.cpp's *_inference)."""
    name, gates = INFERENCE_CALLS[mode]
    steps, batch, inputs, hidden = 8, 8, 30, 21
    if chunked:
        monkeypatch.setattr(planning, "GRU_CHUNK_BYTES" if mode == "gru" else "CHUNK_BYTES", 3 * batch * gates * hidden * 4)
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(a[-2:]) or original(*a), raising=False)
    layer, reference = make_pair(mode, inputs, hidden, dtype=torch.float32, num_layers=2, bidirectional=True,
                                 bias=bias)
    x = torch.randn(steps, batch, inputs)
    state = initial_state(mode, (4, batch, hidden), torch.float32, "cpu") if given_state else None
    with torch.no_grad():
        output, final = layer(x, state)
        ref_output, ref_final = reference(x, state)
    assert calls == [(3 if chunked else steps, True)] * 4  # 2 layers x 2 directions
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(output, ref_output, **tol)
    for a, b in zip(state_tensors(final), state_tensors(ref_final)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("gates", [4, 3, 1], ids=["lstm", "gru", "rnn"])
def test_one_call_inference_is_taken_only_without_lengths_folding_or_float64(module, gates):
    x = torch.randn(8, 8, 30)
    assert planning.one_call(x, 21, gates, None, module) == (8, True)
    assert planning.one_call(x[:2, :4], 21, gates, None, module) == (2, False)  # a few rows: no panels
    assert planning.one_call(x, 21, gates, torch.ones(8, 8, 1, dtype=torch.bool), module) is None  # lengths
    # 30 inputs, 200 units: the LSTM and RNN fold their input there; the GRU never does
    assert (planning.one_call(x, 200, gates, None, module) is None) == (gates != 3)
    assert planning.one_call(x.double(), 21, gates, None, module) is None
    assert planning.one_call(x, 21, gates, None, None) is None


@pytest.mark.parametrize("hidden, batch", [(16, 8), (21, 13), (5, 7), (40, 17)], ids=lambda v: str(v))
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no-grad"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("bias", [True, False])
def test_gru_panel_forward_matches_torch_nn(module, split, step_size_paths, panel_calls, hidden, batch, grad, lengths,
                                            bias, monkeypatch):
    """The GRU's panels hold 3 gates (8-row chunks: 13 rows are 8 + 5, 17 are 8 + 8 + 1):
    outputs, final states and gradients as torch.nn's, however the work is split; the
    reverse sweep's dZ_h W_hh (the direct path dh z added after it) on column panels."""
    monkeypatch.setattr(tuning, "backward_panels_min_batch", 1)  # the reverse sweep's panels at every split
    run = _TwoLayersBothWays("gru", hidden, batch, grad, lengths, bias=bias)
    # W_hh of every layer and direction, with grad or without
    assert panel_calls == [((3 * hidden, hidden),)] * 4
    run.check_outputs()
    if grad:
        panel_calls.clear()
        run.check_gradients()
        assert panel_calls == [("backward", (3 * hidden, hidden))] * 4


@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_gru_panel_forward_saves_what_backward_reads(module, split, step_size_paths, lengths):
    """The compiled GRU forward on panels saves r|z, n and W_hn h + b_hn for backward: those
    must equal the plain path's, whichever way the epilogue requests its lines."""
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


@pytest.mark.parametrize("fold", [0.0, 2.0], ids=["projected", "folded"])  # 2: the upper layer (2H in) folds too
@pytest.mark.parametrize("mode", ["rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("hidden, batch", [(16, 6), (21, 13), (70, 7)], ids=lambda v: str(v))
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no-grad"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_rnn_panel_forward_matches_torch_nn(module, split, step_size_paths, panel_calls, mode, fold, hidden, batch,
                                           grad, lengths, monkeypatch):
    """The RNN's column panels hold 64 units (70 = 64 + 6: a ragged second panel), of W_hhᵀ
    or, folded, of [W_ih, W_hh]ᵀ, and the reverse sweep's of W_hh: outputs, final states
    and gradients as torch.nn's, however the work is split."""
    monkeypatch.setattr(tuning, "fold_input_max_ratio", fold)
    monkeypatch.setattr(tuning, "backward_panels_min_batch", 1)  # the reverse sweep's panels at every split
    run = _TwoLayersBothWays(mode, hidden, batch, grad, lengths)
    if fold:  # [W_ih, W_hh] of every layer and direction: 7 inputs below, 2H above
        expected = [("rnn", (hidden, 7 + hidden))] * 2 + [("rnn", (hidden, 3 * hidden))] * 2
    else:
        expected = [("rnn", (hidden, hidden))] * 4  # W_hh of every layer and direction
    assert sorted(panel_calls) == sorted(expected)
    run.check_outputs()
    if grad:
        panel_calls.clear()
        run.check_gradients()
        assert panel_calls == [("backward", (hidden, hidden))] * 4


def test_rnn_sigmoid_on_panels_matches_the_plain_gemm(module, panel_calls, monkeypatch):
    """torch.nn has no sigmoid RNN; the panel path must match the ATen-GEMM path."""
    import whiteboard

    monkeypatch.setattr(tuning, "fold_input_max_ratio", 0.0)
    layer = whiteboard.RNN(7, 70, nonlinearity="sigmoid", implementation="native")
    x = torch.randn(6, 9, 7)
    with torch.no_grad():
        ours = layer(x)[0]
        monkeypatch.setattr(tuning, "panel_gemm", False)
        plain = layer(x)[0]
    assert panel_calls == [("rnn", (70, 70))]
    torch.testing.assert_close(ours, plain, **TOLERANCES[torch.float32])


# Where a NaN or Inf goes in, per cell: the last row (the second thread's share), the
# ragged last panel (21 units: 16 + 5; the RNN's 70: 64 + 6), the last gate's last unit of
# each weight and bias (the GRU's n gate: r * (W_hn h + b_hn) too).
NON_FINITE_SITES = {
    "lstm": ["input", "weight_ih", "weight_hh", "bias_hh", "h0", "c0"],
    "gru": ["input", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0"],
    "rnn_tanh": ["input", "weight_ih", "weight_hh", "bias_hh", "h0"],
}


@pytest.mark.parametrize("mode, where", [(mode, where) for mode, sites in NON_FINITE_SITES.items() for where in sites])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_on_the_panel_path_come_out_as_torch_nn_s(module, split, panel_calls, mode, where, value,
                                                                     monkeypatch):
    """The epilogue's finite check must see a NaN or Inf wherever it enters, in any thread's
    share, and the call rerun on the torch loop. (The LSTM and RNN here fold their 4 inputs
    into the step's GEMM; the GRU never folds.)"""
    steps, batch, inputs = 5, 9, 4
    hidden = 70 if mode.startswith("rnn") else 21
    gates = {"lstm": 4, "gru": 3}.get(mode, 1)
    layer, reference = make_pair(mode, inputs, hidden, dtype=torch.float32, implementation="native")
    x, h0, c0 = torch.randn(steps, batch, inputs), torch.randn(1, batch, hidden), torch.randn(1, batch, hidden)
    with torch.no_grad():
        if where == "input":
            x[3, batch - 1, 1] = value
        elif where == "h0":
            h0[0, batch - 1, hidden - 1] = value
        elif where == "c0":
            c0[0, 2, 17] = value
        else:
            for model in (layer, reference):
                getattr(model, f"{where}_l0")[gates * hidden - 1, ...] = value
        state = (h0, c0) if mode == "lstm" else h0
        ours, final = layer(x, state)
        theirs, ref_final = reference(x, state)
    # c0 reaches no pre-activation: it is checked before the call, which then never packs
    assert bool(panel_calls) == (where != "c0")
    if value != value:  # NaN must come out; an Inf may saturate a gate into finite values, as in torch.nn
        assert torch.isnan(ours).any()
    tol = TOLERANCES[torch.float32]
    for a, b in zip([ours, *state_tensors(final)], [theirs, *state_tensors(ref_final)]):
        torch.testing.assert_close(a, b, equal_nan=True, **tol)
