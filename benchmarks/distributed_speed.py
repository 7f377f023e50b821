"""Training throughput on 1 and on N processes of this machine, at the same global batch.

Runs ``whiteboard train`` for a fixed number of steps, first as one process with all the
machine's threads, then under torchrun as N processes with an equal share of the threads
each, and reports the tokens per second each logged (the training clock only, evaluation
excluded). The runs are sequential: never two multi-threaded torch jobs at once.

    python benchmarks/distributed_speed.py --corpus ptb --data-dir ../shared/data --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(nproc: int, threads: int, corpus: str, steps: int, sets: list[str], data_dir: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        extra = [item for s in sets + [f"train.max_steps={steps}", f"train.threads={threads}",
                                       f"train.log_every={steps}", "train.eval_every=0"] for item in ("--set", s)]
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                    if nproc > 1 else [sys.executable])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run([*launcher, "-m", "whiteboard", "train", corpus, "--run-dir", str(run_dir), "--quiet",
                               "--data-dir", data_dir, *extra], capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [m for m in lines if m["split"] == "train"][-1]["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="ptb", help="a named corpus (or a file)")
    parser.add_argument("--data-dir", default="../shared/data", help="where named corpora are")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--set", action="append", default=["model.hidden_size=200", "model.embedding_size=200",
                                                           "model.num_layers=2", "train.batch_size=20",
                                                           "train.bptt=35"])
    args = parser.parse_args()
    print(f"# {args.corpus}, {args.steps} steps, settings {' '.join(args.set)}, {args.cores} cores")
    print("| processes | threads each | tokens/s | vs 1 process |")
    print("|---|---|---|---|")
    base = run(1, args.cores, args.corpus, args.steps, args.set, args.data_dir)
    print(f"| 1 | {args.cores} | {base:,.0f} | 1.00 |")
    threads = max(1, args.cores // args.nproc)
    many = run(args.nproc, threads, args.corpus, args.steps, args.set, args.data_dir)
    print(f"| {args.nproc} | {threads} | {many:,.0f} | {many / base:.2f} |")


if __name__ == "__main__":
    main()
