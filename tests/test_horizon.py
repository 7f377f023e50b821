"""The memory horizon on synthetic curves whose answer is known, and the science's guards:
a vanilla RNN learns short lags, and no hyperparameter is chosen on test stories."""

import math

import pytest
import torch

from whiteboard import experiments as ex
from whiteboard.experiments import comparison
from whiteboard.experiments import horizon
from whiteboard.experiments import tasks


def test_log_grid_is_evenly_spaced_in_log_distance():
    assert horizon.log_grid(4, 1000, 13)[:3] == [4, 6, 10]
    grid = horizon.log_grid(4, 1000, 13)
    assert grid[-1] == 1000 and grid == sorted(set(grid))
    ratios = [b / a for a, b in zip(grid[4:], grid[5:])]
    assert max(ratios) / min(ratios) < 1.1
    with pytest.raises(ValueError):
        horizon.log_grid(10, 5, 3)


def test_an_exponential_memory_has_the_horizon_where_it_halves():
    # accuracy 0.9 * 2^(-d / 200): half of the short-distance value just after d = 200
    curve = {d: 0.9 * 2 ** (-d / 200) for d in horizon.log_grid(4, 2000, 30)}
    short = horizon.short_accuracy(curve)
    expected = 200 * math.log2(0.9 / (short / 2))  # where the curve meets half the short value
    assert horizon.horizon(curve) == pytest.approx(expected, rel=0.02)


def test_the_crossing_is_interpolated_in_log_distance():
    curve = {4: 1.0, 10: 1.0, 100: 0.75, 1000: 0.25}
    # half = 0.5, reached halfway between 100 and 1000 in log distance
    assert horizon.horizon(curve) == pytest.approx(math.sqrt(100 * 1000))


def test_a_curve_that_never_halves_is_beyond_the_grid_and_one_that_starts_low_is_at_its_start():
    assert horizon.horizon({4: 1.0, 100: 0.9, 1000: 0.8}) == math.inf
    assert horizon.horizon({4: 0.1, 6: 1.0, 50: 1.0}) == 4.0  # at or below half at once
    assert horizon.horizon({20: 0.8, 40: 0.8}) == math.inf  # nothing at <= 10: the first point is "short"
    # the first crossing counts: short = mean(0.9, 0.3, 0.9) = 0.7, half 0.35, crossed before 6
    assert 4 < horizon.horizon({4: 0.9, 6: 0.3, 10: 0.9, 20: 0.1}) < 6


def test_horizons_over_seeds_are_summarised_on_the_log_scale():
    summary = horizon.summarize([100.0, 100.0, 100.0], 1000)
    assert summary.mean == pytest.approx(100) and summary.low == pytest.approx(100) and summary.beyond is None
    spread = horizon.summarize([50.0, 100.0, 200.0], 1000)
    assert spread.mean == pytest.approx(100)
    # log-scale sd = ln 2, se = ln 2 / sqrt 3, t(2) = 4.303
    assert spread.high == pytest.approx(100 * math.exp(4.303 * math.log(2) / math.sqrt(3)), rel=1e-3)
    assert spread.low * spread.high == pytest.approx(100 * 100)
    assert "95 % CI" in spread.text()
    censored = horizon.summarize([80.0, math.inf], 1000)
    assert censored.beyond == 1000 and censored.text() == "> 1000"
    assert horizon.summarize([42.0], 1000).text() == "42"


def test_the_curriculum_keeps_short_lags_in_every_stage():
    import random

    curriculum = ex.default_curriculum(1000, 100)
    rng = random.Random(0)
    draws = [curriculum.draw(rng, 1000) for _ in range(4000)]
    assert min(draws) >= 3 and max(draws) <= 1000
    assert sum(d <= 10 for d in draws) / len(draws) > 0.15  # uniform sampling would give 0.8 %
    uniform = ex.Curriculum([(1000, 1)], sampling="uniform")
    assert sum(uniform.draw(rng, 1000) <= 10 for _ in range(4000)) / 4000 < 0.02


def test_each_cell_gets_its_literature_s_initialisation():
    vocab_size = 50
    rnn = ex.story_model("rnn", vocab_size, 8).recurrent
    assert rnn.nonlinearity == "relu"
    torch.testing.assert_close(rnn.weight_hh_l0, torch.eye(8))
    assert not rnn.bias_hh_l0.any() and not rnn.bias_ih_l0.any()
    tanh = ex.story_model("rnn-tanh", vocab_size, 8).recurrent
    assert tanh.nonlinearity == "tanh"
    torch.testing.assert_close(tanh.weight_hh_l0 @ tanh.weight_hh_l0.T, torch.eye(8), atol=1e-5, rtol=0)
    lstm = ex.story_model("lstm", vocab_size, 8).recurrent
    assert torch.equal(lstm.bias_hh_l0[8:16] + lstm.bias_ih_l0[8:16], torch.ones(8))  # forget bias 1


def test_a_vanilla_rnn_learns_a_short_lag_far_above_chance():
    """A fixed seed and a small budget: the IRNN reads the country 4-6 tokens back."""
    vocab = ex.story_vocabulary()
    model = ex.story_model("rnn", len(vocab), 48)
    ex.train_story_model(model, vocab, ex.Curriculum([(6, 300)]), lr=2e-3, seed=0, progress=False)
    score = ex.score_stories(ex.lm_logits(model), tasks.make_stories(200, 5, 5, 1, "valid"), vocab)
    chance = ex.chance_level("stories")
    assert score.accuracy > 10 * chance, score


def test_the_learning_rate_sweep_never_sees_a_test_story(monkeypatch):
    """Every validation story is drawn before the first test story, and the rate each
    model keeps is the best on validation."""
    splits = []
    make = tasks.make_stories
    monkeypatch.setattr(tasks, "make_stories", lambda *a, **k: splits.append(a[4] if len(a) > 4 else k.get("split"))
                        or make(*a, **k))
    result = ex.compare("stories", ["rnn"], [4, 8], steps=6, hidden=8, progress=False, test_count=30,
                        learning_rates=[1e-3, 5e-3], log=lambda m: None)
    assert "valid" in splits and "test" in splits
    assert max(i for i, s in enumerate(splits) if s == "valid") < min(i for i, s in enumerate(splits) if s == "test")
    sweep = {float(k): v for k, v in result.sweeps["rnn"].items()}
    assert result.learning_rates["rnn"] == max(sweep, key=sweep.get)
    assert "2 learning rates" in result.budget


def test_the_adding_sweep_chooses_on_validation_batches_alone(monkeypatch):
    seeds = []
    score = ex.score_adding
    monkeypatch.setattr(comparison, "score_adding", lambda model, d, count=1000, seed=12345: seeds.append(seed)
                        or score(model, d, count, seed))
    result = ex.compare("adding", ["rnn"], [6], steps=4, hidden=4, progress=False, learning_rates=[1e-3, 3e-3],
                        log=lambda m: None)
    assert seeds == [777, 777, 12345]  # both rates on the validation batch, then the kept one on the test batch
    sweep = {float(k): v for k, v in result.sweeps["rnn@6"].items()}
    assert result.learning_rates["rnn@6"] == min(sweep, key=sweep.get)


def test_a_model_that_never_learned_has_no_horizon():
    assert math.isnan(horizon.horizon({4: 0.0, 10: 0.0, 100: 0.0}, floor=0.08))
    assert math.isnan(horizon.horizon({4: 0.05, 10: 0.06, 100: 0.05}, floor=0.08))
    assert horizon.horizon({4: 0.9, 10: 0.9, 100: 0.2}, floor=0.08) < 100
    mixed = horizon.summarize([100.0, math.nan, 200.0], 1000)
    assert mixed.not_learned == 1 and mixed.mean == pytest.approx(math.sqrt(100 * 200))
    assert mixed.text().endswith("(1 of 3 seeds did not learn the task)")
    assert horizon.summarize([math.nan, math.nan], 1000).text() == "not learned"
