"""A language model's full training step, eager against torch.compile, in the same process.

One step: forward over a window, cross-entropy, backward, gradient clipping and an SGD step.
The model is compiled with ``torch.compile(model, fullgraph=True)`` (each recurrent layer is
one custom operator in the graph, whiteboard.backends.ops); the optimizer step stays eager
in both. Rounds alternate eager and compiled so neither always runs warm; reports medians,
the interquartile range and the ratio compiled / eager (below 1 = compile is faster).

    python benchmarks/compile_speed.py
    python benchmarks/compile_speed.py --cells lstm gru --hidden 650 --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from whiteboard.lm import config as cfg
from whiteboard.lm.model import LanguageModel


def _train_step(model, optimizer, tokens, targets, vocab):
    optimizer.zero_grad(set_to_none=True)
    logits, _ = model(tokens, None)
    loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab), targets.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
    optimizer.step()
    return loss


def _quartiles(times):
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"])
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps timed together in one round")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, {args.layers} x {args.hidden}, "
          f"vocab {args.vocab}, batch {args.batch}, bptt {args.bptt}, rounds {args.rounds} x {args.steps} steps")
    print("| cell | eager ms | compiled ms | ratio | first compiled step s |")
    print("|---|---|---|---|---|")
    tokens = torch.randint(0, args.vocab, (args.bptt, args.batch))
    targets = torch.randint(0, args.vocab, (args.bptt, args.batch))
    for cell in args.cells:
        config = cfg.resolve(sets=[f"model.cell={cell}", f"model.hidden_size={args.hidden}",
                                   f"model.embedding_size={args.hidden}", f"model.num_layers={args.layers}"]).model
        eager = LanguageModel(args.vocab, config)
        compiled_model = copy.deepcopy(eager)
        compiled = torch.compile(compiled_model, fullgraph=True)
        runs = {"eager": (eager, torch.optim.SGD(eager.parameters(), lr=1.0)),
                "compiled": (compiled, torch.optim.SGD(compiled_model.parameters(), lr=1.0))}
        started = time.perf_counter()
        _train_step(*runs["compiled"], tokens, targets, args.vocab)
        first = time.perf_counter() - started
        for _ in range(2):
            for model, optimizer in runs.values():
                _train_step(model, optimizer, tokens, targets, args.vocab)
        times = {name: [] for name in runs}
        for round_index in range(args.rounds):
            order = list(runs) if round_index % 2 == 0 else list(runs)[::-1]
            for name in order:
                model, optimizer = runs[name]
                started = time.perf_counter()
                for _ in range(args.steps):
                    _train_step(model, optimizer, tokens, targets, args.vocab)
                times[name].append((time.perf_counter() - started) / args.steps * 1e3)
        (e, e_iqr), (c, c_iqr) = _quartiles(times["eager"]), _quartiles(times["compiled"])
        print(f"| {cell} | {e:.2f} ± {e_iqr:.2f} | {c:.2f} ± {c_iqr:.2f} | **{c / e:.2f}** | {first:.1f} |")


if __name__ == "__main__":
    main()
