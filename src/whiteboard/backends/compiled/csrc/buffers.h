// Part of recurrent.cpp's one translation unit: included there, in order, inside its
// anonymous namespace (one unit, so every helper stays inlinable without LTO).
// The buffer pool, W^T in registers, the finite check and the folded input.

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
