"""Data-parallel training under torchrun (gloo, 2 processes on localhost): the same run as
one process at the same global batch, evaluation included; a killed rank takes the job
down and the run resumes; a resumed 2-process run equals an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from whiteboard.cli import main
from lm_helpers import write_corpus

pytestmark = pytest.mark.slow

SETS = ["model.cell=lstm", "model.embedding_size=8", "model.hidden_size=8", "model.num_layers=2",
        "model.dropout=0", "train.batch_size=8", "train.bptt=6", "train.eval_batch_size=4", "train.optimizer=sgd",
        "train.lr=2", "train.clip=0.25", "train.log_every=1", "train.eval_every=4", "train.dtype=float64",
        "train.threads=1"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _command(nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "whiteboard", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "whiteboard", *args]


def _train(nproc: int, corpus, run, *sets: str, resume: bool = False, timeout: float = 300):
    where = ["--resume", str(run)] if resume else [str(corpus), "--run-dir", str(run)]
    extra = [item for s in (([] if resume else SETS) + list(sets)) for item in ("--set", s)]
    done = subprocess.run(_command(nproc, "train", *where, "--quiet", *extra), capture_output=True, text=True,
                          timeout=timeout, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run):
    return {k: v for k, v in load_file(str(run / "training_state.safetensors")).items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("dist") / "c.txt", lines=200)


@pytest.fixture(scope="module")
def one_and_two(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    _train(1, corpus, tmp / "one", "train.max_steps=10")
    _train(2, corpus, tmp / "two", "train.max_steps=10")
    return tmp / "one", tmp / "two"


def test_two_processes_train_exactly_what_one_does_at_the_same_global_batch(one_and_two):
    one, two = one_and_two
    single, double = _metrics(one), _metrics(two)
    train_losses = [(m["step"], m["loss"]) for m in single if m["split"] == "train"]
    assert len(train_losses) == 10
    assert [m["step"] for m in double if m["split"] == "train"] == [s for s, _ in train_losses]
    for (_, a), b in zip(train_losses, [m["loss"] for m in double if m["split"] == "train"]):
        assert abs(a - b) <= 1e-10
    first, second = _weights(one), _weights(two)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == torch.float64
        assert (first[name] - second[name]).abs().max() <= 1e-10, name
    state = json.loads(json.loads((two / "training_state.safetensors").read_bytes()[8:8 + int.from_bytes(
        (two / "training_state.safetensors").read_bytes()[:8], "little")])["__metadata__"]["counters"])
    assert state["world_size"] == 2


def test_evaluation_perplexity_is_the_single_process_value(one_and_two):
    one, two = one_and_two
    for split in ("valid",):  # (a run stopped by max_steps is not tested; the kill test's run is)
        a = [m["loss"] for m in _metrics(one) if m["split"] == split]
        b = [m["loss"] for m in _metrics(two) if m["split"] == split]
        assert a and len(a) == len(b)
        for x, y in zip(a, b):
            assert abs(x - y) <= 1e-10


def test_resumed_two_process_run_equals_an_uninterrupted_one_with_dropout_and_variable_windows(corpus, tmp_path):
    """Every rank's dropout generator and the shared data generator are in the checkpoint."""
    random = ["model.dropout=0.3", "train.variable_bptt=true"]
    whole, resumed, again = tmp_path / "whole", tmp_path / "resumed", tmp_path / "again"
    _train(2, corpus, whole, "train.max_steps=10", *random)
    _train(2, corpus, again, "train.max_steps=10", *random)
    _train(2, corpus, resumed, "train.max_steps=6", *random)
    _train(2, corpus, resumed, "train.max_steps=10", resume=True)
    expected = _weights(whole)
    for other in (again, resumed):  # reproducible for a given world size, resumed or not
        got = _weights(other)
        for name in expected:
            assert (expected[name] - got[name]).abs().max() <= 1e-10, (other.name, name)
    steps = [(m["step"], m["loss"]) for m in _metrics(resumed) if m["split"] == "train"]
    assert [s for s, _ in steps] == list(range(1, 11))
    for (_, a), b in zip(steps, [m["loss"] for m in _metrics(whole) if m["split"] == "train"]):
        assert abs(a - b) <= 1e-10


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_killed_rank_takes_the_job_down_and_the_run_resumes(corpus, tmp_path):
    run = tmp_path / "killed"
    extra = [item for s in SETS + ["train.epochs=500", "train.checkpoint_every=2", "train.eval_every=0"]
             for item in ("--set", s)]
    job = subprocess.Popen(_command(2, "train", str(corpus), "--run-dir", str(run), "--quiet", *extra),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 120
        while not (run / "training_state.safetensors").exists():
            assert job.poll() is None and time.monotonic() < deadline, job.stderr.read() if job.poll() else "no checkpoint"
            time.sleep(0.2)
        workers = _children(job.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        started = time.monotonic()
        job.wait(timeout=90)
        assert job.returncode != 0
        assert time.monotonic() - started < 90
    finally:
        if job.poll() is None:
            job.kill()
    saved = load_file(str(run / "training_state.safetensors"))  # the last checkpoint is whole
    assert any(k.startswith("model.") for k in saved)
    _train(2, corpus, run, "train.epochs=1", "train.max_steps=0", resume=True)
    assert any(m["split"] == "test" for m in _metrics(run))


def test_a_run_from_one_process_resumes_on_two_and_an_uneven_batch_is_refused(corpus, tmp_path, capsys):
    run = tmp_path / "grow"
    _train(1, corpus, run, "train.max_steps=4")
    done = _train(2, corpus, run, "train.max_steps=6", resume=True)
    assert "resuming a run trained on 1 process(es) on 2" in done.stderr
    assert [m["step"] for m in _metrics(run) if m["split"] == "train"] == list(range(1, 7))
    uneven = main(["train", str(corpus), "--run-dir", str(tmp_path / "uneven"), "--nproc", "2", "--quiet",
                   "--set", "train.batch_size=7"])
    assert uneven == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not divide over 2 processes" in err[0] and "multiple of 2" in err[0]
    assert not (tmp_path / "uneven").exists()


def test_nproc_starts_torchrun_and_trains(corpus, tmp_path):
    run = tmp_path / "nproc"
    extra = [item for s in SETS + ["train.max_steps=3"] for item in ("--set", s)]
    done = subprocess.run(_command(1, "train", str(corpus), "--run-dir", str(run), "--nproc", "2", "--quiet", *extra),
                          capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting 2 processes" in done.stderr and "training on 2 processes" in done.stderr
    assert done.stdout.count("steps in") == 1  # rank 0 alone reports
    assert [m["step"] for m in _metrics(run) if m["split"] == "train"] == [1, 2, 3]
