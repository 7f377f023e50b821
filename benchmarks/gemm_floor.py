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

whiteboard's own per-step kernels (recurrent.cpp's panels) beat MKL's small GEMMs, so for
them that is not a floor. The ``peak`` columns are: the same products' FLOPs at the best
rate MKL reaches on any of a few large and in-cache shapes in this process (``--peak``
shows it), the step's whole time at that rate. No float32 kernel here does much better
than that rate (MKL's large GEMMs run at ~93 % of the FMA units' peak), so ``peak floor /
torch.nn`` is about the best ratio reachable at all, with every product and all the
gate math at the machine's best GEMM rate.

    python benchmarks/gemm_floor.py --rounds 5
"""

from __future__ import annotations

import platform
import statistics
import time

import torch

from recurrent_speed import (CELLS, CONFIGS, _infer_step, _train_step, print_table_header, print_table_row,
                             selected, selection_parser, settle_malloc)

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


#: Shapes (m, k, n) the best GEMM rate is taken over: large, and in a core's cache.
PEAK_SHAPES = [(6400, 1024, 1024), (2048, 2048, 2048), (1024, 1024, 1024), (512, 512, 512), (256, 256, 256)]


def peak_gflops(rounds: int) -> float:
    """The best float32 GEMM rate MKL reaches here, GFLOP/s (medians per shape)."""
    best = 0.0
    for m, k, n in PEAK_SHAPES:
        a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
        repeats = max(1, int(2e9 // (2 * m * k * n)))  # ~2 GFLOP a round
        ms = _median_ms(lambda: torch.mm(a, b, out=out), rounds, repeats)
        best = max(best, 2 * m * k * n / ms / 1e6)
    return best


def _layers(cell: str, config: str):
    """Per layer: (its input size I_l, H, G·H, batch, steps)."""
    layers, inp, hidden, batch, steps = CONFIGS[config]
    for layer in range(layers):
        yield (inp if layer == 0 else hidden), hidden, GATES[cell] * hidden, batch, steps


def flops(cell: str, config: str) -> tuple[float, float]:
    """GFLOP of the products above: (training step, inference)."""
    train = infer = 0.0
    for layer_in, hidden, gh, batch, steps in _layers(cell, config):
        rows = steps * batch
        forward = 2 * rows * gh * (layer_in + hidden)
        infer += forward
        train += forward + 2 * rows * gh * (hidden + 2 * layer_in + hidden)  # dh, dX, dW_ih, dW_hh
    return train / 1e9, infer / 1e9


def floor_ms(cell: str, config: str, rounds: int) -> tuple[float, float]:
    train = infer = 0.0
    for layer_in, hidden, gh, batch, steps in _layers(cell, config):
        rows = steps * batch
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
    settle_malloc()
    torch.manual_seed(0)
    peak = peak_gflops(args.rounds)
    print(f"# torch {torch.__version__}, {platform.machine()}, threads {torch.get_num_threads()}, "
          f"medians of {args.rounds} rounds; best GEMM rate (peak) {peak:.0f} GFLOP/s")
    print_table_header("cell", "config", "train: GEMM floor ms", "peak floor ms", "torch.nn ms",
                       "**floor / torch.nn**", "**peak floor / torch.nn**", "infer: GEMM floor ms", "peak floor ms",
                       "torch.nn ms", "**floor / torch.nn**", "**peak floor / torch.nn**")
    for cell, config in selected(args):
        floor_train, floor_infer = floor_ms(cell, config, args.rounds)
        torch_train, torch_infer = torch_ms(cell, config, args.rounds)
        peak_train, peak_infer = (gflop / peak * 1e3 for gflop in flops(cell, config))
        print_table_row(cell, f"{config} {CONFIGS[config]}", f"{floor_train:.2f}", f"{peak_train:.2f}",
                        f"{torch_train:.2f}", f"**{floor_train / torch_train:.2f}**",
                        f"**{peak_train / torch_train:.2f}**", f"{floor_infer:.2f}", f"{peak_infer:.2f}",
                        f"{torch_infer:.2f}", f"**{floor_infer / torch_infer:.2f}**",
                        f"**{peak_infer / torch_infer:.2f}**")


if __name__ == "__main__":
    main()
