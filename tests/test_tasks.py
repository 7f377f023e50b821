"""Generators for the long-range tasks: deterministic, cleanly split, measured at the right place."""

import random

import torch

from whiteboard import experiments as ex
from whiteboard.experiments import tasks


def test_stories_are_deterministic_under_a_seed():
    assert tasks.make_stories(50, 5, 40, seed=3) == tasks.make_stories(50, 5, 40, seed=3)
    assert tasks.make_stories(50, 5, 40, seed=3) != tasks.make_stories(50, 5, 40, seed=4)


def test_story_structure_and_distance_knob():
    rng = random.Random(0)
    for distance in (4, 13, 50, 120):
        story = tasks.make_story(rng, distance)
        assert story.tokens[1:3] == ("lives", "in")
        country = story.tokens[story.clue_index]
        assert story.answer == tasks.COUNTRY_LANGUAGE[country]
        assert story.tokens[story.answer_index - 1] == "speaks"
        assert distance <= story.distance < distance + 20  # sentences are indivisible
        # The fillers name no country and no language: only the clue can tell the answer.
        between = story.tokens[story.clue_index + 1 : story.answer_index]
        assert not set(between) & (set(tasks.COUNTRY_LANGUAGE) | set(tasks.COUNTRY_LANGUAGE.values()))


def test_train_validation_and_test_stories_use_disjoint_name_country_pairs():
    pairs = lambda split: {(s.tokens[0], s.tokens[s.clue_index]) for s in tasks.make_stories(2000, 4, 30, 0, split)}  # noqa: E731
    train, valid, test = pairs("train"), pairs("valid"), pairs("test")
    assert train and valid and test
    assert not train & test and not train & valid and not valid & test


def test_story_task_is_rich_enough():
    assert len(tasks.FEMALE_NAMES) + len(tasks.MALE_NAMES) >= 200
    assert len(tasks.COUNTRY_LANGUAGE) >= 20
    rng = random.Random(0)
    fillers = {" ".join(tasks._filler(rng, "She", "Her")) for _ in range(500)}
    assert len(fillers) > 350  # most sentences differ: a story cannot be memorised


def test_seed_prompt_is_a_story_prefix_the_vocabulary_knows():
    vocab = ex.story_vocabulary()
    assert vocab.unknown(tasks.SEED_PROMPT) == []
    assert vocab.unknown(tasks.long_seed_prompt(100)) == []
    long_prompt = tasks.long_seed_prompt(100).split()
    assert long_prompt[:4] == ["Alice", "lives", "in", "France"] and long_prompt[-2:] == ["She", "speaks"]
    assert len(long_prompt) - 3 >= 100


class OracleModel:
    """Hand-made 'perfect memory' model: where it reads 'speaks' it predicts the language of
    the last country it has read; ``shift`` moves that prediction one position late."""

    def __init__(self, vocab, shift=0):
        self.vocab, self.shift = vocab, shift
        self.language_of = {vocab.index[c]: vocab.index[l] for c, l in tasks.COUNTRY_LANGUAGE.items()}
        self.speaks = vocab.index["speaks"]

    def __call__(self, inputs):
        T, B = inputs.shape
        logits = torch.zeros(T, B, len(self.vocab))
        for b in range(B):
            remembered = None
            for t in range(T):
                remembered = self.language_of.get(int(inputs[t, b]), remembered)
                if int(inputs[t, b]) == self.speaks and t + self.shift < T:
                    logits[t + self.shift, b, remembered] = 10.0
        return logits


def test_accuracy_is_measured_at_the_word_after_speaks():
    vocab = ex.story_vocabulary()
    stories = tasks.make_stories(40, 5, 60, 0, "test")
    perfect = ex.score_stories(OracleModel(vocab), stories, vocab)
    assert perfect.accuracy == 1.0 and perfect.mean_probability > 0.9
    late = ex.score_stories(OracleModel(vocab, shift=1), stories, vocab)
    assert late.accuracy < 0.2  # one position off is a different position


def test_adding_batch_targets_are_the_marked_sum():
    x, y = tasks.adding_batch(16, 50, torch.Generator().manual_seed(0))
    assert x.shape == (50, 16, 2)
    assert torch.all(x[..., 1].sum(0) == 2)
    torch.testing.assert_close((x[..., 0] * x[..., 1]).sum(0), y)
    first = x[..., 1].argmax(0)
    assert torch.all(first < 25)


def test_copy_batch_layout():
    x, y = tasks.copy_batch(4, delay=7, generator=torch.Generator().manual_seed(0), length=5)
    assert x.shape == y.shape == (17, 4)
    assert torch.equal(y[-5:], x[:5])
    assert torch.all(x[11] == tasks.COPY_MARKER)
    assert torch.all(y[:12] == tasks.COPY_BLANK)


def test_matched_hidden_sizes_give_equal_parameter_counts():
    vocab = ex.story_vocabulary()
    build = lambda cell, h: ex.story_model(cell, len(vocab), h)  # noqa: E731
    sizes = ex.hidden_sizes(["rnn", "lstm", "gru"], 64, "params", build)
    counts = {c: sum(p.numel() for p in build(c, h).parameters()) for c, h in sizes.items()}
    assert sizes["rnn"] > sizes["gru"] > sizes["lstm"] == 64
    for c in ("rnn", "gru"):
        assert abs(counts[c] - counts["lstm"]) / counts["lstm"] < 0.01


def test_lstm_learns_a_short_lag_story():
    """Learning, not just running: a tiny curriculum at lag 4 lifts accuracy well above chance."""
    torch.manual_seed(0)
    vocab = ex.story_vocabulary()
    model = ex.story_model("lstm", len(vocab), 64)
    ex.train_story_model(model, vocab, ex.Curriculum([(4, 500)]), lr=1e-2, progress=False)
    score = ex.score_stories(ex.lm_logits(model), tasks.make_stories(100, 4, 4, 1, "test"), vocab)
    assert score.accuracy > 0.5


def test_length_curriculum_grows_to_the_full_length():
    schedule = ex.length_curriculum(200, 400)
    assert [schedule(s) for s in (0, 99, 100, 200, 300, 399, 10_000)] == [25, 25, 50, 100, 200, 200, 200]
