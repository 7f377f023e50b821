"""torch.nn's handling of a recurrent layer's arguments, inputs and states, with its
exception types and words (code written against torch.nn catches them): the constructor's
checks, the input's dtype and size, h_0 / (h_0, c_0), lengths and packed sequences."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


class TorchNNInputs:
    """The input and state handling of :class:`whiteboard.nn.recurrent._RecurrentBase`."""

    def _check_input(self, x: Tensor) -> None:
        """torch.nn's checks of the input's dtype and feature size, with its exception types and
        words (code written against torch.nn catches them). x is (T, B, I)."""
        weight_dtype = self._weight("weight_ih_l0").dtype
        if x.dtype != weight_dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(
                f"RNN input dtype ({x.dtype}) does not match weight dtype ({weight_dtype}). "
                f"Convert input: input.to({weight_dtype}), or convert model: model.to({x.dtype})"
            )
        if x.shape[-1] != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.shape[-1]}"
            )

    def _initial_states(self, hx, batch: int, x: Tensor, unbatched: bool) -> list[Tensor]:
        count = self._state_count()
        layers = self.num_layers * self.num_directions
        # h is proj_size wide in an LSTM with projections (LSTMP); c is always hidden_size.
        shapes = [(layers, batch, self.proj_size or self.hidden_size), (layers, batch, self.hidden_size)][:count]
        if hx is None:
            if shapes[0] == shapes[-1]:
                zeros = x.new_zeros(shapes[0])
                return [zeros] * count
            return [x.new_zeros(shape) for shape in shapes]
        if self.mode == "LSTM":
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2 and all(isinstance(h, Tensor) for h in hx)):
                raise TypeError("LSTM: hx must be a tuple of two Tensors (h_0, c_0)")
            given = list(hx)
            ranks = f"({given[0].dim()}-D, {given[1].dim()}-D) tensors"
            subject, messages = "hx and cx", ("Expected hidden[0] size {}, got {}", "Expected hidden[1] size {}, got {}")
        else:
            if not isinstance(hx, Tensor):
                raise TypeError(f"{self.mode}: hx must be a Tensor h_0, got {type(hx).__name__}")
            given = [hx]
            ranks = f"{hx.dim()}-D tensor"
            subject, messages = "hx", ("Expected hidden size {}, got {}",)
        rank = 2 if unbatched else 3
        if any(state.dim() != rank for state in given):
            kind = "unbatched 2-D" if unbatched else "batched 3-D"
            raise RuntimeError(f"For {kind} input, {subject} should also be {rank}-D but got {ranks}")
        states = []
        for message, state, expected in zip(messages, given, shapes):
            state = state.unsqueeze(1) if unbatched else state
            if _shape(state) != expected:
                raise RuntimeError(message.format(expected, list(state.shape)))
            if state.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):  # torch.nn's rule too
                raise ValueError(f"{self.mode}: expected hidden state of dtype {x.dtype}, got {state.dtype}")
            states.append(state)
        return states

    @staticmethod
    def _repack(outputs: Tensor, packed_input: PackedSequence) -> PackedSequence:
        """Pack (T, B, ·) outputs in the input's original batch order like torch.nn does."""
        lengths = _packed_lengths(packed_input)
        sorted_indices = packed_input.sorted_indices
        if sorted_indices is not None:
            outputs = outputs.index_select(1, sorted_indices)
            lengths = lengths.index_select(0, sorted_indices.to(lengths.device))
        data = pack_padded_sequence(outputs, lengths, enforce_sorted=True).data
        return PackedSequence(data, packed_input.batch_sizes, packed_input.sorted_indices, packed_input.unsorted_indices)

    @staticmethod
    def _mask(lengths, T: int, B: int, device) -> Tensor | None:
        if lengths is None:
            return None
        lengths = torch.as_tensor(lengths)
        if _shape(lengths) != (B,):
            raise ValueError(f"lengths must have shape ({B},), got {_shape(lengths)}")
        if lengths.numel() and (lengths.min() < 1 or lengths.max() > T):
            raise ValueError(f"lengths must lie in [1, {T}], got min {int(lengths.min())}, max {int(lengths.max())}")
        steps = torch.arange(T, device=device).unsqueeze(1)  # (T, 1)
        return (steps < lengths.to(device).unsqueeze(0)).unsqueeze(-1)  # (T, B, 1)

    @staticmethod
    def _reverse_index(lengths, T: int, B: int, device) -> Tensor:
        """Index (T, B) that reverses each sequence within its own length (pads stay put)."""
        steps = torch.arange(T, device=device).unsqueeze(1).expand(T, B)
        lengths = torch.as_tensor(lengths, device=device).unsqueeze(0)
        return torch.where(steps < lengths, lengths - 1 - steps, steps)


def _packed_lengths(packed: PackedSequence) -> Tensor:
    """Lengths in original batch order, on the CPU as pack_padded_sequence wants them."""
    batch_sizes = packed.batch_sizes  # (T,) how many sequences are alive at each step
    B = int(batch_sizes[0])
    steps = torch.arange(B).unsqueeze(0) < batch_sizes.unsqueeze(1)  # (T, B) sorted order
    lengths = steps.sum(0)
    if packed.unsorted_indices is not None:
        lengths = lengths.index_select(0, packed.unsorted_indices.cpu())
    return lengths



def check_constructor_arguments(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional) -> None:
    """torch.nn.RNNBase's argument checks, in its order and words; and the same strictness
    where torch.nn lets a wrong type through (``bidirectional``, ``num_layers``): a string
    ``"False"`` would otherwise quietly mean True."""
    if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability of an element being zeroed"
        )
    for name, value in (("bias", bias), ("batch_first", batch_first), ("bidirectional", bidirectional)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be greater than zero")
