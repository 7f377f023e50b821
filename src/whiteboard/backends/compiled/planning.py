"""Planning for the compiled time loops: how a call's time axis is cut into chunks, which
per-step GEMM each call runs on (AVX-512 panels, oneDNN's packed weight, MKL against a copy
or a view of W_hh^T), whether the input is folded into the per-step GEMM, and whether a
call without grad runs as one compiled call. The torch loop uses none of it. The
thresholds are in :mod:`.tuning`, their measurements in benchmarks/README.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from whiteboard.backends.compiled import tuning

def empty(shape: tuple[int, ...], like: Tensor, compiled=None) -> Tensor:
    """An uninitialised tensor like ``like``; for the compiled path from its buffer pool
    (csrc/recurrent.cpp, BufferPool), which spares large buffers their page faults on
    every call. A pooled block is reused only after every tensor viewing it has died."""
    if compiled is None:
        return like.new_empty(shape)
    return compiled.pooled_empty(list(shape), like)



#: The compiled path walks the time axis in chunks whose per-step buffers (the input
#: projection forward, dZ backward) stay under this many bytes; one chunk for most sizes.
#: A (T, B, G·H) buffer for all steps would be as large as everything saved for backward,
#: and would lift the peak memory above torch.nn's, which walks the steps one by one; per
#: chunk the GEMMs still see enough rows to run near full speed.
CHUNK_BYTES = 32 << 20
#: The GRU's chunks are smaller: it saves more per step for backward (r, z, n and W_hn h)
#: than the LSTM, and with 32 MB chunks its peak exceeded torch.nn's.
GRU_CHUNK_BYTES = 16 << 20
#: The LSTM's reverse sweep walks larger chunks: each chunk after the first re-reads and
#: rewrites dW_ih and dW_hh in its weight-gradient GEMMs, and its peak stays well under
#: torch.nn's even so.
LSTM_SWEEP_CHUNK_BYTES = 128 << 20
#: Where one step's buffer takes at least LARGE_STEP_BYTES, a chunk holds at least
#: MIN_CHUNK_ROWS rows (steps x batch) where the steps allow, above its byte limit if need
#: be: the GEMMs over a chunk's rows (the input projection, dX, and dW accumulated chunk by
#: chunk) lose speed on fewer. Smaller steps keep the byte limit alone: there, longer chunks
#: left dZ less often in cache for the GEMMs that read it.
LARGE_STEP_BYTES = 1 << 20
MIN_CHUNK_ROWS = 2048


def time_chunks(steps: int, bytes_per_step: int, limit: int | None = None, batch: int | None = None) -> list[tuple[int, int]]:
    """[begin, end) ranges covering 0..steps, each within ``limit`` bytes (CHUNK_BYTES by
    default; at least one step), as even as the count allows: 50 steps of at most 16 are
    13 + 13 + 12 + 12, not 16 + 16 + 16 + 2, whose last weight-gradient GEMMs (K = 2 x
    batch) ran far from the GEMMs' peak. Given the batch, for steps of LARGE_STEP_BYTES or
    more, no more chunks than leave each MIN_CHUNK_ROWS rows: 50 steps of batch 128 are
    then 17 + 17 + 16 however large their steps."""
    largest = max(1, min(steps, (CHUNK_BYTES if limit is None else limit) // max(1, bytes_per_step)))
    count = -(-steps // largest)
    if batch is not None and bytes_per_step >= LARGE_STEP_BYTES:
        count = max(1, min(count, steps * batch // max(1, MIN_CHUNK_ROWS)))
    # The longer chunks first: callers size their reused buffer by the first.
    sizes = [steps // count + (1 if i < steps % count else 0) for i in range(count)]
    bounds = [sum(sizes[:i]) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def projected_chunks(x: Tensor, w_ih: Tensor, compiled, limit: int | None = None):
    """For the compiled forward: yields (XW for steps [begin, end) as (end-begin, B, G·H),
    begin), each chunk computed into one reused pooled buffer just before the loop needs
    it (the bias is added in the loop's gate pass; addmm would copy it into every row)."""
    T, B, I = x.shape
    width = w_ih.shape[0]
    chunks = time_chunks(T, B * width * x.element_size(), limit, B)
    buffer = empty((chunks[0][1] - chunks[0][0], B, width), x, compiled)
    for begin, end in chunks:
        xw = buffer[: end - begin]
        torch.mm(x[begin:end].reshape(-1, I), w_ih.t(), out=xw.view(-1, width))
        yield xw, begin


def sweep_chunks(steps: int, width: int, like: Tensor, compiled,
                  limit: int | None = None) -> tuple[Tensor, list[tuple[int, int]]]:
    """For the compiled backward: a pooled dZ buffer (longest chunk, B, width) and the chunks
    of steps, last first (the sweep runs backwards in time)."""
    chunks = time_chunks(steps, like.shape[1] * width * like.element_size(), limit, like.shape[1])
    return empty((chunks[0][1] - chunks[0][0], like.shape[1], width), like, compiled), chunks[::-1]



def packed_weight(weight: Tensor, batch: int) -> Tensor | None:
    """The weight packed for the compiled loop's per-step forward GEMM, or None (plain sgemm)."""
    return tuning.packed_weight(weight, batch)


def folds_input(x: Tensor, hidden_size: int, compiled) -> bool:
    """Whether the compiled forward runs its per-step GEMM on [x_t, h_t] instead of adding
    a precomputed input projection (see ``fold_input_max_ratio`` in whiteboard.backends.compiled.tuning).
    Not for a few rows in all (``transpose_max_rows``: generation): joining [W_ih, W_hh]
    copies both weights on every call, which one step cannot repay (2 x 512 LSTM with a
    128-wide input, one token: 1,054 us folded, 720 not)."""
    steps, batch, inputs = x.shape
    return (compiled is not None and inputs <= tuning.fold_input_max_ratio * hidden_size
            and steps * batch > tuning.transpose_max_rows)


def one_call(x: Tensor, hidden_size: int, gates: int, mask: Tensor | None, compiled) -> tuple[int, bool] | None:
    """Where a layer's direction without grad runs as one compiled call (recurrent.cpp's
    ``rnn_inference``, ``lstm_inference``, ``gru_inference``; ``gates`` 1, 4 or 3): its
    (steps per input-projection chunk, whether W_hh goes into panels); else None. That is
    a few rows in all (generation: steps x batch at most ``tuning.transpose_max_rows``,
    where W_hh is neither copied nor packed) and every call the panel GEMM takes on a
    projected input (not folded: the GRU never folds), without lengths. One call replaces
    some fifteen ATen calls from Python per layer."""
    if compiled is None or mask is not None:
        return None
    steps, batch, _ = x.shape
    if steps * batch <= tuning.transpose_max_rows:
        return steps, False
    if not panels_pay(x.dtype, steps, batch, compiled) or (gates != 3 and folds_input(x, hidden_size, compiled)):
        return None
    limit = GRU_CHUNK_BYTES if gates == 3 else CHUNK_BYTES
    return time_chunks(steps, batch * gates * hidden_size * x.element_size(), limit, batch)[0][1], True


def step_weights(w_hh: Tensor, batch: int, compiled, steps: int) -> tuple[Tensor, Tensor | None]:
    """What the per-step GEMM h @ W_hhᵀ runs on, prepared once per call: (W_hhᵀ, None), or
    for the compiled loop where oneDNN can pack it (W_hh itself, unused, and W_hh packed).

    W_hhᵀ is a contiguous copy (small GEMMs against a transposed view were up to 1.6x
    slower), except for a few rows in all (generation: one token, batch 1), where copying
    cost more than all the steps (see tuning.transpose_max_rows): on the torch loop too,
    where torch's strided copy made a 650-unit RNN layer at one token 6x slower than
    torch.nn's (820 against 130 us)."""
    packed = packed_weight(w_hh, batch) if compiled is not None and steps >= tuning.packed_min_steps else None
    if packed is not None:
        return w_hh.contiguous(), packed
    if steps * batch <= tuning.transpose_max_rows:
        return w_hh.t(), None
    return (compiled.transposed(w_hh.contiguous()) if compiled is not None else w_hh.t().contiguous()), None


def panels_pay(dtype: torch.dtype, steps: int, batch: int, compiled) -> bool:
    """Whether the compiled loops' own panel GEMMs run (recurrent.cpp's gate_panels and
    column_panels): on (``panel_gemm`` in whiteboard.backends.compiled.tuning), built (AVX-512), float32, and
    more than a few rows in all (a token of generation: packing would cost more)."""
    return (compiled is not None and tuning.panel_gemm and dtype == torch.float32
            and steps * batch > tuning.transpose_max_rows and compiled.has_panels())


def gate_panels(weights: tuple[Tensor, ...], gates: int, batch: int, compiled, steps: int) -> Tensor | None:
    """``weights`` (each (gates·H, K_i)) joined along K and packed into the compiled LSTM
    (4 gates) or GRU (3) forward's gate panels, or None where they do not pay (see
    panels_pay)."""
    if not panels_pay(weights[0].dtype, steps, batch, compiled):
        return None
    return compiled.gate_panels([w.detach() for w in weights], gates)


def backward_panels(w_hh: Tensor, batch: int, compiled, steps: int) -> Tensor | None:
    """W_hh (G·H, H) in the column panels of the compiled reverse sweep's per-step GEMM
    dZ_t W_hh (LSTM, GRU and RNN alike), or None (MKL's sgemm) where they do not pay (see
    panels_pay and ``backward_panels_min_batch`` in whiteboard.backends.compiled.tuning)."""
    if not panels_pay(w_hh.dtype, steps, batch, compiled):
        return None
    fits_row_blocks = w_hh.numel() * w_hh.element_size() <= compiled.row_blocks_max_weight_bytes()
    if batch < tuning.backward_panels_min_batch and not fits_row_blocks:
        return None
    return compiled.column_panels(w_hh.detach())


def rnn_panels(w_hh: Tensor, batch: int, compiled, steps: int) -> Tensor | None:
    """W_hhᵀ ((H, H), or [W_ih, W_hh]ᵀ when the input is folded) in the column panels the
    compiled RNN forward's per-step GEMM runs on (64 units a panel, the activation as the
    epilogue), or None where they do not pay (see panels_pay)."""
    if not panels_pay(w_hh.dtype, steps, batch, compiled):
        return None
    return compiled.column_panels(compiled.transposed(w_hh.detach().contiguous()))


def native_mask(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else mask.squeeze(-1).contiguous()  # (T, B) bool



RNN_KINDS = {"tanh": 0, "relu": 1, "sigmoid": 2}  # recurrent.cpp's Activation
