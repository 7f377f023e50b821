"""What RNN, LSTM, GRU and LayerNormLSTM share: torch.nn's constructor, parameters and call,
and the walk over layers and directions. Which loop runs each layer's direction is
whiteboard.backends' choice, made per call."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from whiteboard import backends
from whiteboard.nn.cells import TRACE_FIELDS
from whiteboard.nn.trace import SEED_NAMES, Trace
from whiteboard.nn.inputs import TorchNNInputs, check_constructor_arguments
from whiteboard.nn.precision import autocast_dtype, computing_in
from whiteboard.nn.cudnn_weights import flatten_for_cudnn

__all__ = ["Trace", "TRACE_FIELDS", "SEED_NAMES"]

# auto: the first backend that can run the call (whiteboard.backends.BACKENDS); native:
# the compiled loops, or an error; fused: the torch loop; reference: the loop over whiteboard.nn.cells.
_IMPLEMENTATIONS = ("auto", "native", "cudnn", "triton", "fused", "reference")
#: recurrent_init=: torch.nn's uniform initialisation of weight_hh, or orthogonal gate blocks.
RECURRENT_INITS = ("uniform", "orthogonal")


class _RecurrentBase(TorchNNInputs, nn.Module):
    """Shared machinery; subclasses set ``mode`` and ``gate_count``."""

    mode: str
    gate_count: int
    #: A layer-normalized cell (LayerNormLSTM): backends tell it from a plain LSTM by this.
    layer_norm = False

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
        recurrent_init: str = "uniform",
        proj_size: int | None = None,
    ) -> None:
        super().__init__()
        if recurrent_init not in RECURRENT_INITS:
            raise ValueError(f"recurrent_init must be one of {RECURRENT_INITS}, got {recurrent_init!r}")
        self.recurrent_init = recurrent_init
        if not hasattr(self, "forget_bias"):
            self.forget_bias = None  # set by LSTM's constructor
        check_constructor_arguments(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional)
        if proj_size is not None and self.mode != "LSTM":
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        proj_size = proj_size or 0
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
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
        self.proj_size = proj_size  # LSTMP (Sak et al. 2014): h is W_hr (o * tanh(c)), proj_size wide
        self.implementation = implementation
        # Set for the duration of one call by whiteboard.nn.regularizers.WeightDrop / Zoneout.
        self._weight_overrides: dict[str, Tensor] | None = None
        self._zoneout: tuple[float, float, bool] | None = None
        self._compute_dtype: torch.dtype | None = None  # set for one call under autocast
        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        gate_rows = self.gate_count * hidden_size
        # torch.nn's lists of parameter names: per layer and direction, and all in order.
        self._all_weights: list[list[str]] = []
        self._flat_weights_names: list[str] = []
        state_size = proj_size or hidden_size  # what h_t is, and what feeds back through W_hh
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else state_size * directions
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = {"weight_ih": (gate_rows, layer_input), "weight_hh": (gate_rows, state_size)}
                if bias:
                    shapes.update(bias_ih=(gate_rows,), bias_hh=(gate_rows,))
                if proj_size:
                    shapes.update(weight_hr=(proj_size, hidden_size))
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
        """torch.nn's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H)); then the
        layer's ``recurrent_init`` and ``forget_bias``, where set (:meth:`apply_init_options`)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)
        self.apply_init_options()

    def apply_init_options(self) -> None:
        """``recurrent_init="orthogonal"``: each gate's (H, H) block of every ``weight_hh`` an
        orthogonal matrix (Saxe et al. 2014). ``forget_bias`` (LSTMs): the forget gates'
        summed bias ``bias_ih + bias_hh`` starts at that value (its ``bias_ih`` block set,
        its ``bias_hh`` block zero; Gers et al. 2000, Jozefowicz et al. 2015). Called after
        any other initialisation that should not undo them (the LM's ``init_range``)."""
        H = self.hidden_size
        with torch.no_grad():
            for names in self._all_weights:
                for name in names:
                    parameter = getattr(self, name)
                    if name.startswith("weight_hh") and self.recurrent_init == "orthogonal":
                        for block in parameter.split(H, 0):
                            nn.init.orthogonal_(block)
                    elif name.startswith("bias_") and self.forget_bias is not None:
                        parameter[H : 2 * H].fill_(self.forget_bias if name.startswith("bias_ih") else 0.0)

    def flatten_parameters(self) -> None:
        """torch.nn's: on CUDA with cuDNN, make the weights views of one flat buffer, so the
        cuDNN backend's calls take them as they are instead of copying them every call (an
        optimizer's in-place updates keep them so). A no-op elsewhere, as in torch.nn."""
        flatten_for_cudnn(self)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self.flatten_parameters()  # as torch.nn does after .to() / .cuda()
        return result

    def layer_weights(self, layer: int, direction: int) -> tuple:
        """(weight_ih, weight_hh, bias_ih, bias_hh) of one layer and direction, and weight_hr
        after them in an LSTM with projections."""
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        w_ih = self._weight(f"weight_ih{suffix}")
        w_hh = self._weight(f"weight_hh{suffix}")
        if self._weight_overrides:
            w_hh = self._weight_overrides.get(f"weight_hh{suffix}", w_hh)
        if self._compute_dtype is not None:  # under autocast: a low-precision copy, whose gradient reaches w
            return tuple(None if w is None else w.to(self._compute_dtype)
                         for w in self._layer_weights(suffix, w_ih, w_hh))
        return self._layer_weights(suffix, w_ih, w_hh)

    def _layer_weights(self, suffix: str, w_ih: Tensor, w_hh: Tensor) -> tuple:
        biases = (self._weight(f"bias_ih{suffix}"), self._weight(f"bias_hh{suffix}")) if self.bias else (None, None)
        if self.proj_size:
            return w_ih, w_hh, *biases, self._weight(f"weight_hr{suffix}")
        return w_ih, w_hh, *biases

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
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
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
        if self.recurrent_init != "uniform":
            s += f", recurrent_init={self.recurrent_init!r}"
        if self.forget_bias is not None:
            s += f", forget_bias={self.forget_bias}"
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
        autocast = autocast_dtype(self, x, hx)
        result_dtype = autocast
        if self.layer_norm and autocast is not None:
            # Layer norm is on autocast's float32 list: compute in float32, return as an LSTM does.
            autocast = torch.float32
        if autocast is not None:
            x = x.to(autocast)
        states = self._initial_states(hx, B, x, unbatched)
        if T == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        mask = self._mask(lengths, T, B, x.device)
        with computing_in(self, autocast, x.device.type):
            states = states if autocast is None else [s.to(autocast) for s in states]
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
        if result_dtype is not None and result_dtype != autocast:
            output = output.to(result_dtype) if not packed else output._replace(data=output.data.to(result_dtype))
            finals = [f.to(result_dtype) for f in finals]
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

    def _state_count(self) -> int:
        return 2 if self.mode == "LSTM" else 1

    def _call(self, x: Tensor, tensors=(), mask=None, trace: bool = False) -> backends.Call:
        """What decides the backend of a call on x (and ``tensors``: states, weights)."""
        return backends.Call(self.mode, self.layer_norm, x.device.type, x.dtype, trace, self._zoneout,
                             mask is not None, backends.under_functorch(x, *tensors),
                             getattr(self, "nonlinearity", "tanh"), projection=self.proj_size > 0)

    def _direction(self, x, initial, weights, mask, trace: bool):
        """One layer, one direction over (T, B, I), on the backend whiteboard.backends
        chooses. Returns (output, finals, fields)."""
        if torch.compiler.is_compiling() and not trace and self._zoneout is None:
            # One custom operator that torch.compile and torch.export see whole; it chooses
            # the backend when it runs (whiteboard.backends.ops).
            cell = "layernorm-lstm" if self.layer_norm else self.mode.lower()
            weights = [x.new_empty(0) if w is None else w for w in weights]  # the operator's missing bias
            outputs = backends.direction_op(cell, getattr(self, "nonlinearity", "tanh"), self.implementation,
                                            x.contiguous(), list(initial), weights, mask)
            return outputs[0], list(outputs[1:]), None
        call = self._call(x, (*initial, *weights), mask, trace)
        return backends.choose(call, self.implementation).run(call, x, initial, weights, mask)

    def _stack_in_one_call(self, x: Tensor, states: list[Tensor]) -> list[Tensor] | None:
        """All layers and directions at once where the backend offers it (no zoneout):
        [output, h_n (, c_n)], else None."""
        if self._zoneout is not None or torch.compiler.is_compiling():
            return None
        weights = [self.layer_weights(layer, d) for layer in range(self.num_layers) for d in range(self.num_directions)]
        call = self._call(x, (*states, *(w for group in weights for w in group)))
        dropout = self.dropout if self.training and self.num_layers > 1 else 0.0
        return backends.choose(call, self.implementation).run_stack(call, x, states, weights, self.bidirectional,
                                                                     dropout)
