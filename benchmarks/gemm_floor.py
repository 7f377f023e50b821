"""How fast can a recurrent layer be here? The time of its matrix products alone.

Any implementation of a float32 RNN / LSTM / GRU training step does at least these GEMMs,
per layer (G gates, T steps, batch B, input I_l, hidden H):

    forward:   X W_ihᵀ             (T·B x I_l) x (I_l x G·H)       one large GEMM
               h_{t-1} W_hhᵀ       (B x H) x (H x G·H)             T small ones, in sequence
    backward:  dZ_t W_hh           (B x G·H) x (G·H x H)           T small ones, in sequence
               dZ W_ih, dZᵀ X, dZᵀ H_prev                          three large GEMMs

(inference: the forward's). This script times exactly those products on this machine, each
the faster of MKL's ``mm`` and oneDNN's packed-weight linear for the per-step ones, and the
torch.nn step in the same process. ``floor / torch.nn`` is the best ratio that any
implementation doing the same float32 arithmetic through torch's GEMMs can reach: the
pointwise gate math, the memory traffic and the per-step overhead all come on top.

    python benchmarks/gemm_floor.py --rounds 5
"""

from __future__ import annotations

import platform
import statistics
import time

import torch

from recurrent_speed import (CELLS, CONFIGS, _infer_step, _train_step, print_table_header, print_table_row,
                             selected, selection_parser)

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _median_ms(fn, rounds: int, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        times.append((time.perf_counter() - start) / repeats)
    return statistics.median(times) * 1e3


def _step_gemm_ms(batch: int, k: int, n: int, steps: int, rounds: int) -> float:
    """T sequential (batch x k) x (k x n) products, the faster of plain and packed."""
    x = torch.randn(batch, k)
    weight = torch.randn(n, k)
    weight_t = weight.t().contiguous()
    out = torch.empty(batch, n)
    plain = _median_ms(lambda: [torch.mm(x, weight_t, out=out) for _ in range(steps)], rounds)
    if not torch.backends.mkldnn.is_available():
        return plain
    packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch)
    linear = torch.ops.mkldnn._linear_pointwise
    packed = _median_ms(lambda: [linear(x, packed_weight, None, "none", [], None) for _ in range(steps)], rounds)
    return min(plain, packed)


def _big_gemm_ms(m: int, k: int, n: int, rounds: int) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    return _median_ms(lambda: torch.mm(a, b), rounds)


def floor_ms(cell: str, config: str, rounds: int) -> tuple[float, float]:
    layers, inp, hidden, batch, steps = CONFIGS[config]
    gh = GATES[cell] * hidden
    rows = steps * batch
    train = infer = 0.0
    for layer in range(layers):
        layer_in = inp if layer == 0 else hidden
        forward = _big_gemm_ms(rows, layer_in, gh, rounds) + _step_gemm_ms(batch, hidden, gh, steps, rounds)
        backward = (
            _step_gemm_ms(batch, gh, hidden, steps, rounds)  # dh_{t-1} = dZ_t W_hh
            + _big_gemm_ms(rows, gh, layer_in, rounds)  # dX = dZ W_ih
            + _big_gemm_ms(gh, rows, layer_in, rounds)  # dW_ih = dZᵀ X
            + _big_gemm_ms(gh, rows, hidden, rounds)  # dW_hh = dZᵀ H_prev
        )
        infer += forward
        train += forward + backward
    return train, infer


def torch_ms(cell: str, config: str, rounds: int) -> tuple[float, float]:
    layers, inp, hidden, batch, steps = CONFIGS[config]
    layer = CELLS[cell][1](inp, hidden, num_layers=layers)
    x = torch.randn(steps, batch, inp, requires_grad=True)
    grad_out = torch.randn(steps, batch, hidden)
    train = _median_ms(lambda: _train_step(layer, x, grad_out), rounds)
    infer = _median_ms(lambda: _infer_step(layer, x), rounds)
    return train, infer


def main(argv=None) -> None:
    parser = selection_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, {platform.machine()}, threads {torch.get_num_threads()}, "
          f"medians of {args.rounds} rounds")
    print_table_header("cell", "config", "train: GEMM floor ms", "torch.nn ms", "**floor / torch.nn**",
                       "infer: GEMM floor ms", "torch.nn ms", "**floor / torch.nn**")
    for cell, config in selected(args):
        floor_train, floor_infer = floor_ms(cell, config, args.rounds)
        torch_train, torch_infer = torch_ms(cell, config, args.rounds)
        print_table_row(cell, f"{config} {CONFIGS[config]}", f"{floor_train:.2f}", f"{torch_train:.2f}",
                        f"**{floor_train / torch_train:.2f}**", f"{floor_infer:.2f}", f"{torch_infer:.2f}",
                        f"**{floor_infer / torch_infer:.2f}**")


if __name__ == "__main__":
    main()
