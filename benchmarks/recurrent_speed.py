"""whiteboard's recurrent layers vs torch.nn, in the same process.

For every config and cell type: a training step (forward + backward with input, weight
and bias gradients) and an inference step (no_grad forward), ours and torch.nn's in
interleaved rounds (the order alternates per round so neither side always runs warm).
Reports the median time per step, the spread (interquartile range) and the ratio
ours / torch.nn (below 1 = we are faster).

    python benchmarks/recurrent_speed.py                    # all configs, CPU
    python benchmarks/recurrent_speed.py --device cuda      # on a GPU (cuDNN baseline)
    python benchmarks/recurrent_speed.py --cells lstm --configs a b --rounds 5
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import statistics
import time

import torch

import whiteboard

# name: (layers, input, hidden, batch, steps)
CONFIGS = {
    "a": (2, 200, 200, 20, 35),
    "b": (2, 650, 650, 20, 35),
    "c": (1, 64, 512, 64, 100),
    "d": (1, 1024, 1024, 128, 50),
    # one token at batch 1, as text generation calls a layer: per-call costs only
    "g": (2, 650, 650, 1, 1),
    # small batch, long sequence: the GPU's persistent-kernel case (not in the default CPU run)
    "e": (1, 1024, 1024, 4, 100),
}
CELLS = {
    "lstm": (whiteboard.LSTM, torch.nn.LSTM),
    "gru": (whiteboard.GRU, torch.nn.GRU),
    "rnn": (whiteboard.RNN, torch.nn.RNN),
    # against torch.nn's plain LSTM, which has no layer norm (the GPU goal: <= 1.3x cuDNN's LSTM)
    "layernorm-lstm": (whiteboard.LayerNormLSTM, torch.nn.LSTM),
}


def settle_malloc() -> None:
    """Put glibc's allocator in the state of a process that has run for a while. glibc
    serves each allocation above its mmap threshold (128 kB at start) with a fresh mmap,
    page-faulted on every call, and raises the threshold to the size of the first such
    chunk freed (up to 32 MB). A training process has long since freed one; a benchmark's
    fresh process had not, and torch.nn's LSTM training step at config (a) took 21-25 ms
    there against 15-16.5 after one 30 MB tensor was freed (three processes each)."""
    chunk = torch.empty(30 << 18)  # 30 MB of float32
    del chunk


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(layer, x, grad_out):
    out, _ = layer(x)
    out.backward(grad_out)


def _trace_train_step(layer, x, grad_out):
    out, _, _ = layer.trace(x)
    out.backward(grad_out)


def _infer_step(layer, x):
    with torch.no_grad():
        layer(x)


def _time(fn, device, repeats: int) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _spread(values: list[float]) -> float:
    if len(values) < 4:
        return max(values) - min(values)
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def _repeats_for(fns, device, repeats: int, min_window: float) -> int:
    """At least ``repeats`` steps a timed round, and enough that the faster side's round
    lasts ``min_window`` seconds: at config (g) three calls of 0.35 ms were a 1 ms window,
    and its inference ratio swung 0.91-1.03 between runs of the same code."""
    fastest = min(_time(fn, device, 1) for fn in fns.values())
    return max(repeats, math.ceil(min_window / max(fastest, 1e-9)))


def bench(cell: str, config: str, device: torch.device, rounds: int, repeats: int, warmup: int, implementation: str,
          min_window: float = 0.0, trace: bool = False):
    layers, inp, hidden, batch, steps = CONFIGS[config]
    ours_cls, torch_cls = CELLS[cell]
    reference = torch_cls(inp, hidden, num_layers=layers).to(device)
    ours = ours_cls(inp, hidden, num_layers=layers, implementation=implementation).to(device)
    ours.load_state_dict(reference.state_dict(), strict=cell != "layernorm-lstm")
    x = torch.randn(steps, batch, inp, device=device, requires_grad=True)
    grad_out = torch.randn(steps, batch, hidden, device=device)
    results = {}
    for kind in ("train", "infer"):
        if kind == "train":
            ours_step = _trace_train_step if trace else _train_step
            fns = {"ours": lambda: ours_step(ours, x, grad_out), "torch": lambda: _train_step(reference, x, grad_out)}
        else:
            fns = {"ours": lambda: _infer_step(ours, x), "torch": lambda: _infer_step(reference, x)}
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        steps_per_round = _repeats_for(fns, device, repeats, min_window)
        times = {"ours": [], "torch": []}
        for r in range(rounds):
            order = ("ours", "torch") if r % 2 == 0 else ("torch", "ours")
            for name in order:
                times[name].append(_time(fns[name], device, steps_per_round))
        ours_med = statistics.median(times["ours"])
        torch_med = statistics.median(times["torch"])
        results[kind] = (ours_med, _spread(times["ours"]), torch_med, _spread(times["torch"]), ours_med / torch_med)
        # Gradients accumulate across the timed steps; drop them so memory stays flat.
        ours.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        x.grad = None
    return results


def selection_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the --cells and --configs every benchmark here takes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", choices=list(CELLS), default=["lstm", "gru", "rnn"])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["a", "b", "c", "d", "g"])
    return parser


def selected(args: argparse.Namespace):
    """The (cell, config) pairs chosen on the command line, in table order."""
    return itertools.product(args.cells, args.configs)


def print_table_header(*columns: str) -> None:
    """A Markdown table's header and rule, for results pasted into benchmarks/README.md."""
    print_table_row(*columns)
    print("|" + "---|" * len(columns))


def print_table_row(*columns) -> None:
    print("| " + " | ".join(str(column) for column in columns) + " |", flush=True)


def main(argv=None) -> None:
    parser = selection_parser(__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="steps timed together in one round (at least)")
    parser.add_argument("--min-window-ms", type=float, default=20.0,
                        help="more steps a round where a step is short, so that a round lasts this long")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--implementation", default="auto",
                        choices=["auto", "native", "cudnn", "triton", "fused", "reference"])
    parser.add_argument("--trace", action="store_true", help="our training step calls trace() (torch.nn's is untraced)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    settle_malloc()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, device {device} ({name}), threads {torch.get_num_threads()}, "
          f"rounds {args.rounds} x {args.repeats} steps (more where that is under {args.min_window_ms:g} ms), "
          f"implementation {args.implementation}")
    print_table_header("cell", "config (L, I, H, B, T)", "train ours ms", "train torch.nn ms", "train ratio",
                       "infer ours ms", "infer torch.nn ms", "infer ratio")
    for cell, config in selected(args):
        r = bench(cell, config, device, args.rounds, args.repeats, args.warmup, args.implementation,
                  args.min_window_ms / 1e3, args.trace)
        tr, inf = r["train"], r["infer"]
        fmt = lambda med, spread: f"{med * 1e3:.2f} ± {spread * 1e3:.2f}"  # noqa: E731
        print_table_row(cell, f"{config} {CONFIGS[config]}", fmt(tr[0], tr[1]), fmt(tr[2], tr[3]), f"**{tr[4]:.2f}**",
                        fmt(inf[0], inf[1]), fmt(inf[2], inf[3]), f"**{inf[4]:.2f}**")


if __name__ == "__main__":
    main()
