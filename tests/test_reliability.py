"""No run is lost or overwritten, no NaN reaches a checkpoint, and bad input gets one line.

Each test drives the command line as a user would (``main(argv)``, or a subprocess where
signals and locks are involved) and checks the exit status, the one-line message and that
the run directory is as it was, or loads and resumes.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from whiteboard.lm import rundir
from whiteboard.cli import main
from whiteboard.inspect.report import _json_for_script
from whiteboard.lm.records import read_metrics
from lm_helpers import TINY, start_training, write_corpus



@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch run and its corpus."""
    tmp = tmp_path_factory.mktemp("reliability")
    corpus = write_corpus(tmp / "c.txt")
    run = tmp / "run"
    assert main(["train", str(corpus), "--run-dir", str(run), "--set", "train.epochs=2", *TINY]) == 0
    return corpus, run


@pytest.fixture
def run_copy(finished, tmp_path):
    corpus, run = finished
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return corpus, copy


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _one_error_line(capsys, status, code=1) -> str:
    """The error: the last line on stderr (progress lines may come before it), the only one
    that says error, and no traceback."""
    err = capsys.readouterr().err.strip()
    assert status == code, err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("whiteboard: error: ") and "Traceback" not in err, err
    assert sum("error" in line for line in lines) == 1, err
    return lines[-1]


# ----------------------------------------------------------------- data loss


def test_a_model_without_training_state_is_not_overwritten(finished, tmp_path, capsys):
    """The campaign's reproduction: model, config and vocabulary copied into a new folder."""
    corpus, run = finished
    target = tmp_path / "demo-like"
    target.mkdir()
    for name in ("model.safetensors", "config.json", "vocab.json"):
        shutil.copy(run / name, target / name)
    before = _snapshot(target)
    err = _one_error_line(capsys, main(["train", str(corpus), "--run-dir", str(target), *TINY,
                                        "--set", "model.hidden_size=24"]))
    assert "not empty" in err and "--overwrite" in err
    assert _snapshot(target) == before
    assert main(["evaluate", str(target), "--batch-size", "2"]) == 0


def test_overwrite_replaces_the_run_and_keeps_other_files(run_copy, capsys):
    corpus, run = run_copy
    (run / "notes.txt").write_text("mine")
    assert main(["train", str(corpus), "--run-dir", str(run), "--overwrite", *TINY, "--set", "train.epochs=1",
                 "--set", "model.hidden_size=24"]) == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "config.json").read_text())["model"]["hidden_size"] == 24
    assert [r["split"] for r in read_metrics(run)] .count("test") == 1
    assert main(["evaluate", str(run), "--batch-size", "2"]) == 0


def test_the_same_command_again_neither_retrains_nor_retests_a_finished_run(run_copy, capsys):
    corpus, run = run_copy
    before = _snapshot(run)
    assert main(["train", str(corpus), "--run-dir", str(run), "--set", "train.epochs=2", *TINY]) == 0
    assert "finished already" in capsys.readouterr().out
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert _snapshot(run) == before  # no second test record, no new checkpoint


def test_a_run_stopped_at_max_steps_trains_no_further_step_when_resumed(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    run = tmp_path / "run"
    assert main(["train", str(corpus), "--run-dir", str(run), "--set", "train.max_steps=5", *TINY]) == 0
    steps = lambda: load_file(str(run / "training_state.safetensors")) and json.loads(  # noqa: E731
        _metadata(run / "training_state.safetensors")["counters"])["step"]
    assert steps() == 5
    for _ in range(2):
        assert main(["train", "--resume", str(run), "--quiet"]) == 0
        assert steps() == 5


def _metadata(path: Path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]


def test_stale_temporaries_of_a_killed_write_are_removed_when_a_run_opens(run_copy, tmp_path):
    corpus, run = run_copy
    stale = run / ".training_state.safetensors.k2j4_x9.tmp"
    stale.write_bytes(b"\0" * 1000)
    foreign = run / ".someone-elses.tmp"
    foreign.write_bytes(b"keep")
    assert main(["train", "--resume", str(run), "--quiet", "--set", "train.epochs=3"]) == 0
    assert not stale.exists() and foreign.exists()


def test_a_second_process_is_refused_and_a_killed_one_leaves_a_resumable_run(tmp_path):
    first, run, command = start_training(tmp_path)
    second = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert second.stderr.strip().startswith("whiteboard: error:") and "in use by another" in second.stderr
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    # The OS released the dead holder's claim: the run resumes at once.
    resumed = subprocess.run([sys.executable, "-m", "whiteboard", "train", "--resume", str(run), "--quiet",
                              "--set", "train.max_steps=1"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr


def test_one_process_cannot_claim_a_directory_twice(tmp_path):
    with rundir.RunDirectoryClaim(tmp_path / "run"):
        with pytest.raises(rundir.WhiteboardError, match="in use by another"):
            with rundir.RunDirectoryClaim(tmp_path / "run"):
                pass
    with rundir.RunDirectoryClaim(tmp_path / "run"):  # released on exit
        pass


def test_sigterm_saves_like_ctrl_c_and_exits_143(tmp_path):
    """No checkpoint is due before the first epoch ends (thousands of steps here): the one
    found after the signal was written because of it."""
    corpus = write_corpus(tmp_path / "c.txt", lines=20000)
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "whiteboard", "train", str(corpus), "--run-dir", str(run),
                                "--set", "train.epochs=2", "--set", "train.log_every=5", *TINY],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert not (run / "training_state.safetensors").exists()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "--resume" in err
    counters = json.loads(_metadata(run / "training_state.safetensors")["counters"])
    assert counters["epoch"] == 1 and counters["step"] >= 5


# ----------------------------------------------------------------- divergence


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_a_nan_gradient_stops_before_the_update_and_keeps_the_last_checkpoint(run_copy, monkeypatch, capsys):
    corpus, run = run_copy
    before = _snapshot(run)
    from whiteboard.lm import train as train_module

    class PoisonedLoss(torch.nn.CrossEntropyLoss):
        def forward(self, logits, targets):
            return _NaNGradient.apply(super().forward(logits, targets))

    monkeypatch.setattr(train_module.nn, "CrossEntropyLoss", PoisonedLoss)
    err = _one_error_line(capsys, main(["train", "--resume", str(run), "--quiet", "--set", "train.epochs=3",
                                        "--set", "train.checkpoint_every=1", "--set", "train.clip=0"]))
    assert "gradient norm became nan" in err and "last good checkpoint" in err
    after = _snapshot(run)
    assert after["training_state.safetensors"] == before["training_state.safetensors"]
    assert after["model.safetensors"] == before["model.safetensors"]


def test_an_absurd_learning_rate_never_reaches_a_checkpoint(run_copy, capsys):
    corpus, run = run_copy
    before = _snapshot(run)
    err = _one_error_line(capsys, main(["train", "--resume", str(run), "--quiet", "--set", "train.epochs=3",
                                        "--set", "train.lr=1e30", "--set", "train.checkpoint_every=1"]))
    assert "last good checkpoint" in err
    assert _snapshot(run)["training_state.safetensors"] == before["training_state.safetensors"]
    assert main(["train", "--resume", str(run), "--quiet", "--set", "train.max_steps=1"]) == 0  # still resumable


FLOAT_KEYS = ["train.lr", "train.time_limit", "train.momentum", "train.weight_decay", "train.clip"]


@pytest.mark.parametrize("key, value", [(key, value) for key in FLOAT_KEYS for value in ("nan", "inf", "-1")]
                         + [("train.max_steps", "-1"), ("train.max_steps", "nan")])
def test_non_finite_or_negative_settings_are_refused(tmp_path, capsys, key, value):
    corpus = write_corpus(tmp_path / "c.txt")
    err = _one_error_line(capsys, main(["train", str(corpus), "--run-dir", str(tmp_path / "r"), *TINY,
                                        "--set", f"{key}={value}"]), code=2)
    assert key in err
    assert not (tmp_path / "r").exists()


def test_non_finite_weights_in_a_checkpoint_are_refused(run_copy, capsys):
    _, run = run_copy
    tensors = load_file(str(run / "model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first][0] = float("nan")
    save_file(tensors, str(run / "model.safetensors"), metadata=_metadata(run / "model.safetensors"))
    err = _one_error_line(capsys, main(["predict", str(run), "the cat"]))
    assert "non-finite weights" in err and first in err


# ----------------------------------------------------------------- one line for every bad input


def _edit_config(run: Path, edit) -> None:
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))


CORRUPTIONS = {
    "edited hidden size": (lambda run: _edit_config(run, lambda c: c["model"].update(hidden_size=24)), "does not fit"),
    "hidden size 0": (lambda run: _edit_config(run, lambda c: c["model"].update(hidden_size=0)), "hidden_size"),
    "hidden size -5": (lambda run: _edit_config(run, lambda c: c["model"].update(hidden_size=-5)), "hidden_size"),
    "a list": (lambda run: (run / "config.json").write_text("[1, 2]"), "JSON object"),
    "malformed JSON": (lambda run: (run / "config.json").write_text("{\"model\": "), "not valid JSON"),
    "non-UTF-8 config": (lambda run: (run / "config.json").write_bytes(b"\xff\xfe{}"), "not UTF-8"),
    "non-UTF-8 vocabulary": (lambda run: (run / "vocab.json").write_bytes(b"\xff\xfe{}"), "not UTF-8"),
    "a larger vocabulary": (lambda run: (run / "vocab.json").write_text(json.dumps(
        {"level": "word", "tokens": json.loads((run / "vocab.json").read_text())["tokens"] + ["zebra"]})),
        "does not fit"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("command", ["predict", "evaluate", "resume"])
def test_a_damaged_run_directory_gives_one_line(run_copy, capsys, corruption, command):
    _, run = run_copy
    damage, words = CORRUPTIONS[corruption]
    damage(run)
    before = _snapshot(run)
    argv = {"predict": ["predict", str(run), "the cat"], "evaluate": ["evaluate", str(run), "--batch-size", "2"],
            "resume": ["train", "--resume", str(run), "--quiet", "--set", "train.epochs=3"]}[command]
    status = main(argv)
    err = _one_error_line(capsys, status, code=status if status in (1, 2) else 1)
    assert words in err
    assert _snapshot(run) == before


def test_resuming_as_another_cell_gives_one_line(run_copy, capsys):
    _, run = run_copy
    err = _one_error_line(capsys, main(["train", "--resume", str(run), "--quiet", "--set", "model.cell=gru",
                                        "--set", "train.epochs=3"]))
    assert "does not fit" in err


def test_a_non_utf8_config_file_gives_one_line(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_bytes(b"[train]\nlr = 1\n# \xff\n")
    corpus = write_corpus(tmp_path / "c.txt")
    err = _one_error_line(capsys, main(["train", str(corpus), "--run-dir", str(tmp_path / "r"), "--config",
                                        str(config)]), code=2)
    assert "not UTF-8" in err


@pytest.mark.parametrize("device, code, words", [("cuda", 1, "no CUDA device"), ("banana", 2, "train.device")])
def test_a_device_this_machine_lacks_gives_one_line(tmp_path, capsys, device, code, words):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    corpus = write_corpus(tmp_path / "c.txt")
    err = _one_error_line(capsys, main(["train", str(corpus), "--run-dir", str(tmp_path / "r"), *TINY,
                                        "--set", f"train.device={device}"]), code=code)
    assert words in err
    assert not (tmp_path / "r").exists()


def test_a_run_directory_that_is_a_file_or_lies_under_one_gives_one_line(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.txt")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for run in (blocker, blocker / "run"):
        err = _one_error_line(capsys, main(["train", str(corpus), "--run-dir", str(run), *TINY]))
        assert "file" in err
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("error, words", [(errno.EACCES, "Permission denied"), (errno.ENOSPC, "disk is full")])
def test_an_unwritable_or_full_run_directory_is_found_before_training(tmp_path, capsys, monkeypatch, error, words):
    """Root may write anywhere, so the refusal the OS would give is simulated where the
    probe file is created."""
    corpus = write_corpus(tmp_path / "c.txt")

    def refuse(*args, **kwargs):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(rundir.tempfile, "mkstemp", refuse)
    err = _one_error_line(capsys, main(["train", str(corpus), "--run-dir", str(tmp_path / "r"), *TINY]))
    assert "cannot write in the run directory" in err and words in err


def test_a_full_disk_mid_run_gives_one_line_and_keeps_the_last_checkpoint(run_copy, capsys, monkeypatch):
    corpus, run = run_copy
    before = _snapshot(run)
    from whiteboard import files

    real = files.os.fsync

    def full(fd):
        if os.fstat(fd).st_size > 10_000:  # checkpoints, not the run directory's probe
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", full)
    err = _one_error_line(capsys, main(["train", "--resume", str(run), "--quiet", "--set", "train.epochs=3"]))
    assert "No space left on device" in err
    after = _snapshot(run)
    for name in ("training_state.safetensors", "model.safetensors"):
        assert after[name] == before[name]
    assert not [name for name in after if name.endswith(".tmp")]
    monkeypatch.setattr(files.os, "fsync", real)
    assert main(["evaluate", str(run), "--batch-size", "2"]) == 0


@pytest.mark.parametrize("argv, words", [
    (lambda run: ["evaluate", str(run), "--batch-size", "0"], "--batch-size"),
    (lambda run: ["reach", str(run), "--text", "the cat", "--max-lag", "-2"], "--max-lag"),
    (lambda run: ["generate", str(run), "--temperature", "nan"], "--temperature"),
    (lambda run: ["generate", str(run), "--temperature", "inf"], "--temperature"),
    (lambda run: ["generate", str(run), "--top-k", "-1"], "--top-k"),
    (lambda run: ["predict", str(run), "the", "--top-k", "-1"], "--top-k"),
    (lambda run: ["generate", str(run), "--length", "1000000000"], "--length"),
    (lambda run: ["train", "x.txt", "--run-dir", str(run), "--set", "train.max_steps=-1"], "max_steps"),
    # argparse's own refusals, which it would prefix with "whiteboard evaluate: error:"
    (lambda run: ["evaluate", str(run), "--split", "nope"], "--split"),
    (lambda run: ["inspect", str(run), "the", "--units", "x"], "--units"),
    (lambda run: ["compare", "--distances", "0"], "--distances"),
])
def test_bad_command_line_values_are_usage_errors(finished, capsys, argv, words):
    _, run = finished
    before = _snapshot(run)
    err = _one_error_line(capsys, main(argv(run)), code=2)
    assert words in err
    assert _snapshot(run) == before


def test_inspect_into_an_unwritable_place_gives_one_line_before_any_work(finished, tmp_path, capsys):
    _, run = finished
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _one_error_line(capsys, main(["inspect", str(run), "the cat", "--out", str(blocker / "report.html")]))
    assert "--out" in err


def test_a_tiny_temperature_samples_greedily(finished, capsys):
    _, run = finished
    assert main(["generate", str(run), "--prompt", "the", "--length", "8", "--temperature", "1e-45", "--seed", "1"]) == 0
    tiny = capsys.readouterr().out
    assert main(["generate", str(run), "--prompt", "the", "--length", "8", "--temperature", "0"]) == 0
    assert tiny == capsys.readouterr().out


def test_generation_streams_the_tokens_generate_returns(finished):
    from whiteboard.lm.checkpoint import load_run
    from whiteboard.lm.generate import generate, generate_pieces

    model, vocab, _ = load_run(finished[1])
    for prompt in ("", "the cat"):
        pieces = list(generate_pieces(model, vocab, prompt, 30, 1.0, 0, 1.0, seed=3))
        assert len(pieces) == 30
        assert "".join(pieces) == generate(model, vocab, prompt, 30, 1.0, 0, 1.0, seed=3)


def test_a_one_line_file_is_refused_with_what_to_do(tmp_path, capsys):
    corpus = tmp_path / "one-line.txt"
    corpus.write_text(" ".join(["word"] * 5000))
    err = _one_error_line(capsys, main(["train", str(corpus), "--run-dir", str(tmp_path / "r"), *TINY]))
    assert "1 line" in err and "by lines" in err and "train.txt" in err


def test_the_report_s_json_survives_any_text_in_a_script_element():
    data = {"text": "a <!--<script> b </script> & c > d"}
    embedded = _json_for_script(data)
    assert "<" not in embedded and ">" not in embedded and "&" not in embedded
    assert json.loads(embedded) == data


def test_written_files_get_ordinary_permissions(tmp_path):
    from whiteboard.files import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
