"""The compiled loops' tuning: the sizes from which each faster path pays, and the switches
that turn one off. Each threshold's measurement is in benchmarks/README.md."""

from __future__ import annotations

import os
import warnings

import torch

#: Buffers of the compiled path from this size up come from its pool (recurrent.cpp,
#: BufferPool): below it glibc's heap already reuses memory without fresh page faults.
POOL_MIN_BYTES = 1 << 20


def pool_max_idle_bytes() -> int:
    """How much freed buffer memory the pool keeps for reuse: ``WHITEBOARD_POOL_MB``
    (default 1024; 0 keeps none). Call the module's ``release_pool()`` to return it early."""
    value = os.environ.get("WHITEBOARD_POOL_MB", "1024")
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = -1.0
    if not megabytes >= 0:  # also NaN
        raise ValueError(f"WHITEBOARD_POOL_MB must be a number of megabytes >= 0, got {value!r}")
    return int(megabytes * (1 << 20))


#: Per-step GEMMs against a weight oneDNN packed once per call (see recurrent.cpp's
#: step_gemm); ``WHITEBOARD_PACKED_GEMM=0`` (or setting this False) uses MKL's plain sgemm.
packed_gemm = os.environ.get("WHITEBOARD_PACKED_GEMM", "1") != "0"
#: Below this many multiply-adds per step the packed call's fixed cost (a oneDNN primitive
#: lookup and a fresh output per step) outweighs its faster kernel (measured: benchmarks/README.md,
#: "Why each threshold is where it is").
packed_gemm_min_macs = 20_000_000


#: Preparing W_hh once per call pays only over enough steps: oneDNN's packing costs about
#: one step's GEMM and gains a little on every step. A contiguous copy of W_hhᵀ is skipped,
#: and the GEMM runs on the transposed view, for at most transpose_max_rows rows (steps x
#: batch) in all: for so few the copy costs more than the slower GEMMs (generation, one
#: token at a time, was the case that needed it). Measured: benchmarks/README.md, "Why each
#: threshold is where it is".
packed_min_steps = 8
transpose_max_rows = 32

#: The compiled LSTM and RNN forwards fold the input into the per-step GEMM ([x_t, h_t]
#: against [W_ih, W_hh], see recurrent.cpp) when input_size <= this x hidden_size, rather
#: than reading a precomputed input projection back from memory. Each step's GEMM grows
#: by I / H, so this pays for small inputs only (char-level models: embedding 64, H 512).
#: GRU cannot fold: its candidate gate multiplies W_hn h, but not W_in x, by r.
fold_input_max_ratio = 0.25


#: The LSTM and GRU forward's per-step GEMM on the compiled loop's own AVX-512 microkernel,
#: the gate math as its epilogue, against W packed into panels of 16 units once per call
#: (see csrc/panels_gemm.h); ``WHITEBOARD_PANEL_GEMM=0`` (or setting this False) goes back to
#: oneDNN's packed or MKL's plain GEMM. Used for float32 on CPUs with AVX-512, for every call
#: but a few rows in all (``transpose_max_rows``): packing pays off from one step.
panel_gemm = os.environ.get("WHITEBOARD_PANEL_GEMM", "1") != "0"
#: The reverse sweep's dZ_t W_hh takes column panels (recurrent.cpp's column_panels) from
#: this batch size on, or where W_hh fits the row-block limit (each thread then runs all
#: panels for its own rows): below it, with a W_hh too large for one core's L2, MKL's sgemm
#: was as fast or faster for all three cells (benchmarks/README.md, "what each change bought").
backward_panels_min_batch = 32


def packed_weight(weight: torch.Tensor, batch: int) -> torch.Tensor | None:
    """``weight`` (N, K) in oneDNN's blocked layout for per-step ``y = x @ weight.T`` with
    ``batch`` rows, or None where that path is off, unavailable (float64 included) or too
    small to pay. Only the forward sweep packs: for the reverse sweep's dZ_t W_hh (long K,
    short N) packing W_hhᵀ, after transposing it, cost more than it gained (20-30 % slower
    at batch 20; even at (c), 1-2 % slower at (d), measured end to end)."""
    global packed_gemm
    if not packed_gemm or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    if batch * weight.shape[0] * weight.shape[1] < packed_gemm_min_macs:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch)
    except (RuntimeError, AttributeError) as exc:  # an older torch, or a CPU oneDNN will not pack for
        packed_gemm = False
        warnings.warn(f"whiteboard: oneDNN weight packing is unavailable ({exc}); using plain GEMMs",
                      RuntimeWarning, stacklevel=2)
        return None
