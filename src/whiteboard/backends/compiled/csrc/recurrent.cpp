// The time loops of the fused RNN / LSTM / GRU kernels, compiled.
//
// Python (whiteboard/fused.py) does everything that is one large operation: the input
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
// report it, and whiteboard/fused.py then reruns the call on the torch loop, which
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

// ------------------------------------------------------------------ scalar math

inline float exp_approx(float x) {
  // Cephes expf: x = n ln2 + r, exp(r) by a degree-6 polynomial, 2^n built in the exponent.
  x = std::fmin(std::fmax(x, -87.3365447505531f), 88.3762626647949f);
  float t = x * 1.44269504088896341f + 0.5f;
  float fx = static_cast<float>(static_cast<int32_t>(t));  // floor(t), written so it vectorises
  fx -= static_cast<float>(fx > t);
  float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  int32_t n = static_cast<int32_t>(fx);
  int32_t bits = (n + 127) << 23;
  return y * __builtin_bit_cast(float, bits);
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

inline float tanh_approx(float x) {
  // Eigen 3.3's float tanh (ptanh_float; TensorFlow's CPU tanh for years): a [13/6]
  // rational minimax approximation, exact to float precision outside +-7.9 (where it is
  // clamped). Max error 2.6e-7 over [-20, 20] (~2 ulp; torch's own float32 tanh: 3e-8),
  // and it needs no exp: the LSTM forward pass ran 31 % faster than with Cephes' tanhf,
  // which evaluated a polynomial and an exp-based branch for every lane.
  const float clamp = 7.90531110763549805f;
  x = std::fmin(std::fmax(x, -clamp), clamp);
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return x * p / q;
}

inline float tanh_(float x) { return tanh_approx(x); }
inline double tanh_(double x) { return std::tanh(x); }

// Gradients that vanish through many steps (a vanilla RNN on the adding problem, say) sink
// into subnormal floats, which x86 processes about 100x slower, and then every GEMM and
// pass downstream crawls. Values this small carry no information at float precision, so
// the backward passes flush them to zero (per value, so every thread does it, unlike
// the MXCSR flag torch.set_flush_denormal sets for the calling thread only).
template <typename T> inline T tiny();
template <> inline float tiny<float>() { return 1e-30f; }
template <> inline double tiny<double>() { return 1e-300; }
template <typename T>
inline T flush(T x) { return std::fabs(x) < tiny<T>() ? T(0) : x; }

// 1 where x is NaN or +-Inf, tested on the exponent bits (under -ffinite-math-only the
// compiler may fold std::isfinite to true). The forward passes OR this over every
// pre-activation: any NaN or Inf in x, W_ih, W_hh, the biases or h0 reaches one of them
// (0 * Inf and NaN * 0 are NaN), and the clamps in the gate math, compiled for finite
// numbers, would otherwise turn it into a finite value. The forward then reports it, and
// whiteboard/fused.py recomputes the call with the torch loop, which propagates NaN as
// torch.nn does. Checking the inputs up front instead read every weight again on every
// call: at batch 1 and one token (generation) that doubled a GRU's time.
inline int32_t not_finite(float x) {
  return (__builtin_bit_cast(uint32_t, x) & 0x7f800000u) == 0x7f800000u;
}
inline int32_t not_finite(double x) {
  return (__builtin_bit_cast(uint64_t, x) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}

// Rows of the batch are independent: split them over torch's intra-op threads when the
// step has enough work to pay for the hand-off. at::parallel_for is a header template that
// runs its body serially unless this file is compiled with -fopenmp (whiteboard/native.py
// does, linking the libgomp that torch itself loaded, so there is one thread pool); until
// that flag was added every pass ran on one thread. From about 4k elements per pass two
// threads win (LSTM inference at config (a), 20 x 800 elements: 1.22 -> 1.04 x torch.nn).
std::atomic<int64_t> g_parallel_min_elements{4096};

void set_parallel_min_elements(int64_t elements) {
  TORCH_CHECK(elements >= 1, "parallel_min_elements must be >= 1");
  g_parallel_min_elements.store(elements);
}

int64_t parallel_min_elements() { return g_parallel_min_elements.load(); }

// How many threads for_rows hands `rows` rows of `row_elements` each to. For the test that
// the passes really run in parallel: they silently ran on one thread while -fopenmp was
// missing from the build.
template <typename F>
void for_rows(int64_t rows, int64_t row_elements, const F& body);

int64_t pass_threads(int64_t rows, int64_t row_elements) {
  std::mutex mutex;
  std::set<int64_t> threads;
  for_rows(rows, row_elements, [&](int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    threads.insert(at::get_thread_num());
  });
  return static_cast<int64_t>(threads.size());
}

// for_rows over batch rows [first, last) only.
template <typename F>
void for_rows_in(int64_t first, int64_t last, int64_t row_elements, const F& body) {
  const int64_t grain = std::max<int64_t>(1, g_parallel_min_elements.load(std::memory_order_relaxed) /
                                                 std::max<int64_t>(1, row_elements));
  at::parallel_for(first, last, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) body(b);
  });
}

template <typename F>
void for_rows(int64_t rows, int64_t row_elements, const F& body) {
  for_rows_in(0, rows, row_elements, body);
}

// Batch rows never interact, so a whole time loop can run on a block of them. When the
// per-step weight fits a core's L2, each thread runs the loop for its own rows from the
// first step to the last: its GEMM (MKL, single-threaded inside the parallel region) and
// gate pass share that core's cache, and the threads never wait for each other; split per
// step instead, each step's GEMM output crosses between the cores and every step pays two
// fork/joins. With larger weights each thread would stream all of W_hh every step where
// the per-step split streams half, so those keep the per-step split. The forward loops
// and the backward sweeps use it.
// Inference x torch.nn, per-step split -> row blocks, in one process: at 1 x 128/128,
// batch 64, 100 steps: LSTM 1.15 -> 1.06, GRU 0.56 -> 0.51, RNN 0.62 -> 0.45; at config
// (a): LSTM 1.02 -> 0.98, GRU 0.60 -> 0.57, RNN 0.70 -> 0.54. Training with both sweeps in
// blocks, at (a): LSTM 0.70 -> 0.63, GRU 0.46 -> 0.42, RNN 0.59 -> 0.51. Above 1 MB of weight
// (2 x 300 to 1 x 512, up to 4 MB) blocks measured even or worse, hence the default.
std::atomic<int64_t> g_row_blocks_max_weight_bytes{1 << 20};
constexpr int64_t kRowBlockMinRows = 4;  // below this many rows per thread MKL's small-M GEMM loses

void set_row_blocks_max_weight_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "row_blocks_max_weight_bytes must be >= 0");
  g_row_blocks_max_weight_bytes.store(bytes);
}

int64_t row_blocks_max_weight_bytes() { return g_row_blocks_max_weight_bytes.load(); }

// How many blocks of rows over_row_blocks runs a loop of `rows` rows with this per-step
// weight in (1: the per-step split).
int64_t row_block_count(int64_t rows, const at::Tensor& weight, bool packed) {
  const int64_t threads = at::get_num_threads();
  const int64_t weight_bytes = weight.numel() * static_cast<int64_t>(weight.element_size());
  if (packed || threads < 2 || at::in_parallel_region() || rows < 2 * kRowBlockMinRows ||
      weight_bytes > g_row_blocks_max_weight_bytes.load(std::memory_order_relaxed))
    return 1;
  return std::min(threads, rows / kRowBlockMinRows);
}

// Runs loop(first, last) once over all rows, or on each thread over its own block of them.
// (Inside a block, at::parallel_for runs serially and reports thread 0: code that keeps
// per-thread state, like BiasGradSum, must not run in blocks as it stands.)
template <typename F>
void over_row_blocks(int64_t rows, const at::Tensor& weight, bool packed, const F& loop) {
  const int64_t blocks = row_block_count(rows, weight, packed);
  if (blocks == 1) {
    loop(int64_t(0), rows);
    return;
  }
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // The pool's other thread does not inherit the caller's grad mode, and its ATen calls
    // (the GEMMs, on weights that require grad in backward) must not meet autograd.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t p = begin; p < end; ++p) loop(rows * p / blocks, rows * (p + 1) / blocks);
  });
}

// Rows [first, last) of a contiguous (rows, cols) block starting at `data`, as a tensor.
template <typename T>
inline at::Tensor row_block(T* data, int64_t first, int64_t last, int64_t cols, const at::Tensor& like) {
  return at::from_blob(data + first * cols, {last - first, cols}, like.options());
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

// base[t] for a contiguous (T, ...) tensor, as a tensor that does not own its memory. The
// per-step GEMM needs tensors, and base[t] (at::select through the dispatcher) cost 1-2 us
// each, several per step: a measurable share of a step at small sizes.
inline at::Tensor step_view(const at::Tensor& base, int64_t t) {
  const int64_t stride = base.stride(0);
  return at::from_blob(static_cast<char*>(base.data_ptr()) + t * stride * base.element_size(),
                       base.sizes().slice(1), base.options());
}

// Whether a forward's per-step buffer (the LSTM's gates, the GRU's factors) holds every
// step, as it does for backward, or is the one-step scratch of a call without grad. Read
// from the state buffer's length, not from the buffer's own: a one-step sequence's saved
// buffer has one row too, and taking it for scratch left a one-step LSTM's gates unsaved
// (wrong gradients for T = 1).
inline bool holds_every_step(const at::Tensor& buffer, const at::Tensor& hs) {
  return buffer.size(0) == hs.size(0) - 1;
}

template <typename T>
inline T* step_ptr(const at::Tensor& base, int64_t t) {
  return base.data_ptr<T>() + t * base.stride(0);
}

// dh <- dh_new for the rows still inside their sequence; a finished sequence (mask false)
// carries its gradient through the step unchanged.
template <typename T>
void take_alive_rows(at::Tensor& dh, const at::Tensor& dh_new, const bool* alive, int64_t first, int64_t last) {
  const int64_t H = dh.size(1);
  T* out = dh.data_ptr<T>();
  const T* in = dh_new.data_ptr<T>();
  if (alive == nullptr) {
    std::memcpy(out + first * H, in + first * H, (last - first) * H * sizeof(T));
    return;
  }
  for (int64_t b = first; b < last; ++b)
    if (alive[b]) std::memcpy(out + b * H, in + b * H, H * sizeof(T));
}

// The bias as a contiguous vector of n, zeros when there is none: the passes add it to
// every row, so the input projection is a plain GEMM (addmm would first copy the bias
// into all T x B rows: a full extra write of the projection, 3 ms at config (c)).
at::Tensor bias_or_zeros(const c10::optional<at::Tensor>& bias, int64_t n, const at::Tensor& like) {
  if (!bias.has_value()) return at::zeros({n}, like.options());
  TORCH_CHECK(bias->numel() == n && bias->scalar_type() == like.scalar_type(), "bias must have ", n, " elements");
  return bias->contiguous();
}

// The bias gradient, the sum of dZ over all steps and batch rows, accumulated in the
// backward passes while dZ is in registers: as a separate dZ.sum((0, 1)) it re-read all
// of dZ (9 ms at config (d)). Each thread sums into its own row, in double (T x B rows
// of float32 summed in float32 would drift from torch's pairwise sum); rows are added
// up at the end.
class BiasGradSum {
 public:
  explicit BiasGradSum(int64_t width)
      : width_(width), partial_(at::zeros({at::get_num_threads(), width}, at::kDouble)) {}

  double* row() const {  // the calling thread's; valid inside for_rows
    const int64_t thread = at::get_thread_num();
    TORCH_CHECK(thread < partial_.size(0), "bias gradient: more threads than at::get_num_threads()");
    return partial_.data_ptr<double>() + thread * width_;
  }

  void add_into(at::Tensor& out) const {  // out += the sum (the sweep may run in chunks)
    TORCH_CHECK(out.numel() == width_, "bias gradient: expected ", width_, " elements");
    out.add_(partial_.sum(0).view(out.sizes()).to(out.scalar_type()));
  }

 private:
  int64_t width_;
  at::Tensor partial_;
};

const bool* mask_ptr(const c10::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous(), "mask must be a contiguous bool (T, B) tensor");
  return mask->data_ptr<bool>();
}

// The forward's per-step GEMM y = x W^T. With a weight that oneDNN has packed once per call
// (torch.ops.mkldnn._reorder_linear_weight, done in whiteboard/native.py), it goes through
// mkldnn::_linear_pointwise, the blocked-weight GEMM torch's inductor uses on CPU: at
// batch-sized M it beats an MKL sgemm against the plain weight. Otherwise at::mm_out into
// `out`. Either way the returned tensor holds y.
using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   c10::string_view, c10::List<std::optional<at::Scalar>>,
                                   std::optional<c10::string_view>);

// (plain_t may be a transposed view: for a few steps that beats copying W^T first.)
at::Tensor step_gemm(const at::Tensor& x, const at::Tensor& plain_t, const c10::optional<at::Tensor>& packed,
                     at::Tensor& out) {
  if (packed.has_value()) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                               .typed<LinearPointwise>();
    return op.call(x, *packed, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
  }
  at::mm_out(out, x, plain_t);
  return out;
}


// ------------------------------------------------------------------ buffer pool

// The compiled path's large buffers (the input projection, saved gates and states, dZ)
// come from here. glibc serves every allocation above its mmap threshold (at most 32 MB)
// with fresh pages and returns them to the kernel on free, so each call paid ~12.5 ms of
// page faults per 52 MB: 5-10 % of an LSTM step at configs (c) and (d). A freed block
// goes back to this pool only when the last tensor viewing it dies (it is the storage's
// deleter), so reuse is always safe, also for tensors saved for backward; the forward's
// input projection and the backward's dZ then share one block, as torch's own caching
// allocators would do. Idle blocks are capped (set_pool_limits, release_pool).
class BufferPool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    void* data = nullptr;
    size_t capacity = bytes;
    if (bytes >= min_bytes_) {
      std::lock_guard<std::mutex> lock(mutex_);
      // Best fit among idle blocks at most 1/8 larger than asked: repeated calls of one
      // model ask for the same sizes, and a much larger block would be wasted.
      auto it = idle_.lower_bound(bytes);
      if (it != idle_.end() && it->first <= bytes + bytes / 8) {
        capacity = it->first;
        data = it->second;
        idle_bytes_ -= capacity;
        idle_.erase(it);
      }
    }
    if (data == nullptr) data = c10::alloc_cpu(capacity);
    return {data, new Block{data, capacity}, &BufferPool::give_back, c10::Device(c10::kCPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void set_limits(size_t min_bytes, size_t max_idle_bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    min_bytes_ = min_bytes;
    max_idle_bytes_ = max_idle_bytes;
    trim(max_idle_bytes_);
  }

  size_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return idle_bytes_;
  }

  void release() {
    std::lock_guard<std::mutex> lock(mutex_);
    trim(0);
  }

  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();  // never destroyed: tensors may die after exit handlers
    return *pool;
  }

 private:
  struct Block {
    void* data;
    size_t capacity;
  };

  static void give_back(void* context) {
    Block* block = static_cast<Block*>(context);
    instance().keep(block->data, block->capacity);
    delete block;
  }

  void keep(void* data, size_t capacity) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (capacity >= min_bytes_ && idle_bytes_ + capacity <= max_idle_bytes_) {
        idle_.emplace(capacity, data);
        idle_bytes_ += capacity;
        return;
      }
    }
    c10::free_cpu(data);
  }

  void trim(size_t limit) {  // mutex held
    while (idle_bytes_ > limit && !idle_.empty()) {
      auto largest = std::prev(idle_.end());
      idle_bytes_ -= largest->first;
      c10::free_cpu(largest->second);
      idle_.erase(largest);
    }
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> idle_;
  size_t idle_bytes_ = 0;
  size_t min_bytes_ = size_t(1) << 20;
  size_t max_idle_bytes_ = size_t(1) << 30;
};

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::Tensor& like) {
  return at::detail::empty_generic(sizes, &BufferPool::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   like.scalar_type(), std::nullopt);
}

void set_pool_limits(int64_t min_bytes, int64_t max_idle_bytes) {
  TORCH_CHECK(min_bytes >= 0 && max_idle_bytes >= 0, "pool limits must be >= 0");
  BufferPool::instance().set_limits(static_cast<size_t>(min_bytes), static_cast<size_t>(max_idle_bytes));
}

int64_t pool_idle_bytes() { return static_cast<int64_t>(BufferPool::instance().idle_bytes()); }

void release_pool() { BufferPool::instance().release(); }

// W^T as a new contiguous tensor, for the forward's per-step GEMM. torch's strided copy
// (Tensor::contiguous on the transposed view) took 0.1-0.36 ms for an LSTM's 800 x 200
// W_hh, per layer and call: up to 17 % of an inference call at config (a). With AVX-512
// each 16 x 16 tile is transposed in registers (the unpack / shuffle network of Intel's
// optimization manual): 29 us there, 2-3x faster at every size measured.
#if defined(__AVX512F__)
inline void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; ++i) {
    t[2*i]   = _mm512_unpacklo_ps(r[2*i], r[2*i+1]);
    t[2*i+1] = _mm512_unpackhi_ps(r[2*i], r[2*i+1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4*i]   = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4*i]),   _mm512_castps_pd(t[4*i+2])));
    r[4*i+1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4*i]),   _mm512_castps_pd(t[4*i+2])));
    r[4*i+2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4*i+1]), _mm512_castps_pd(t[4*i+3])));
    r[4*i+3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4*i+1]), _mm512_castps_pd(t[4*i+3])));
  }
  for (int i = 0; i < 4; ++i) {
    t[i]    = _mm512_shuffle_f32x4(r[i],    r[4+i],  0x88);
    t[4+i]  = _mm512_shuffle_f32x4(r[i],    r[4+i],  0xdd);
    t[8+i]  = _mm512_shuffle_f32x4(r[8+i],  r[12+i], 0x88);
    t[12+i] = _mm512_shuffle_f32x4(r[8+i],  r[12+i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i]    = _mm512_shuffle_f32x4(t[i],   t[8+i],  0x88);
    r[8+i]  = _mm512_shuffle_f32x4(t[i],   t[8+i],  0xdd);
    r[4+i]  = _mm512_shuffle_f32x4(t[4+i], t[12+i], 0x88);
    r[12+i] = _mm512_shuffle_f32x4(t[4+i], t[12+i], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
}
#endif

at::Tensor transposed(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu(), "transposed: a CPU matrix");
#if defined(__AVX512F__)
  if (w.scalar_type() == at::kFloat && w.is_contiguous()) {
    const int64_t rows = w.size(0), cols = w.size(1);
    at::Tensor out = at::empty({cols, rows}, w.options());
    const float* src = w.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    const int64_t full_rows = rows / 16 * 16, full_cols = cols / 16 * 16;
    at::parallel_for(0, full_rows / 16, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin * 16; r < end * 16; r += 16)
        for (int64_t c = 0; c < full_cols; c += 16) transpose16(src + r * cols + c, cols, dst + c * rows + r, rows);
    });
    // The ragged right and bottom edges, element by element.
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = (r < full_rows ? full_cols : 0); c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
    return out;
  }
#endif
  return w.t().contiguous();
}

// True when no element is NaN or +-Inf. Tested on the exponent bits: this file is built
// with -ffinite-math-only, under which std::isfinite may be folded to true.
template <typename T, typename Bits>
bool all_finite_impl(const at::Tensor& t, Bits exponent) {
  const Bits* bits = reinterpret_cast<const Bits*>(t.data_ptr<T>());
  const int64_t n = t.numel();
  // Captured by value: captured by reference, the pointer and the mask were reloaded through
  // the closure in every iteration, and gcc vectorised the loop with gathers: 10.9 ms for
  // the 26 MB output gradient at config (d), 1 % of a training step; now 0.5 ms, as a sum.
  return at::parallel_reduce(0, n, 1 << 16, true, [bits, exponent](int64_t begin, int64_t end, bool ok) {
    Bits any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t k = begin; k < end; ++k) any |= static_cast<Bits>((bits[k] & exponent) == exponent);
    return ok && any == 0;
  }, [](bool a, bool b) { return a && b; });
}

bool all_finite(const std::vector<at::Tensor>& tensors) {
  for (const at::Tensor& tensor : tensors) {
    const at::Tensor t = tensor.contiguous();
    bool ok = true;
    if (t.scalar_type() == at::kFloat) ok = all_finite_impl<float, uint32_t>(t, 0x7f800000u);
    else if (t.scalar_type() == at::kDouble) ok = all_finite_impl<double, uint64_t>(t, 0x7ff0000000000000ull);
    else ok = at::isfinite(t).all().item<bool>();
    if (!ok) return false;
  }
  return true;
}

// The folded input. With a small input size I, the forward's per-step GEMM runs on
// [x_t, h_t] (B, I + H) against [W_ih, W_hh] instead of adding a precomputed XW_t: that
// (T, B, G·H) projection was written by one GEMM before the loop and then read back from
// DRAM, step by step, inside the gate pass, which it stalled (at config (c), I = 64 and
// H = 512, the pass ran 4x slower than in cache and a second thread did not help), while
// K = I + H makes each step's GEMM only I / H longer. `rows` holds [x_t, h_t]: the pass
// writes h_{t+1} into it beside hs, and x_{t+1} is copied in after each step.
template <typename T>
void copy_rows(T* dst, int64_t dst_stride, const T* src, int64_t src_stride, int64_t rows, int64_t count) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * dst_stride, src + r * src_stride, count * sizeof(T));
}

template <typename T>
at::Tensor folded_rows(const at::Tensor& x, const at::Tensor& h0) {
  const int64_t B = x.size(1), I = x.size(2), H = h0.size(1);
  at::Tensor rows = at::empty({B, I + H}, x.options());
  copy_rows(rows.data_ptr<T>(), I + H, x.data_ptr<T>(), I, B, I);
  copy_rows(rows.data_ptr<T>() + I, I + H, h0.data_ptr<T>(), H, B, H);
  return rows;
}

// ------------------------------------------------------------------ LSTM

// One batch row of the LSTM forward pass: the activations from y (the step's GEMM), xw
// (XW_t, unless kFolded: then it is part of y) and the bias; c and h of the next step.
// Returns nonzero where a pre-activation was NaN or Inf. kSaveGates: store the activations
// for backward; without grad they are not needed, which skips four of six stores per unit.
template <typename T, bool kFolded, bool kSaveGates>
int32_t lstm_cells(const T* y, const T* xw, const T* bias, T* gates, const T* c_prev, T* c_next, T* h_next,
                   int64_t H) {
  int32_t bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t j = 0; j < H; ++j) {
    T zi = y[j] + bias[j], zf = y[H + j] + bias[H + j], zg = y[2 * H + j] + bias[2 * H + j],
      zo = y[3 * H + j] + bias[3 * H + j];
    if constexpr (!kFolded) {
      zi += xw[j];
      zf += xw[H + j];
      zg += xw[2 * H + j];
      zo += xw[3 * H + j];
    }
    bad |= not_finite(zi) | not_finite(zf) | not_finite(zg) | not_finite(zo);
    const T i = sigmoid(zi), f = sigmoid(zf), g = tanh_(zg), o = sigmoid(zo);
    if constexpr (kSaveGates) {
      gates[j] = i;
      gates[H + j] = f;
      gates[2 * H + j] = g;
      gates[3 * H + j] = o;
    }
    const T c = flush(f * c_prev[j] + i * g);
    c_next[j] = c;
    h_next[j] = o * tanh_(c);
  }
  return bad;
}

// What one step t of an LSTM forward reads and writes (s: the step's index in `input`,
// which may start at t_begin): the activations' buffer (that step's, or the one-step
// scratch without grad), XW_t (none when folded), the states, and which rows still run.
template <typename T>
struct LstmStep {
  LstmStep(const at::Tensor& gates, const at::Tensor& input, const at::Tensor& cs, const at::Tensor& hs,
           const bool* mask, int64_t batch, int64_t s, int64_t t, bool keep, bool folded)
      : gates(step_ptr<T>(gates, keep ? t : 0)),
        xw(folded ? nullptr : step_ptr<T>(input, s)),
        c_prev(step_ptr<T>(cs, t)),
        h_prev(step_ptr<T>(hs, t)),
        c_next(step_ptr<T>(cs, t + 1)),
        h_next(step_ptr<T>(hs, t + 1)),
        alive(mask ? mask + t * batch : nullptr) {}
  T* gates;
  const T* xw;
  const T* c_prev;
  const T* h_prev;
  T* c_next;
  T* h_next;
  const bool* alive;
};

// kFolded: `input` is x (T, B, I) and w_t is [W_ih, W_hh]^T (I + H, 4H); otherwise
// `input` is XW (T, B, 4H) and w_t is W_hh^T (H, 4H). (packed: the same weight, packed.)
template <typename T, bool kFolded>
bool lstm_forward_impl(const at::Tensor& input, const c10::optional<at::Tensor>& bias, const at::Tensor& w_t,
                       at::Tensor& hs, at::Tensor& cs, at::Tensor& gates, const c10::optional<at::Tensor>& mask,
                       const c10::optional<at::Tensor>& packed, int64_t t_begin) {
  const int64_t steps = input.size(0), B = input.size(1), H = hs.size(2), I = input.size(2);
  const at::Tensor b_all = bias_or_zeros(bias, 4 * H, input);
  const T* bb = b_all.data_ptr<T>();
  const bool keep = holds_every_step(gates, hs);  // all steps' gates, or one step's scratch
  const bool* m = mask_ptr(mask);
  at::Tensor xh;
  if constexpr (kFolded) xh = folded_rows<T>(input, step_view(hs, 0));
  T* xhp = kFolded ? xh.data_ptr<T>() : nullptr;
  std::atomic<bool> saw_nonfinite{false};
  std::atomic<bool>* nonfinite = &saw_nonfinite;
  over_row_blocks(B, w_t, packed.has_value(), [&](int64_t r0, int64_t r1) {
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = t_begin + s;  // input is indexed by s, the state buffers by t
      const LstmStep<T> step(gates, input, cs, hs, m, B, s, t, keep, kFolded);
      at::Tensor z = row_block(step.gates, r0, r1, 4 * H, gates);  // the activations
      // h W_hh^T, or [x, h] [W_ih, W_hh]^T (written into z itself unless packed); XW_t and
      // the bias are added in the pass below.
      const at::Tensor hw = step_gemm(kFolded ? row_block(xhp, r0, r1, I + H, xh) : row_block(step_ptr<T>(hs, t), r0, r1, H, hs),
                                      w_t, packed, z);
      const T* yp = hw.data_ptr<T>() - r0 * 4 * H;  // indexed by batch row below
      for_rows_in(r0, r1, 4 * H, [=](int64_t b) {
        if (step.alive != nullptr && !step.alive[b]) {  // finished sequence: carry the state (its gates are never used)
          std::memcpy(step.c_next + b * H, step.c_prev + b * H, H * sizeof(T));
          std::memcpy(step.h_next + b * H, step.h_prev + b * H, H * sizeof(T));
          return;
        }
        T* zb = step.gates + b * 4 * H;
        const T* yb = yp + b * 4 * H;
        const T* xb = kFolded ? nullptr : step.xw + b * 4 * H;
        const T* cp = step.c_prev + b * H;
        T* cn = step.c_next + b * H;
        T* hn = step.h_next + b * H;
        const int32_t bad = keep ? lstm_cells<T, kFolded, true>(yb, xb, bb, zb, cp, cn, hn, H)
                                 : lstm_cells<T, kFolded, false>(yb, xb, bb, zb, cp, cn, hn, H);
        if (bad) nonfinite->store(true, std::memory_order_relaxed);
        if constexpr (kFolded) std::memcpy(xhp + b * (I + H) + I, hn, H * sizeof(T));
      });
      if constexpr (kFolded) {
        if (s + 1 < steps) copy_rows(xhp + r0 * (I + H), I + H, step_ptr<T>(input, s + 1) + r0 * I, I, r1 - r0, I);
      }
    }
  });
  return !saw_nonfinite.load();
}

// out rows [r0, r1) (row stride ldo, the first n columns) = a rows [r0, r1) (row stride
// lda) x a (K, n) matrix packed by column_panels; the panel GEMM below.
void column_panel_product(const float* a, int64_t lda, int64_t r0, int64_t r1, const at::Tensor& panels, float* out,
                          int64_t ldo, int64_t n);

// The reverse sweeps' per-step product, rows [r0, r1) of (B, H) out = dZ_t (row stride
// lda) x W_hh (lda x H), on W_hh in column panels where the caller packed them (float32,
// AVX-512): true where it ran, false where the caller runs MKL's sgemm on the plain W_hh.
// (oneDNN's packed weights, which win in the forward over MKL, were no faster for this
// long-K, short-N shape once packing W_hh^T, and transposing it first, is counted: 20-30 %
// slower at batch 20.)
template <typename T>
bool column_panel_step(const T* dz_t, int64_t lda, int64_t r0, int64_t r1, const c10::optional<at::Tensor>& panels,
                       T* out, int64_t H) {
  if constexpr (std::is_same_v<T, float>) {
    if (panels.has_value()) {
      column_panel_product(dz_t, lda, r0, r1, *panels, out, H, H);
      return true;
    }
  }
  return false;
}

template <typename T>
void lstm_backward_impl(const at::Tensor& d_out, const at::Tensor& gates, const at::Tensor& cs, const at::Tensor& w_hh,
                        at::Tensor& dh, at::Tensor& dc, at::Tensor& dz, at::Tensor& db,
                        const c10::optional<at::Tensor>& mask, int64_t t_begin, int64_t t_end,
                        const c10::optional<at::Tensor>& panels) {
  // Steps t_end - 1 down to t_begin; dz holds those steps only (dz[t - t_begin]).
  const int64_t B = gates.size(1), H = dh.size(1);
  const bool* m = mask_ptr(mask);
  const BiasGradSum bias_sum(4 * H);
  const BiasGradSum* sums = &bias_sum;
  at::Tensor dh_prev = at::empty_like(dh);
  // Each thread may run all steps on its own rows (see over_row_blocks). Inside a block
  // at::parallel_for reports thread 0, so a block sums its bias gradient into the row of
  // the thread that runs it, taken here.
  over_row_blocks(B, w_hh, false, [&](int64_t r0, int64_t r1) {
    double* const block_acc = (r1 - r0 < B) ? sums->row() : nullptr;
    for (int64_t t = t_end - 1; t >= t_begin; --t) {
      const T* a = step_ptr<T>(gates, t);
      const T* c = step_ptr<T>(cs, t + 1);
      const T* c_prev = step_ptr<T>(cs, t);
      const T* go = step_ptr<T>(d_out, t);
      T* dhp = dh.data_ptr<T>();
      T* dcp = dc.data_ptr<T>();
      T* dzt = step_ptr<T>(dz, t - t_begin);
      const bool* mt = m ? m + t * B : nullptr;
      for_rows_in(r0, r1, 4 * H, [=](int64_t b) {
        // Per-row pointers and a branch-free blend: written so that gcc vectorises the loop
        // (indexing by b * H + j with a conditional store kept it scalar, 5x slower).
        const T* ab = a + b * 4 * H;
        T* dzb = dzt + b * 4 * H;
        const T* cb = c + b * H;
        const T* cpb = c_prev + b * H;
        const T* gob = go + b * H;
        const T* dhb = dhp + b * H;
        T* dcb = dcp + b * H;
        double* acc = block_acc != nullptr ? block_acc : sums->row();
        const T alive = (mt == nullptr || mt[b]) ? T(1) : T(0);
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const T i = ab[j], f = ab[H + j], g = ab[2 * H + j], o = ab[3 * H + j];
          const T tc = tanh_(cb[j]);
          const T dh_t = (gob[j] + dhb[j]) * alive;
          const T dc_t = dcb[j] * alive + dh_t * o * (T(1) - tc * tc);
          const T d_i = flush(dc_t * g * i * (T(1) - i));
          const T d_f = flush(dc_t * cpb[j] * f * (T(1) - f));
          const T d_g = flush(dc_t * i * (T(1) - g * g));
          const T d_o = flush(dh_t * tc * o * (T(1) - o));
          dzb[j] = d_i;
          dzb[H + j] = d_f;
          dzb[2 * H + j] = d_g;
          dzb[3 * H + j] = d_o;
          acc[j] += d_i;
          acc[H + j] += d_f;
          acc[2 * H + j] += d_g;
          acc[3 * H + j] += d_o;
          // A finished sequence (alive = 0) carries its gradient through unchanged.
          dcb[j] = alive * flush(dc_t * f) + (T(1) - alive) * dcb[j];
        }
      });
      // (B, 4H) x (4H, H)
      if (!column_panel_step<T>(dzt, 4 * H, r0, r1, panels, dh_prev.data_ptr<T>(), H)) {
        at::Tensor dh_prev_rows = row_block(dh_prev.data_ptr<T>(), r0, r1, H, dh_prev);
        at::mm_out(dh_prev_rows, row_block(dzt, r0, r1, 4 * H, dz), w_hh);
      }
      take_alive_rows<T>(dh, dh_prev, mt, r0, r1);
    }
  });
  bias_sum.add_into(db);
}

enum Activation : int64_t { kTanh = 0, kRelu = 1, kSigmoid = 2 };  // the RNN's nonlinearity

// ------------------------------------------------------------------ gate panels

// Where a step's gate pre-activations (B x 4H floats) take at least this many bytes, the
// epilogue's lines are requested a few at a time during the K loop (EpilogueLines), and
// c_{t-1}, c_t and h_t with them; below it, XW_t's and the saved gates' all at once before
// it. At config (d) (2 MB a step) the step's 16 MB weight stream has evicted them all, and
// spreading the requests made the forward loop 6-9 % faster (loop alone, interleaved
// medians: 193 -> 176 ms training); at batch 20 (200-650 units: 16-208 kB) the lines
// are near and the requests in the K loop cost 4-9 %. 512 kB is config (c), which gained 4 %.
std::atomic<int64_t> g_spread_lines_min_step_bytes{512 << 10};
bool spread_lines(int64_t step_bytes) { return step_bytes >= g_spread_lines_min_step_bytes.load(std::memory_order_relaxed); }
void set_spread_lines_min_step_bytes(int64_t bytes) { g_spread_lines_min_step_bytes.store(bytes); }
int64_t spread_lines_min_step_bytes() { return g_spread_lines_min_step_bytes.load(); }

// Where the rows of a reverse sweep's dZ_t W_hh (B x G·H floats) take at least this many
// bytes, its column-panel GEMM walks K in blocks (column_panel_product_blocked). At config
// (d) (2 MB) the LSTM's sweep alone took 186 -> 169 ms (interleaved medians); at (c)
// (512 kB) it was even, at batch 20 with 650 units 13 % slower (its 11 panels split 6 / 5
// over two threads, where (panel, row chunk) items split evenly). The GRU's (d) (1.5 MB)
// is blocked too; 128 kB instead, which blocks the RNN's (d) and both at (c), was within
// noise of this (seventh session).
std::atomic<int64_t> g_column_blocks_min_bytes{1 << 20};
void set_column_blocks_min_bytes(int64_t bytes) { g_column_blocks_min_bytes.store(bytes); }
int64_t column_blocks_min_bytes() { return g_column_blocks_min_bytes.load(std::memory_order_relaxed); }
std::atomic<int64_t> g_column_k_block{512};
void set_column_k_block(int64_t k) {
  TORCH_CHECK(k > 0, "set_column_k_block: a positive block size");
  g_column_k_block.store(k);
}
int64_t column_k_block() { return g_column_k_block.load(std::memory_order_relaxed); }

// The LSTM forward's per-step GEMM, written here for float32 with AVX-512, with the gate
// math as its epilogue. W (4H, K) is packed once per call into panels of 16 units: panel p
// holds, for every k, the 64 weights of units 16p..16p+15 in gate order i|f|g|o, so one
// k of a panel is four zmm registers and a 6-row microkernel keeps 6 x 4 accumulators.
// The accumulators of one row are then the four gates of 16 units: their activations, c
// and h are computed while the panel's output is still in registers and L1, by the thread
// that computed it. Against the same (B, 4H) = (B, K) x (K, 4H) products on two threads,
// medians of interleaved runs on the 2-core AVX-512 Xeon (us per step; MKL sgemm on W^T,
// oneDNN's packed linear): B 20, K 650: 302 / 387 / 426; B 10, K 200: 12 / 20 / 47;
// B 64, K 576, H 512: 479 / 676 / 605; B 128, K 1024: 3275 / 3811 / 3487. The units of
// a step are split over the threads (each streams its own panels of W); where the whole
// packed weight fits a core's L2, each thread instead runs every step for its own rows.
#if defined(__AVX512F__)
constexpr int64_t kPanelUnits = 16;
constexpr int64_t kPanelWidth = 4 * kPanelUnits;  // floats per k of an LSTM (or column) panel
constexpr int kPanelRows = 6;                     // rows per microkernel call: 24 accumulators
// A GRU panel holds 16 units x 3 gates (48 floats per k): 8 rows keep 24 accumulators.
constexpr int64_t kGruPanelWidth = 3 * kPanelUnits;
constexpr int kGruPanelRows = 8;

// Rows per microkernel call for panels of `width` floats per k.
constexpr int panel_rows(int64_t width) { return width == kGruPanelWidth ? kGruPanelRows : kPanelRows; }

bool has_panels() { return true; }

// [W_0, W_1, ...] joined along K (each (G·H, K_i), float32, G = `gates`: 4 for the LSTM,
// 3 for the GRU), packed into (panels, K, 16 G): panel p holds units 16p..16p+15, gate by
// gate. Units past H in the last panel get zero weights.
at::Tensor gate_panels(const std::vector<at::Tensor>& weights, int64_t gates) {
  TORCH_CHECK(!weights.empty(), "gate_panels: no weight");
  TORCH_CHECK(gates == 3 || gates == 4, "gate_panels: 3 (GRU) or 4 (LSTM) gates");
  const int64_t rows = weights[0].size(0), H = rows / gates, width = gates * kPanelUnits;
  int64_t K = 0;
  for (const at::Tensor& w : weights) {
    TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && rows % gates == 0 && w.scalar_type() == at::kFloat &&
                    w.device().is_cpu(), "gate_panels: float32 CPU weights (gates x H, K) with one H");
    K += w.size(1);
  }
  const int64_t panels = (H + kPanelUnits - 1) / kPanelUnits;
  at::Tensor packed = pooled_empty({panels, K, width}, weights[0]);  // (pooled: no page faults per call)
  float* out = packed.data_ptr<float>();
  std::vector<at::Tensor> plain;
  for (const at::Tensor& w : weights) plain.push_back(w.contiguous());
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t units = std::min(kPanelUnits, H - p * kPanelUnits);
      int64_t k_offset = 0;
      for (const at::Tensor& w : plain) {
        const int64_t k_size = w.size(1);
        const float* src = w.data_ptr<float>();
        for (int64_t g = 0; g < gates; ++g) {
          const float* block = src + (g * H + p * kPanelUnits) * k_size;  // row u: unit 16p + u
          float* dst = out + (p * K + k_offset) * width + g * kPanelUnits;
          int64_t k = 0;
          if (units == kPanelUnits)
            for (; k + 16 <= k_size; k += 16) transpose16(block + k, k_size, dst + k * width, width);
          for (; k < k_size; ++k)
            for (int64_t u = 0; u < kPanelUnits; ++u)
              dst[k * width + u] = u < units ? block[u * k_size + k] : 0.0f;
        }
        k_offset += k_size;
      }
    }
  });
  return packed;
}

// The cache lines an item's epilogue will read (XW_t, c_{t-1}) or write (the saved gates,
// c_t, h_t). Spread (see spread_lines): kept, and requested a few at a time while the
// item's K loop runs (panel_product); otherwise requested at once, as they are named.
struct EpilogueLines {
  static constexpr int kMax = 96;
  explicit EpilogueLines(bool spread_them) : spread(spread_them) {}
  const bool spread;
  const char* line[kMax];
  bool written[kMax];
  int count = 0;
  void read(const void* p) {
    if (!spread) return _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
    add(p, false);
  }
  void write(const void* p) {
    if (!spread) return __builtin_prefetch(p, 1);
    add(p, true);
  }

 private:
  void add(const void* p, bool w) {
    if (count < kMax) {
      line[count] = static_cast<const char*>(p);
      written[count++] = w;
    }
  }
};

// y (R, 16 G) = A (R rows, K, row stride lda) x panel (K, 16 G). Meanwhile `lines` cache
// lines per k from `prefetch` on (up to `prefetch_end`) are fetched into L2, and the
// epilogue's lines (`early`, may be null) into L1, spread evenly over the K loop.
template <int R, int G>
inline void panel_product(const float* a, int64_t lda, const float* panel, int64_t K, float* y, const char* prefetch,
                          const char* prefetch_end, int64_t lines,
                          const EpilogueLines* early = nullptr) {
  constexpr int64_t width = 16 * G;
  __m512 acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
  const int early_count = early == nullptr ? 0 : early->count;
  // One request per `every` k. Issued all at once before the FMAs, more misses than the
  // line fill buffers hold stalled the core: those prefetches were 8 % of the forward
  // loop's cycles at config (d).
  int64_t every = 1;  // a power of two, at most K / early_count
  while (early_count > 0 && every * 2 * early_count <= K) every *= 2;
  const int64_t every_mask = every - 1;
  int next = 0;
  for (int64_t k = 0; k < K; ++k) {
    if ((k & every_mask) == 0 && next < early_count) {
      if (early->written[next]) __builtin_prefetch(early->line[next], 1);
      else _mm_prefetch(early->line[next], _MM_HINT_T0);
      ++next;
    }
    for (int64_t l = 0; l < lines && prefetch < prefetch_end; ++l, prefetch += 64) _mm_prefetch(prefetch, _MM_HINT_T1);
    const float* w = panel + k * width;
    __m512 wk[G];
    for (int g = 0; g < G; ++g) wk[g] = _mm512_loadu_ps(w + 16 * g);
    for (int r = 0; r < R; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r * lda + k]);
      for (int g = 0; g < G; ++g) acc[r][g] = _mm512_fmadd_ps(ar, wk[g], acc[r][g]);
    }
  }
  for (; next < early_count; ++next) {
    if (early->written[next]) __builtin_prefetch(early->line[next], 1);
    else _mm_prefetch(early->line[next], _MM_HINT_T0);
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) _mm512_storeu_ps(y + r * width + g * 16, acc[r][g]);
}

// panel_product for `rows` (at most panel_rows(16 G)) rows.
template <int G>
void panel_product_rows(int rows, const float* a, int64_t lda, const float* panel, int64_t K, float* y,
                        const char* prefetch, const char* prefetch_end, int64_t lines,
                        const EpilogueLines* early = nullptr) {
  if constexpr (G == 3) {  // (8 x 3 accumulators; 8 x 4 would not fit the 32 registers)
    if (rows == 8) return panel_product<8, G>(a, lda, panel, K, y, prefetch, prefetch_end, lines, early);
    if (rows == 7) return panel_product<7, G>(a, lda, panel, K, y, prefetch, prefetch_end, lines, early);
  }
  switch (rows) {
    case 6: panel_product<6, G>(a, lda, panel, K, y, prefetch, prefetch_end, lines, early); break;
    case 5: panel_product<5, G>(a, lda, panel, K, y, prefetch, prefetch_end, lines, early); break;
    case 4: panel_product<4, G>(a, lda, panel, K, y, prefetch, prefetch_end, lines, early); break;
    case 3: panel_product<3, G>(a, lda, panel, K, y, prefetch, prefetch_end, lines, early); break;
    case 2: panel_product<2, G>(a, lda, panel, K, y, prefetch, prefetch_end, lines, early); break;
    default: panel_product<1, G>(a, lda, panel, K, y, prefetch, prefetch_end, lines, early); break;
  }
}

// A panel that does not fit L1 comes from L2 for every chunk of rows after the first, but
// for the first from L3 or memory: that chunk waited on the stream, and the others were
// bound by the FMAs. So while the chunks after the first compute (or the only one, for a
// few rows), the next panel is prefetched into L2: at batch 20, 2 x 650 units, a step's
// GEMM took 218 instead of 272 us, 84 % of the FMA peak.
//
// The work of a step is (panel, chunk of up to kPanelRows rows) items, in panel-major
// order, split over the threads in contiguous ranges (split by whole panels, a count that
// does not divide by the threads would leave one thread a panel more: 11 column panels of a
// 650-unit W_hh, 6 against 5). body(p, first_row, rows,
// prefetch, prefetch_end, lines_per_k) computes one item; inside a row block (see
// over_row_blocks) one thread runs all of them.
template <int G, typename F>
void over_panel_chunks(int64_t panel_count, int64_t r0, int64_t r1, const float* panels, int64_t K, const F& body) {
  constexpr int64_t width = 16 * G;
  constexpr int chunk_rows = panel_rows(width);
  const int64_t chunks = (r1 - r0 + chunk_rows - 1) / chunk_rows;
  const int64_t panel_floats = K * width;
  const int64_t lines = panel_floats * static_cast<int64_t>(sizeof(float)) / 64;
  const int64_t fetching_chunks = std::max<int64_t>(1, chunks - 1);
  const int64_t lines_per_k = (lines + fetching_chunks * K - 1) / (fetching_chunks * K);
  const int64_t grain = std::max<int64_t>(
      1, g_parallel_min_elements.load(std::memory_order_relaxed) / (chunk_rows * width));
  at::parallel_for(0, panel_count * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / chunks, c = item % chunks;
      const int64_t b0 = r0 + c * chunk_rows;
      const int rows = static_cast<int>(std::min<int64_t>(chunk_rows, r1 - b0));
      const char* fetch = nullptr;
      const char* fetch_end = nullptr;
      if (p + 1 < panel_count && (c > 0 || chunks == 1)) {
        const char* next = reinterpret_cast<const char*>(panels + (p + 1) * panel_floats);
        fetch_end = next + lines * 64;
        fetch = std::min(fetch_end, next + std::max<int64_t>(0, c - 1) * K * lines_per_k * 64);
      }
      body(p, b0, rows, fetch, fetch_end, lines_per_k);
    }
  });
}

// A panel GEMM's time loop: each thread's block of rows (over_row_blocks), and for each of
// `steps` steps every (panel, row chunk) item of it (over_panel_chunks):
// item(s, p, first_row, rows, prefetch, prefetch_end, lines_per_k); then, once all of a
// step's items are done, after_step(s, r0, r1) for the block's rows [r0, r1).
template <int G, typename F, typename After>
void panel_time_loop(int64_t B, int64_t steps, const at::Tensor& panels, int64_t K, const F& item,
                     const After& after_step) {
  const float* w = panels.data_ptr<float>();
  over_row_blocks(B, panels, false, [&](int64_t r0, int64_t r1) {
    for (int64_t s = 0; s < steps; ++s) {
      over_panel_chunks<G>(panels.size(0), r0, r1, w, K, [&](int64_t p, int64_t b0, int rows, const char* fetch,
                                                            const char* fetch_end, int64_t lines_per_k) {
        item(s, p, b0, rows, fetch, fetch_end, lines_per_k);
      });
      after_step(s, r0, r1);
    }
  });
}

template <int G, typename F>
void panel_time_loop(int64_t B, int64_t steps, const at::Tensor& panels, int64_t K, const F& item) {
  panel_time_loop<G>(B, steps, panels, K, item, [](int64_t, int64_t, int64_t) {});
}

// A (K, N) matrix (row stride N) in panels of 64 columns: (ceil(N / 64), K, 64), zeros past
// N. For the reverse sweeps' dh_{t-1} = dZ_t W_hh, W_hh (G·H, H) packed once per call. Against
// MKL's sgemm on the plain W_hh, in us per step on two threads (medians, interleaved): B 20,
// H 200: 23 / 38; B 20, H 650: 281 / 308; B 64, H 512: 391 / 452; B 128, H 1024: 3305 / 3239.
at::Tensor column_panels(const at::Tensor& matrix) {
  TORCH_CHECK(matrix.dim() == 2 && matrix.scalar_type() == at::kFloat && matrix.device().is_cpu(),
              "column_panels: a float32 CPU matrix");
  const at::Tensor w = matrix.contiguous();
  const int64_t K = w.size(0), N = w.size(1), panels = (N + kPanelWidth - 1) / kPanelWidth;
  at::Tensor packed = pooled_empty({panels, K, kPanelWidth}, w);
  const float* src = w.data_ptr<float>();
  float* out = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = std::min(kPanelWidth, N - p * kPanelWidth);
      for (int64_t k = 0; k < K; ++k) {
        float* dst = out + (p * K + k) * kPanelWidth;
        std::memcpy(dst, src + k * N + p * kPanelWidth, n * sizeof(float));
        std::memset(dst + n, 0, (kPanelWidth - n) * sizeof(float));
      }
    }
  });
  return packed;
}

// y (R, 64) (+)= A (R rows, kc, row stride lda) x a (kc, 64) block of a column panel.
template <int R>
inline void panel_block_product(const float* a, int64_t lda, const float* block, int64_t kc, float* y,
                                bool accumulate) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 4; ++g)
      acc[r][g] = accumulate ? _mm512_load_ps(y + r * kPanelWidth + 16 * g) : _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const float* wk = block + k * kPanelWidth;
    __m512 v[4];
    for (int g = 0; g < 4; ++g) v[g] = _mm512_load_ps(wk + 16 * g);
    for (int r = 0; r < R; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r * lda + k]);
      for (int g = 0; g < 4; ++g) acc[r][g] = _mm512_fmadd_ps(ar, v[g], acc[r][g]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 4; ++g) _mm512_store_ps(y + r * kPanelWidth + 16 * g, acc[r][g]);
}

// column_panel_product where its rows (A) are too large to stay in L2 beside a panel: each
// thread takes whole panels and walks K in blocks of column_k_block() (512; 1024 and 2048
// were as fast at config (d), 256 3 % slower), all its panels per block, so a block of A
// is read from L3 once and then from L2 by every panel, where panel by panel all of A came
// from L3 again for each. The partial sums wait in a per-thread buffer.
void column_panel_product_blocked(const float* a, int64_t lda, int64_t r0, int64_t r1, const at::Tensor& panels,
                                  float* out, int64_t ldo, int64_t n) {
  const int64_t kc = column_k_block();
  const int64_t K = panels.size(1), rows_total = r1 - r0;
  const float* w = panels.data_ptr<float>();
  at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
    const int64_t mine = end - begin;
    float* y = static_cast<float*>(std::aligned_alloc(64, mine * rows_total * kPanelWidth * sizeof(float)));
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t k_size = std::min(kc, K - k0);
      for (int64_t p = begin; p < end; ++p) {
        const float* block = w + (p * K + k0) * kPanelWidth;
        float* yp = y + (p - begin) * rows_total * kPanelWidth;
        for (int64_t b0 = r0; b0 < r1; b0 += kPanelRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kPanelRows, r1 - b0));
          const float* ab = a + b0 * lda + k0;
          float* yb = yp + (b0 - r0) * kPanelWidth;
          const bool acc = k0 > 0;
          switch (rows) {
            case 6: panel_block_product<6>(ab, lda, block, k_size, yb, acc); break;
            case 5: panel_block_product<5>(ab, lda, block, k_size, yb, acc); break;
            case 4: panel_block_product<4>(ab, lda, block, k_size, yb, acc); break;
            case 3: panel_block_product<3>(ab, lda, block, k_size, yb, acc); break;
            case 2: panel_block_product<2>(ab, lda, block, k_size, yb, acc); break;
            default: panel_block_product<1>(ab, lda, block, k_size, yb, acc); break;
          }
        }
      }
    }
    for (int64_t p = begin; p < end; ++p) {
      const int64_t columns = std::min(kPanelWidth, n - p * kPanelWidth);
      const float* yp = y + (p - begin) * rows_total * kPanelWidth;
      for (int64_t r = 0; r < rows_total; ++r)
        std::memcpy(out + (r0 + r) * ldo + p * kPanelWidth, yp + r * kPanelWidth, columns * sizeof(float));
    }
    std::free(y);
  });
}

void column_panel_product(const float* a, int64_t lda, int64_t r0, int64_t r1, const at::Tensor& panels, float* out,
                          int64_t ldo, int64_t n) {
  const int64_t K = panels.size(1);
  TORCH_CHECK(panels.scalar_type() == at::kFloat && panels.dim() == 3 && panels.size(0) == (n + kPanelWidth - 1) / kPanelWidth &&
                  panels.size(2) == kPanelWidth && panels.is_contiguous(),
              "column panels of a (K, ", n, ") float32 matrix expected");
  const float* w = panels.data_ptr<float>();
  if (K > column_k_block() && (r1 - r0) * K * static_cast<int64_t>(sizeof(float)) >= column_blocks_min_bytes())
    return column_panel_product_blocked(a, lda, r0, r1, panels, out, ldo, n);
  over_panel_chunks<4>(panels.size(0), r0, r1, w, K, [&](int64_t p, int64_t b0, int rows, const char* fetch,
                                                         const char* fetch_end, int64_t lines_per_k) {
    alignas(64) float y[kPanelRows * kPanelWidth];
    panel_product_rows<4>(rows, a + b0 * lda, lda, w + p * K * kPanelWidth, K, y, fetch, fetch_end, lines_per_k);
    const int64_t columns = std::min(kPanelWidth, n - p * kPanelWidth);
    for (int r = 0; r < rows; ++r)
      std::memcpy(out + (b0 + r) * ldo + p * kPanelWidth, y + r * kPanelWidth, columns * sizeof(float));
  });
}

// exp_approx, sigmoid and tanh_approx for 16 lanes, written out: the scalar versions
// vectorise only in loops gcc can see whole, and a panel's 16 units (fewer in the last
// panel, where the scalar loop ran lane by lane and cost as much as all the others) are
// one masked vector here. Division becomes a reciprocal estimate and one Newton step
// (~1 ulp more): five divisions per unit were the epilogue's slowest part.
inline __m512 reciprocal16(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3365447505531f)), _mm512_set1_ps(88.3762626647949f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(fx, _mm512_set1_ps(2.12194440e-4f), r);
  const __m512 r2 = _mm512_mul_ps(r, r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, fx);  // y * 2^fx
}

inline __m512 sigmoid16(__m512 x) {
  return reciprocal16(_mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

inline __m512 tanh16(__m512 x) {
  const float clamp = 7.90531110763549805f;
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-clamp)), _mm512_set1_ps(clamp));
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(-2.76076847742355e-16f);
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(2.00018790482477e-13f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-8.60467152213735e-11f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(5.12229709037114e-08f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(1.48572235717979e-05f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(6.37261928875436e-04f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(4.89352455891786e-03f));
  __m512 q = _mm512_set1_ps(1.19825839466702e-06f);
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(1.18534705686654e-04f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(2.26843463243900e-03f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(4.89352518554385e-03f));
  return _mm512_mul_ps(_mm512_mul_ps(x, p), reciprocal16(q));
}

// Lanes of v that hold NaN or +-Inf (exponent bits, as not_finite).
inline __mmask16 not_finite16(__m512 v) {
  const __m512i exponent = _mm512_set1_epi32(0x7f800000);
  return _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), exponent), exponent);
}

// The panel epilogues' walk over a chunk's rows b0 .. b0 + rows - 1, once the panel's
// product is in registers' reach, for the LSTM, GRU and RNN forward alike: carry(b,
// at_unit) for a row whose sequence has finished (alive[b] false), else live(r, b,
// at_unit), which returns nonzero where a pre-activation was NaN or Inf; then after(b,
// at_unit) for every row (the folded loops copy h_t beside x_{t+1} there). at_unit is the
// row's first unit of the panel in a (B, H) state, b * H + u0. Marks `nonfinite` where
// any pre-activation was not finite.
struct NoRowEnd {
  void operator()(int64_t, int64_t) const {}
};

template <typename Carry, typename Live, typename After = NoRowEnd>
inline void epilogue_rows(int rows, int64_t b0, int64_t H, int64_t u0, const bool* alive,
                          std::atomic<bool>& nonfinite, const Carry& carry, const Live& live,
                          const After& after = After()) {
  int32_t bad = 0;
  for (int r = 0; r < rows; ++r) {
    const int64_t b = b0 + r;
    const int64_t at_unit = b * H + u0;
    if (alive != nullptr && !alive[b])
      carry(b, at_unit);
    else
      bad |= live(r, b, at_unit);
    after(b, at_unit);
  }
  if (bad) nonfinite.store(true, std::memory_order_relaxed);
}

// lstm_cells for the units of one panel in one batch row: y holds the panel's GEMM output
// (i|f|g|o, 16 floats each); every other gate block is H apart. Only `lanes` are read and
// written. Returns nonzero where a pre-activation was NaN or Inf.
template <bool kFolded, bool kSaveGates>
inline int32_t lstm_units16(const float* y, const float* xw, const float* bias, float* gates, const float* c_prev,
                            float* c_next, float* h_next, __mmask16 lanes, int64_t H) {
  __m512 z[4];
  __mmask16 bad = 0;
  for (int g = 0; g < 4; ++g) {
    z[g] = _mm512_add_ps(_mm512_loadu_ps(y + g * kPanelUnits), _mm512_maskz_loadu_ps(lanes, bias + g * H));
    if constexpr (!kFolded) z[g] = _mm512_add_ps(z[g], _mm512_maskz_loadu_ps(lanes, xw + g * H));
    bad |= not_finite16(z[g]);
  }
  const __m512 i = sigmoid16(z[0]), f = sigmoid16(z[1]), g = tanh16(z[2]), o = sigmoid16(z[3]);
  if constexpr (kSaveGates) {
    _mm512_mask_storeu_ps(gates, lanes, i);
    _mm512_mask_storeu_ps(gates + H, lanes, f);
    _mm512_mask_storeu_ps(gates + 2 * H, lanes, g);
    _mm512_mask_storeu_ps(gates + 3 * H, lanes, o);
  }
  __m512 c = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(lanes, c_prev), _mm512_mul_ps(i, g));
  // flush(): |c| below tiny<float>() becomes 0
  const __mmask16 tiny_c = _mm512_cmp_ps_mask(_mm512_abs_ps(c), _mm512_set1_ps(tiny<float>()), _CMP_LT_OQ);
  c = _mm512_mask_mov_ps(c, tiny_c, _mm512_setzero_ps());
  _mm512_mask_storeu_ps(c_next, lanes, c);
  _mm512_mask_storeu_ps(h_next, lanes, _mm512_mul_ps(o, tanh16(c)));
  return static_cast<int32_t>(bad & lanes);
}

// lstm_forward_impl with the per-step GEMM on panels (gate_panels of W_hh, or of
// [W_ih, W_hh] when kFolded). The arguments are otherwise lstm_forward_impl's.
template <bool kFolded>
bool lstm_forward_panels(const at::Tensor& input, const c10::optional<at::Tensor>& bias, const at::Tensor& panels,
                         at::Tensor& hs, at::Tensor& cs, at::Tensor& gates, const c10::optional<at::Tensor>& mask,
                         int64_t t_begin) {
  const int64_t steps = input.size(0), B = input.size(1), H = hs.size(2), I = input.size(2);
  const int64_t K = kFolded ? I + H : H, panel_count = panels.size(0);
  TORCH_CHECK(input.scalar_type() == at::kFloat && panels.scalar_type() == at::kFloat && panels.dim() == 3 &&
                  panels.size(0) == (H + kPanelUnits - 1) / kPanelUnits && panels.size(1) == K &&
                  panels.size(2) == kPanelWidth && panels.is_contiguous(),
              "lstm_forward: panels must be gate_panels(.., 4) of the step's float32 weight");
  const at::Tensor b_all = bias_or_zeros(bias, 4 * H, input);
  const float* bb = b_all.data_ptr<float>();
  const float* w = panels.data_ptr<float>();
  const bool keep = holds_every_step(gates, hs);  // save the activations for backward
  const bool* m = mask_ptr(mask);
  // Folded: the step's GEMM reads [x_t, h_t] rows. Other panels of the same step still read
  // h_t while h_{t+1} is written, so two buffers take turns.
  at::Tensor xh;
  float* xh_buffers[2] = {nullptr, nullptr};
  if constexpr (kFolded) {
    xh = at::empty({2, B, I + H}, input.options());
    xh.select(0, 0).copy_(folded_rows<float>(input, step_view(hs, 0)));
    xh_buffers[0] = xh.data_ptr<float>();
    xh_buffers[1] = xh_buffers[0] + B * (I + H);
  }
  std::atomic<bool> saw_nonfinite{false};
  std::atomic<bool>* nonfinite = &saw_nonfinite;
  const bool spread = spread_lines(B * 4 * H * static_cast<int64_t>(sizeof(float)));
  over_row_blocks(B, panels, false, [&](int64_t r0, int64_t r1) {
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = t_begin + s;  // input is indexed by s, the state buffers by t
      const float* a = kFolded ? xh_buffers[s % 2] : step_ptr<float>(hs, t);
      float* xh_next = kFolded ? xh_buffers[(s + 1) % 2] : nullptr;
      const int64_t lda = kFolded ? I + H : H;
      const LstmStep<float> step(gates, input, cs, hs, m, B, s, t, keep, kFolded);
      over_panel_chunks<4>(panel_count, r0, r1, w, K, [&](int64_t p, int64_t b0, int rows, const char* fetch,
                                                         const char* fetch_end, int64_t lines_per_k) {
        alignas(64) float y[kPanelRows * kPanelWidth];
        const int64_t u0 = p * kPanelUnits, n = std::min(kPanelUnits, H - u0);
        const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1);  // the panel's real units
        // The epilogue's lines: XW_t (written by the input projection long before), the
        // saved activations' fresh lines, and c_{t-1}, c_t, h_t. Requested now, they arrive
        // while the chunk's FMAs run instead of stalling its epilogue (see spread_lines).
        EpilogueLines early(spread);
        for (int64_t b = b0; b < b0 + rows; ++b) {
          for (int64_t g = 0; g < 4; ++g) {
            if constexpr (!kFolded) early.read(step.xw + b * 4 * H + g * H + u0);
            if (keep) early.write(step.gates + b * 4 * H + g * H + u0);
          }
          if (spread) {  // (requested up front, the state lines gained nothing)
            early.read(step.c_prev + b * H + u0);
            early.write(step.c_next + b * H + u0);
            early.write(step.h_next + b * H + u0);
          }
        }
        panel_product_rows<4>(rows, a + b0 * lda, lda, w + p * K * kPanelWidth, K, y, fetch, fetch_end, lines_per_k,
                              &early);
        epilogue_rows(
            rows, b0, H, u0, step.alive, *nonfinite,
            [&](int64_t, int64_t at_unit) {  // finished sequence: carry the state (its gates are never used)
              std::memcpy(step.c_next + at_unit, step.c_prev + at_unit, n * sizeof(float));
              std::memcpy(step.h_next + at_unit, step.h_prev + at_unit, n * sizeof(float));
            },
            [&](int r, int64_t b, int64_t at_unit) {
              const float* yb = y + r * kPanelWidth;
              const float* xb = kFolded ? nullptr : step.xw + b * 4 * H + u0;
              float* zb = step.gates + b * 4 * H + u0;
              const float* cp = step.c_prev + at_unit;
              float* cn = step.c_next + at_unit;
              float* hn = step.h_next + at_unit;
              const float* bu = bb + u0;
              return keep ? lstm_units16<kFolded, true>(yb, xb, bu, zb, cp, cn, hn, lanes, H)
                          : lstm_units16<kFolded, false>(yb, xb, bu, zb, cp, cn, hn, lanes, H);
            },
            [&](int64_t b, int64_t at_unit) {
              if constexpr (kFolded) std::memcpy(xh_next + b * (I + H) + I + u0, step.h_next + at_unit, n * sizeof(float));
            });
      });
      if constexpr (kFolded) {
        if (s + 1 < steps) copy_rows(xh_next + r0 * (I + H), I + H, step_ptr<float>(input, s + 1) + r0 * I, I, r1 - r0, I);
      }
    }
  });
  return !saw_nonfinite.load();
}
// gru_forward_impl's gate math for the units of one panel in one batch row: y holds the
// panel's h W_hh^T (r|z|n, 16 floats each); xw, the biases and the saved factors are
// H apart per gate (rz: r|z, 2H). Only `lanes` are read and written. Returns nonzero
// where a pre-activation was NaN or Inf.
inline int32_t gru_units16(const float* y, const float* xw, const float* bx, const float* bh, const float* h_prev,
                           float* h_next, float* rz, float* n_out, float* hn_out, __mmask16 lanes, int64_t H) {
  auto in = [lanes](const float* p) { return _mm512_maskz_loadu_ps(lanes, p); };
  const __m512 zr = _mm512_add_ps(_mm512_add_ps(in(xw), in(bx)), _mm512_add_ps(_mm512_loadu_ps(y), in(bh)));
  const __m512 zz = _mm512_add_ps(_mm512_add_ps(in(xw + H), in(bx + H)),
                                  _mm512_add_ps(_mm512_loadu_ps(y + kPanelUnits), in(bh + H)));
  const __m512 r = sigmoid16(zr), z = sigmoid16(zz);
  const __m512 hn = _mm512_add_ps(_mm512_loadu_ps(y + 2 * kPanelUnits), in(bh + 2 * H));
  const __m512 zn = _mm512_fmadd_ps(r, hn, _mm512_add_ps(in(xw + 2 * H), in(bx + 2 * H)));  // not finite whenever hn is not
  const __mmask16 bad = not_finite16(zr) | not_finite16(zz) | not_finite16(zn);
  const __m512 cand = tanh16(zn);
  _mm512_mask_storeu_ps(rz, lanes, r);
  _mm512_mask_storeu_ps(rz + H, lanes, z);
  _mm512_mask_storeu_ps(n_out, lanes, cand);
  _mm512_mask_storeu_ps(hn_out, lanes, hn);
  _mm512_mask_storeu_ps(h_next, lanes, _mm512_fmadd_ps(z, _mm512_sub_ps(in(h_prev), cand), cand));  // n + z (h - n)
  return static_cast<int32_t>(bad & lanes);
}

// gru_forward_impl with the per-step GEMM h W_hh^T on gate_panels(W_hh, 3) and the gate
// math as its epilogue; the arguments are otherwise gru_forward_impl's.
bool gru_forward_panels(const at::Tensor& xw, const c10::optional<at::Tensor>& b_ih, const at::Tensor& panels,
                        const c10::optional<at::Tensor>& b_hh, at::Tensor& hs, at::Tensor& rz, at::Tensor& n,
                        at::Tensor& hn, const c10::optional<at::Tensor>& mask, int64_t t_begin) {
  const int64_t steps = xw.size(0), B = xw.size(1), H = hs.size(2);
  TORCH_CHECK(xw.scalar_type() == at::kFloat && panels.scalar_type() == at::kFloat && panels.dim() == 3 &&
                  panels.size(0) == (H + kPanelUnits - 1) / kPanelUnits && panels.size(1) == H &&
                  panels.size(2) == kGruPanelWidth && panels.is_contiguous(),
              "gru_forward: panels must be gate_panels(W_hh, 3) of a float32 W_hh");
  const bool keep = holds_every_step(n, hs);  // all steps' factors, or one step's scratch
  const bool* m = mask_ptr(mask);
  const at::Tensor bias_x = bias_or_zeros(b_ih, 3 * H, xw), bias_h = bias_or_zeros(b_hh, 3 * H, xw);
  const float* bx = bias_x.data_ptr<float>();
  const float* bh = bias_h.data_ptr<float>();
  const float* w = panels.data_ptr<float>();
  // Base pointers, taken once: each item below finds its step's rows from them.
  const float* xw_data = xw.data_ptr<float>();
  float* hs_data = hs.data_ptr<float>();
  float* rz_data = rz.data_ptr<float>();
  float* n_data = n.data_ptr<float>();
  float* hn_data = hn.data_ptr<float>();
  std::atomic<bool> saw_nonfinite{false};
  // Spread requests (see spread_lines) for training only: without grad the factors go to a
  // one-step scratch that stays in cache (GRU (d) inference measured 0.850 against 0.872 of
  // torch.nn's with the requests spread, within noise but no gain).
  const bool spread = keep && spread_lines(B * 3 * H * static_cast<int64_t>(sizeof(float)));
  panel_time_loop<3>(B, steps, panels, H, [&](int64_t s, int64_t p, int64_t b0, int rows, const char* fetch,
                                              const char* fetch_end, int64_t lines_per_k) {
    const int64_t t = t_begin + s;  // xw is indexed by s, the state buffers by t
    const int64_t saved = keep ? t : 0;
    const float* x = xw_data + s * B * 3 * H;
    const float* h_prev = hs_data + t * B * H;
    float* h_next = hs_data + (t + 1) * B * H;
    float* rzp = rz_data + saved * B * 2 * H;
    float* np = n_data + saved * B * H;
    float* hnp = hn_data + saved * B * H;
    const bool* alive = m ? m + t * B : nullptr;
    alignas(64) float y[kGruPanelRows * kGruPanelWidth];
    const int64_t u0 = p * kPanelUnits, units = std::min(kPanelUnits, H - u0);
    const __mmask16 lanes = static_cast<__mmask16>((1u << units) - 1);  // the panel's real units
    EpilogueLines early(spread);  // XW_t and the saved factors' lines (see lstm_forward_panels)
    for (int64_t b = b0; b < b0 + rows; ++b) {
      for (int64_t g = 0; g < 3; ++g) early.read(x + b * 3 * H + g * H + u0);
      if (keep) {
        early.write(rzp + b * 2 * H + u0);
        early.write(rzp + b * 2 * H + H + u0);
        early.write(np + b * H + u0);
        early.write(hnp + b * H + u0);
      }
      if (spread) {  // the states' lines, as the LSTM's
        early.read(h_prev + b * H + u0);
        early.write(h_next + b * H + u0);
      }
    }
    panel_product_rows<3>(rows, h_prev + b0 * H, H, w + p * H * kGruPanelWidth, H, y, fetch, fetch_end, lines_per_k,
                          &early);
    epilogue_rows(
        rows, b0, H, u0, alive, saw_nonfinite,
        [&](int64_t b, int64_t at_unit) {  // finished sequence: carry the state; zero the saved
          std::memcpy(h_next + at_unit, h_prev + at_unit, units * sizeof(float));  // factors, which its
          std::memset(rzp + b * 2 * H + u0, 0, units * sizeof(float));             // zero gradient
          std::memset(rzp + b * 2 * H + H + u0, 0, units * sizeof(float));         // multiplies
          std::memset(np + at_unit, 0, units * sizeof(float));
          std::memset(hnp + at_unit, 0, units * sizeof(float));
        },
        [&](int r, int64_t b, int64_t at_unit) {
          return gru_units16(y + r * kGruPanelWidth, x + b * 3 * H + u0, bx + u0, bh + u0, h_prev + at_unit,
                             h_next + at_unit, rzp + b * 2 * H + u0, np + at_unit, hnp + at_unit, lanes, H);
        });
  });
  return !saw_nonfinite.load();
}
// The RNN's activation of the 64 units of one column panel in one batch row: h = phi(y +
// XW_t + b) (no XW_t when folded: xw null), the first `units` of them written. Returns
// nonzero where a pre-activation was NaN or Inf.
inline int32_t rnn_units64(const float* y, const float* xw, const float* bias, float* h_next, int64_t units,
                           int64_t kind) {
  __mmask16 bad = 0;
  for (int64_t g = 0; g < 4; ++g) {
    const int64_t left = units - 16 * g;
    if (left <= 0) break;
    const __mmask16 lanes = left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    const __m512 xw_g = xw != nullptr ? _mm512_maskz_loadu_ps(lanes, xw + 16 * g) : _mm512_setzero_ps();
    const __m512 v = _mm512_add_ps(_mm512_loadu_ps(y + 16 * g),
                                   _mm512_add_ps(xw_g, _mm512_maskz_loadu_ps(lanes, bias + 16 * g)));
    bad |= not_finite16(v) & lanes;
    const __m512 h = kind == kTanh ? tanh16(v) : (kind == kRelu ? _mm512_max_ps(v, _mm512_setzero_ps()) : sigmoid16(v));
    _mm512_mask_storeu_ps(h_next + 16 * g, lanes, h);
  }
  return static_cast<int32_t>(bad);
}

// rnn_forward_impl with the per-step GEMM on column panels: of W_hh^T, or when kFolded of
// [W_ih, W_hh]^T with `input` x and [x_t, h_t] rows (two buffers taking turns, as in
// lstm_forward_panels); the activation is the epilogue. The arguments are otherwise
// rnn_forward_impl's.
template <bool kFolded>
bool rnn_forward_panels(const at::Tensor& input, const c10::optional<at::Tensor>& bias, const at::Tensor& panels,
                        at::Tensor& hs, int64_t kind, const c10::optional<at::Tensor>& mask, int64_t t_begin) {
  const int64_t steps = input.size(0), B = input.size(1), H = hs.size(2), I = input.size(2);
  const int64_t K = kFolded ? I + H : H;
  TORCH_CHECK(input.scalar_type() == at::kFloat && panels.scalar_type() == at::kFloat && panels.dim() == 3 &&
                  panels.size(0) == (H + kPanelWidth - 1) / kPanelWidth && panels.size(1) == K &&
                  panels.size(2) == kPanelWidth && panels.is_contiguous(),
              "rnn_forward: panels must be column_panels of the step's float32 weight, transposed");
  const at::Tensor b_all = bias_or_zeros(bias, H, input);
  const float* bb = b_all.data_ptr<float>();
  const bool* m = mask_ptr(mask);
  const float* w = panels.data_ptr<float>();
  const float* in_data = input.data_ptr<float>();  // (each item finds its step's rows from these)
  float* hs_data = hs.data_ptr<float>();
  at::Tensor xh;
  float* xh_buffers[2] = {nullptr, nullptr};
  if constexpr (kFolded) {
    xh = at::empty({2, B, I + H}, input.options());
    xh.select(0, 0).copy_(folded_rows<float>(input, step_view(hs, t_begin)));
    xh_buffers[0] = xh.data_ptr<float>();
    xh_buffers[1] = xh_buffers[0] + B * (I + H);
  }
  std::atomic<bool> saw_nonfinite{false};
  panel_time_loop<4>(B, steps, panels, K, [&](int64_t s, int64_t p, int64_t b0, int rows, const char* fetch,
                                              const char* fetch_end, int64_t lines_per_k) {
    const int64_t t = t_begin + s;  // input is indexed by s, the state buffer by t
    const float* x = kFolded ? nullptr : in_data + s * B * H;
    const float* h_prev = hs_data + t * B * H;
    float* h_next = hs_data + (t + 1) * B * H;
    const float* a = kFolded ? xh_buffers[s % 2] : h_prev;
    float* xh_next = kFolded ? xh_buffers[(s + 1) % 2] : nullptr;
    const bool* alive = m ? m + t * B : nullptr;
    alignas(64) float y[kPanelRows * kPanelWidth];
    const int64_t u0 = p * kPanelWidth, units = std::min(kPanelWidth, H - u0);
    if constexpr (!kFolded)
      for (int64_t b = b0; b < b0 + rows; ++b)  // XW_t sits in L3 (see lstm_forward_panels)
        for (int64_t g = 0; g < 4; ++g) _mm_prefetch(reinterpret_cast<const char*>(x + b * H + u0 + 16 * g), _MM_HINT_T0);
    panel_product_rows<4>(rows, a + b0 * K, K, w + p * K * kPanelWidth, K, y, fetch, fetch_end, lines_per_k);
    epilogue_rows(
        rows, b0, H, u0, alive, saw_nonfinite,
        [&](int64_t, int64_t at_unit) {  // finished sequence: carry the state
          std::memcpy(h_next + at_unit, h_prev + at_unit, units * sizeof(float));
        },
        [&](int r, int64_t, int64_t at_unit) {
          return rnn_units64(y + r * kPanelWidth, kFolded ? nullptr : x + at_unit, bb + u0, h_next + at_unit, units, kind);
        },
        [&](int64_t b, int64_t at_unit) {
          if constexpr (kFolded) std::memcpy(xh_next + b * (I + H) + I + u0, h_next + at_unit, units * sizeof(float));
        });
  }, [&](int64_t s, int64_t r0, int64_t r1) {
    if constexpr (kFolded) {  // x_{s+1} beside h_{s+1} in the buffer the next step reads
      if (s + 1 < steps)
        copy_rows(xh_buffers[(s + 1) % 2] + r0 * (I + H), I + H, in_data + (s + 1) * B * I + r0 * I, I, r1 - r0, I);
    }
  });
  return !saw_nonfinite.load();
}
#else
bool has_panels() { return false; }
at::Tensor gate_panels(const std::vector<at::Tensor>&, int64_t) { TORCH_CHECK(false, "gate_panels: built without AVX-512"); }
bool gru_forward_panels(const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
                        const c10::optional<at::Tensor>&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                        const c10::optional<at::Tensor>&, int64_t) {
  return false;
}
template <bool kFolded>
bool rnn_forward_panels(const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&, at::Tensor&, int64_t,
                        const c10::optional<at::Tensor>&, int64_t) {
  return false;
}
at::Tensor column_panels(const at::Tensor&) { TORCH_CHECK(false, "column_panels: built without AVX-512"); }
void column_panel_product(const float*, int64_t, int64_t, int64_t, const at::Tensor&, float*, int64_t, int64_t) {
  TORCH_CHECK(false, "column panels: built without AVX-512");
}
#endif

// ------------------------------------------------------------------ GRU

template <typename T>
bool gru_forward_impl(const at::Tensor& xw, const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh_t,
                      const c10::optional<at::Tensor>& b_hh,
                      at::Tensor& hs, at::Tensor& rz, at::Tensor& n, at::Tensor& hn,
                      const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& packed,
                      int64_t t_begin) {
  const int64_t steps = xw.size(0), B = xw.size(1), H = hs.size(2);
  const bool keep = holds_every_step(n, hs);  // all steps' factors, or one step's scratch
  const bool* m = mask_ptr(mask);
  at::Tensor hw = at::empty({B, 3 * H}, xw.options());
  const at::Tensor bias_x = bias_or_zeros(b_ih, 3 * H, xw), bias_h = bias_or_zeros(b_hh, 3 * H, xw);
  const T* bx = bias_x.data_ptr<T>();
  const T* bh = bias_h.data_ptr<T>();
  std::atomic<bool> saw_nonfinite{false};
  std::atomic<bool>* nonfinite = &saw_nonfinite;
  // Each thread may run all steps on its own rows (see over_row_blocks).
  over_row_blocks(B, w_hh_t, packed.has_value(), [&](int64_t r0, int64_t r1) {
    for (int64_t step = 0; step < steps; ++step) {
      const int64_t t = t_begin + step;  // xw is indexed by step, the state buffers by t
      // The biases are added in the pass below: no extra copy.
      at::Tensor hw_rows = row_block(hw.data_ptr<T>(), r0, r1, 3 * H, hw);
      const at::Tensor y = step_gemm(row_block(step_ptr<T>(hs, t), r0, r1, H, hs), w_hh_t, packed, hw_rows);
      const int64_t s = keep ? t : 0;
      const T* x = step_ptr<T>(xw, step);
      const T* hwp = y.data_ptr<T>() - r0 * 3 * H;  // indexed by batch row below
      const T* h_prev = step_ptr<T>(hs, t);
      T* h_next = step_ptr<T>(hs, t + 1);
      T* rzp = step_ptr<T>(rz, s);
      T* np = step_ptr<T>(n, s);
      T* hnp = step_ptr<T>(hn, s);
      const bool* mt = m ? m + t * B : nullptr;
      for_rows_in(r0, r1, 3 * H, [=](int64_t b) {
        if (mt != nullptr && !mt[b]) {  // finished sequence: carry the state; zero the saved
          std::memcpy(h_next + b * H, h_prev + b * H, H * sizeof(T));  // factors, which its
          std::memset(rzp + b * 2 * H, 0, 2 * H * sizeof(T));           // zero gradient
          std::memset(np + b * H, 0, H * sizeof(T));                     // multiplies
          std::memset(hnp + b * H, 0, H * sizeof(T));
          return;
        }
        const T* xb = x + b * 3 * H;
        const T* hb = hwp + b * 3 * H;
        const T* hp = h_prev + b * H;
        T* rb = rzp + b * 2 * H;
        T* nb = np + b * H;
        T* hnb = hnp + b * H;
        T* out = h_next + b * H;
        int32_t bad = 0;
#pragma omp simd reduction(| : bad)
        for (int64_t j = 0; j < H; ++j) {
          const T zr = xb[j] + bx[j] + hb[j] + bh[j], zz = xb[H + j] + bx[H + j] + hb[H + j] + bh[H + j];
          T r = sigmoid(zr);
          T z = sigmoid(zz);
          T hn_j = hb[2 * H + j] + bh[2 * H + j];
          const T zn = xb[2 * H + j] + bx[2 * H + j] + r * hn_j;  // not finite whenever hn_j is not (r > 0)
          bad |= not_finite(zr) | not_finite(zz) | not_finite(zn);
          T cand = tanh_(zn);
          rb[j] = r;
          rb[H + j] = z;
          nb[j] = cand;
          hnb[j] = hn_j;
          out[j] = cand + z * (hp[j] - cand);
        }
        if (bad) nonfinite->store(true, std::memory_order_relaxed);
      });
    }
  });
  return !saw_nonfinite.load();
}

template <typename T>
void gru_backward_impl(const at::Tensor& d_out, const at::Tensor& hs, const at::Tensor& rz, const at::Tensor& n,
                       const at::Tensor& hn, const at::Tensor& w_hh, at::Tensor& dh, at::Tensor& dz_x,
                       at::Tensor& dn_h, at::Tensor& db, const c10::optional<at::Tensor>& mask,
                       int64_t t_begin, int64_t t_end, const c10::optional<at::Tensor>& panels) {
  // The gradient of the hidden projection W_hh h + b_hh equals dz_x in its r and z blocks
  // and differs only in the n block (d_n * r): that block alone is kept for all steps
  // (dn_h, T x B x H), the full (B, 3H) row lives in a one-step scratch for the GEMM.
  // Steps t_end - 1 down to t_begin; dz_x and dn_h hold those steps only ([t - t_begin]).
  // db (4H) receives the bias gradients [b_ir, b_iz, b_in | b_hn]; b_hr, b_hz equal b_ir, b_iz.
  const int64_t B = n.size(1), H = n.size(2);
  const bool* m = mask_ptr(mask);
  const BiasGradSum bias_sum(4 * H);
  const BiasGradSum* sums = &bias_sum;
  at::Tensor direct = at::empty_like(dh);
  at::Tensor dh_prev = at::empty_like(dh);
  at::Tensor dz_h = at::empty({B, 3 * H}, dh.options());
  // Each thread may run all steps on its own rows (see over_row_blocks). Inside a block
  // at::parallel_for reports thread 0, so a block sums its bias gradient into the row of
  // the thread that runs it, taken here.
  over_row_blocks(B, w_hh, false, [&](int64_t r0, int64_t r1) {
    double* const block_acc = (r1 - r0 < B) ? sums->row() : nullptr;
    for (int64_t t = t_end - 1; t >= t_begin; --t) {
      const T* rzp = step_ptr<T>(rz, t);
      const T* np = step_ptr<T>(n, t);
      const T* hnp = step_ptr<T>(hn, t);
      const T* h_prev = step_ptr<T>(hs, t);
      const T* go = step_ptr<T>(d_out, t);
      T* dhp = dh.data_ptr<T>();
      T* dir = direct.data_ptr<T>();
      T* dx = step_ptr<T>(dz_x, t - t_begin);
      T* dhh = dz_h.data_ptr<T>();
      T* dnh = step_ptr<T>(dn_h, t - t_begin);
      const bool* mt = m ? m + t * B : nullptr;
      for_rows_in(r0, r1, 3 * H, [=](int64_t b) {
        const T alive = (mt == nullptr || mt[b]) ? T(1) : T(0);
        double* acc = block_acc != nullptr ? block_acc : sums->row();
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const int64_t k = b * H + j;
          T r = rzp[b * 2 * H + j], z = rzp[b * 2 * H + H + j], cand = np[k];
          T dh_t = (go[k] + dhp[k]) * alive;
          T d_n = dh_t * (T(1) - z) * (T(1) - cand * cand);
          T d_z = dh_t * (h_prev[k] - cand) * z * (T(1) - z);
          T d_r = d_n * hnp[k] * r * (T(1) - r);
          d_r = flush(d_r);
          d_z = flush(d_z);
          d_n = flush(d_n);
          dx[b * 3 * H + j] = d_r;
          dx[b * 3 * H + H + j] = d_z;
          dx[b * 3 * H + 2 * H + j] = d_n;
          dhh[b * 3 * H + j] = d_r;
          dhh[b * 3 * H + H + j] = d_z;
          const T d_hn = flush(d_n * r);
          dhh[b * 3 * H + 2 * H + j] = dnh[k] = d_hn;
          dir[k] = flush(dh_t * z);
          acc[j] += d_r;
          acc[H + j] += d_z;
          acc[2 * H + j] += d_n;
          acc[3 * H + j] += d_hn;
        }
      });
      // dh_{t-1} = dh_t z + dZ_h W_hh, (B, 3H) x (3H, H)
      if (column_panel_step<T>(dhh, 3 * H, r0, r1, panels, dh_prev.data_ptr<T>(), H)) {
        T* const dh_out = dhp;
        const T* const product = dh_prev.data_ptr<T>();
        for_rows_in(r0, r1, H, [=](int64_t b) {
          if (mt != nullptr && !mt[b]) return;  // a finished sequence carries its gradient
#pragma omp simd
          for (int64_t j = 0; j < H; ++j) dh_out[b * H + j] = product[b * H + j] + dir[b * H + j];
        });
      } else {
        at::Tensor dh_prev_rows = row_block(dh_prev.data_ptr<T>(), r0, r1, H, dh_prev);
        at::addmm_out(dh_prev_rows, row_block(dir, r0, r1, H, direct), row_block(dhh, r0, r1, 3 * H, dz_h), w_hh);
        take_alive_rows<T>(dh, dh_prev, mt, r0, r1);
      }
    }
  });
  bias_sum.add_into(db);
}

// ------------------------------------------------------------------ RNN

template <typename T>
inline T derivative_from_output(T h, int64_t kind) {
  return kind == kTanh ? T(1) - h * h : (kind == kRelu ? (h <= T(0) ? T(0) : T(1)) : h * (T(1) - h));
}

// kFolded and the arguments as for lstm_forward_impl.
template <typename T, bool kFolded>
bool rnn_forward_impl(const at::Tensor& input, const c10::optional<at::Tensor>& bias, const at::Tensor& w_t,
                      at::Tensor& hs, int64_t kind, const c10::optional<at::Tensor>& mask,
                      const c10::optional<at::Tensor>& packed, int64_t t_begin) {
  const int64_t steps = input.size(0), B = input.size(1), H = hs.size(2), I = input.size(2);
  const at::Tensor b_all = bias_or_zeros(bias, H, input);
  const T* bb = b_all.data_ptr<T>();
  const bool* m = mask_ptr(mask);
  at::Tensor a = at::empty({B, H}, input.options());
  at::Tensor xh;
  if constexpr (kFolded) xh = folded_rows<T>(input, step_view(hs, 0));
  T* xhp = kFolded ? xh.data_ptr<T>() : nullptr;
  // Folded, XW_t is part of the GEMM: a zero row stands in for it in the pass below.
  const at::Tensor zeros = kFolded ? at::zeros({B, H}, input.options()) : at::Tensor();
  std::atomic<bool> saw_nonfinite{false};
  std::atomic<bool>* nonfinite = &saw_nonfinite;
  // Each thread may run all steps on its own rows (see over_row_blocks).
  over_row_blocks(B, w_t, packed.has_value(), [&](int64_t r0, int64_t r1) {
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = t_begin + s;  // input is indexed by s, the state buffer by t
      // XW_t and the bias are added in the pass below: no extra copy. (Keep the tensor: when packed it is
      // a fresh one, and a pointer into a temporary would dangle.)
      at::Tensor a_rows = row_block(a.data_ptr<T>(), r0, r1, H, a);
      const at::Tensor y = step_gemm(kFolded ? row_block(xhp, r0, r1, I + H, xh) : row_block(step_ptr<T>(hs, t), r0, r1, H, hs),
                                     w_t, packed, a_rows);
      const T* ap = y.data_ptr<T>() - r0 * H;  // indexed by batch row below
      const T* xp = kFolded ? zeros.data_ptr<T>() : step_ptr<T>(input, s);
      const T* h_prev = step_ptr<T>(hs, t);
      T* h_next = step_ptr<T>(hs, t + 1);
      const bool* mt = m ? m + t * B : nullptr;
      for_rows_in(r0, r1, H, [=](int64_t b) {
        if (mt != nullptr && !mt[b]) {  // finished sequence: carry the state
          std::memcpy(h_next + b * H, h_prev + b * H, H * sizeof(T));
          return;
        }
        const T* a_b = ap + b * H;
        const T* x_b = xp + b * H;
        T* out = h_next + b * H;
        int32_t bad = 0;
        if (kind == kTanh) {
#pragma omp simd reduction(| : bad)
          for (int64_t j = 0; j < H; ++j) {
            const T v = a_b[j] + x_b[j] + bb[j];
            bad |= not_finite(v);
            out[j] = tanh_(v);
          }
        } else if (kind == kRelu) {
#pragma omp simd reduction(| : bad)
          for (int64_t j = 0; j < H; ++j) {
            const T v = a_b[j] + x_b[j] + bb[j];
            bad |= not_finite(v);
            out[j] = std::max(v, T(0));
          }
        } else {
#pragma omp simd reduction(| : bad)
          for (int64_t j = 0; j < H; ++j) {
            const T v = a_b[j] + x_b[j] + bb[j];
            bad |= not_finite(v);
            out[j] = sigmoid(v);
          }
        }
        if (bad) nonfinite->store(true, std::memory_order_relaxed);
        if constexpr (kFolded) std::memcpy(xhp + b * (I + H) + I, out, H * sizeof(T));
      });
      if constexpr (kFolded) {
        if (s + 1 < steps) copy_rows(xhp + r0 * (I + H), I + H, step_ptr<T>(input, s + 1) + r0 * I, I, r1 - r0, I);
      }
    }
  });
  return !saw_nonfinite.load();
}

template <typename T>
void rnn_backward_impl(const at::Tensor& d_out, const at::Tensor& hs, const at::Tensor& w_hh, at::Tensor& dh,
                       at::Tensor& dz, at::Tensor& db, int64_t kind, const c10::optional<at::Tensor>& mask,
                       int64_t t_begin, int64_t t_end, const c10::optional<at::Tensor>& panels) {
  // Steps t_end - 1 down to t_begin; dz holds those steps only (dz[t - t_begin]).
  const int64_t B = d_out.size(1), H = d_out.size(2);
  const bool* m = mask_ptr(mask);
  const BiasGradSum bias_sum(H);
  const BiasGradSum* sums = &bias_sum;
  at::Tensor dh_prev = at::empty_like(dh);
  // Each thread may run all steps on its own rows (see over_row_blocks). Inside a block
  // at::parallel_for reports thread 0, so a block sums its bias gradient into the row of
  // the thread that runs it, taken here.
  over_row_blocks(B, w_hh, false, [&](int64_t r0, int64_t r1) {
    double* const block_acc = (r1 - r0 < B) ? sums->row() : nullptr;
    for (int64_t t = t_end - 1; t >= t_begin; --t) {
      const T* h = step_ptr<T>(hs, t + 1);
      const T* go = step_ptr<T>(d_out, t);
      const T* dhp = dh.data_ptr<T>();
      T* dzt = step_ptr<T>(dz, t - t_begin);
      const bool* mt = m ? m + t * B : nullptr;
      for_rows_in(r0, r1, H, [=](int64_t b) {
        const T alive = (mt == nullptr || mt[b]) ? T(1) : T(0);
        double* acc = block_acc != nullptr ? block_acc : sums->row();
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const int64_t k = b * H + j;
          const T d = flush((go[k] + dhp[k]) * alive * derivative_from_output(h[k], kind));
          dzt[k] = d;
          acc[j] += d;
        }
      });
      // (B, H) x (H, H)
      if (!column_panel_step<T>(dzt, H, r0, r1, panels, dh_prev.data_ptr<T>(), H)) {
        at::Tensor dh_prev_rows = row_block(dh_prev.data_ptr<T>(), r0, r1, H, dh_prev);
        at::mm_out(dh_prev_rows, row_block(dzt, r0, r1, H, dz), w_hh);
      }
      take_alive_rows<T>(dh, dh_prev, mt, r0, r1);
    }
  });
  bias_sum.add_into(db);
}

// ------------------------------------------------------------------ dispatch

#define WB_DISPATCH(tensor, NAME, ...)                                                      \
  do {                                                                                      \
    if ((tensor).scalar_type() == at::kFloat) {                                             \
      using scalar_t = float;                                                               \
      __VA_ARGS__;                                                                          \
    } else if ((tensor).scalar_type() == at::kDouble) {                                     \
      using scalar_t = double;                                                              \
      __VA_ARGS__;                                                                          \
    } else {                                                                                \
      TORCH_CHECK(false, NAME, ": only float32 and float64 are compiled, got ", (tensor).scalar_type()); \
    }                                                                                       \
  } while (0)

// The steps a forward call covers: xw's, from t_begin (the input projection may come in
// chunks of steps); the state buffers hold all steps.
void check_forward_range(const at::Tensor& xw, const at::Tensor& hs, int64_t t_begin) {
  TORCH_CHECK(t_begin >= 0 && t_begin + xw.size(0) <= hs.size(0) - 1, "steps ", t_begin, " + ", xw.size(0),
              " out of range for ", hs.size(0) - 1, " steps");
}

// The steps a backward call covers: t_end - 1 down to t_begin, dZ holding those only.
void check_backward_range(const at::Tensor& dz, int64_t steps, int64_t t_begin, int64_t t_end) {
  TORCH_CHECK(0 <= t_begin && t_begin < t_end && t_end <= steps && dz.size(0) >= t_end - t_begin,
              "backward steps [", t_begin, ", ", t_end, ") out of range");
}

// The forward's `packed` weight is either oneDNN's (an opaque mkldnn tensor, for
// step_gemm) or, for the LSTM and GRU, gate_panels' (a plain tensor).
bool is_panels(const c10::optional<at::Tensor>& packed) {
  if (!packed.has_value() || packed->is_mkldnn()) return false;
#if !defined(__AVX512F__)
  TORCH_CHECK(false, "gate panels need a build with AVX-512");
#endif
  return true;
}

#if !defined(__AVX512F__)
template <bool kFolded>
bool lstm_forward_panels(const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&, at::Tensor&,
                         at::Tensor&, at::Tensor&, const c10::optional<at::Tensor>&, int64_t) {
  return false;
}
#endif

bool lstm_forward(const at::Tensor& xw, const c10::optional<at::Tensor>& bias, const at::Tensor& w_hh_t, at::Tensor hs,
                  at::Tensor cs, at::Tensor gates, const c10::optional<at::Tensor>& mask,
                  const c10::optional<at::Tensor>& packed, int64_t t_begin) {
  check_forward_range(xw, hs, t_begin);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&xw, &hs, &cs, &gates}) check(*t, "lstm_forward argument");
  if (is_panels(packed)) return lstm_forward_panels<false>(xw, bias, *packed, hs, cs, gates, mask, t_begin);
  WB_DISPATCH(xw, "lstm_forward", return lstm_forward_impl<scalar_t, false>(xw, bias, w_hh_t, hs, cs, gates, mask, packed, t_begin));
}

bool lstm_forward_folded(const at::Tensor& x, const c10::optional<at::Tensor>& bias, const at::Tensor& w_cat_t,
                         at::Tensor hs, at::Tensor cs, at::Tensor gates, const c10::optional<at::Tensor>& mask,
                         const c10::optional<at::Tensor>& packed) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &hs, &cs, &gates}) check(*t, "lstm_forward_folded argument");
  if (is_panels(packed)) return lstm_forward_panels<true>(x, bias, *packed, hs, cs, gates, mask, 0);
  WB_DISPATCH(x, "lstm_forward_folded", return lstm_forward_impl<scalar_t, true>(x, bias, w_cat_t, hs, cs, gates, mask, packed, 0));
}

void lstm_backward(const at::Tensor& d_out, const at::Tensor& gates, const at::Tensor& cs, const at::Tensor& w_hh,
                   at::Tensor dh, at::Tensor dc, at::Tensor dz, at::Tensor db, const c10::optional<at::Tensor>& mask,
                   int64_t t_begin, int64_t t_end, const c10::optional<at::Tensor>& panels) {
  check_backward_range(dz, gates.size(0), t_begin, t_end);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&d_out, &gates, &cs, &w_hh, &dh, &dc, &dz}) check(*t, "lstm_backward argument");
  TORCH_CHECK(!panels.has_value() || gates.scalar_type() == at::kFloat, "lstm_backward: column panels are float32");
  WB_DISPATCH(gates, "lstm_backward", lstm_backward_impl<scalar_t>(d_out, gates, cs, w_hh, dh, dc, dz, db, mask, t_begin, t_end, panels));
}

bool gru_forward(const at::Tensor& xw, const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh_t,
                 const c10::optional<at::Tensor>& b_hh, at::Tensor hs,
                 at::Tensor rz, at::Tensor n, at::Tensor hn, const c10::optional<at::Tensor>& mask,
                 const c10::optional<at::Tensor>& packed, int64_t t_begin) {
  check_forward_range(xw, hs, t_begin);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&xw, &hs, &rz, &n, &hn}) check(*t, "gru_forward argument");
  if (is_panels(packed)) return gru_forward_panels(xw, b_ih, *packed, b_hh, hs, rz, n, hn, mask, t_begin);
  WB_DISPATCH(xw, "gru_forward", return gru_forward_impl<scalar_t>(xw, b_ih, w_hh_t, b_hh, hs, rz, n, hn, mask, packed, t_begin));
}

void gru_backward(const at::Tensor& d_out, const at::Tensor& hs, const at::Tensor& rz, const at::Tensor& n,
                  const at::Tensor& hn, const at::Tensor& w_hh, at::Tensor dh, at::Tensor dz_x, at::Tensor dn_h,
                  at::Tensor db, const c10::optional<at::Tensor>& mask, int64_t t_begin, int64_t t_end,
                  const c10::optional<at::Tensor>& panels) {
  check_backward_range(dz_x, n.size(0), t_begin, t_end);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&d_out, &hs, &rz, &n, &hn, &w_hh, &dh, &dz_x, &dn_h}) check(*t, "gru_backward argument");
  TORCH_CHECK(!panels.has_value() || n.scalar_type() == at::kFloat, "gru_backward: column panels are float32");
  WB_DISPATCH(n, "gru_backward", gru_backward_impl<scalar_t>(d_out, hs, rz, n, hn, w_hh, dh, dz_x, dn_h, db, mask, t_begin, t_end, panels));
}

bool rnn_forward(const at::Tensor& xw, const c10::optional<at::Tensor>& bias, const at::Tensor& w_hh_t, at::Tensor hs,
                 int64_t kind, const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& packed,
                 int64_t t_begin) {
  check_forward_range(xw, hs, t_begin);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&xw, &hs}) check(*t, "rnn_forward argument");
  if (is_panels(packed)) return rnn_forward_panels<false>(xw, bias, *packed, hs, kind, mask, t_begin);
  WB_DISPATCH(xw, "rnn_forward", return rnn_forward_impl<scalar_t, false>(xw, bias, w_hh_t, hs, kind, mask, packed, t_begin));
}

bool rnn_forward_folded(const at::Tensor& x, const c10::optional<at::Tensor>& bias, const at::Tensor& w_cat_t,
                        at::Tensor hs, int64_t kind, const c10::optional<at::Tensor>& mask,
                        const c10::optional<at::Tensor>& packed) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &hs}) check(*t, "rnn_forward_folded argument");
  if (is_panels(packed)) return rnn_forward_panels<true>(x, bias, *packed, hs, kind, mask, 0);
  WB_DISPATCH(x, "rnn_forward_folded", return rnn_forward_impl<scalar_t, true>(x, bias, w_cat_t, hs, kind, mask, packed, 0));
}

void rnn_backward(const at::Tensor& d_out, const at::Tensor& hs, const at::Tensor& w_hh, at::Tensor dh, at::Tensor dz,
                  at::Tensor db, int64_t kind, const c10::optional<at::Tensor>& mask, int64_t t_begin, int64_t t_end,
                  const c10::optional<at::Tensor>& panels) {
  check_backward_range(dz, d_out.size(0), t_begin, t_end);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&d_out, &hs, &w_hh, &dh, &dz}) check(*t, "rnn_backward argument");
  TORCH_CHECK(!panels.has_value() || hs.scalar_type() == at::kFloat, "rnn_backward: column panels are float32");
  WB_DISPATCH(hs, "rnn_backward", rnn_backward_impl<scalar_t>(d_out, hs, w_hh, dh, dz, db, kind, mask, t_begin, t_end, panels));
}

// ------------------------------------------------------------------ few-row inference

// One layer and direction of a call without grad, without lengths, over a few rows in
// all (generating text: one token at batch 1), as one call from Python. Through the
// general path such a call made about fifteen ATen calls from Python around the two
// GEMVs, at 5-10 us each with caches cold from streaming the weights: more than the
// GEMVs themselves (2 x 650 RNN: 0.48 ms per call against torch.nn's 0.33). The step GEMM
// runs on W_hh^T as a view (whiteboard.fused only sends calls that would not copy it
// anyway). Returns the output (T, B, H) and the final state(s), or nothing where a value
// was not finite: the caller then reruns the call on the torch loop.
// What every one-call inference shares (lstm_inference, gru_inference, rnn_inference): a
// layer's direction without grad in one call from Python, where the same work took about
// fifteen ATen calls and 150 us per layer (8 % of an LSTM inference call at config (a),
// 23 % of an RNN's).

// A pooled (T + 1, B, H) state buffer holding h0 at step 0. (From the pool, as fused.py's
// buffers: with fresh pages for the two 27 MB state buffers at config (d) the LSTM's call
// was 4 % slower than the Python path; from the pool, 1 % faster.)
at::Tensor state_buffer(const at::Tensor& x, const at::Tensor& h0, int64_t H) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU (T, B, I) tensor");
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == x.size(1) && h0.size(1) == H, "initial states must be (B, H)");
  at::Tensor states = pooled_empty({x.size(0) + 1, x.size(1), H}, x);
  states.select(0, 0).copy_(h0);
  return states;
}

// x W_ih^T in chunks of at most `chunk_steps` steps, into one reused buffer, each handed to
// run(chunk, first_step) as soon as it is computed (the biases are added in the loops).
// False as soon as a run returns false (a NaN or Inf met).
template <typename F>
bool over_projected_chunks(const at::Tensor& x, const at::Tensor& w_ih, int64_t chunk_steps, const F& run) {
  TORCH_CHECK(chunk_steps >= 1, "chunk_steps must be >= 1");
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), width = w_ih.size(0);
  const at::Tensor w_ih_t = w_ih.t();
  const int64_t steps_per_chunk = std::min(chunk_steps, std::max<int64_t>(T, 1));
  at::Tensor xw = pooled_empty({steps_per_chunk, B, width}, x);
  for (int64_t begin = 0; begin < T; begin += steps_per_chunk) {
    const int64_t steps = std::min(steps_per_chunk, T - begin);
    at::Tensor chunk = xw.narrow(0, 0, steps);
    at::Tensor rows = chunk.view({steps * B, width});
    at::mm_out(rows, x.narrow(0, begin, steps).view({steps * B, I}), w_ih_t);
    if (!run(chunk, begin)) return false;
  }
  return true;
}

// b_ih + b_hh, or the one given, or none.
c10::optional<at::Tensor> summed(const c10::optional<at::Tensor>& a, const c10::optional<at::Tensor>& b) {
  if (a.has_value() && b.has_value()) return at::add(*a, *b);
  return a.has_value() ? a : b;
}

// An RNN layer's direction without grad: W_hh^T in column panels when `panels` (float32,
// AVX-512), else the GEMM on W_hh^T as a transposed view (a few rows in all: copying W_hh^T
// would cost more than all the steps). Returns (output, h_n), or nothing where a NaN or Inf
// was met (the caller reruns on the torch loop).
std::vector<at::Tensor> rnn_inference(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                      const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                      const c10::optional<at::Tensor>& b_hh, int64_t kind, int64_t chunk_steps,
                                      bool panels) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t T = x.size(0), H = w_hh.size(1);
  at::Tensor hs = state_buffer(x, h0, H);
  const c10::optional<at::Tensor> bias = summed(b_ih, b_hh);
  const at::Tensor packed = panels ? column_panels(transposed(w_hh.contiguous())) : at::Tensor();
  const bool finite = over_projected_chunks(x, w_ih, chunk_steps, [&](const at::Tensor& xw, int64_t begin) {
    if (panels) return rnn_forward_panels<false>(xw, bias, packed, hs, kind, c10::nullopt, begin);
    bool ok = false;
    WB_DISPATCH(x, "rnn_inference",
                ok = rnn_forward_impl<scalar_t, false>(xw, bias, w_hh.t(), hs, kind, c10::nullopt, c10::nullopt, begin));
    return ok;
  });
  if (!finite) return {};
  return {hs.narrow(0, 1, T), hs.select(0, T)};
}

// The same for an LSTM layer's direction (W_hh in gate panels); returns (output, h_n, c_n).
std::vector<at::Tensor> lstm_inference(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                       const at::Tensor& w_ih, const at::Tensor& w_hh,
                                       const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                                       int64_t chunk_steps, bool panels) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t T = x.size(0), B = x.size(1), H = w_hh.size(1);
  // c0 reaches no pre-activation, so the passes' finite check cannot see it.
  if (!all_finite({c0})) return {};
  at::Tensor hs = state_buffer(x, h0, H);
  at::Tensor cs = state_buffer(x, c0, H);
  at::Tensor gates = at::empty({1, B, 4 * H}, x.options());
  const c10::optional<at::Tensor> bias = summed(b_ih, b_hh);
  const at::Tensor packed = panels ? gate_panels({w_hh}, 4) : at::Tensor();
  const bool finite = over_projected_chunks(x, w_ih, chunk_steps, [&](const at::Tensor& xw, int64_t begin) {
    if (panels) return lstm_forward_panels<false>(xw, bias, packed, hs, cs, gates, c10::nullopt, begin);
    bool ok = false;
    WB_DISPATCH(x, "lstm_inference",
                ok = lstm_forward_impl<scalar_t, false>(xw, bias, w_hh.t(), hs, cs, gates, c10::nullopt,
                                                        c10::nullopt, begin));
    return ok;
  });
  if (!finite) return {};
  return {hs.narrow(0, 1, T), hs.select(0, T), cs.select(0, T)};
}

// The same for a GRU layer's direction (W_hh in gate panels); returns (output, h_n).
std::vector<at::Tensor> gru_inference(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                      const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                      const c10::optional<at::Tensor>& b_hh, int64_t chunk_steps, bool panels) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t T = x.size(0), B = x.size(1), H = w_hh.size(1);
  at::Tensor hs = state_buffer(x, h0, H);
  at::Tensor rz = at::empty({1, B, 2 * H}, x.options());  // one step's factors: nothing runs backward
  at::Tensor n = at::empty({1, B, H}, x.options());
  at::Tensor hn = at::empty({1, B, H}, x.options());
  const at::Tensor packed = panels ? gate_panels({w_hh}, 3) : at::Tensor();
  const bool finite = over_projected_chunks(x, w_ih, chunk_steps, [&](const at::Tensor& xw, int64_t begin) {
    if (panels) return gru_forward_panels(xw, b_ih, packed, b_hh, hs, rz, n, hn, c10::nullopt, begin);
    bool ok = false;
    WB_DISPATCH(x, "gru_inference",
                ok = gru_forward_impl<scalar_t>(xw, b_ih, w_hh.t(), b_hh, hs, rz, n, hn, c10::nullopt, c10::nullopt,
                                                begin));
    return ok;
  });
  if (!finite) return {};
  return {hs.narrow(0, 1, T), hs.select(0, T)};
}


// Every layer of a one-directional stack without grad in one call from Python, each
// layer's *_inference (above) on the output of the layer below; for a few rows in all
// (generation: one token at a time), where the per-layer Python around those calls cost
// about as much as the calls themselves (2 x 650 RNN at one token: 379 us a call against
// 238 for the two compiled calls alone). `cell`: 0 RNN (`kind` its Activation), 1 LSTM,
// 2 GRU. `states`: h_0 (L, B, H), and c_0 for the LSTM; `weights`: (w_ih, w_hh, b_ih,
// b_hh) per layer, the biases None where there are none. Returns (output, h_n[, c_n]), or
// nothing where a NaN or Inf was met (the caller reruns the layers one by one).
std::vector<at::Tensor> stack_inference(int64_t cell, const at::Tensor& x, const std::vector<at::Tensor>& states,
                                        const std::vector<c10::optional<at::Tensor>>& weights, int64_t kind) {
  TORCH_CHECK(cell >= 0 && cell <= 2, "stack_inference: cell 0 (RNN), 1 (LSTM) or 2 (GRU)");
  TORCH_CHECK(states.size() == (cell == 1 ? 2u : 1u), "stack_inference: h_0 (and c_0 for the LSTM)");
  const int64_t layers = states[0].size(0), steps = x.size(0);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 4 * layers, "stack_inference: four weights per layer");
  at::Tensor input = x;
  std::vector<at::Tensor> h_n, c_n;
  for (int64_t l = 0; l < layers; ++l) {
    TORCH_CHECK(weights[4 * l].has_value() && weights[4 * l + 1].has_value(), "stack_inference: no weight");
    const at::Tensor& w_ih = *weights[4 * l];
    const at::Tensor& w_hh = *weights[4 * l + 1];
    const c10::optional<at::Tensor>& b_ih = weights[4 * l + 2];
    const c10::optional<at::Tensor>& b_hh = weights[4 * l + 3];
    std::vector<at::Tensor> result;
    if (cell == 0) {
      result = rnn_inference(input, states[0][l], w_ih, w_hh, b_ih, b_hh, kind, steps, false);
    } else if (cell == 1) {
      result = lstm_inference(input, states[0][l], states[1][l], w_ih, w_hh, b_ih, b_hh, steps, false);
    } else {
      result = gru_inference(input, states[0][l], w_ih, w_hh, b_ih, b_hh, steps, false);
    }
    if (result.empty()) return {};
    input = result[0];
    h_n.push_back(result[1]);
    if (cell == 1) c_n.push_back(result[2]);
  }
  if (cell == 1) return {input, at::stack(h_n), at::stack(c_n)};
  return {input, at::stack(h_n)};
}

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
