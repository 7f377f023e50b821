"""The compiled runtime (whiteboard.backends.compiled.build): the build and its fallbacks, the buffer pool,
the pointwise passes on torch's threads with one OpenMP runtime, row blocks per thread."""

from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck

from whiteboard import backends
from whiteboard.backends import functions as fused
from whiteboard.backends.compiled import build as native
from whiteboard.backends.compiled import tuning
from helpers import MODES, TOLERANCES, initial_state, loss_of, make_pair, state_tensors, torch_nn_run
from function_helpers import B, H, I, MASKS, T, function_inputs, function_weights


def test_native_loops_build_and_are_the_cpu_default():
    import whiteboard

    assert native.load() is not None, f"the compiled loops must build on this machine: {native._failed}"
    layer = whiteboard.LSTM(I, H)
    assert layer.implementation == "auto"
    assert backends.choose(backends.call_of(layer, torch.randn(T, B, I))) is backends.COMPILED
    assert backends.choose(backends.call_of(layer, torch.randn(T, B, I, dtype=torch.float16))) is backends.TORCH_LOOP


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


@pytest.fixture
def pool():
    """The compiled module's buffer pool, its limits restored afterwards."""
    module = native.load()
    if module is None:
        pytest.skip("the compiled loops are not built here")
    yield module
    module.set_pool_limits(tuning.POOL_MIN_BYTES, tuning.pool_max_idle_bytes())


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


def test_pool_size_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("WHITEBOARD_POOL_MB", raising=False)
    assert tuning.pool_max_idle_bytes() == 1024 << 20
    monkeypatch.setenv("WHITEBOARD_POOL_MB", "0.5")
    assert tuning.pool_max_idle_bytes() == 1 << 19
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("WHITEBOARD_POOL_MB", bad)
        with pytest.raises(ValueError, match="WHITEBOARD_POOL_MB must be a number of megabytes"):
            tuning.pool_max_idle_bytes()


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
    x, h0 = function_inputs()
    mask = MASKS["ragged"]
    if cell == "lstm":
        c0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
        assert gradcheck(fused.FusedLSTM.apply, (x, h0, c0, *function_weights(4, True), mask, parallel_passes))
    elif cell == "gru":
        assert gradcheck(fused.FusedGRU.apply, (x, h0, *function_weights(3, True), mask, parallel_passes))
    else:
        assert gradcheck(fused.FusedRNN.apply, (x, h0, *function_weights(1, True), mask, "tanh", parallel_passes))


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
    monkeypatch.setattr(tuning, "fold_input_max_ratio", fold)
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
