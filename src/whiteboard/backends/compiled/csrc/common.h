// Part of recurrent.cpp's one translation unit: included there, in order, inside its
// anonymous namespace (one unit, so every helper stays inlinable without LTO).
// Scalar math, threads and row blocks, and the small helpers every loop uses.

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
// whiteboard/backends/functions.py recomputes the call with the torch loop, which propagates NaN as
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
// runs its body serially unless this file is compiled with -fopenmp (whiteboard/backends/compiled/build.py
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
// and the backward sweeps use it. Blocks won for weights up to 1 MB and measured even or
// worse above it, hence the default (benchmarks/README.md).
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
// (torch.ops.mkldnn._reorder_linear_weight, done in whiteboard/backends/compiled/tuning.py), it goes through
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
