"""The fused autograd Functions: float64 gradcheck and agreement with the reference loop."""

from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck

from whiteboard import fused, native, planning
from helpers import MODES, TOLERANCES, initial_state, loss_of, make_pair, state_tensors, torch_nn_run

T, B, I, H = 4, 2, 3, 5


def _params(gates, bias=True):
    shape = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    w_ih, w_hh = shape(gates * H, I), shape(gates * H, H)
    b_ih, b_hh = (shape(gates * H), shape(gates * H)) if bias else (None, None)
    return w_ih, w_hh, b_ih, b_hh


def _inputs():
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    return x, h0


BACKENDS = ["torch", "native"]


def _backend(name):
    """None selects the torch loop; the compiled module the C++ loop."""
    if name == "torch":
        return None
    module = native.load()
    assert module is not None, f"the compiled loops must build here: {native._failed}"
    return module


MASKS = {
    "full": None,
    "ragged": (torch.arange(T).unsqueeze(1) < torch.tensor([2, 4]).unsqueeze(0)).unsqueeze(-1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask", list(MASKS))
def test_fused_lstm_gradcheck(bias, mask, backend):
    x, h0 = _inputs()
    c0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    args = (x, h0, c0, *_params(4, bias), MASKS[mask], _backend(backend))
    assert gradcheck(fused.FusedLSTM.apply, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask", list(MASKS))
def test_fused_gru_gradcheck(bias, mask, backend):
    x, h0 = _inputs()
    assert gradcheck(fused.FusedGRU.apply, (x, h0, *_params(3, bias), MASKS[mask], _backend(backend)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nonlinearity", ["tanh", "sigmoid", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask", list(MASKS))
def test_fused_rnn_gradcheck(nonlinearity, bias, mask, backend):
    x, h0 = _inputs()
    w_ih, w_hh, b_ih, b_hh = _params(1, bias)
    if nonlinearity == "relu":
        # Keep pre-activations away from the kink at 0, where finite differences lie.
        with torch.no_grad():
            w_hh.mul_(0.1)
            if b_ih is not None:
                b_ih.add_(3.0)
            x.abs_()
            w_ih.abs_()
    args = (x, h0, w_ih, w_hh, b_ih, b_hh, MASKS[mask], nonlinearity, _backend(backend))
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


def test_native_loops_build_and_are_the_cpu_default():
    import whiteboard

    assert native.load() is not None, f"the compiled loops must build on this machine: {native._failed}"
    layer = whiteboard.LSTM(I, H)
    assert layer.implementation == "auto"
    assert layer._native_for(torch.randn(T, B, I)) is native.load()
    assert layer._native_for(torch.randn(T, B, I, dtype=torch.float16)) is None


def test_failed_build_falls_back_to_the_torch_path_with_one_warning(monkeypatch):
    import whiteboard

    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setattr(native, "_source", lambda: __import__("pathlib").Path("/nonexistent/recurrent.cpp"))
    layer, reference = make_pair("lstm", I, H)
    x = torch.randn(T, B, I, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        out = layer(x)[0]
    torch.testing.assert_close(out, reference(x)[0])
    with pytest.raises(RuntimeError, match="implementation='native' cannot run this call: could not be built"):
        whiteboard.LSTM(I, H, implementation="native").double()(x)


def test_a_compiler_without_openmp_still_builds_the_loops_with_one_warning(monkeypatch):
    """-fopenmp failing (clang without libomp, say) must not cost the compiled loops."""

    class Built:
        def set_pool_limits(self, *limits):
            self.limits = limits

    attempts = []

    def build(openmp, verbose):
        attempts.append(list(openmp))
        if openmp:
            raise RuntimeError("clang: error: unsupported option '-fopenmp'")
        return Built()

    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setattr(native, "openmp_flags", lambda: ["-fopenmp"])
    monkeypatch.setattr(native, "_build", build)
    with pytest.warns(RuntimeWarning, match="without OpenMP") as caught:
        module = native.load()
    assert isinstance(module, Built) and attempts == [["-fopenmp"], []]
    assert len(caught) == 1 and "unsupported option" in str(caught[0].message)


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


def test_native_backward_flushes_subnormal_gradients():
    """Vanishing gradients must not sink into subnormal floats (100x slower on x86)."""
    layer = __import__("whiteboard").RNN(I, H, implementation="native")
    x = torch.randn(T, B, I, requires_grad=True)
    out, _ = layer(x)
    out.backward(torch.full_like(out, 1e-36))
    assert torch.all(x.grad == 0)  # 1e-36-sized gradients are flushed, not carried as subnormals
    x.grad = None
    out, _ = layer(x)
    out.backward(torch.full_like(out, 1e-3))
    assert x.grad.abs().min() > 0 or x.grad.abs().max() > 1e-6


def test_the_pip_installed_ninja_is_found_without_an_activated_environment(monkeypatch):
    import sysconfig

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    native._put_scripts_on_path()
    assert __import__("os").environ["PATH"].split(":")[0] == sysconfig.get_path("scripts")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("lengths", [None, [T, 2]], ids=["full", "lengths"])
def test_packed_weight_gemms_match_plain_ones(mode, lengths, monkeypatch):
    """float32 per-step forward GEMMs go through oneDNN's packed weights; they must give what
    MKL's plain sgemm gives, in the outputs and in every gradient."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    layer, reference = make_pair(mode, I, H, dtype=torch.float32, implementation="native", num_layers=2)
    x = torch.randn(T, B, I)
    monkeypatch.setattr(native, "packed_gemm_min_macs", 0)  # tiny sizes here: pack anyway
    monkeypatch.setattr(native, "packed_min_steps", 0)
    results = {}
    for packed in (True, False):
        monkeypatch.setattr(native, "packed_gemm", packed)
        calls = []
        original = native.packed_weight
        monkeypatch.setattr(native, "packed_weight", lambda w, b: calls.append(tuple(w.shape)) or original(w, b))
        x_in = x.clone().requires_grad_()
        output, state = layer(x_in, lengths=None if lengths is None else torch.tensor(lengths))
        grads = torch.autograd.grad(loss_of(output, state), [x_in, *layer.parameters()])
        results[packed] = (output, state_tensors(state), grads)
        monkeypatch.setattr(native, "packed_weight", original)
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
    assert native.packed_weight(torch.randn(800, 200), 20) is None  # 3.2 M multiply-adds per step
    if torch.backends.mkldnn.is_available():
        assert native.packed_weight(torch.randn(2048, 512), 64) is not None  # 67 M
    assert native.packed_weight(torch.randn(2048, 512, dtype=torch.float64), 64) is None


@pytest.fixture
def pool():
    """The compiled module's buffer pool, its limits restored afterwards."""
    module = native.load()
    if module is None:
        pytest.skip("the compiled loops are not built here")
    yield module
    module.set_pool_limits(native.POOL_MIN_BYTES, native.pool_max_idle_bytes())


@pytest.mark.parametrize("mode", list(MODES))
def test_pooled_buffers_do_not_leak_between_calls(mode, pool):
    """With every buffer pooled (threshold 0), two models run forward, forward, backward,
    backward, so blocks freed by one call are handed to the next while tensors saved for
    backward are still alive: everything must still match torch.nn."""
    pool.release_pool()
    pool.set_pool_limits(0, 1 << 30)
    pairs = [make_pair(mode, I, H, dtype=torch.float64, implementation="native", num_layers=2) for _ in range(2)]
    inputs = [torch.randn(T, B, I, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    ours = [layer(x) for (layer, _), x in zip(pairs, inputs)]
    theirs = [reference(x) for (_, reference), x in zip(pairs, inputs)]
    for (output, state), (ref_output, ref_state), x in zip(ours, theirs, inputs):
        torch.testing.assert_close(output, ref_output)
        grad = torch.autograd.grad(loss_of(output, state), x)[0]
        ref_grad = torch.autograd.grad(loss_of(ref_output, ref_state), x)[0]
        torch.testing.assert_close(grad, ref_grad)
    assert pool.pool_idle_bytes() > 0  # freed buffers did go back to the pool


def test_pool_reuses_a_block_only_after_its_last_view_dies(pool):
    pool.release_pool()
    pool.set_pool_limits(1 << 20, 1 << 30)
    like = torch.empty(1)
    first = pool.pooled_empty([1 << 19], like)  # 2 MiB of float32
    address = first.data_ptr()
    view = first[10:]
    del first
    assert pool.pool_idle_bytes() == 0  # a view still holds it
    held = pool.pooled_empty([1 << 19], like)
    assert held.data_ptr() != address
    del view
    assert pool.pool_idle_bytes() == 1 << 21
    again = pool.pooled_empty([1 << 19], like)
    assert again.data_ptr() == address and pool.pool_idle_bytes() == 0
    again.fill_(3.0)
    assert float(again.sum()) == 3.0 * (1 << 19)
    del again, held
    assert pool.pool_idle_bytes() == 2 << 21
    pool.release_pool()
    assert pool.pool_idle_bytes() == 0


def test_pool_keeps_neither_small_blocks_nor_more_than_its_cap(pool):
    pool.release_pool()
    pool.set_pool_limits(1 << 20, 3 << 20)
    like = torch.empty(1)
    small = pool.pooled_empty([1000], like)
    del small
    assert pool.pool_idle_bytes() == 0
    blocks = [pool.pooled_empty([1 << 19], like) for _ in range(3)]  # 3 x 2 MiB, cap 3 MiB
    del blocks
    assert pool.pool_idle_bytes() == 2 << 20  # one block kept, two freed
    # An idle block much larger than asked is not handed out (most of it would be wasted).
    smaller = pool.pooled_empty([1 << 18], like)  # 1 MiB
    assert pool.pool_idle_bytes() == 2 << 20
    del smaller  # 2 + 1 MiB still fits under the cap: kept
    assert pool.pool_idle_bytes() == 3 << 20
    extra = pool.pooled_empty([1 << 18], like)  # takes the 1 MiB block back
    other = pool.pooled_empty([1 << 18], like)  # fresh
    del extra, other  # only one of them fits under the cap again
    assert pool.pool_idle_bytes() == 3 << 20
    resized = pool.pooled_empty([10], like)
    resized.resize_(1 << 20)  # storages from the pool stay resizable, like torch's own
    assert resized.numel() == 1 << 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_compiled_finite_check(dtype, bad, pool):
    tensors = [torch.randn(3, 4, dtype=dtype), torch.randn(100_000, dtype=dtype)]
    if bad is not None:
        tensors[1][77_777] = bad
    assert pool.all_finite(tensors) is (bad is None)
    assert pool.all_finite([tensors[0], tensors[1][:77_777]])


@pytest.mark.parametrize("mode", list(MODES))
def test_inf_input_matches_torch_nn(mode):
    """An infinite input takes the torch loop (the compiled one assumes finite numbers)."""
    layer, reference = make_pair(mode, I, H, dtype=torch.float32)
    x = torch.randn(T, B, I)
    x[1, 0, 0] = float("inf")
    with torch.no_grad():
        ours, theirs = layer(x)[0], reference(x)[0]
    torch.testing.assert_close(ours, theirs, equal_nan=True)


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
        monkeypatch.setattr(native, "fold_input_max_ratio", ratio)
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


def test_pool_size_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("WHITEBOARD_POOL_MB", raising=False)
    assert native.pool_max_idle_bytes() == 1024 << 20
    monkeypatch.setenv("WHITEBOARD_POOL_MB", "0.5")
    assert native.pool_max_idle_bytes() == 1 << 19
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("WHITEBOARD_POOL_MB", bad)
        with pytest.raises(ValueError, match="WHITEBOARD_POOL_MB must be a number of megabytes"):
            native.pool_max_idle_bytes()


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
    monkeypatch.setattr(native, "transpose_max_rows", copy_rows)
    monkeypatch.setattr(native, "panel_gemm", False)  # the LSTM's own GEMM does not use _step_weights
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


def _value_sites(*sites):
    """(mode, where) pairs: every mode at every site, c0 for the LSTM only."""
    return [(mode, where) for mode in MODES for where in sites if where != "c0" or mode == "lstm"]


@pytest.mark.parametrize("mode, where", _value_sites("input", "weight_ih", "weight_hh", "bias", "h0", "c0"))
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (16, 16), (800, 200), (803, 197), (15, 33), (2600, 650)])
def test_compiled_transpose_is_exact(dtype, shape, pool):
    matrix = torch.randn(shape, dtype=dtype)
    result = pool.transposed(matrix)
    assert result.is_contiguous() and result.dtype == dtype
    assert torch.equal(result, matrix.t())


@pytest.fixture
def parallel_passes():
    """The compiled module with its pointwise passes split over two threads even at tiny
    sizes (every row its own share), restored afterwards."""
    module = native.load()
    if module is None:
        pytest.skip("the compiled loops are not built here")
    threads, minimum = torch.get_num_threads(), module.parallel_min_elements()
    torch.set_num_threads(2)
    module.set_parallel_min_elements(1)
    yield module
    module.set_parallel_min_elements(minimum)
    torch.set_num_threads(threads)


def test_passes_run_on_torch_s_threads(parallel_passes):
    """at::parallel_for ran every pass on one thread while the build lacked -fopenmp."""
    assert parallel_passes.pass_threads(8, 4) == 2
    parallel_passes.set_parallel_min_elements(64)
    assert parallel_passes.pass_threads(8, 4) == 1  # 32 elements in all: below the threshold
    assert parallel_passes.pass_threads(40, 4) == 2
    torch.set_num_threads(1)
    assert parallel_passes.pass_threads(40, 4) == 1  # the thread count follows torch's
    with pytest.raises(RuntimeError, match=">= 1"):
        parallel_passes.set_parallel_min_elements(0)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_one_openmp_runtime_in_the_process(parallel_passes):
    """-fopenmp links libgomp.so.1: the loader must reuse the copy torch loaded, or a second
    thread pool would fight torch's for the cores."""
    libraries = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                 if "libgomp" in line or "libiomp" in line}
    assert len(libraries) == 1, libraries


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lengths", [None, [7, 3, 5, 6, 1]], ids=["full", "lengths"])
def test_passes_split_over_threads_match_torch_nn(mode, dtype, lengths, parallel_passes):
    """Rows split over two threads (an odd batch: uneven shares), forward and backward,
    the bias gradients summed per thread: outputs, states and every gradient as torch.nn's."""
    steps, batch, inputs, hidden = 7, 5, 6, 9
    layer, reference = make_pair(mode, inputs, hidden, dtype=dtype, implementation="native", num_layers=2)
    x = torch.randn(steps, batch, inputs, dtype=dtype)
    state = initial_state(mode, (2, batch, hidden), dtype, "cpu")
    ours_in, ref_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    output, final = layer(ours_in, state, lengths=None if lengths is None else torch.tensor(lengths))
    ref_output, ref_final = torch_nn_run(reference, ref_in, lengths, state)
    grads = torch.autograd.grad(loss_of(output, final), [ours_in, *layer.parameters(), *state_tensors(state)])
    ref_grads = torch.autograd.grad(loss_of(ref_output, ref_final), [ref_in, *reference.parameters(), *state_tensors(state)])
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(output, ref_output, **tol)
    for a, b in zip(state_tensors(final) + list(grads), state_tensors(ref_final) + list(ref_grads)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_gradcheck_with_passes_split_over_threads(cell, parallel_passes):
    x, h0 = _inputs()
    mask = MASKS["ragged"]
    if cell == "lstm":
        c0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
        assert gradcheck(fused.FusedLSTM.apply, (x, h0, c0, *_params(4, True), mask, parallel_passes))
    elif cell == "gru":
        assert gradcheck(fused.FusedGRU.apply, (x, h0, *_params(3, True), mask, parallel_passes))
    else:
        assert gradcheck(fused.FusedRNN.apply, (x, h0, *_params(1, True), mask, "tanh", parallel_passes))


@pytest.fixture
def row_blocks():
    """The compiled module with the forward time loops run per block of batch rows (one
    block per thread) whatever the weight's size, restored afterwards."""
    module = native.load()
    if module is None:
        pytest.skip("the compiled loops are not built here")
    threads, limit = torch.get_num_threads(), module.row_blocks_max_weight_bytes()
    torch.set_num_threads(2)
    module.set_row_blocks_max_weight_bytes(1 << 40)
    yield module
    module.set_row_blocks_max_weight_bytes(limit)
    torch.set_num_threads(threads)


def test_row_blocks_are_chosen_only_where_they_pay(row_blocks):
    weight = torch.empty(20, 5)
    assert row_blocks.row_block_count(9, weight, False) == 2
    assert row_blocks.row_block_count(7, weight, False) == 1  # fewer than 4 rows per thread
    assert row_blocks.row_block_count(9, weight, True) == 1  # a packed weight: large sizes
    row_blocks.set_row_blocks_max_weight_bytes(weight.numel() * 4 - 1)
    assert row_blocks.row_block_count(9, weight, False) == 1  # the weight would not stay in L2
    torch.set_num_threads(1)
    row_blocks.set_row_blocks_max_weight_bytes(1 << 40)
    assert row_blocks.row_block_count(9, weight, False) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lengths", [None, [7, 3, 5, 6, 1, 7, 2, 4, 6]], ids=["full", "lengths"])
@pytest.mark.parametrize("fold", [0.0, 1.0], ids=["projected", "folded"])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no-grad"])
@pytest.mark.parametrize("mode", list(MODES))
def test_forward_in_row_blocks_matches_torch_nn(mode, dtype, lengths, fold, grad, row_blocks, monkeypatch):
    """Each thread runs the whole time loop, forward and backward, on its own rows (9 rows:
    blocks of 4 and 5), both directions; the GRU never folds its input, so it runs the
    same test twice."""
    monkeypatch.setattr(native, "fold_input_max_ratio", fold)
    steps, batch, inputs, hidden = 7, 9, 6, 5
    assert row_blocks.row_block_count(batch, torch.empty(4 * hidden, hidden), False) == 2
    layer, reference = make_pair(mode, inputs, hidden, dtype=dtype, implementation="native", num_layers=2,
                                 bidirectional=True)
    x = torch.randn(steps, batch, inputs, dtype=dtype)
    state = initial_state(mode, (4, batch, hidden), dtype, "cpu")
    ours_in, ref_in = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        output, final = layer(ours_in, state, lengths=None if lengths is None else torch.tensor(lengths))
        ref_output, ref_final = torch_nn_run(reference, ref_in, lengths, state)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(output, ref_output, **tol)
    for a, b in zip(state_tensors(final), state_tensors(ref_final)):
        torch.testing.assert_close(a, b, **tol)
    if grad:
        grads = torch.autograd.grad(loss_of(output, final), [ours_in, *layer.parameters()])
        ref_grads = torch.autograd.grad(loss_of(ref_output, ref_final), [ref_in, *reference.parameters()])
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_nan_in_one_row_block_still_reruns_on_the_torch_loop(mode, row_blocks):
    layer, reference = make_pair(mode, 6, 5, dtype=torch.float32, implementation="auto")
    x = torch.randn(7, 9, 6)
    x[3, 8, 0] = float("nan")  # in the second thread's rows only
    with torch.no_grad():
        ours, theirs = layer(x)[0], reference(x)[0]
    assert torch.isnan(ours).any()
    torch.testing.assert_close(ours, theirs, equal_nan=True, **TOLERANCES[torch.float32])


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
    steps = 40 if case == "rows-over-the-limit" else 1  # 40 x 1 rows: over native.transpose_max_rows
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


@pytest.mark.parametrize("mode, where", _value_sites("input", "h0", "c0", "weight_ih", "bias"))
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
