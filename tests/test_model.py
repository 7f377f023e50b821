import pytest
import torch

from whiteboard import config as cfg
from whiteboard.model import LanguageModel, detach_state


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
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
    config = cfg.resolve(sets=["model.embedding_size=8", "model.hidden_size=8", "model.init_range=0.05"])
    model = LanguageModel(10, config.model)
    assert all(p.abs().max() <= 0.05 for p in model.parameters())
