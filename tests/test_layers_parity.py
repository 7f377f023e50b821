"""whiteboard.RNN/LSTM/GRU against torch.nn: outputs, final states and every gradient."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import whiteboard

from helpers import MODES, TOLERANCES, initial_state, tolerance, loss_of, make_pair, state_tensors

T, B, I, H = 5, 3, 4, 6

GRID = list(itertools.product(MODES, [1, 2, 3], [False, True], [False, True], [True, False]))


def _compare(ours, reference, x, hx, dtype):
    tol = tolerance(dtype, x.device)
    out_ours, state_ours = ours(x, hx)
    out_ref, state_ref = reference(x, hx)
    torch.testing.assert_close(out_ours, out_ref, **tol)
    for a, b in zip(state_tensors(state_ours), state_tensors(state_ref)):
        torch.testing.assert_close(a, b, **tol)
    inputs = [x, *state_tensors(hx)]
    grads_ours = torch.autograd.grad(loss_of(out_ours, state_ours), inputs + list(ours.parameters()))
    grads_ref = torch.autograd.grad(loss_of(out_ref, state_ref), inputs + list(reference.parameters()))
    names = ["input", "h_0", "c_0"][: len(inputs)] + [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, grads_ours, grads_ref):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"gradient of {name}: {m}")


@pytest.mark.parametrize("mode,num_layers,bidirectional,batch_first,bias", GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("implementation", ["native", "fused", "reference"])
def test_layer_matches_torch_nn(mode, num_layers, bidirectional, batch_first, bias, dtype, implementation, device):
    ours, reference = make_pair(
        mode, I, H, dtype=dtype, device=device, implementation=implementation,
        num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias,
    )
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    D = 2 if bidirectional else 1
    hx = initial_state(mode, (num_layers * D, B, H), dtype, device)
    _compare(ours, reference, x, hx, dtype)


@pytest.mark.parametrize("mode", list(MODES))
def test_layer_without_initial_state_matches_torch_nn(mode, device):
    ours, reference = make_pair(mode, I, H, device=device, num_layers=2)
    x = torch.randn(T, B, I, dtype=torch.float64, device=device)
    out_ours, _ = ours(x)
    out_ref, _ = reference(x)
    torch.testing.assert_close(out_ours, out_ref)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_unbatched_input_matches_torch_nn(mode, bidirectional, device):
    ours, reference = make_pair(mode, I, H, device=device, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(T, I, dtype=torch.float64, device=device, requires_grad=True)
    hx = initial_state(mode, (2 * (2 if bidirectional else 1), H), torch.float64, device)
    _compare(ours, reference, x, hx, torch.float64)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("enforce_sorted", [False, True])
@pytest.mark.parametrize("implementation", ["native", "fused", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_sequence_matches_torch_nn(mode, bidirectional, enforce_sorted, implementation, dtype, device):
    ours, reference = make_pair(
        mode, I, H, dtype=dtype, device=device, implementation=implementation, num_layers=2, bidirectional=bidirectional
    )
    lengths = torch.tensor([5, 4, 2, 1]) if enforce_sorted else torch.tensor([2, 5, 1, 4])
    batch = len(lengths)
    padded = torch.randn(T, batch, I, dtype=dtype, device=device, requires_grad=True)
    D = 2 if bidirectional else 1
    hx = initial_state(mode, (2 * D, batch, H), dtype, device)

    def run(layer):
        packed = pack_padded_sequence(padded, lengths, enforce_sorted=enforce_sorted)
        return layer(packed, hx)

    (out_ours, state_ours), (out_ref, state_ref) = run(ours), run(reference)
    assert isinstance(out_ours, torch.nn.utils.rnn.PackedSequence)
    tol = tolerance(dtype, device)
    torch.testing.assert_close(out_ours.batch_sizes, out_ref.batch_sizes)
    if enforce_sorted:
        assert out_ours.sorted_indices is None and out_ref.sorted_indices is None
    else:
        torch.testing.assert_close(out_ours.sorted_indices, out_ref.sorted_indices)
        torch.testing.assert_close(out_ours.unsorted_indices, out_ref.unsorted_indices)
    torch.testing.assert_close(out_ours.data, out_ref.data, **tol)
    torch.testing.assert_close(pad_packed_sequence(out_ours)[0], pad_packed_sequence(out_ref)[0], **tol)
    for a, b in zip(state_tensors(state_ours), state_tensors(state_ref)):
        torch.testing.assert_close(a, b, **tol)
    inputs = [padded, *state_tensors(hx)]
    g_ours = torch.autograd.grad(loss_of(out_ours, state_ours), inputs + list(ours.parameters()))
    g_ref = torch.autograd.grad(loss_of(out_ref, state_ref), inputs + list(reference.parameters()))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("mode", list(MODES))
def test_lengths_keyword_equals_packing(mode):
    ours, _ = make_pair(mode, I, H, num_layers=2, bidirectional=True)
    lengths = torch.tensor([3, 5, 1])
    x = torch.randn(T, 3, I, dtype=torch.float64)
    out_masked, state_masked = ours(x, lengths=lengths)
    out_packed, state_packed = ours(pack_padded_sequence(x, lengths, enforce_sorted=False))
    torch.testing.assert_close(out_masked, pad_packed_sequence(out_packed, total_length=T)[0])
    for a, b in zip(state_tensors(state_masked), state_tensors(state_packed)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", list(MODES))
def test_state_dict_moves_both_ways(mode):
    ours_cls, torch_cls, extra = MODES[mode]
    ours = ours_cls(I, H, num_layers=2, bidirectional=True, **extra)
    reference = torch_cls(I, H, num_layers=2, bidirectional=True, **extra)
    assert list(ours.state_dict()) == list(reference.state_dict())
    for name, tensor in reference.state_dict().items():
        assert ours.state_dict()[name].shape == tensor.shape, name
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, I)
    torch.testing.assert_close(ours(x)[0], reference(x)[0], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("mode", list(MODES))
def test_dropout_between_layers_only_in_training(mode):
    ours, reference = make_pair(mode, I, H, num_layers=3, dropout=0.5)
    x = torch.randn(T, B, I, dtype=torch.float64)
    ours.eval()
    reference.eval()
    torch.testing.assert_close(ours(x)[0], reference(x)[0])
    ours.train()
    torch.manual_seed(3)
    first = ours(x)[0]
    torch.manual_seed(4)
    second = ours(x)[0]
    assert not torch.allclose(first, second), "training-mode dropout must change the output"


def test_dropout_is_not_applied_after_the_last_layer():
    # Both warn, each in its own words: ours, and torch.nn's ("expects num_layers greater than 1").
    with pytest.warns(UserWarning, match="no effect with num_layers=1"), \
            pytest.warns(UserWarning, match="expects num_layers greater than 1"):
        ours, reference = make_pair("lstm", I, H, num_layers=1, dropout=0.9)
    ours.train()
    x = torch.randn(T, B, I, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], reference(x)[0])


@pytest.mark.parametrize("mode", list(MODES))
def test_dropout_matches_torch_nn_under_the_same_random_stream(mode):
    """Same seed, same dropout masks: torch.nn draws one mask per layer output, as we do."""
    ours, reference = make_pair(mode, I, H, num_layers=2, dropout=0.3, dtype=torch.float32)
    x = torch.randn(T, B, I)
    torch.manual_seed(11)
    out_ours = ours(x)[0]
    torch.manual_seed(11)
    out_ref = reference(x)[0]
    torch.testing.assert_close(out_ours, out_ref, **TOLERANCES[torch.float32])


CONFIGURATIONS = [
    dict(),
    dict(num_layers=3, bias=False),
    dict(num_layers=2, bidirectional=True, batch_first=True, dropout=0.25),
    dict(bidirectional=True, bias=False),
]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("config", CONFIGURATIONS, ids=str)
def test_the_attributes_torch_nn_code_reads_are_torch_nn_s(mode, config):
    ours, reference = make_pair(mode, I, H, **config)
    assert ours.proj_size == reference.proj_size == 0
    assert ours._flat_weights_names == reference._flat_weights_names
    assert [[w.shape for w in ws] for ws in ours.all_weights] == [[w.shape for w in ws] for ws in reference.all_weights]
    by_name = dict(ours.named_parameters())
    flat = [w for ws in ours.all_weights for w in ws]
    assert all(w is by_name[name] for w, name in zip(flat, ours._flat_weights_names))
    assert [w is by_name[name] for w, name in zip(ours._flat_weights, ours._flat_weights_names)] == [True] * len(flat)
    for name in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional"):
        assert getattr(ours, name) == getattr(reference, name), name
    if mode != "rnn_relu":
        assert repr(ours) == repr(reference)


def test_the_rnn_prints_a_nonlinearity_other_than_tanh():
    # torch.nn.RNN prints none (its RNNCell prints one other than tanh, as we do).
    assert repr(whiteboard.RNN(4, 6, nonlinearity="relu", num_layers=2)) == \
        "RNN(4, 6, num_layers=2, nonlinearity='relu')"
    assert repr(whiteboard.RNN(4, 6, nonlinearity="tanh")) == repr(torch.nn.RNN(4, 6)) == "RNN(4, 6)"
