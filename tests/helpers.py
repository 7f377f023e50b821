"""Shared builders for the parity tests: the same layer in torch.nn and in whiteboard."""

import torch

import whiteboard

# (whiteboard class, torch.nn class, extra constructor kwargs)
MODES = {
    "lstm": (whiteboard.LSTM, torch.nn.LSTM, {}),
    "gru": (whiteboard.GRU, torch.nn.GRU, {}),
    "rnn_tanh": (whiteboard.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (whiteboard.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}

# float32 tolerances: tight, but a hand-written backward sums in another order than oneDNN.
TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=2e-5), torch.float64: dict(rtol=1e-7, atol=1e-9)}
# cuDNN's float32 bidirectional tanh RNN gradients differ from an exact float32 loop by up to
# ~1e-3 relative (measured on an H200: 6e-5 absolute in weight_ih, with our fused and reference
# paths agreeing with each other and with the CPU); compare with cuDNN at that accuracy.
CUDA_FLOAT32 = dict(rtol=2e-3, atol=1e-4)


def tolerance(dtype, device="cpu"):
    if torch.device(device).type == "cuda" and dtype == torch.float32:
        return CUDA_FLOAT32
    return TOLERANCES[dtype]


def make_pair(mode, input_size, hidden_size, dtype=torch.float64, device="cpu", implementation="auto", **kwargs):
    if implementation == "native" and torch.device(device).type != "cpu":
        import pytest

        pytest.skip("the compiled time loops are CPU-only; on CUDA 'auto' takes the fused path")
    ours_cls, torch_cls, extra = MODES[mode]
    reference = torch_cls(input_size, hidden_size, **extra, **kwargs).to(device=device, dtype=dtype)
    ours = ours_cls(input_size, hidden_size, **extra, implementation=implementation, **kwargs).to(device=device, dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def initial_state(mode, shape, dtype, device):
    if mode == "lstm":
        return tuple(torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    return torch.randn(shape, dtype=dtype, device=device, requires_grad=True)


def state_tensors(state):
    return list(state) if isinstance(state, tuple) else [state]


def loss_of(output, state):
    """A loss that touches every output and every final state with distinct weights."""
    if isinstance(output, torch.nn.utils.rnn.PackedSequence):
        output = output.data
    gen = torch.Generator(device="cpu").manual_seed(1)
    total = (output * torch.randn(output.shape, generator=gen, dtype=output.dtype).to(output.device)).sum()
    for s in state_tensors(state):
        total = total + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype).to(s.device)).sum()
    return total


def torch_nn_run(reference, x, lengths, state=None):
    """torch.nn's (output (T, B, D*H), final state) for x, as a packed sequence of those
    lengths when given (padded back to T steps)."""
    if lengths is None:
        return reference(x, state)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    output, final = reference(packed, state)
    return torch.nn.utils.rnn.pad_packed_sequence(output, total_length=x.shape[0])[0], final


def error_of(call):
    """(exception type, message) that ``call()`` raises, or None: for comparing our errors
    with torch.nn's, whatever it raises."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 (we compare whatever torch.nn raises)
        return type(exc), str(exc)
    return None
