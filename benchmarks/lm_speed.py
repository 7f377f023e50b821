"""End to end: tokens/s of a full language-model training step (embedding, 2-layer LSTM,
decoder, cross-entropy, backward, SGD step) with whiteboard's LSTM vs the same model
built on torch.nn.LSTM, in the same process, interleaved.

    python benchmarks/lm_speed.py            # zaremba-small sizes: V 10000, 2 x 200, B 20, T 20
    python benchmarks/lm_speed.py --hidden 650 --bptt 35
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from whiteboard.lm.config import ModelConfig
from whiteboard.lm.model import LanguageModel

from recurrent_speed import settle_malloc


def build(vocab: int, hidden: int, layers: int, backend: str) -> LanguageModel:
    model = LanguageModel(vocab, ModelConfig(cell="lstm", embedding_size=hidden, hidden_size=hidden, num_layers=layers))
    if backend == "torch":
        reference = nn.LSTM(hidden, hidden, num_layers=layers)
        reference.load_state_dict(model.recurrent.state_dict())
        model.recurrent = reference
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--bptt", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    args = parser.parse_args(argv)
    settle_malloc()
    torch.manual_seed(0)
    models = {name: build(args.vocab, args.hidden, args.layers, name) for name in ("ours", "torch")}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.1) for name, m in models.items()}
    tokens = torch.randint(0, args.vocab, (args.bptt + 1, args.batch))

    def step(name: str) -> None:
        model = models[name]
        logits, _ = model(tokens[:-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[1:].flatten())
        optimizers[name].zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizers[name].step()

    for name in models:
        for _ in range(3):
            step(name)
    rates = {"ours": [], "torch": []}
    for r in range(args.rounds):
        for name in (("ours", "torch") if r % 2 == 0 else ("torch", "ours")):
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            rates[name].append(args.steps * args.bptt * args.batch / (time.perf_counter() - start))
    ours, theirs = statistics.median(rates["ours"]), statistics.median(rates["torch"])
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, V {args.vocab}, {args.layers} x {args.hidden}, "
          f"B {args.batch}, T {args.bptt}, medians of {args.rounds} rounds x {args.steps} steps")
    print(f"whiteboard LSTM: {ours:,.0f} tokens/s; torch.nn.LSTM: {theirs:,.0f} tokens/s; ratio {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
