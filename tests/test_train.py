import json
import math
import os

import pytest
import torch

from whiteboard.lm import checkpoint, optim
from whiteboard.lm import train as train_mod
from whiteboard.lm.checkpoint import atomic_write_bytes, load_run
from whiteboard.errors import WhiteboardError
from whiteboard.lm.records import read_metrics
from whiteboard.lm.train import train
from lm_helpers import tiny_config, write_corpus


def quiet(_):
    pass


def losses(run_dir):
    """Metrics without wall-clock fields, which no two runs share."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run_dir)]


def test_small_model_overfits_a_repetitive_corpus(tmp_path):
    corpus = tmp_path / "abc.txt"
    corpus.write_text("a b c d e f g h\n" * 200)
    config = tiny_config(corpus, epochs=4, optimizer="adam", lr=0.01, bptt=16)
    result = train(config, tmp_path / "run", progress=False, log=quiet)
    assert result.best_valid_loss < 0.1  # the sequence is deterministic: perplexity ~1


def test_run_directory_holds_safetensors_and_json(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    train(tiny_config(corpus), tmp_path / "run", progress=False, log=quiet)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert names == {"config.json", "vocab.json", "model.safetensors", "training_state.safetensors", "metrics.jsonl"}
    for name in ("model.safetensors", "training_state.safetensors"):
        assert b"pickle" not in (tmp_path / "run" / name).read_bytes()[:200]
    splits = [r["split"] for r in read_metrics(tmp_path / "run")]
    assert splits.count("valid") == 2 and splits[-1] == "test"


def test_same_seed_gives_the_same_run(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    config = tiny_config(corpus, epochs=1)
    config.model.dropout = 0.3
    train(config, tmp_path / "a", progress=False, log=quiet)
    train(config, tmp_path / "b", progress=False, log=quiet)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


@pytest.mark.parametrize("variable_bptt", [False, True])
def test_resume_gives_identical_losses(tmp_path, variable_bptt):
    corpus = write_corpus(tmp_path / "c.txt")
    config = tiny_config(corpus, epochs=2, variable_bptt=variable_bptt)
    config.model.dropout = 0.2  # dropout draws from the RNG, which must be restored too
    train(config, tmp_path / "whole", progress=False, log=quiet)
    stopped = tiny_config(corpus, epochs=2, variable_bptt=variable_bptt, max_steps=13)  # mid-epoch
    stopped.model.dropout = 0.2
    first = train(stopped, tmp_path / "split", progress=False, log=quiet)
    assert first.steps == 13 and first.test_loss is None
    train(config, tmp_path / "split", resume=True, progress=False, log=quiet)
    whole = losses(tmp_path / "whole")
    assert len([r for r in whole if r["split"] == "train"]) >= 4
    assert losses(tmp_path / "split") == whole


def test_an_existing_run_is_never_overwritten(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    train(tiny_config(corpus, epochs=1), tmp_path / "run", progress=False, log=quiet)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    other = tiny_config(corpus, epochs=1)
    other.model.hidden_size = 24
    with pytest.raises(WhiteboardError, match="not empty: it holds a run with another config.*--overwrite"):
        train(other, tmp_path / "run", progress=False, log=quiet)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "c.txt")
    run = tmp_path / "run"
    train(tiny_config(corpus, epochs=1), run, progress=False, log=quiet)
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    class Killed(BaseException):
        pass

    real_fsync = os.fsync

    def die_midway(fd):  # the data is half on disk, the rename has not happened
        raise Killed

    monkeypatch.setattr(os, "fsync", die_midway)
    model, _, _ = load_run(run)
    with pytest.raises(Killed):
        checkpoint.save_model(run, model, step=999)
    with pytest.raises(Killed):
        atomic_write_bytes(run / "config.json", b"{half")
    monkeypatch.setattr(os, "fsync", real_fsync)
    after = {p.name: p.read_bytes() for p in run.iterdir()}
    assert after == before  # same files, same bytes, no temporaries left behind
    load_run(run)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "c.txt")
    run = tmp_path / "run"
    train(tiny_config(corpus, epochs=1), run, progress=False, log=quiet)
    saved = (run / "training_state.safetensors").read_bytes()

    class PoisonedLoss(torch.nn.CrossEntropyLoss):
        calls = 0

        def forward(self, logits, targets):
            PoisonedLoss.calls += 1
            loss = super().forward(logits, targets)
            return loss * float("nan") if PoisonedLoss.calls >= 3 else loss

    monkeypatch.setattr(train_mod.nn, "CrossEntropyLoss", PoisonedLoss)
    with pytest.raises(train_mod.TrainingDiverged, match=r"training loss became nan at step \d+ \(epoch 2\).*last good checkpoint"):
        train(tiny_config(corpus, epochs=3), run, resume=True, progress=False, log=quiet)
    assert (run / "training_state.safetensors").read_bytes() == saved


def test_lr_schedule_halves_after_decay_start(tmp_path):
    config = tiny_config(write_corpus(tmp_path / "c.txt"), lr=1.0, lr_decay=0.5, decay_start=2)
    assert [optim.scheduled_lr(config, e, 1.0) for e in (1, 2, 3, 4)] == [1.0, 1.0, 0.5, 0.25]


def test_char_level_reports_bits_per_char(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    config = tiny_config(corpus, epochs=1)
    config.data.level = "char"
    result = train(config, tmp_path / "run", progress=False, log=quiet)
    valid = [r for r in read_metrics(tmp_path / "run") if r["split"] == "valid"]
    assert valid[0]["bpc"] == pytest.approx(valid[0]["loss"] / math.log(2))
    assert "bits/char" in result.summary()
    assert json.loads((tmp_path / "run" / "vocab.json").read_text())["level"] == "char"


def test_loss_per_sequence_equals_token_loss_with_lr_times_bptt(tmp_path):
    """Zaremba's convention (loss summed over the window) is a rescaled learning rate."""
    corpus = write_corpus(tmp_path / "c.txt")
    train(tiny_config(corpus, epochs=1, clip=0, lr=0.25, loss_per="sequence"), tmp_path / "seq", progress=False, log=quiet)
    train(tiny_config(corpus, epochs=1, clip=0, lr=0.25 * 8), tmp_path / "tok", progress=False, log=quiet)
    # Only the epoch's last window is shorter than bptt (its summed loss weighs less), so
    # compare the training log lines before it.
    seq = [r for r in losses(tmp_path / "seq") if r["split"] == "train"][:-1]
    tok = [r for r in losses(tmp_path / "tok") if r["split"] == "train"][:-1]
    assert len(seq) >= 5
    for a, b in zip(seq, tok):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_ntasgd_trigger_is_merity_et_als_non_monotone_criterion():
    from whiteboard.lm.optim import ntasgd_should_switch

    assert not ntasgd_should_switch([5.0, 4.0, 3.0], 3.5, nonmono=3)  # too few evaluations yet
    assert not ntasgd_should_switch([5.0, 4.0, 3.0, 2.9, 2.8], 2.95, nonmono=3)  # better than 5.0, 4.0
    assert ntasgd_should_switch([5.0, 4.0, 3.0, 2.9, 2.8], 4.5, nonmono=3)  # worse than min(5.0, 4.0)


def test_ntasgd_switches_to_averaged_sgd_when_validation_stalls_and_resumes(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    # A large learning rate makes validation stall quickly.
    config = tiny_config(corpus, epochs=2, optimizer="ntasgd", lr=30.0, nonmono=1, eval_every=8)
    train(config, tmp_path / "run", progress=False, log=quiet)
    valid = [r for r in losses(tmp_path / "run") if r["split"] == "valid"]
    kinds = [r["optimizer"] for r in valid]
    assert kinds[0] == "sgd" and "asgd" in kinds
    switched_at = kinds.index("asgd")
    assert valid[switched_at]["loss"] > min(r["loss"] for r in valid[: switched_at - 1])
    # The averaged-SGD state survives a resume.
    stopped = tiny_config(corpus, epochs=2, optimizer="ntasgd", lr=30.0, nonmono=1, eval_every=8,
                          max_steps=8 * (switched_at + 2))
    train(stopped, tmp_path / "split", progress=False, log=quiet)
    train(config, tmp_path / "split", resume=True, progress=False, log=quiet)
    assert losses(tmp_path / "split") == losses(tmp_path / "run")


def test_awd_regularizers_train_and_resume_exactly(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    sets = dict(epochs=2, ar_alpha=2.0, tar_beta=1.0)

    def make(**extra):
        config = tiny_config(corpus, **sets, **extra)
        config.model.dropout = 0.3
        config.model.variational = True
        config.model.embedding_dropout = 0.1
        config.model.weight_drop = 0.3
        return config

    train(make(), tmp_path / "whole", progress=False, log=quiet)
    train(make(max_steps=11), tmp_path / "split", progress=False, log=quiet)
    train(make(), tmp_path / "split", resume=True, progress=False, log=quiet)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    from whiteboard.lm.checkpoint import load_run

    model, _, _ = load_run(tmp_path / "whole")
    assert type(model.recurrent).__name__ == "WeightDrop"


def test_anneal_factor_is_constant_then_linear_to_zero():
    factor = optim.anneal_factor
    assert [factor(0.25, p) for p in (0.0, 0.5, 0.75, 0.875, 1.0, 1.2)] == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert factor(0.0, 0.99) == 1.0


def test_anneal_lowers_the_lr_over_the_last_part_of_the_run(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    config = tiny_config(corpus, epochs=5, lr=2.0, anneal=0.5, max_steps=40, log_every=1)
    train(config, tmp_path / "run", progress=False, log=quiet)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert len(lrs) == 40
    assert lrs[:20] == [2.0] * 20  # steps 1..20 start at progress < 0.5
    assert all(a > b for a, b in zip(lrs[20:], lrs[21:]))  # then falling every step
    assert lrs[-1] == pytest.approx(2.0 * (1 - 39 / 40) / 0.5)


def test_time_limit_ends_the_run_with_a_last_evaluation_and_the_test(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    config = tiny_config(corpus, epochs=50, time_limit=0.01)  # 0.6 s of a 50-epoch run
    messages = []
    result = train(config, tmp_path / "run", progress=False, log=messages.append)
    records = read_metrics(tmp_path / "run")
    assert any("time limit of 0.01 minutes reached" in m for m in messages)
    assert result.epochs_done < 50 and not result.interrupted
    assert records[-1]["split"] == "test" and records[-2]["split"] == "valid"
    assert records[-2]["step"] == result.steps  # the last evaluation saw the last step
    assert result.test_loss is not None


def test_bfloat16_decoder_only_in_training(tmp_path):
    from whiteboard.lm import config as cfg
    from whiteboard.lm.model import LanguageModel

    config = cfg.resolve(sets=["model.embedding_size=16", "model.hidden_size=16", "model.decoder_precision=bfloat16"])
    model = LanguageModel(50, config.model)
    hidden = torch.randn(4, 3, 16)
    logits = model.decode(hidden)
    exact = model.decoder(hidden)
    assert logits.dtype == torch.float32
    assert not torch.equal(logits, exact) and torch.allclose(logits, exact, atol=0.05)  # rounded to bfloat16
    model.eval()
    assert torch.equal(model.decode(hidden), exact)
    corpus = write_corpus(tmp_path / "c.txt")
    run_config = tiny_config(corpus, epochs=2)
    run_config.model.decoder_precision = "bfloat16"
    result = train(run_config, tmp_path / "run", progress=False, log=quiet)
    assert result.best_valid_loss < math.log(len(WORDS_IN_CORPUS)) + 0.1  # it learned something


WORDS_IN_CORPUS = set("the cat sat on a mat dog ran to park big small red blue house tree".split())


@pytest.mark.parametrize("flags,expected", [({"avx512f", "avx512_bf16"}, "bfloat16"), ({"amx_bf16"}, "bfloat16"),
                                            ({"avx512f", "avx2"}, "float32")], ids=["avx512-bf16", "amx", "neither"])
def test_auto_decoder_precision_follows_the_cpu_says_so_and_is_saved(tmp_path, monkeypatch, flags, expected):
    from whiteboard.lm import hardware

    monkeypatch.setattr(hardware, "cpu_flags", lambda: set(flags))
    corpus = write_corpus(tmp_path / "c.txt")
    config = tiny_config(corpus, max_steps=2)
    config.model.decoder_precision = "auto"
    lines = []
    train(config, tmp_path / "run", progress=False, log=lines.append)
    said = [line for line in lines if "decoder_precision=auto" in line]
    assert len(said) == 1 and said[0].startswith(f"model.decoder_precision=auto: {expected}")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["decoder_precision"] == expected  # a resume keeps what this machine chose
    # the same command again finds the same run (its config resolved the same way) and continues it
    again = tiny_config(corpus, max_steps=2)
    again.model.decoder_precision = "auto"
    train(again, tmp_path / "run", progress=False, log=lines.append)
    assert any("holds this run" in line for line in lines)


def test_every_preset_chooses_its_decoder_precision_by_machine():
    from whiteboard.lm import config as cfg

    for name in cfg.preset_names():
        assert cfg.resolve(preset=name).model.decoder_precision == "auto", name


def test_awd_ptb_preset_runs_a_few_steps(tmp_path):
    """The full AWD-LSTM configuration (a GPU recipe), two steps on the CPU on a tiny corpus."""
    from whiteboard.lm import config as cfg

    corpus = write_corpus(tmp_path / "c.txt", lines=400)
    config = cfg.resolve("awd-ptb", sets=[f"data.corpus={corpus}", "train.device=cpu", "train.max_steps=2",
                                          "train.eval_batch_size=2"])
    result = train(config, tmp_path / "run", progress=False, log=quiet)
    assert result.steps == 2
    model, _, _ = load_run(tmp_path / "run")
    sizes = [layer.layer.hidden_size for layer in model.recurrent.layers]
    assert sizes == [1150, 1150, 400] and model.decoder.weight is model.embedding.weight
    assert model.recurrent.dropout.p == 0.25 and model.input_dropout.p == 0.4 and model.dropout.p == 0.4
    # AWD's "24 M parameters" at PTB's 10 k words: these 20.2 M in the LSTMs + the 4 M embedding.
    assert sum(p.numel() for p in model.recurrent.parameters()) == 20_211_600


def test_a_time_budgeted_run_forecasts_its_tokens_once_and_warns_when_far_below_its_tuning(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    for tuned, warned in ((10 ** 12, True), (1, False)):
        config = tiny_config(corpus, time_limit=0.05, tuned_tokens=tuned, max_steps=25)
        lines = []
        train(config, tmp_path / f"run-{tuned}", progress=False, log=lines.append)
        forecasts = [line for line in lines if line.startswith("forecast:")]
        assert len(forecasts) == 1 and "M training tokens in the 0.05-minute budget" in forecasts[0]
        assert f"tuned with {tuned / 1e6:.1f} M" in forecasts[0]
        assert any(line.startswith("warning: this machine will train on") for line in lines) == warned


def test_the_forecast_is_the_tokens_so_far_plus_the_speed_times_the_time_left():
    from whiteboard.lm.records import forecast_lines

    lines = forecast_lines(1_000_000, 2_000.0, 1_500.0, 30, 10_000_000)
    assert lines[0].startswith("forecast: 4.0 M training tokens in the 30-minute budget (2,000 tokens/s)")
    assert "40% of the tokens" in lines[1]
    assert forecast_lines(1_000_000, 2_000.0, 1_500.0, 30, 5_000_000) == [
        "forecast: 4.0 M training tokens in the 30-minute budget (2,000 tokens/s); the recipe was tuned with 5.0 M"]


@pytest.mark.parametrize("seconds_per_step", [0.02, 0.04])
def test_a_slower_machine_cools_down_on_fewer_steps_but_always_cools_down(tmp_path, monkeypatch, seconds_per_step):
    """The rule for budgeted recipes (README, "Configuration"): the lr schedule follows the
    clock, so the cooldown takes the budget's last `anneal` share whatever the speed. A fake
    clock advances a fixed time per step: twice as slow, half the steps, the same schedule."""
    from whiteboard.lm import train as train_module

    clock = {"now": 1000.0}
    monkeypatch.setattr(train_module.time, "monotonic", lambda: clock["now"])
    real_step = train_module._Trainer.train_step

    def timed_step(self, window, lr):
        loss = real_step(self, window, lr)
        clock["now"] += seconds_per_step
        return loss

    monkeypatch.setattr(train_module._Trainer, "train_step", timed_step)
    corpus = write_corpus(tmp_path / "c.txt")
    config = tiny_config(corpus, epochs=1000, lr=2.0, anneal=0.5, time_limit=0.01, log_every=1)  # 0.6 s budget
    train(config, tmp_path / "run", progress=False, log=quiet)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    # the same clock arithmetic as the trainer's: a step starts while the budget is not used up
    starts, now = [], 1000.0
    while 0.0 + now - 1000.0 < 0.01 * 60:
        starts.append((0.0 + now - 1000.0) / (0.01 * 60))
        now += seconds_per_step
    steps = len(starts)
    assert abs(steps - 0.6 / seconds_per_step) <= 1  # twice as slow, half the steps
    assert lrs == pytest.approx([2.0 * min(1.0, (1 - p) / 0.5) for p in starts])
    assert lrs[: steps // 2] == [2.0] * (steps // 2)  # constant for the first half of the time
    assert all(a > b for a, b in zip(lrs[steps // 2 :], lrs[steps // 2 + 1 :]))  # then falling every step
    assert lrs[-1] < 2.0 * 3 * seconds_per_step / 0.6  # the last step: almost cooled down
