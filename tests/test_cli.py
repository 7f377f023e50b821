import json
import signal

import pytest

from whiteboard.cli import main
from lm_helpers import TINY, start_training, write_corpus



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(tmp / "c.txt")
    run = tmp / "run"
    assert main(["train", str(corpus), "--run-dir", str(run), "--set", "train.epochs=2", "--set", "train.optimizer=adam",
                 "--set", "train.lr=0.01", *TINY]) == 0
    return run


def test_help_lists_every_command_with_an_example(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "predict", "generate"):
        assert f"whiteboard {command} " in out


def test_usage_error_is_one_line_and_exit_2(capsys):
    assert main(["predict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]
    assert main(["train", "x.txt"]) == 2
    assert "needs --run-dir" in capsys.readouterr().err


def test_predict_lists_top_k_with_probabilities_and_names_unknown_words(trained, capsys):
    assert main(["predict", str(trained), "the cat zebra", "--top-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["unknown"] == ["zebra"]
    probs = [p["probability"] for p in result["predictions"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    assert main(["predict", str(trained), "the cat zebra"]) == 0
    captured = capsys.readouterr()
    assert "zebra" in captured.err and len(captured.out.strip().splitlines()) == 5


def test_predict_probabilities_equal_the_models_softmax(trained, capsys):
    import torch

    from whiteboard.lm.checkpoint import load_run

    assert main(["predict", str(trained), "the cat", "--top-k", "1", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["predictions"][0]
    model, vocab, _ = load_run(trained)
    logits, _ = model(torch.tensor(vocab.encode_text("the cat")).unsqueeze(1))
    probs = logits[-1, 0].detach().softmax(-1)
    assert top["token"] == vocab.tokens[int(probs.argmax())]
    assert top["probability"] == pytest.approx(float(probs.max()), rel=1e-5)


def test_generate_is_seeded_and_greedy_at_temperature_zero(trained, capsys):
    args = ["generate", str(trained), "--prompt", "the cat", "--length", "12"]
    assert main(args + ["--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(args + ["--seed", "3"]) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("the cat")
    assert main(args + ["--temperature", "0", "--seed", "1"]) == 0
    greedy_1 = capsys.readouterr().out
    assert main(args + ["--temperature", "0", "--seed", "2"]) == 0
    assert capsys.readouterr().out == greedy_1


def test_evaluate_reports_perplexity(trained, capsys):
    assert main(["evaluate", str(trained), "--split", "valid", "--json", "--batch-size", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(__import__("math").exp(result["loss"]))


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda tmp: ["train", str(tmp / "missing.txt"), "--run-dir", str(tmp / "r")], "corpus not found"),
        (lambda tmp: ["train", "ptb", "--data-dir", str(tmp), "--run-dir", str(tmp / "r")], "ptb.train.txt not found"),
        (lambda tmp: ["evaluate", str(tmp / "no-run")], "run directory not found"),
        (lambda tmp: ["predict", str(tmp), "hello"], "config.json not found"),
    ],
)
def test_bad_inputs_give_one_message_and_exit_1(tmp_path, capsys, make_args, message):
    assert main(make_args(tmp_path)) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("whiteboard: error:")
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_non_utf8_and_too_short_corpora(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    assert main(["train", str(bad), "--run-dir", str(tmp_path / "r1")]) == 1
    assert "line 2" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("one two\n" * 40)
    assert main(["train", str(short), "--run-dir", str(tmp_path / "r2"), "--quiet"]) == 1
    assert "too short for batch size" in capsys.readouterr().err


def test_resume_through_the_cli_continues_a_stopped_run(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.txt")
    run = tmp_path / "run"
    assert main(["train", str(corpus), "--run-dir", str(run), "--set", "train.epochs=2", "--set", "train.max_steps=5", *TINY]) == 0
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=0", "--quiet"]) == 0
    assert "test loss" in capsys.readouterr().out


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    proc, run, _ = start_training(tmp_path)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err
    assert main(["evaluate", str(run), "--split", "valid", "--batch-size", "2"]) == 0


def test_a_typed_text_is_split_at_its_punctuation_and_prompts_the_same_way(tmp_path, capsys):
    import random

    rng = random.Random(0)
    names, countries = ["Alice", "Bob", "Carla", "Dan"], ["France", "Spain", "Peru"]
    lines = [f"{rng.choice(names)} lives in {rng.choice(countries)}. She likes to cook, and paints." for _ in range(300)]
    corpus = tmp_path / "typed.txt"
    corpus.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    assert main(["train", str(corpus), "--run-dir", str(run), "--set", "train.epochs=1", *TINY]) == 0
    vocab = json.loads((run / "vocab.json").read_text())
    assert vocab["tokenizer"] == "punctuation"
    assert {"France", ".", ","} <= set(vocab["tokens"]) and "France." not in vocab["tokens"]
    capsys.readouterr()
    assert main(["predict", str(run), "Alice lives in France. She likes to cook,", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unknown"] == []


@pytest.mark.parametrize("command", [["evaluate", "{run}"], ["predict", "{run}", "the cat"],
                                     ["generate", "{run}", "--prompt", "the", "--length", "3"],
                                     ["inspect", "{run}", "the cat sat", "--out", "{tmp}/r.html"],
                                     ["reach", "{run}", "--text", "the cat sat on", "--out", "{tmp}/reach.png"]],
                         ids=["evaluate", "predict", "generate", "inspect", "reach"])
def test_every_command_takes_a_device_and_refuses_one_this_machine_lacks(trained, tmp_path, capsys, command):
    import torch

    args = [a.format(run=trained, tmp=tmp_path) for a in command]
    assert main([*args, "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main([*args, "--device", "tpu:7"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device must be a torch device" in err[0]
    if not torch.cuda.is_available():
        assert main([*args, "--device", "cuda"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no CUDA device" in err[0]


def test_train_records_its_device_auto_by_default_and_as_given(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    assert main(["train", str(corpus), "--run-dir", str(tmp_path / "auto"), "--quiet", *TINY,
                 "--set", "train.max_steps=2"]) == 0
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["train"]["device"] == "auto"
    assert main(["train", str(corpus), "--run-dir", str(tmp_path / "cpu"), "--quiet", "--device", "cpu", *TINY,
                 "--set", "train.max_steps=2"]) == 0
    assert json.loads((tmp_path / "cpu" / "config.json").read_text())["train"]["device"] == "cpu"


def test_compare_runs_on_the_device_it_is_given(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--task", "adding", "--models", "rnn", "--distances", "5", "--steps", "3",
                 "--hidden", "4", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert main(["compare", "--task", "adding", "--models", "rnn", "--distances", "5", "--steps", "3",
                 "--out", str(tmp_path / "x"), "--quiet", "--device", "cuda:9"]) == 1
