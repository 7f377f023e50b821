"""Peak memory of one training step: whiteboard vs torch.nn, each in a fresh process.

A process's peak resident set only grows, so each measurement runs in its own child:
build the layer and inputs, record the peak so far, run one forward + backward, record
the peak again; the difference is what the step needed at its worst.

    python benchmarks/memory.py                      # LSTM, GRU, RNN on configs a-d
    python benchmarks/memory.py --cells lstm --configs d
"""

from __future__ import annotations

import json
import subprocess
import sys

from recurrent_speed import CONFIGS, print_table_header, print_table_row, selected, selection_parser

CHILD = r"""
import json, resource, sys, torch, whiteboard
from whiteboard.backends.compiled import build as native
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
    args = selection_parser(__doc__).parse_args(argv)
    print_table_header("cell", "config", "ours MiB", "torch.nn MiB", "ratio")
    for cell, config in selected(args):
        ours, theirs = measure(cell, config, "ours"), measure(cell, config, "torch")
        print_table_row(cell, config, f"{ours:.1f}", f"{theirs:.1f}", f"**{ours / max(theirs, 1e-9):.2f}**")


if __name__ == "__main__":
    main()
