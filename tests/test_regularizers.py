"""Each regularizer: identity in eval (zoneout: its expectation), the right randomness in training."""

import pytest
import torch

import whiteboard
from whiteboard.nn.regularizers import (EmbeddingDropout, LockedDropout, WeightDrop, Zoneout, activation_regularization,
                                     temporal_activation_regularization)

T, B, I, H = 6, 4, 5, 7


def test_locked_dropout_is_identity_in_eval_and_constant_over_time_in_training():
    drop = LockedDropout(0.5)
    x = torch.randn(T, B, I)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    y = drop(torch.ones(T, B, I))
    assert torch.all(y == y[0])  # the same mask at every step
    assert set(y.unique().tolist()) <= {0.0, 2.0} and (y == 0).any() and (y == 2).any()


def test_embedding_dropout_drops_whole_words():
    embedding = torch.nn.Embedding(10, 4)
    drop = EmbeddingDropout(0.5)
    tokens = torch.tensor([[1, 2, 1, 3, 1, 2]] * 3)
    drop.eval()
    assert torch.equal(drop(embedding, tokens), embedding(tokens))
    drop.train()
    torch.manual_seed(0)
    out = drop(embedding, tokens)
    for word in (1, 2, 3):
        rows = out[tokens == word]
        dropped = rows.abs().sum(-1) == 0
        assert dropped.all() or not dropped.any()  # a word is dropped everywhere or nowhere
        if not dropped.any():
            torch.testing.assert_close(rows, embedding.weight[word].expand_as(rows) * 2)


@pytest.mark.parametrize("implementation", ["auto", "fused", "reference"])
@pytest.mark.parametrize("cls", [whiteboard.LSTM, whiteboard.GRU, whiteboard.RNN])
def test_weight_drop_leaves_first_step_unchanged_and_changes_later_steps(cls, implementation):
    layer = cls(I, H, implementation=implementation)
    dropped = WeightDrop(layer, 0.5)
    x = torch.randn(T, B, I)
    plain = layer(x)[0]
    dropped.train()
    torch.manual_seed(1)
    out = dropped(x)[0]
    torch.testing.assert_close(out[0], plain[0])  # h_0 = 0: W_hh has not acted yet
    assert not torch.allclose(out[1:], plain[1:])
    dropped.eval()
    torch.testing.assert_close(dropped(x)[0], plain)
    assert layer._weight_overrides is None


def test_weight_drop_gradients_reach_the_raw_weights():
    layer = whiteboard.LSTM(I, H)
    dropped = WeightDrop(layer, 0.3).train()
    dropped(torch.randn(T, B, I))[0].sum().backward()
    assert layer.weight_hh_l0.grad is not None and layer.weight_hh_l0.grad.abs().sum() > 0
    assert (layer.weight_hh_l0.grad == 0).any()  # dropped connections get no gradient


@pytest.mark.parametrize("cls", [whiteboard.LSTM, whiteboard.GRU, whiteboard.RNN])
def test_zoneout_zero_is_identity_and_one_copies_the_previous_state(cls):
    layer = cls(I, H)
    x = torch.randn(T, B, I)
    plain_out, plain_state = layer(x)
    for training in (True, False):
        zero = Zoneout(layer, 0.0).train(training)
        torch.testing.assert_close(zero(x)[0], plain_out)
        one = Zoneout(layer, 1.0).train(training)
        h0 = torch.randn(1, B, H)
        hx = (h0, torch.randn(1, B, H)) if cls is whiteboard.LSTM else h0
        out, _ = one(x, hx)
        torch.testing.assert_close(out, h0.expand(T, B, H))  # the board is never overwritten


def test_zoneout_eval_uses_the_expectation():
    layer = whiteboard.GRU(I, H).double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    out, _ = Zoneout(layer, 0.25).eval()(x)
    h = torch.zeros(B, H, dtype=torch.float64)
    for t in range(T):
        step = whiteboard.gru_step(x[t], h, *layer.layer_weights(0, 0))
        h = 0.25 * h + 0.75 * step.hidden
        torch.testing.assert_close(out[t], h)


def test_zoneout_identity_eval_mode_is_the_plain_layer():
    layer = whiteboard.LSTM(I, H).double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    zoned = Zoneout(layer, 0.5, eval_mode="identity")
    torch.testing.assert_close(zoned.eval()(x)[0], layer(x)[0])
    assert not torch.allclose(zoned.train()(x)[0], layer(x)[0])  # still zoneout in training
    with pytest.raises(ValueError, match="eval_mode"):
        Zoneout(layer, 0.5, eval_mode="sometimes")


def test_zoneout_training_keeps_some_units():
    layer = whiteboard.LSTM(I, H)
    torch.manual_seed(0)
    out, _ = Zoneout(layer, 0.5).train()(torch.randn(T, B, I))
    same = (out[1:] == out[:-1]).float().mean()
    assert 0.2 < same < 0.8


def test_activation_regularizers():
    out = torch.tensor([[[1.0, 2.0]], [[3.0, 2.0]]])  # (T=2, B=1, H=2)
    assert activation_regularization(out, 2.0) == pytest.approx(2.0 * (1 + 4 + 9 + 4) / 4)
    assert temporal_activation_regularization(out, 1.0) == pytest.approx((4 + 0) / 2)
    assert temporal_activation_regularization(out[:1], 1.0) == 0


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no-grad"])
def test_a_weight_replaced_by_a_plain_tensor_is_used_awd_style(grad):
    """The original AWD-LSTM WeightDrop deletes the Parameter and sets a plain (dropped)
    tensor under the same name before each call: the layer must read that tensor."""
    layer = whiteboard.LSTM(4, 6, num_layers=2)
    reference = whiteboard.LSTM(4, 6, num_layers=2, implementation="reference")
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 1, 4)  # a few steps: W_hh acts from the second on
    with torch.no_grad():
        reference.weight_hh_l1.mul_(0.5)
        expected, _ = reference(x)
        unchanged, _ = layer(x)
    raw = layer.weight_hh_l1
    del layer._parameters["weight_hh_l1"]
    layer.weight_hh_l1 = raw.detach() * 0.5  # a plain tensor attribute now
    with torch.set_grad_enabled(grad):
        output, _ = layer(x)
    torch.testing.assert_close(output, expected)
    assert not torch.allclose(output, unchanged)
