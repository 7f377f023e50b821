"""The backend boundary: one choice per call, a reason for every backend that declines,
and the backend explain() names is the one that runs."""

import pytest
import torch

import whiteboard
from whiteboard import backends


def _record_runs(monkeypatch) -> list[str]:
    """The names of the backends whose run() (one layer, one direction) or run_stack() (a
    whole stack, where it gives one) the calls after this make."""
    seen = []
    for backend in backends.BACKENDS:
        for method in ("run", "run_stack"):
            original = getattr(backend, method)

            def recorded(*args, _original=original, _name=backend.name, _method=method):
                result = _original(*args)
                if _method == "run" or result is not None:
                    seen.append(_name)
                return result

            monkeypatch.setattr(backend, method, recorded)
    return seen


def _ran(layer, x, monkeypatch, **kwargs):
    """Which backends a call ran on."""
    seen = _record_runs(monkeypatch)
    layer(x, **kwargs)
    return set(seen)


CASES = [
    # (layer, input, expected backend, a word of each declining backend's reason)
    (lambda: whiteboard.LSTM(4, 6), torch.randn(5, 3, 4), "compiled", {}),
    (lambda: whiteboard.GRU(4, 6).half(), torch.randn(5, 3, 4).half(), "torch-loop", {"compiled": "float16"}),
    (lambda: whiteboard.LayerNormLSTM(4, 6), torch.randn(5, 3, 4), "torch-loop",
     {"compiled": "no compiled loop for the layer-norm LSTM"}),
    (lambda: whiteboard.RNN(4, 6, implementation="fused"), torch.randn(5, 3, 4), "torch-loop", {}),
    (lambda: whiteboard.RNN(4, 6, implementation="reference"), torch.randn(5, 3, 4), "reference", {}),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_explain_names_the_backend_that_runs_and_why_the_others_decline(case, monkeypatch):
    build, x, expected, reasons = CASES[case]
    layer = build()
    explanation = backends.explain(layer, x)
    assert explanation.chosen == expected
    for name, words in reasons.items():
        assert words in explanation.reasons[name]
    assert explanation.reasons[expected] is None
    assert _ran(layer, x, monkeypatch) == {expected}
    text = str(explanation)
    assert f"{expected}" in text and "runs this call" in text and len(text.splitlines()) == len(backends.BACKENDS)


def test_a_trace_or_zoneout_runs_on_the_reference_whatever_is_named(monkeypatch):
    layer = whiteboard.LSTM(4, 6, implementation="native")
    x = torch.randn(5, 3, 4)
    explanation = backends.explain(layer, x, trace=True)
    assert explanation.chosen == "reference" and "trace" in explanation.reasons["compiled"]
    seen = _record_runs(monkeypatch)
    layer.trace(x)
    assert set(seen) == {"reference"}


def test_a_named_backend_that_cannot_run_the_call_says_why():
    with pytest.raises(RuntimeError, match="implementation='native' cannot run this call: float16"):
        whiteboard.GRU(4, 6, implementation="native").half()(torch.randn(5, 3, 4).half())


def test_turning_the_compiled_loops_off_is_a_reason(monkeypatch):
    monkeypatch.setenv("WHITEBOARD_NATIVE", "0")
    explanation = backends.explain(whiteboard.LSTM(4, 6), torch.randn(5, 3, 4))
    assert explanation.chosen == "torch-loop" and "WHITEBOARD_NATIVE=0" in explanation.reasons["compiled"]


class _GRUOnly(backends.Backend):
    name, implementation = "gru-only", "gru-only"

    def __init__(self):
        self.calls = []

    def supports(self, call):
        return None if call.mode == "GRU" else "GRU only"

    def run(self, call, x, initial, weights, mask):
        self.calls.append(call)
        return backends.REFERENCE.run(call, x, initial, weights, mask)


def test_a_backend_added_to_the_registry_is_chosen_where_it_is_preferred():
    added = _GRUOnly()
    backends.register(added, before=backends.COMPILED)
    try:
        gru = backends.call_of(whiteboard.GRU(4, 6), torch.randn(5, 3, 4))
        lstm = backends.call_of(whiteboard.LSTM(4, 6), torch.randn(5, 3, 4))
        assert backends.choose(gru).name == "gru-only"
        assert backends.choose(lstm).name == "compiled"
        assert backends.explain(whiteboard.LSTM(4, 6), torch.randn(5, 3, 4)).reasons["gru-only"] == "GRU only"
        layer = whiteboard.GRU(4, 6, num_layers=2)
        x = torch.randn(5, 3, 4)
        output, h_n = layer(x)
        assert len(added.calls) == 2 and added.calls[0].mode == "GRU"  # one run per layer
        with pytest.raises(ValueError, match="already registered"):
            backends.register(_GRUOnly())
    finally:
        backends.unregister(added)
    assert [b.name for b in backends.BACKENDS] == ["compiled", "cudnn", "triton", "torch-loop", "reference"]
    reference = torch.nn.GRU(4, 6, num_layers=2)
    reference.load_state_dict(layer.state_dict())
    expected, expected_h = reference(x)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(h_n, expected_h)


def test_a_stack_without_grad_for_one_token_runs_in_one_compiled_call(monkeypatch):
    layer = whiteboard.LSTM(4, 6, num_layers=3)
    seen = _record_runs(monkeypatch)
    with torch.no_grad():
        layer(torch.randn(1, 1, 4))
    assert seen == ["compiled"]  # run_stack gave the result: no per-layer run
    seen.clear()
    with torch.no_grad():
        layer(torch.randn(50, 8, 4))  # too many rows for one stacked call: layer by layer
    assert seen == ["compiled"] * 3
