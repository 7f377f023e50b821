"""What the docs say about shapes and gate order is what the code does."""

import doctest
import re

import pytest
import torch

import whiteboard
from whiteboard.nn import layers


@pytest.mark.parametrize("obj", [whiteboard.RNN, whiteboard.LSTM, whiteboard.GRU])
def test_docstring_examples_run(obj):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(obj, globs={"torch": torch, obj.__name__: obj})
    examples = [t for t in tests if t.examples]
    assert examples, f"{obj.__name__} has no runnable example"
    for test in examples:
        runner.run(test)
    assert runner.failures == 0


@pytest.mark.parametrize("cls,gates", [(whiteboard.RNN, 1), (whiteboard.LSTM, 4), (whiteboard.GRU, 3)])
def test_documented_parameter_layout(cls, gates):
    """The module docstring's layout table: (G*H, I_k), (G*H, H), (G*H,)."""
    I, H = 3, 5
    layer = cls(I, H, num_layers=2, bidirectional=True)
    # Each documented line "name_l{k}  (shape)" read as a formula in G, H, I_k.
    documented = dict(re.findall(r"^\s+(\w+)_l\{k\}\s+(\([^)]*\))", layers.__doc__, re.MULTILINE))
    assert set(documented) == {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}
    for name, param in layer.named_parameters():
        prefix, k = name.split("_l")[0], int(name.split("_l")[1][0])
        in_k = I if k == 0 else 2 * H  # I_0 = input_size, I_k = D*H after the first layer
        shape = eval(documented[prefix].replace("*", " * "), {}, {"G": gates, "H": H, "I_k": in_k})  # noqa: S307
        assert param.shape == (shape if isinstance(shape, tuple) else (shape,)), (name, documented[prefix])


def test_documented_shapes_with_batch_first_and_bidirectional():
    layer = whiteboard.LSTM(3, 5, num_layers=2, batch_first=True, bidirectional=True)
    output, (h_n, c_n) = layer(torch.randn(7, 4, 3))  # (B, T, I)
    assert output.shape == (7, 4, 10)  # (B, T, D*H)
    assert h_n.shape == c_n.shape == (4, 7, 5)  # (L*D, B, H)


def test_seed_glossary_names_are_trace_fields():
    for name in whiteboard.SEED_NAMES:
        assert name in whiteboard.TRACE_FIELDS["LSTM"]
