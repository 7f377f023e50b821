// The time loops of the RNN / LSTM / GRU, compiled: the compiled backend's C++.
//
// One translation unit made of parts, each included below in order: common.h (math,
// threads, helpers), buffers.h (the pool), lstm.h / gru.h / rnn.h (each cell's passes in
// portable C++), panels_gemm.h / panels_cells.h / panels_rnn.h (the AVX-512 panel GEMM and
// its cell epilogues), dispatch.h (the entry points), inference.h (one-call inference).
//
// Python (whiteboard/backends/compiled/loops.py) does everything that is one large operation: the input
// projection for all steps, the weight gradients after the reverse sweep, allocation of
// every buffer. This file does only what must happen once per time step:
//
//   forward:  Z_t = XW_t + h_{t-1} W_hh^T      (at::mm_out: torch's own BLAS)
//             gate math and state update       (one pass over B x H, below)
//             -- or, float32 with AVX-512, both at once: our panel GEMM with the gate
//                math as its epilogue (see "gate panels" below)
//   backward: dZ_t from dh_t, dc_t             (one pass over B x H, below)
//             dh_{t-1} = dZ_t W_hh             (at::mm_out / at::addmm_out, or panels)
//
// Why: from Python each small op costs 5-15 us of dispatch, which dominates at the sizes
// recurrent nets run at; here the loop costs one GEMM plus one pass per step. The ATen
// GEMMs use the BLAS torch was built with; every parallel region here runs on torch's
// threads. The panel GEMM exists because at batch-sized M those BLAS calls reach ~60 % of
// the FMA peak on the AVX-512 machine measured (benchmarks/README.md), ours 80-85 %.
//
// The pointwise passes evaluate sigmoid/tanh with branch-free approximations for float
// (sigmoid from Cephes' expf, ~1 ulp; tanh a rational function, ~2 ulp) so the compiler
// vectorises them; double uses the C library. The file is compiled with -ffinite-math-only
// (without it gcc will not vectorise the clamps), so a NaN or Inf must not pass through
// the gate math: the forward passes test every pre-activation for one (not_finite) and
// report it, and whiteboard/backends/functions.py then reruns the call on the torch loop, which
// propagates NaN/Inf like torch.nn. Buffers are allocated by the caller.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#if defined(__AVX512F__)
#include <immintrin.h>  // only where the register transpose and the panel GEMM are built (not on ARM, say)
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <atomic>
#include <map>
#include <mutex>
#include <set>

namespace {

#include "common.h"
#include "buffers.h"
#include "lstm.h"
#include "panels_gemm.h"
#include "panels_cells.h"
#include "panels_rnn.h"
#include "gru.h"
#include "rnn.h"
#include "dispatch.h"
#include "inference.h"

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "whiteboard's compiled recurrent time loops (see recurrent.cpp)";
  m.def("lstm_forward", &lstm_forward);
  m.def("lstm_backward", &lstm_backward);
  m.def("gru_forward", &gru_forward);
  m.def("gru_backward", &gru_backward);
  m.def("rnn_forward", &rnn_forward);
  m.def("rnn_backward", &rnn_backward);
  m.def("lstm_forward_folded", &lstm_forward_folded);
  m.def("rnn_forward_folded", &rnn_forward_folded);
  m.def("pooled_empty", &pooled_empty);
  m.def("set_pool_limits", &set_pool_limits);
  m.def("pool_idle_bytes", &pool_idle_bytes);
  m.def("release_pool", &release_pool);
  m.def("all_finite", &all_finite);
  m.def("transposed", &transposed);
  m.def("set_parallel_min_elements", &set_parallel_min_elements);
  m.def("parallel_min_elements", &parallel_min_elements);
  m.def("pass_threads", &pass_threads);
  m.def("set_row_blocks_max_weight_bytes", &set_row_blocks_max_weight_bytes);
  m.def("row_blocks_max_weight_bytes", &row_blocks_max_weight_bytes);
  m.def("row_block_count", &row_block_count);
  m.def("rnn_inference", &rnn_inference);
  m.def("lstm_inference", &lstm_inference);
  m.def("gru_inference", &gru_inference);
  m.def("stack_inference", &stack_inference);
  m.def("has_panels", &has_panels);
  m.def("gate_panels", &gate_panels);
  m.def("column_panels", &column_panels);
  m.def("set_column_blocks_min_bytes", &set_column_blocks_min_bytes);
  m.def("column_blocks_min_bytes", &column_blocks_min_bytes);
  m.def("set_column_k_block", &set_column_k_block);
  m.def("column_k_block", &column_k_block);
  m.def("set_spread_lines_min_step_bytes", &set_spread_lines_min_step_bytes);
  m.def("spread_lines_min_step_bytes", &spread_lines_min_step_bytes);
}
