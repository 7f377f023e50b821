"""Peak memory of one training step: whiteboard vs torch.nn, each in a fresh process.

A process's peak resident set only grows, so each measurement runs in its own child:
build the layer and inputs, record the peak so far, run one forward + backward, record
the peak again; the difference is what the step needed at its worst.

    python benchmarks/memory.py                      # LSTM, GRU, RNN on configs a-d
    python benchmarks/memory.py --cells lstm --configs d
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from recurrent_speed import CELLS, CONFIGS

CHILD = r"""
import json, resource, sys, torch, whiteboard
from whiteboard import native
cell, config, which = sys.argv[1], sys.argv[2], sys.argv[3]
layers, inp, hidden, batch, steps = json.loads(sys.argv[4])
cls = {"lstm": (whiteboard.LSTM, torch.nn.LSTM), "gru": (whiteboard.GRU, torch.nn.GRU),
       "rnn": (whiteboard.RNN, torch.nn.RNN)}[cell][0 if which == "ours" else 1]
layer = cls(inp, hidden, num_layers=layers)
x = torch.randn(steps, batch, inp, requires_grad=True)
grad = torch.randn(steps, batch, hidden)
if which == "ours":
    native.load()  # build or load the extension before measuring
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out, _ = layer(x)
out.backward(grad)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"kib": after - before}))
"""


def measure(cell: str, config: str, which: str) -> float:
    args = [sys.executable, "-c", CHILD, cell, config, which, json.dumps(CONFIGS[config])]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["kib"] / 1024


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS))
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args(argv)
    print("| cell | config | ours MiB | torch.nn MiB | ratio |")
    print("|---|---|---|---|---|")
    for cell in args.cells:
        for config in args.configs:
            ours, theirs = measure(cell, config, "ours"), measure(cell, config, "torch")
            print(f"| {cell} | {config} | {ours:.1f} | {theirs:.1f} | **{ours / max(theirs, 1e-9):.2f}** |", flush=True)


if __name__ == "__main__":
    main()
