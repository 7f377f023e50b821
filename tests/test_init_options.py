"""The initialisations users ask for: forget_bias= on the LSTMs, recurrent_init="orthogonal"
on every layer, and both from the language model's config."""

import pytest
import torch

import whiteboard
from whiteboard.errors import UsageError
from whiteboard.lm import config as cfg
from whiteboard.lm.model import LanguageModel

H = 6


def _bias_blocks(layer, name):
    return getattr(layer, name).detach().split(H)  # i|f|g|o


@pytest.mark.parametrize("layer_class", [whiteboard.LSTM, whiteboard.LayerNormLSTM])
def test_forget_bias_sets_the_summed_forget_gate_bias_and_leaves_the_rest(layer_class):
    torch.manual_seed(0)
    layer = layer_class(4, H, num_layers=2, bidirectional=True, forget_bias=1.5)
    for names in layer._all_weights:
        suffix = names[0].removeprefix("weight_ih")
        ih, hh = _bias_blocks(layer, "bias_ih" + suffix), _bias_blocks(layer, "bias_hh" + suffix)
        assert torch.equal(ih[1] + hh[1], torch.full((H,), 1.5))
        assert torch.equal(hh[1], torch.zeros(H))
        for block in (ih[0], ih[2], ih[3], hh[0], hh[2], hh[3]):  # torch.nn's uniform draw, untouched
            assert block.abs().max() <= 1 / H ** 0.5 and block.std() > 0
    assert "forget_bias=1.5" in repr(layer)
    assert layer_class(4, H).forget_bias is None and "forget_bias" not in repr(layer_class(4, H))


def test_forget_bias_changes_what_the_layer_computes_as_its_bias_says():
    torch.manual_seed(0)
    plain = whiteboard.LSTM(3, H)
    opened = whiteboard.LSTM(3, H, forget_bias=20.0)
    opened.load_state_dict(plain.state_dict())
    opened.apply_init_options()
    x, c0 = torch.zeros(1, 2, 3), torch.randn(1, 2, H)
    with torch.no_grad():
        plain.weight_hh_l0.zero_(), opened.weight_hh_l0.zero_()
        _, (_, c_plain) = plain(x, (torch.zeros(1, 2, H), c0))
        _, (_, c_open) = opened(x, (torch.zeros(1, 2, H), c0))
    # A forget gate of sigmoid(20) keeps the whole board: c_1 = c_0 + i*g.
    i, g = torch.sigmoid(opened.bias_ih_l0[:H] + opened.bias_hh_l0[:H]), torch.tanh(
        opened.bias_ih_l0[2 * H:3 * H] + opened.bias_hh_l0[2 * H:3 * H])
    torch.testing.assert_close(c_open[0], c0[0] + (i * g).detach())
    assert not torch.allclose(c_plain, c_open)


def test_forget_bias_is_refused_where_there_is_no_forget_gate_or_no_number():
    with pytest.raises(TypeError):
        whiteboard.GRU(3, H, forget_bias=1.0)
    with pytest.raises(ValueError, match="forget_bias must be a finite number"):
        whiteboard.LSTM(3, H, forget_bias=float("nan"))


@pytest.mark.parametrize("layer_class,gates", [(whiteboard.RNN, 1), (whiteboard.LSTM, 4), (whiteboard.GRU, 3)])
def test_orthogonal_recurrent_init_makes_every_gate_block_orthogonal(layer_class, gates):
    layer = layer_class(4, H, num_layers=2, recurrent_init="orthogonal")
    for name, parameter in layer.named_parameters():
        if name.startswith("weight_hh"):
            blocks = parameter.detach().split(H)
            assert len(blocks) == gates
            for block in blocks:
                torch.testing.assert_close(block @ block.T, torch.eye(H), atol=1e-5, rtol=0)
        elif name.startswith("weight_ih"):  # untouched: torch.nn's uniform draw
            assert parameter.abs().max() <= 1 / H ** 0.5
    assert "recurrent_init='orthogonal'" in repr(layer)
    with pytest.raises(ValueError, match="recurrent_init must be one of"):
        layer_class(4, H, recurrent_init="identity")


def test_the_state_dict_is_still_torch_nns():
    ours = whiteboard.LSTM(4, H, forget_bias=1.0, recurrent_init="orthogonal")
    theirs = torch.nn.LSTM(4, H)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 4)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])


def test_the_language_model_config_sets_both_after_init_range():
    config = cfg.resolve(sets=["model.cell=lstm", "model.hidden_size=6", "model.embedding_size=6",
                               "model.forget_bias=1", "model.recurrent_init=orthogonal", "model.init_range=0.1"])
    model = LanguageModel(20, config.model)
    layer = model.layer
    assert torch.equal(layer.bias_ih_l0[H:2 * H] + layer.bias_hh_l0[H:2 * H], torch.ones(H))
    block = layer.weight_hh_l0[:H].detach()
    torch.testing.assert_close(block @ block.T, torch.eye(H), atol=1e-5, rtol=0)
    assert layer.weight_ih_l0.abs().max() <= 0.1  # init_range still applies to the rest
    default = LanguageModel(20, cfg.resolve(sets=["model.hidden_size=6", "model.embedding_size=6"]).model)
    assert default.layer.forget_bias is None and default.layer.recurrent_init == "uniform"


@pytest.mark.parametrize("setting", ["model.forget_bias=nan", "model.recurrent_init=identity"])
def test_the_config_refuses_what_no_layer_takes(setting):
    with pytest.raises(UsageError):
        cfg.validate(cfg.resolve(sets=[setting]))
