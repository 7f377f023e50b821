"""How compiled calls are planned (whiteboard.backends.compiled.planning): time chunks, folded inputs, packed
and transposed step weights, one call per layer or per stack; each against torch.nn."""

import pytest
import torch

from whiteboard.backends.compiled import build as native
from whiteboard.backends.compiled import tuning
from whiteboard.backends.compiled import planning
from helpers import MODES, TOLERANCES, initial_state, loss_of, make_pair, state_tensors, torch_nn_run
from function_helpers import B, H, I, T, value_sites


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("lengths", [None, [T, 2]], ids=["full", "lengths"])
def test_packed_weight_gemms_match_plain_ones(mode, lengths, monkeypatch):
    """float32 per-step forward GEMMs go through oneDNN's packed weights; they must give what
    MKL's plain sgemm gives, in the outputs and in every gradient."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    layer, reference = make_pair(mode, I, H, dtype=torch.float32, implementation="native", num_layers=2)
    x = torch.randn(T, B, I)
    monkeypatch.setattr(tuning, "packed_gemm_min_macs", 0)  # tiny sizes here: pack anyway
    monkeypatch.setattr(tuning, "packed_min_steps", 0)
    results = {}
    for packed in (True, False):
        monkeypatch.setattr(tuning, "packed_gemm", packed)
        calls = []
        original = tuning.packed_weight
        monkeypatch.setattr(tuning, "packed_weight", lambda w, b: calls.append(tuple(w.shape)) or original(w, b))
        x_in = x.clone().requires_grad_()
        output, state = layer(x_in, lengths=None if lengths is None else torch.tensor(lengths))
        grads = torch.autograd.grad(loss_of(output, state), [x_in, *layer.parameters()])
        results[packed] = (output, state_tensors(state), grads)
        monkeypatch.setattr(tuning, "packed_weight", original)
        if packed:
            G = {"lstm": 4, "gru": 3}.get(mode, 1)
            # 2 layers, each packing W_hh for the forward sweep (the backward's GEMM is MKL's)
            assert sorted(calls) == [(G * H, H)] * 2
    (out_p, states_p, grads_p), (out_m, states_m, grads_m) = results[True], results[False]
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out_p, out_m, **tol)
    for a, b in zip(states_p + list(grads_p), states_m + list(grads_m)):
        torch.testing.assert_close(a, b, **tol)


def test_small_per_step_gemms_are_not_packed():
    assert tuning.packed_weight(torch.randn(800, 200), 20) is None  # 3.2 M multiply-adds per step
    if torch.backends.mkldnn.is_available():
        assert tuning.packed_weight(torch.randn(2048, 512), 64) is not None  # 67 M
    assert tuning.packed_weight(torch.randn(2048, 512, dtype=torch.float64), 64) is None


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lengths", [None, [7, 3, 5, 6, 2]], ids=["full", "lengths"])
def test_folded_input_matches_the_input_projection(mode, dtype, lengths, monkeypatch):
    """With a small input the compiled forward runs its GEMM on [x_t, h_t] (LSTM and RNN);
    forced on and off, outputs, final states and every gradient must match torch.nn."""
    if native.load() is None:
        pytest.skip("the compiled loops are not built here")
    steps, batch, inputs, hidden = 7, 5, 4, 16  # 35 rows in all: more than a few (see below)
    layer, reference = make_pair(mode, inputs, hidden, dtype=dtype, implementation="native", num_layers=2)
    x = torch.randn(steps, batch, inputs, dtype=dtype)
    calls = []
    module = native.load()
    for name in ("lstm_forward_folded", "rnn_forward_folded"):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a), raising=False)
    results = []
    for ratio in (0.0, 0.25):  # off; on for layer 1 (4 <= 0.25 x 16), off for layer 2 (16 > 4)
        monkeypatch.setattr(tuning, "fold_input_max_ratio", ratio)
        calls.clear()
        x_in = x.clone().requires_grad_()
        size = None if lengths is None else torch.tensor(lengths)
        output, state = layer(x_in, lengths=size)
        results.append((output, state_tensors(state), torch.autograd.grad(loss_of(output, state), [x_in, *layer.parameters()])))
        folds = mode in ("lstm", "rnn_tanh", "rnn_relu") and ratio > 0
        assert len(calls) == (1 if folds else 0)
    ref_x = x.clone().requires_grad_()
    ref_output, ref_state = torch_nn_run(reference, ref_x, lengths)
    ref_grads = torch.autograd.grad(loss_of(ref_output, ref_state), [ref_x, *reference.parameters()])
    tol = TOLERANCES[dtype]
    for output, states, grads in results:
        torch.testing.assert_close(output, ref_output, **tol)
        for a, b in zip(states + list(grads), state_tensors(ref_state) + list(ref_grads)):
            torch.testing.assert_close(a, b, **tol)


def test_a_few_rows_never_fold_the_input():
    """Joining [W_ih, W_hh] copies both weights per call: not worth it for one token."""
    module = native.load()
    if module is None:
        pytest.skip("the compiled loops are not built here")
    hidden = 16
    assert planning.folds_input(torch.empty(7, 5, 4), hidden, module)
    assert not planning.folds_input(torch.empty(1, 1, 4), hidden, module)
    assert not planning.folds_input(torch.empty(8, 4, 4), hidden, module)  # 32 rows: still few
    assert not planning.folds_input(torch.empty(7, 5, 5), hidden, module)  # input > hidden / 4
    assert not planning.folds_input(torch.empty(7, 5, 4), hidden, None)  # the torch loop


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("chunk_steps", [1, 3], ids=["one-step-chunks", "uneven-chunks"])
@pytest.mark.parametrize("lengths", [None, [7, 3, 5]], ids=["full", "lengths"])
@pytest.mark.parametrize("input_grad", [True, False], ids=["dx", "no-dx"])
def test_time_chunks_match_torch_nn(mode, chunk_steps, lengths, input_grad, monkeypatch):
    """The compiled path walks time in chunks when its per-step buffers would be large
    (input projection forward, dZ backward): with chunks of 1 and of 3 of 7 steps, the
    outputs, final states and every gradient must still match torch.nn's."""
    if native.load() is None:
        pytest.skip("the compiled loops are not built here")
    steps, batch, inputs, hidden = 7, 3, 6, 5
    layer, reference = make_pair(mode, inputs, hidden, dtype=torch.float64, implementation="native", num_layers=2)
    gates = {"lstm": 4, "gru": 3}.get(mode, 1)
    widest = max(gates, 4 if mode == "gru" else gates)  # the GRU's backward buffer holds 4H per row
    # the LSTM's reverse sweep has a limit of its own
    limits = {"gru": ["GRU_CHUNK_BYTES"], "lstm": ["CHUNK_BYTES", "LSTM_SWEEP_CHUNK_BYTES"]}.get(mode, ["CHUNK_BYTES"])
    for limit in limits:
        monkeypatch.setattr(planning, limit, chunk_steps * batch * widest * hidden * 8)
        assert len(planning.time_chunks(steps, batch * widest * hidden * 8, getattr(planning, limit))) == -(-steps // chunk_steps)
    sizes = []
    original = planning.time_chunks
    monkeypatch.setattr(planning, "time_chunks", lambda *a: sizes.append(len(r := original(*a))) or r)
    x = torch.randn(steps, batch, inputs, dtype=torch.float64)
    state = initial_state(mode, (2, batch, hidden), torch.float64, "cpu")
    ours_in, ref_in = x.clone().requires_grad_(input_grad), x.clone().requires_grad_(input_grad)
    size = None if lengths is None else torch.tensor(lengths)
    output, final = layer(ours_in, state, lengths=size)
    ref_output, ref_final = torch_nn_run(reference, ref_in, lengths, state)
    inputs_ours = ([ours_in] if input_grad else []) + list(layer.parameters()) + state_tensors(state)
    inputs_ref = ([ref_in] if input_grad else []) + list(reference.parameters()) + state_tensors(state)
    grads = torch.autograd.grad(loss_of(output, final), inputs_ours)
    ref_grads = torch.autograd.grad(loss_of(ref_output, ref_final), inputs_ref)
    assert max(sizes) == -(-steps // chunk_steps)  # the cell's own limit was used (backward: widest)
    if mode == "lstm":  # both layers' forward and reverse sweep walked the chunks
        assert sizes == [-(-steps // chunk_steps)] * 4
    tol = TOLERANCES[torch.float64]
    torch.testing.assert_close(output, ref_output, **tol)
    for a, b in zip(state_tensors(final) + list(grads), state_tensors(ref_final) + list(ref_grads)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("steps, largest", [(50, 16), (35, 12), (7, 3), (7, 7), (1, 4), (12, 4)])
def test_time_chunks_are_as_even_as_their_count_allows(steps, largest):
    """Chunks cover the steps in order, none over the limit, the fewest that fit, sizes
    differing by at most one and the longest first (callers size their buffer by it)."""
    chunks = planning.time_chunks(steps, 1, largest)
    sizes = [end - begin for begin, end in chunks]
    assert chunks[0][0] == 0 and chunks[-1][1] == steps
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert len(chunks) == -(-steps // largest) and max(sizes) <= largest
    assert max(sizes) - min(sizes) <= 1 and sizes[0] == max(sizes)


def test_time_chunks_of_large_steps_keep_enough_rows_for_the_gemms():
    """Steps of LARGE_STEP_BYTES or more: no more chunks than leave MIN_CHUNK_ROWS rows
    each (config (d)'s GRU: 16 MB chunks of 2 MB steps at batch 128 would be 7 of 7-8
    steps); smaller steps, or no batch given, keep the byte limit alone."""
    large = planning.LARGE_STEP_BYTES
    assert planning.MIN_CHUNK_ROWS == 2048
    assert planning.time_chunks(50, 2 * large, 16 * large, 128) == [(0, 17), (17, 34), (34, 50)]
    assert len(planning.time_chunks(50, 2 * large, 16 * large)) == 7  # no batch: the byte limit
    assert len(planning.time_chunks(50, large // 2, 4 * large, 128)) == 7  # small steps: the byte limit
    assert planning.time_chunks(10, large, 2 * large, 100) == [(0, 10)]  # 1,000 rows in all: one chunk
    assert len(planning.time_chunks(50, 2 * large, 64 * large, 128)) == 2  # the byte limit already leaves more rows


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("copy_rows", [0, 10**6], ids=["transposed-copy", "transposed-view"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("implementation", ["native", "fused"])
def test_step_weights_as_a_copy_or_a_view_match_torch_nn(mode, copy_rows, dtype, implementation, monkeypatch):
    """For few rows in all (generation) the per-step GEMM runs on a transposed view of
    W_hh instead of a contiguous copy, on the compiled and on the torch loop; both must
    give torch.nn's outputs and gradients."""
    if implementation == "native" and native.load() is None:
        pytest.skip("the compiled loops are not built here")
    monkeypatch.setattr(tuning, "transpose_max_rows", copy_rows)
    monkeypatch.setattr(tuning, "panel_gemm", False)  # the LSTM's own GEMM does not use _step_weights
    layer, reference = make_pair(mode, I, H, dtype=dtype, implementation=implementation, num_layers=2)
    x = torch.randn(T, B, I, dtype=dtype)
    views = []
    original = planning.step_weights
    monkeypatch.setattr(planning, "step_weights",
                        lambda *a: views.append(not (r := original(*a))[0].is_contiguous()) or r)
    ours_in, ref_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    output, state = layer(ours_in)
    ref_output, ref_state = reference(ref_in)
    assert views == [copy_rows > 0] * 2  # both layers took the path asked for
    grads = torch.autograd.grad(loss_of(output, state), [ours_in, *layer.parameters()])
    ref_grads = torch.autograd.grad(loss_of(ref_output, ref_state), [ref_in, *reference.parameters()])
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(output, ref_output, **tol)
    for a, b in zip(state_tensors(state) + list(grads), state_tensors(ref_state) + list(ref_grads)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (4, 8), (2, 3)], ids=["one-token", "32-rows", "6-rows"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("given_state", [True, False], ids=["state", "zeros"])
def test_few_row_inference_in_one_call_matches_torch_nn(mode, dtype, shape, bias, given_state, monkeypatch):
    """Without grad, a few rows in all (generation) take one compiled call per layer and
    direction (recurrent.cpp's *_inference): outputs and final states as torch.nn's."""
    module = native.load()
    if module is None:
        pytest.skip("the compiled loops are not built here")
    calls = []
    for name in ("rnn_inference", "lstm_inference", "gru_inference"):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a), raising=False)
    steps, batch = shape
    layer, reference = make_pair(mode, I, H, dtype=dtype, num_layers=2, bidirectional=True, bias=bias)
    x = torch.randn(steps, batch, I, dtype=dtype)
    state = initial_state(mode, (4, batch, H), dtype, "cpu") if given_state else None
    with torch.no_grad():
        output, final = layer(x, state)
        ref_output, ref_final = reference(x, state)
    assert len(calls) == 4  # 2 layers x 2 directions
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(output, ref_output, **tol)
    for a, b in zip(state_tensors(final), state_tensors(ref_final)):
        torch.testing.assert_close(a, b, **tol)


def _spy_calls(module, monkeypatch, names):
    """Record the name of every call to `names` of the compiled module (then run it)."""
    calls = []
    for name in names:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a), raising=False)
    return calls


LAYER_CALLS = ("rnn_inference", "lstm_inference", "gru_inference")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (4, 8), (2, 3), (3, None)], ids=["one-token", "32-rows", "6-rows", "unbatched"])
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("given_state", [True, False], ids=["state", "zeros"])
def test_few_row_inference_of_a_stack_is_one_call_matching_torch_nn(mode, dtype, shape, layers, bias, given_state,
                                                                    monkeypatch):
    """Without grad, a few rows in all through a one-directional stack (generation): every
    layer in one compiled call (recurrent.cpp's stack_inference), each layer on the output
    of the one below; outputs and final states as torch.nn's. (The RNN's relu checks that
    the nonlinearity reaches the call.)"""
    module = native.load()
    if module is None:
        pytest.skip("the compiled loops are not built here")
    calls = _spy_calls(module, monkeypatch, ("stack_inference",) + LAYER_CALLS)
    steps, batch = shape
    layer, reference = make_pair(mode, I, H, dtype=dtype, num_layers=layers, bias=bias, dropout=0.3 if layers > 1 else 0)
    layer.eval(), reference.eval()  # dropout between layers is off in eval mode: the one call is taken
    x = torch.randn((steps, I) if batch is None else (steps, batch, I), dtype=dtype)
    state_shape = (layers, H) if batch is None else (layers, batch, H)
    state = initial_state(mode, state_shape, dtype, "cpu") if given_state else None
    with torch.no_grad():
        output, final = layer(x, state)
        ref_output, ref_final = reference(x, state)
    assert calls == ["stack_inference"]  # it calls no layer's *_inference from Python
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(output, ref_output, **tol)
    assert len(state_tensors(final)) == len(state_tensors(ref_final))
    for a, b in zip(state_tensors(final), state_tensors(ref_final)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)


def test_stack_in_one_call_also_for_batch_first_and_a_sigmoid_rnn(monkeypatch):
    import whiteboard

    module = native.load()
    if module is None:
        pytest.skip("the compiled loops are not built here")
    x = torch.randn(2, 3, I)  # (B, T, I)
    for make in (lambda: whiteboard.GRU(I, H, num_layers=2, batch_first=True),
                 lambda: whiteboard.RNN(I, H, num_layers=2, nonlinearity="sigmoid")):
        layer = make()
        with torch.no_grad():
            layer.implementation = "fused"
            expected, expected_final = layer(x)
            layer.implementation = "auto"
            calls = _spy_calls(module, monkeypatch, ("stack_inference",))
            output, final = layer(x)
        assert calls == ["stack_inference"]
        torch.testing.assert_close(output, expected, **TOLERANCES[torch.float32])
        torch.testing.assert_close(final, expected_final, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("case", ["grad", "lengths", "bidirectional", "dropout-in-training", "rows-over-the-limit",
                                  "fused", "layernorm"])
def test_stack_in_one_call_only_where_the_layers_would_each_make_one_call(case, monkeypatch):
    """The stack call is for what one call per layer would do anyway: not with grad (the
    autograd path), lengths, two directions, dropout between layers to apply, more than a
    few rows, another implementation asked for, or a cell without compiled loops."""
    import whiteboard

    module = native.load()
    if module is None:
        pytest.skip("the compiled loops are not built here")
    calls = _spy_calls(module, monkeypatch, ("stack_inference",))
    kwargs = {"bidirectional": case == "bidirectional", "dropout": 0.5 if case == "dropout-in-training" else 0.0}
    cls = whiteboard.LayerNormLSTM if case == "layernorm" else whiteboard.GRU
    layer = cls(I, H, num_layers=2, implementation="fused" if case == "fused" else "auto", **kwargs)
    steps = 40 if case == "rows-over-the-limit" else 1  # 40 x 1 rows: over tuning.transpose_max_rows
    x = torch.randn(steps, 1, I, requires_grad=case == "grad")
    lengths = torch.tensor([steps]) if case == "lengths" else None
    with torch.set_grad_enabled(case == "grad"):
        layer(x, lengths=lengths)
    assert calls == []
    layer.eval()
    if case not in ("grad", "lengths", "bidirectional", "rows-over-the-limit", "fused", "layernorm"):
        with torch.no_grad():
            layer(x)  # the same layer in eval mode: no dropout to apply
        assert calls == ["stack_inference"]


@pytest.mark.parametrize("mode, where", value_sites("input", "h0", "c0", "weight_ih", "bias"))
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_few_row_inference_with_non_finite_values_matches_torch_nn(mode, where, value, monkeypatch):
    """The stack call meets the NaN or Inf in its first layer and returns nothing; the
    layers then run one by one, the first on the torch loop."""
    module = native.load()
    if module is None:
        pytest.skip("the compiled loops are not built here")
    calls = _spy_calls(module, monkeypatch, ("stack_inference",) + LAYER_CALLS)
    layer, reference = make_pair(mode, I, H, dtype=torch.float32, num_layers=2)
    x = torch.randn(1, 2, I)
    state = [s.detach() for s in state_tensors(initial_state(mode, (2, 2, H), torch.float32, "cpu"))]
    if where == "input":
        x[0, 1, 0] = value
    elif where in ("h0", "c0"):
        state[0 if where == "h0" else 1][0, 1, 0] = value
    else:
        name = "weight_ih_l0" if where == "weight_ih" else "bias_hh_l0"
        with torch.no_grad():
            for module in (layer, reference):
                getattr(module, name).view(-1)[0] = value
    hx = tuple(state) if mode == "lstm" else state[0]
    with torch.no_grad():
        ours, theirs = layer(x, hx), reference(x, hx)
    for a, b in zip([ours[0], *state_tensors(ours[1])], [theirs[0], *state_tensors(theirs[1])]):
        torch.testing.assert_close(a, b, equal_nan=True, **TOLERANCES[torch.float32])
    assert calls[0] == "stack_inference" and len(calls) == 3  # then each layer's own call
    if value != value:  # a NaN always reaches the output (an Inf may saturate a gate)
        assert torch.isnan(theirs[0]).any()
