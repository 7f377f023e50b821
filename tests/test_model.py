import pytest
import torch

from whiteboard.lm import config as cfg
from whiteboard.lm.model import LanguageModel, RecurrentStack, detach_state
from whiteboard.nn.regularizers import LockedDropout, WeightDrop


@pytest.mark.parametrize("cell", ["lstm", "layernorm-lstm", "gru", "rnn"])
def test_forward_shapes_and_step_equals_full_forward(cell):
    config = cfg.resolve(sets=[f"model.cell={cell}", "model.embedding_size=8", "model.hidden_size=8", "model.tie_weights=true"])
    model = LanguageModel(20, config.model).eval()
    tokens = torch.randint(0, 20, (7, 3))
    logits, state = model(tokens)
    assert logits.shape == (7, 3, 20)
    stepped_state = None
    for t in range(7):
        step_logits, stepped_state = model.step(tokens[t], stepped_state)
        torch.testing.assert_close(step_logits, logits[t])
    assert model.decoder.weight is model.embedding.weight


def test_detached_state_lets_the_next_window_backpropagate_alone():
    config = cfg.resolve(sets=["model.embedding_size=8", "model.hidden_size=8"])
    model = LanguageModel(10, config.model)
    state = None
    for _ in range(2):
        state = detach_state(state) if state is not None else None
        logits, state = model(torch.randint(0, 10, (5, 2)), state)
        logits.sum().backward()  # would fail on the second window without the detach
    assert all(s.grad_fn is not None for s in state)
    assert all(s.grad_fn is None and not s.requires_grad for s in detach_state(state))


def test_init_range_sets_uniform_weights():
    config = cfg.resolve(sets=["model.embedding_size=32", "model.hidden_size=32", "model.init_range=0.05"])
    model = LanguageModel(100, config.model)
    values = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert values.abs().max() <= 0.05
    # U(-0.05, 0.05): mean 0, standard deviation 0.05 / sqrt(3), the whole range used
    assert abs(float(values.mean())) < 0.002
    assert float(values.std()) == pytest.approx(0.05 / 3 ** 0.5, rel=0.03)
    assert values.abs().max() > 0.049


@pytest.mark.parametrize("cell", ["lstm", "layernorm-lstm", "gru"])
def test_tied_model_with_a_wider_middle_is_stacked_awd_style(cell):
    """AWD-LSTM's shape: E=6 embedding, 10-unit middle layers, a last layer of E units."""
    config = cfg.resolve(sets=[f"model.cell={cell}", "model.embedding_size=6", "model.hidden_size=10",
                               "model.num_layers=3", "model.tie_weights=true", "model.weight_drop=0.5",
                               "model.variational=true", "model.dropout=0.3", "model.hidden_dropout=0.2"])
    model = LanguageModel(20, config.model)
    assert isinstance(model.recurrent, RecurrentStack)
    assert [layer.layer.hidden_size for layer in model.recurrent.layers] == [10, 10, 6]
    assert all(isinstance(layer, WeightDrop) for layer in model.recurrent.layers)
    assert isinstance(model.recurrent.dropout, LockedDropout) and model.recurrent.dropout.p == 0.2
    assert model.decoder.weight is model.embedding.weight
    tokens = torch.randint(0, 20, (7, 3))
    logits, state = model(tokens)  # training mode: every dropout active
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    states = state if isinstance(state, tuple) else (state,)
    assert all(s.shape == (3, 3, 10) for s in states)
    assert all(s[2, :, 6:].abs().max() == 0 for s in states)  # the 6-unit layer's padding

    model.eval()
    logits, _ = model(tokens)
    stepped = None
    for t in range(7):
        step_logits, stepped = model.step(tokens[t], stepped)
        torch.testing.assert_close(step_logits, logits[t])
    traced_logits, _, trace = model.trace(tokens)
    torch.testing.assert_close(traced_logits, logits, rtol=1e-4, atol=1e-5)
    assert len(trace.steps) == 3 and trace.get("hidden", layer=2).shape == (7, 3, 6)


def test_variational_multi_layer_uses_locked_dropout_between_layers():
    config = cfg.resolve(sets=["model.embedding_size=8", "model.hidden_size=8", "model.num_layers=2",
                               "model.variational=true", "model.dropout=0.5"])
    model = LanguageModel(10, config.model)
    assert isinstance(model.recurrent, RecurrentStack)
    seen = []
    model.recurrent.layers[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    model(torch.randint(0, 10, (6, 2)))
    dropped = seen[0] == 0  # (T, B, H): which units the between-layer dropout zeroed
    assert dropped.any() and torch.equal(dropped, dropped[:1].expand_as(dropped))  # same mask at every step


def test_separate_input_dropout():
    config = cfg.resolve(sets=["model.embedding_size=8", "model.hidden_size=8", "model.dropout=0.1",
                               "model.input_dropout=0.6"])
    model = LanguageModel(10, config.model)
    assert model.input_dropout.p == 0.6 and model.dropout.p == 0.1


def test_init_range_keeps_layer_norm_gains_at_one():
    config = cfg.resolve(sets=["model.cell=layernorm-lstm", "model.embedding_size=8", "model.hidden_size=8",
                               "model.init_range=0.05"])
    model = LanguageModel(10, config.model)
    gains = [p for n, p in model.named_parameters() if ".gain_" in n]
    assert gains and all(torch.all(g == 1) for g in gains)
