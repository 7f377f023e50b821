"""``RNN``, ``LSTM`` and ``GRU`` layers: torch.nn's interface, our equations.

Constructor arguments, call signature, return values, parameter names, shapes and gate
order are torch.nn's, so ``ours.load_state_dict(theirs.state_dict())`` works both ways.
What torch.nn cannot do is added on top:

* ``layer.trace(input)`` returns, beside the usual outputs, every gate and state of every
  layer, direction and time step (a :class:`Trace`);
* ``implementation="reference"`` runs the plain loop over :mod:`whiteboard.nn.cells`;
  the default ``"fused"`` runs :mod:`whiteboard.backends.fused` (hand-written backward through time);
* ``lengths=`` gives per-sequence lengths for a padded batch without packing it;
* ``RNN(nonlinearity="sigmoid")``, the seed's own choice, beside tanh and relu.

Parameter layout, per layer ``k`` and direction (suffix ``_reverse`` for backward)::

    weight_ih_l{k}  (G*H, I_k)   I_0 = input_size, I_k = D*H after the first layer
    weight_hh_l{k}  (G*H, H)
    bias_ih_l{k}    (G*H,)
    bias_hh_l{k}    (G*H,)

with G = 1 (RNN), 4 (LSTM: i|f|g|o) or 3 (GRU: r|z|n), D = 2 if bidirectional else 1.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from whiteboard import backends
from whiteboard.nn import cells
from whiteboard.backends import fused
from whiteboard.backends.compiled import build as native
from whiteboard.backends.compiled import planning

__all__ = ["RNN", "LSTM", "GRU", "LayerNormLSTM", "Trace", "TRACE_FIELDS", "SEED_NAMES"]

#: What each layer type records per step in a :class:`Trace`, in order.
TRACE_FIELDS: dict[str, tuple[str, ...]] = {
    "RNN": ("preactivation", "hidden"),
    "LSTM": ("input_gate", "forget_gate", "cell_candidate", "output_gate", "cell", "hidden"),
    "GRU": ("reset_gate", "update_gate", "candidate", "hidden"),
}

#: The seed's whiteboard words for the standard names (see the README's glossary).
SEED_NAMES: dict[str, str] = {
    "input_gate": "selective read",
    "forget_gate": "selective forget",
    "output_gate": "selective write",
    "cell_candidate": "what could be written",
    "cell": "the whiteboard",
    "hidden": "what is shown to the next step",
}

# auto: the compiled loops (whiteboard.backends.compiled.build) for CPU float32/float64 where they can be built,
#       else the pure-PyTorch fused path; native: the compiled loops, or an error;
# fused: the pure-PyTorch fused path; reference: the loop over whiteboard.nn.cells.
_IMPLEMENTATIONS = ("auto", "native", "fused", "reference")


@dataclass
class Trace:
    """Per-step internals of a recurrent layer.

    ``steps[layer][direction][name]`` is a tensor of shape (T, B, H), or (B, T, H) when the
    layer is ``batch_first`` (unbatched input: (T, H)); names are ``TRACE_FIELDS[mode]``.
    Direction 0 is forward in time, 1 (bidirectional only) is backward; both are indexed
    by the input's time step. Steps beyond a sequence's length are zero.
    """

    mode: str
    steps: list[list[dict[str, Tensor]]] = field(default_factory=list)

    def __getitem__(self, layer: int) -> list[dict[str, Tensor]]:
        return self.steps[layer]

    def get(self, name: str, layer: int = -1, direction: int = 0) -> Tensor:
        """One traced quantity, e.g. ``trace.get("forget_gate", layer=0)``."""
        if name not in TRACE_FIELDS[self.mode]:
            raise KeyError(f"{self.mode} traces record {TRACE_FIELDS[self.mode]}, not {name!r}")
        return self.steps[layer][direction][name]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


class _RecurrentBase(nn.Module):
    """Shared machinery; subclasses set ``mode`` and ``gate_count``."""

    mode: str
    gate_count: int
    #: A layer-normalized cell (LayerNormLSTM): backends tell it from a plain LSTM by this.
    layer_norm = False
    #: recurrent.cpp's stack_inference cell (0 RNN, 1 LSTM, 2 GRU); None: no such call.
    stack_cell: int | None = None

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        implementation: str = "auto",
    ) -> None:
        super().__init__()
        _check_constructor_arguments(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional)
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"dropout={dropout} has no effect with num_layers=1: dropout is applied "
                "between layers, never after the last one (as in torch.nn)",
                stacklevel=3,
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = 0  # torch.nn's attribute; projections (LSTMP) are not supported
        self.implementation = implementation
        # Set for the duration of one call by whiteboard.nn.regularizers.WeightDrop / Zoneout.
        self._weight_overrides: dict[str, Tensor] | None = None
        self._zoneout: tuple[float, float, bool] | None = None
        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        gate_rows = self.gate_count * hidden_size
        # torch.nn's lists of parameter names: per layer and direction, and all in order.
        self._all_weights: list[list[str]] = []
        self._flat_weights_names: list[str] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * directions
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = {"weight_ih": (gate_rows, layer_input), "weight_hh": (gate_rows, hidden_size)}
                if bias:
                    shapes.update(bias_ih=(gate_rows,), bias_hh=(gate_rows,))
                names = [f"{name}{suffix}" for name in shapes]
                for name, shape in zip(names, shapes.values()):
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                self._all_weights.append(names)
                self._flat_weights_names.extend(names)
                for name, size in self._extra_parameter_sizes().items():
                    self.register_parameter(f"{name}{suffix}", nn.Parameter(torch.empty(size, **factory)))
        self.reset_parameters()

    # ----------------------------------------------------------------- properties

    @property
    def implementation(self) -> str:
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        if value not in _IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {value!r}")
        self._implementation = value

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """torch.nn's: per layer and direction, [weight_ih, weight_hh(, bias_ih, bias_hh)]."""
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _flat_weights(self) -> list[Tensor]:
        """torch.nn's: the parameters named by ``_flat_weights_names``, in that order."""
        return [getattr(self, name) for name in self._flat_weights_names]

    def _extra_parameter_sizes(self) -> dict[str, int]:
        """Per layer and direction parameters beyond torch.nn's four (name prefix: size)."""
        return {}

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """Accepted for drop-in compatibility with torch.nn; nothing to flatten here."""

    def layer_weights(self, layer: int, direction: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(weight_ih, weight_hh, bias_ih, bias_hh) of one layer and direction."""
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        w_ih = self._weight(f"weight_ih{suffix}")
        w_hh = self._weight(f"weight_hh{suffix}")
        if self._weight_overrides:
            w_hh = self._weight_overrides.get(f"weight_hh{suffix}", w_hh)
        if not self.bias:
            return w_ih, w_hh, None, None
        return w_ih, w_hh, self._weight(f"bias_ih{suffix}"), self._weight(f"bias_hh{suffix}")

    def _weight(self, name: str) -> Tensor:
        # From the parameter dict first: through nn.Module.__getattr__ the four lookups of a
        # 2-layer generation call made it ~30 us slower (of ~330). A weight that is no longer
        # a Parameter (an AWD-style WeightDrop deletes it and sets a plain tensor) is an
        # ordinary attribute.
        weight = self._parameters.get(name)
        return weight if weight is not None else getattr(self, name)

    def extra_repr(self) -> str:
        # torch.nn's RNNBase.extra_repr, then what only whiteboard has.
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        if self.implementation != "auto":
            s += f", implementation={self.implementation!r}"
        return s

    # ----------------------------------------------------------------- the call

    def forward(self, input, hx=None, *, lengths: Tensor | None = None):
        """Same signature and return values as the torch.nn layer, plus optional
        ``lengths`` (B,) for a padded batch whose sequences have different lengths."""
        output, state, _ = self._run(input, hx, lengths, trace=False)
        return output, state

    def trace(self, input, hx=None, *, lengths: Tensor | None = None):
        """Like ``forward`` but also returns a :class:`Trace` of every gate and state.

        Runs the reference loop over :mod:`whiteboard.nn.cells`, so it is slower than
        ``forward``; it stays differentiable (gradient-reach analysis uses that).
        Returns ``(output, state, trace)``.
        """
        return self._run(input, hx, lengths, trace=True)

    # ----------------------------------------------------------------- internals

    def _state_count(self) -> int:
        return 2 if self.mode == "LSTM" else 1

    def _run(self, input, hx, lengths, trace: bool):
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("lengths= is for padded batches; a PackedSequence carries its own")
            x, lengths = pad_packed_sequence(input, batch_first=False)  # (T, B, I), original order
            unbatched = False
        else:
            x = input
            if not isinstance(x, Tensor):
                raise TypeError(f"{self.mode}: input must be a Tensor or PackedSequence, got {type(x).__name__}")
            if x.dim() not in (2, 3):
                # torch.nn's words, which differ by a word between its RNN and the others
                noun = "D tensor instead" if self.mode == "RNN" else "D instead"
                raise ValueError(f"{self.mode}: Expected input to be 2D or 3D, got {x.dim()}{noun}")
            unbatched = x.dim() == 2
            if unbatched:
                x = x.unsqueeze(1)
            elif self.batch_first:
                x = x.transpose(0, 1)
        self._check_input(x)
        T, B = x.shape[0], x.shape[1]
        states = self._initial_states(hx, B, x, unbatched)
        if T == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        mask = self._mask(lengths, T, B, x.device)

        stacked = None if trace or mask is not None else self._stack_in_one_call(x, states)
        if stacked is not None:
            outputs, finals, trace_steps = stacked[0], stacked[1:], None
        else:
            outputs, finals, trace_steps = self._stack(x, states, mask, lengths, trace)
            finals = [torch.stack(f, 0) for f in finals]  # each (L*D, B, H)
        if packed:
            output = self._repack(outputs, input)
        elif unbatched:
            output = outputs.squeeze(1)
            finals = [f.squeeze(1) for f in finals]
        else:
            output = outputs.transpose(0, 1) if self.batch_first else outputs
        state = (finals[0], finals[1]) if self.mode == "LSTM" else finals[0]
        result_trace = None
        if trace:
            result_trace = Trace(self.mode, [[self._trace_layout(d, unbatched) for d in layer] for layer in trace_steps])
        return output, state, result_trace

    def _trace_layout(self, fields: dict[str, Tensor], unbatched: bool) -> dict[str, Tensor]:
        if unbatched:
            return {k: v.squeeze(1) for k, v in fields.items()}
        if self.batch_first:
            return {k: v.transpose(0, 1) for k, v in fields.items()}
        return fields

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
        expected = (layers, batch, self.hidden_size)
        if hx is None:
            zeros = x.new_zeros(expected)
            return [zeros] * count
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
        for message, state in zip(messages, given):
            state = state.unsqueeze(1) if unbatched else state
            if _shape(state) != expected:
                raise RuntimeError(message.format(expected, list(state.shape)))
            if state.dtype != x.dtype:
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

    def _stack_in_one_call(self, x: Tensor, states: list[Tensor]) -> list[Tensor] | None:
        """All layers in one compiled call (recurrent.cpp's stack_inference) where a call
        without grad covers a few rows in all (generation: one token at a time, where the
        per-layer Python cost about as much as the layers' compiled calls), one direction,
        no dropout between layers to apply: [output, h_n (, c_n)]. Else, or where a NaN or
        Inf was met, None: the layers run one by one."""
        T, B = x.shape[0], x.shape[1]
        if (self.stack_cell is None or self.bidirectional or self._zoneout is not None
                or T * B > native.transpose_max_rows or (self.dropout > 0 and self.training and self.num_layers > 1)
                or self.implementation in ("reference", "fused") or B == 0):
            return None
        compiled = self._native_for(x)
        if compiled is None:
            return None
        weights = [w for layer in range(self.num_layers) for w in self.layer_weights(layer, 0)]
        if (torch.is_grad_enabled() and _any_requires_grad(x, states, weights)) or _under_functorch(x, *states, *weights):
            return None
        kind = planning.RNN_KINDS[self.nonlinearity] if self.mode == "RNN" else 0
        return compiled.stack_inference(self.stack_cell, x.contiguous(), states, weights, kind) or None

    def _stack(self, x: Tensor, states: list[Tensor], mask, lengths, trace: bool):
        T, B = x.shape[0], x.shape[1]
        directions = self.num_directions
        finals: list[list[Tensor]] = [[] for _ in states]
        trace_steps: list[list[dict[str, Tensor]]] = []
        reverse_index = None
        if self.bidirectional and lengths is not None:
            reverse_index = self._reverse_index(lengths, T, B, x.device)
        layer_input = x
        per_layer = [s.unbind(0) for s in states]  # one call per state, not one per layer
        for layer in range(self.num_layers):
            outs = []
            layer_trace = []
            for direction in range(directions):
                index = layer * directions + direction
                initial = [s[index] for s in per_layer]
                seq = layer_input
                if direction == 1:
                    seq = self._reverse_time(seq, reverse_index)
                out, final, fields = self._direction(seq, initial, self.layer_weights(layer, direction), mask, trace)
                if direction == 1:
                    out = self._reverse_time(out, reverse_index)
                    if fields is not None:
                        fields = {k: self._reverse_time(v, reverse_index) for k, v in fields.items()}
                outs.append(out)
                layer_trace.append(fields)
                for store, value in zip(finals, final):
                    store.append(value)
            layer_output = outs[0] if directions == 1 else torch.cat(outs, dim=2)  # (T, B, D*H)
            if trace:
                trace_steps.append(layer_trace)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_output = nn.functional.dropout(layer_output, self.dropout, training=True)
            layer_input = layer_output
        return layer_input, finals, trace_steps

    @staticmethod
    def _reverse_time(seq: Tensor, reverse_index: Tensor | None) -> Tensor:
        if reverse_index is None:
            return seq.flip(0)
        index = reverse_index.unsqueeze(-1).expand(-1, -1, seq.shape[-1])
        return seq.gather(0, index)

    def _direction(self, x, initial, weights, mask, trace: bool):
        """One layer, one direction over (T, B, I). Returns (output, finals, fields)."""
        call = backends.Call(self.mode, self.layer_norm, x.device.type, x.dtype, trace, self._zoneout is not None,
                             mask is not None, _under_functorch(x, *initial, *weights))
        backend = backends.choose(call, self.implementation)
        if backend is backends.REFERENCE:
            return self._reference_direction(x, initial, weights, mask, trace)
        module = native.load() if backend is backends.COMPILED else None
        out, finals = self._fused_direction(x.contiguous(), initial, weights, mask, module)
        return out, finals, None

    def _native_for(self, x: Tensor):
        """The compiled loop module where this layer's plain call on ``x`` runs on it, else None."""
        call = backends.Call(self.mode, self.layer_norm, x.device.type, x.dtype)
        return native.load() if backends.choose(call, self.implementation) is backends.COMPILED else None

    def _fused_direction(self, x, initial, weights, mask, native):
        raise NotImplementedError

    def _step(self, x_t, state, weights):
        raise NotImplementedError

    def _reference_direction(self, x, initial, weights, mask, trace: bool):
        fields_per_step = []
        outputs = []
        state = list(initial)
        for t in range(x.shape[0]):
            step = self._step(x[t], state, weights)
            new_state = [step.hidden] if self.mode != "LSTM" else [step.hidden, step.cell]
            if self._zoneout is not None:
                p_hidden, p_cell, training = self._zoneout
                new_state = [cells.zoneout_mix(new, old, p, training)
                             for new, old, p in zip(new_state, state, (p_hidden, p_cell))]
                step = step._replace(hidden=new_state[0], **({"cell": new_state[1]} if self.mode == "LSTM" else {}))
            if mask is not None:
                m = mask[t]
                new_state = [torch.where(m, new, old) for new, old in zip(new_state, state)]
                outputs.append(step.hidden * m)
            else:
                outputs.append(step.hidden)
            state = new_state
            if trace:
                fields_per_step.append(step)
        output = torch.stack(outputs, 0)  # (T, B, H)
        fields = None
        if trace:
            fields = {}
            for name in TRACE_FIELDS[self.mode]:
                values = torch.stack([getattr(s, name) for s in fields_per_step], 0)  # (T, B, H)
                fields[name] = values if mask is None else values * mask
        return output, state, fields


class RNN(_RecurrentBase):
    """Elman RNN, torch.nn.RNN-compatible, with the seed's sigmoid as a third choice.

    .. math::
        s_t = \\phi(W_{ih} x_t + b_{ih} + W_{hh} s_{t-1} + b_{hh}),
        \\quad \\phi \\in \\{\\tanh, \\mathrm{relu}, \\sigma\\}

    Args:
        input_size: features I of the input x.
        hidden_size: features H of the state s.
        num_layers: stacked layers L. Default 1.
        nonlinearity: ``'tanh'`` (default), ``'relu'`` or ``'sigmoid'``.
        bias: use ``bias_ih``/``bias_hh``. Default True.
        batch_first: input and output are (B, T, ·) instead of (T, B, ·). Default False.
        dropout: dropout on each layer's output except the last, in training. Default 0.
        bidirectional: add a layer that reads the sequence backwards. Default False.
        implementation: ``'auto'`` (default: compiled time loops on CPU where they build,
            else the pure-PyTorch fused path), ``'native'``, ``'fused'`` or ``'reference'``.

    Shapes:
        input: (T, B, I), (B, T, I) if batch_first, (T, I) unbatched, or a PackedSequence.
        h_0: (L*D, B, H) or (L*D, H) unbatched; zeros if omitted.
        output: (T, B, D*H) ((B, T, D*H) if batch_first), or a PackedSequence.
        h_n: (L*D, B, H).

    Example:
        >>> rnn = RNN(10, 20, num_layers=2)
        >>> output, h_n = rnn(torch.randn(5, 3, 10))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
    """

    mode = "RNN"
    gate_count = 1
    stack_cell = 0

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh", *args, **kwargs):
        if nonlinearity not in cells.NONLINEARITIES:
            raise ValueError(f"Unknown nonlinearity {nonlinearity!r}. Select from {tuple(cells.NONLINEARITIES)}.")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, *args, **kwargs)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", nonlinearity={self.nonlinearity!r}" if self.nonlinearity != "tanh" else "")

    def _step(self, x_t, state, weights):
        return cells.rnn_step(x_t, state[0], *weights, nonlinearity=self.nonlinearity)

    def _fused_direction(self, x, initial, weights, mask, native):
        if torch.is_grad_enabled() and _any_requires_grad(x, initial, weights):
            out, h_n = fused.FusedRNN.apply(x, initial[0], *weights, mask, self.nonlinearity, native)
            return out, [h_n]
        call = planning.one_call(x, initial[0].shape[-1], 1, mask, native)
        if call is not None:
            result = native.rnn_inference(x.contiguous(), initial[0], *weights, planning.RNN_KINDS[self.nonlinearity],
                                          *call)
            if result:
                return result[0], [result[1]]
            native = None  # a NaN or Inf: the torch loop propagates it as torch.nn does
        (hs, out), _ = fused.run_sequence(fused.rnn_sequence, native, x, initial[0], *weights, mask, self.nonlinearity)
        return out, [hs[-1]]


class LSTM(_RecurrentBase):
    """LSTM, torch.nn.LSTM-compatible (no peepholes, no projection).

    .. math::
        i_t = \\sigma(W_{ii} x_t + b_{ii} + W_{hi} h_{t-1} + b_{hi})    input gate  (selective read)
        f_t = \\sigma(W_{if} x_t + b_{if} + W_{hf} h_{t-1} + b_{hf})    forget gate (selective forget)
        g_t = \\tanh(W_{ig} x_t + b_{ig} + W_{hg} h_{t-1} + b_{hg})     candidate
        o_t = \\sigma(W_{io} x_t + b_{io} + W_{ho} h_{t-1} + b_{ho})    output gate (selective write)
        c_t = f_t \\odot c_{t-1} + i_t \\odot g_t                        cell state  (the whiteboard)
        h_t = o_t \\odot \\tanh(c_t)

    Args: as :class:`RNN` without ``nonlinearity``.

    Shapes:
        input: (T, B, I), (B, T, I) if batch_first, (T, I) unbatched, or a PackedSequence.
        (h_0, c_0): each (L*D, B, H) or (L*D, H) unbatched; zeros if omitted.
        output: (T, B, D*H) ((B, T, D*H) if batch_first), or a PackedSequence.
        (h_n, c_n): each (L*D, B, H).

    Attributes:
        weight_ih_l{k}: (4H, I_k), rows i|f|g|o.  weight_hh_l{k}: (4H, H).
        bias_ih_l{k}, bias_hh_l{k}: (4H,).

    Example:
        >>> lstm = LSTM(10, 20, num_layers=2)
        >>> output, (h_n, c_n) = lstm(torch.randn(5, 3, 10))
        >>> output.shape, h_n.shape, c_n.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]), torch.Size([2, 3, 20]))
    """

    mode = "LSTM"
    gate_count = 4
    stack_cell = 1

    def __init__(self, *args, proj_size: int = 0, **kwargs):
        if proj_size:
            raise ValueError("LSTM: proj_size (LSTMP) is not supported; use proj_size=0")
        super().__init__(*args, **kwargs)

    def _step(self, x_t, state, weights):
        return cells.lstm_step(x_t, state[0], state[1], *weights)

    def _fused_direction(self, x, initial, weights, mask, native):
        if torch.is_grad_enabled() and _any_requires_grad(x, initial, weights):
            out, h_n, c_n = fused.FusedLSTM.apply(x, initial[0], initial[1], *weights, mask, native)
            return out, [h_n, c_n]
        call = planning.one_call(x, initial[0].shape[-1], 4, mask, native)
        if call is not None:
            result = native.lstm_inference(x.contiguous(), initial[0], initial[1], *weights, *call)
            if result:
                return result[0], [result[1], result[2]]
            native = None  # a NaN or Inf: the torch loop propagates it as torch.nn does
        native = fused.finite_or_none(native, initial[1])
        (hs, cs, _, out), _ = fused.run_sequence(fused.lstm_sequence, native, x, *initial, *weights, mask, False)
        return out, [hs[-1], cs[-1]]


class GRU(_RecurrentBase):
    """GRU, torch.nn.GRU-compatible, gate order r, z, n.

    .. math::
        r_t = \\sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr})   reset gate
        z_t = \\sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz})   update gate
        n_t = \\tanh(W_{in} x_t + b_{in} + r_t \\odot (W_{hn} h_{t-1} + b_{hn}))   candidate
        h_t = (1 - z_t) \\odot n_t + z_t \\odot h_{t-1}

    Args and shapes: as :class:`RNN` without ``nonlinearity``.

    Example:
        >>> gru = GRU(10, 20)
        >>> output, h_n = gru(torch.randn(5, 3, 10))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 20]), torch.Size([1, 3, 20]))
    """

    mode = "GRU"
    gate_count = 3
    stack_cell = 2

    def _step(self, x_t, state, weights):
        return cells.gru_step(x_t, state[0], *weights)

    def _fused_direction(self, x, initial, weights, mask, native):
        if torch.is_grad_enabled() and _any_requires_grad(x, initial, weights):
            out, h_n = fused.FusedGRU.apply(x, initial[0], *weights, mask, native)
            return out, [h_n]
        call = planning.one_call(x, initial[0].shape[-1], 3, mask, native)
        if call is not None:
            result = native.gru_inference(x.contiguous(), initial[0], *weights, *call)
            if result:
                return result[0], [result[1]]
            native = None  # a NaN or Inf: the torch loop propagates it as torch.nn does
        (hs, _, _, _, out), _ = fused.run_sequence(fused.gru_sequence, native, x, initial[0], *weights, mask, False)
        return out, [hs[-1]]


class LayerNormLSTM(LSTM):
    """Layer-normalized LSTM (Ba, Kiros & Hinton 2016), an LSTM with the same interface.

    .. math::
        (i, f, g, o)_t = \\mathrm{LN}(W_{ih} x_t; \\alpha_{ih}) + \\mathrm{LN}(W_{hh} h_{t-1}; \\alpha_{hh}) + b_{ih} + b_{hh}
        c_t = \\sigma(f_t) \\odot c_{t-1} + \\sigma(i_t) \\odot \\tanh(g_t)
        h_t = \\sigma(o_t) \\odot \\tanh(\\mathrm{LN}(c_t; \\alpha_c, \\beta_c))

    Normalizing each projection keeps the gates' pre-activations at unit scale whatever the
    size of the weights or of the inputs, which steadies training of deep and long-unrolled
    stacks. The state, returns and trace fields are the LSTM's.

    Parameters: torch.nn.LSTM's four per layer and direction (so an ``nn.LSTM`` state dict
    loads with ``strict=False``), plus ``gain_ih_l{k}`` (4H), ``gain_hh_l{k}`` (4H),
    ``gain_cell_l{k}`` (H) and ``bias_cell_l{k}`` (H); gains start at 1 and the shift at 0.

    Implementations: ``reference`` (:func:`whiteboard.nn.cells.layernorm_lstm_step` per step)
    and ``fused`` (:class:`whiteboard.backends.fused.FusedLayerNormLSTM`, hand-written backward);
    ``auto`` picks ``fused``. There is no compiled loop for this cell yet.
    """

    eps = cells.LAYER_NORM_EPS
    stack_cell = None  # no compiled loop
    layer_norm = True

    def _extra_parameter_sizes(self) -> dict[str, int]:
        H = self.hidden_size
        return {"gain_ih": 4 * H, "gain_hh": 4 * H, "gain_cell": H, "bias_cell": H}

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.reset_normalization()

    def reset_normalization(self) -> None:
        """Gains to 1 and the cell's shift to 0: the normalizations start as plain standardization."""
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if name.startswith("gain_"):
                    parameter.fill_(1.0)
                elif name.startswith("bias_cell"):
                    parameter.zero_()

    def layer_weights(self, layer: int, direction: int) -> tuple:
        """(weight_ih, weight_hh, bias_ih, bias_hh, gain_ih, gain_hh, gain_cell, bias_cell)."""
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        names = ("gain_ih", "gain_hh", "gain_cell", "bias_cell")
        return (*super().layer_weights(layer, direction), *(getattr(self, name + suffix) for name in names))

    def _step(self, x_t, state, weights):
        return cells.layernorm_lstm_step(x_t, state[0], state[1], *weights)

    def _fused_direction(self, x, initial, weights, mask, native):
        if torch.is_grad_enabled() and _any_requires_grad(x, initial, weights):
            out, h_n, c_n = fused.FusedLayerNormLSTM.apply(x, initial[0], initial[1], *weights, mask, self.eps)
            return out, [h_n, c_n]
        hs, cs, out, _ = fused.layernorm_lstm_sequence(x, initial[0], initial[1], *weights, mask, False, self.eps)
        return out, [hs[-1], cs[-1]]


def _under_functorch(*tensors: Tensor | None) -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap) wraps any of ``tensors``: the
    call then runs the reference loop, plain torch ops every transform sees through (the
    compiled calls need real storage, and the Functions' backward has no vmap rule)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(t is not None and wrapped(t) for t in tensors)


def _any_requires_grad(x: Tensor, initial: list[Tensor], weights) -> bool:
    return any(t is not None and t.requires_grad for t in (x, *initial, *weights))


def _packed_lengths(packed: PackedSequence) -> Tensor:
    """Lengths in original batch order, on the CPU as pack_padded_sequence wants them."""
    batch_sizes = packed.batch_sizes  # (T,) how many sequences are alive at each step
    B = int(batch_sizes[0])
    steps = torch.arange(B).unsqueeze(0) < batch_sizes.unsqueeze(1)  # (T, B) sorted order
    lengths = steps.sum(0)
    if packed.unsorted_indices is not None:
        lengths = lengths.index_select(0, packed.unsorted_indices.cpu())
    return lengths



def _check_constructor_arguments(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional) -> None:
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
