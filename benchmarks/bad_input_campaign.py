"""Bad inputs and kills against the CLI, as a new user would meet them; prints one count line.

    .venv/bin/python benchmarks/bad_input_campaign.py [--kills 10]

Every bad input runs as its own ``python -m whiteboard`` process on tiny models and is
classed as: a clear error (non-zero exit, the last line ``whiteboard: error: ...``, no
traceback), a traceback, or silent (exit 0 where an error was due). Every kill sends
SIGKILL to a training run at a random moment; the run is lost unless it then resumes and
evaluates.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["--set", "model.embedding_size=16", "--set", "model.hidden_size=16", "--set", "model.num_layers=1",
        "--set", "train.batch_size=4", "--set", "train.bptt=8", "--set", "train.eval_batch_size=2", "--quiet"]
WORDS = "the cat sat on a mat dog ran to park big small red blue house tree".split()


def whiteboard(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whiteboard", *argv], capture_output=True, text=True, timeout=timeout)


def corpus(path: Path, lines: int = 300) -> Path:
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) for _ in range(lines)))
    return path


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def cases(tmp: Path, text: Path, run: Path):
    """(name, set-up (a fresh copy of the run -> argv))."""
    def copy() -> Path:
        target = Path(tempfile.mkdtemp(dir=tmp)) / "run"
        shutil.copytree(run, target)
        return target

    def with_copy(change, argv):
        def make():
            target = copy()
            change(target)
            return argv(target)
        return make

    blocker = tmp / "a-file"
    blocker.write_text("x")
    one_line = tmp / "one-line.txt"
    one_line.write_text(" ".join(["word"] * 20000))
    binary = tmp / "binary.txt"
    binary.write_bytes(b"ok\n\xff\xfe\n" * 50)
    bad_toml = tmp / "bad.toml"
    bad_toml.write_bytes(b"[train]\nlr = \xff\n")
    yield "missing corpus", lambda: ["train", str(tmp / "missing.txt"), "--run-dir", str(tmp / "r1")]
    yield "non-UTF-8 corpus", lambda: ["train", str(binary), "--run-dir", str(tmp / "r2")]
    yield "one-line corpus", lambda: ["train", str(one_line), "--run-dir", str(tmp / "r3"), *TINY]
    yield "unknown preset", lambda: ["train", str(text), "--run-dir", str(tmp / "r4"), "--preset", "nope"]
    yield "unknown config key", lambda: ["train", str(text), "--run-dir", str(tmp / "r5"), "--set", "train.nope=1"]
    yield "non-UTF-8 --config", lambda: ["train", str(text), "--run-dir", str(tmp / "r6"), "--config", str(bad_toml)]
    for key, value in [("train.lr", "nan"), ("train.lr", "inf"), ("train.lr", "-1"), ("train.time_limit", "nan"),
                       ("train.time_limit", "inf"), ("train.max_steps", "-1"), ("train.momentum", "-0.5"),
                       ("train.weight_decay", "-1"), ("train.clip", "nan"), ("train.device", "banana"),
                       ("train.device", "cuda"), ("model.hidden_size", "0"), ("model.dropout", "1.5"),
                       ("train.batch_size", "0"), ("model.cell", "transformer")]:
        yield f"--set {key}={value}", lambda key=key, value=value: [
            "train", str(text), "--run-dir", str(tmp / "r7"), *TINY, "--set", f"{key}={value}"]
    yield "run dir is a file", lambda: ["train", str(text), "--run-dir", str(blocker), *TINY]
    yield "run dir under a file", lambda: ["train", str(text), "--run-dir", str(blocker / "run"), *TINY]
    yield "another config into a finished run", lambda: ["train", str(text), "--run-dir", str(copy()), *TINY,
                                                         "--set", "model.hidden_size=24"]
    yield "resume a missing run", lambda: ["train", "--resume", str(tmp / "nothing")]
    yield "resume with --preset", lambda: ["train", "--resume", str(run), "--preset", "zaremba-small"]
    config_edits = {
        "config hidden size edited": lambda c: c["model"].update(hidden_size=24),
        "config hidden size 0": lambda c: c["model"].update(hidden_size=0),
        "config hidden size -5": lambda c: c["model"].update(hidden_size=-5),
        "config cell unknown": lambda c: c["model"].update(cell="banana"),
        "config lr nan": lambda c: c["train"].update(lr=float("nan")),
    }
    for name, edit in config_edits.items():
        for command in ("predict", "evaluate", "resume"):
            yield f"{name} ({command})", with_copy(lambda r, edit=edit: edit_json(r / "config.json", edit),
                                                   lambda r, command=command: _command(command, r))
    for name, damage in {
        "config a JSON list": lambda r: (r / "config.json").write_text("[1]"),
        "config malformed": lambda r: (r / "config.json").write_text("{\"model\":"),
        "config non-UTF-8": lambda r: (r / "config.json").write_bytes(b"\xff{}"),
        "vocab non-UTF-8": lambda r: (r / "vocab.json").write_bytes(b"\xff{}"),
        "vocab one word longer": lambda r: edit_json(r / "vocab.json", lambda v: v["tokens"].append("zebra")),
        "model truncated": lambda r: (r / "model.safetensors").write_bytes((r / "model.safetensors").read_bytes()[:100]),
        "model NaN weights": _nan_weights,
        "model missing": lambda r: (r / "model.safetensors").unlink(),
    }.items():
        for command in ("predict", "evaluate"):
            yield f"{name} ({command})", with_copy(damage, lambda r, command=command: _command(command, r))
    yield "resume as GRU", lambda: ["train", "--resume", str(copy()), "--set", "model.cell=gru", "--quiet"]
    yield "evaluate --batch-size 0", lambda: ["evaluate", str(run), "--batch-size", "0"]
    yield "evaluate --split nope", lambda: ["evaluate", str(run), "--split", "nope"]
    yield "reach --max-lag -2", lambda: ["reach", str(run), "--text", "the cat", "--max-lag", "-2"]
    yield "generate --temperature nan", lambda: ["generate", str(run), "--temperature", "nan"]
    yield "generate --temperature -1", lambda: ["generate", str(run), "--temperature", "-1"]
    yield "generate --top-k -1", lambda: ["generate", str(run), "--top-k", "-1"]
    yield "generate --top-p 0", lambda: ["generate", str(run), "--top-p", "0"]
    yield "generate --length 1e9", lambda: ["generate", str(run), "--length", "1000000000"]
    yield "predict --top-k 0", lambda: ["predict", str(run), "the", "--top-k", "0"]
    yield "predict empty text", lambda: ["predict", str(run), ""]
    yield "inspect --out under a file", lambda: ["inspect", str(run), "the cat", "--out", str(blocker / "r.html")]
    yield "inspect --top-units 0", lambda: ["inspect", str(run), "the cat", "--top-units", "0"]
    yield "inspect --units x", lambda: ["inspect", str(run), "the cat", "--units", "x"]
    yield "compare --models cnn", lambda: ["compare", "--models", "cnn"]
    yield "compare --distances 0", lambda: ["compare", "--distances", "0"]
    yield "compare --steps 0", lambda: ["compare", "--steps", "0"]


def _command(command: str, run: Path) -> list[str]:
    return {"predict": ["predict", str(run), "the cat"], "evaluate": ["evaluate", str(run), "--batch-size", "2"],
            "resume": ["train", "--resume", str(run), "--quiet", "--set", "train.epochs=3"]}[command]


def _nan_weights(run: Path) -> None:
    from safetensors.torch import load_file, save_file

    raw = (run / "model.safetensors").read_bytes()
    metadata = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    tensors = load_file(str(run / "model.safetensors"))
    next(iter(tensors.values())).view(-1)[0] = float("nan")
    save_file(tensors, str(run / "model.safetensors"), metadata=metadata)


def classify(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    if "Traceback" in result.stderr:
        return "traceback"
    if result.returncode == 0:
        return "silent"
    if lines and lines[-1].startswith("whiteboard: error: "):
        return "clear"
    return "traceback"


def kill_campaign(tmp: Path, text: Path, kills: int) -> tuple[int, int]:
    """Kill a training run at random moments; returns (kills, runs that no longer resume and evaluate)."""
    rng = random.Random(1)
    lost = 0
    run = tmp / "killed"
    command = [sys.executable, "-m", "whiteboard", "train", str(text), "--run-dir", str(run),
               "--set", "train.epochs=3", "--set", "train.checkpoint_every=7", *TINY]
    for kill in range(kills):
        argv = command if not (run / "training_state.safetensors").exists() else [
            sys.executable, "-m", "whiteboard", "train", "--resume", str(run), "--quiet"]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 6.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if (run / "training_state.safetensors").exists():
            resumed = whiteboard("train", "--resume", str(run), "--quiet", "--set", "train.max_steps=0")
            if resumed.returncode != 0 or whiteboard("evaluate", str(run), "--batch-size", "2").returncode != 0:
                lost += 1
                print(f"kill {kill}: the run was lost: {resumed.stderr.strip()[-300:]}", file=sys.stderr)
            shutil.rmtree(run)
    return kills, lost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        text = corpus(tmp / "c.txt")
        run = tmp / "run"
        trained = whiteboard("train", str(text), "--run-dir", str(run), "--set", "train.epochs=1", *TINY)
        assert trained.returncode == 0, trained.stderr
        counts = {"clear": 0, "traceback": 0, "silent": 0}
        for name, make in cases(tmp, text, run):
            kind = classify(whiteboard(*make()))
            counts[kind] += 1
            if kind != "clear":
                print(f"{kind}: {name}", file=sys.stderr)
        kills, lost = kill_campaign(tmp, corpus(tmp / "long.txt", lines=3000), args.kills)
    total = sum(counts.values())
    print(f"bad inputs tried {total}: clear errors {counts['clear']}, tracebacks {counts['traceback']}, "
          f"silent wrong {counts['silent']}; kills {kills}, runs lost {lost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
