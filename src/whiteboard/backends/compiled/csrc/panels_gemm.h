// Part of recurrent.cpp's one translation unit: included there, in order, inside its
// anonymous namespace (one unit, so every helper stays inlinable without LTO).
// The AVX-512 panel GEMM: packing, the microkernel, the epilogue's line requests, column panels.

enum Activation : int64_t { kTanh = 0, kRelu = 1, kSigmoid = 2 };  // the RNN's nonlinearity

// ------------------------------------------------------------------ gate panels

// Where a step's gate pre-activations (B x 4H floats) take at least this many bytes, the
// epilogue's lines are requested a few at a time during the K loop (EpilogueLines), and
// c_{t-1}, c_t and h_t with them; below it, XW_t's and the saved gates' all at once before
// it. With large steps the weight stream has evicted those lines by the time the epilogue
// needs them; with small ones they are still near, and requests in the K loop only cost.
std::atomic<int64_t> g_spread_lines_min_step_bytes{512 << 10};
bool spread_lines(int64_t step_bytes) { return step_bytes >= g_spread_lines_min_step_bytes.load(std::memory_order_relaxed); }
void set_spread_lines_min_step_bytes(int64_t bytes) { g_spread_lines_min_step_bytes.store(bytes); }
int64_t spread_lines_min_step_bytes() { return g_spread_lines_min_step_bytes.load(); }

// Where the rows of a reverse sweep's dZ_t W_hh (B x G·H floats) take at least this many
// bytes, its column-panel GEMM walks K in blocks (column_panel_product_blocked): large
// sweeps gain from keeping a block of A in cache; small ones lose evenly split work.
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
// that computed it. At batch-sized M this beats MKL's sgemm and oneDNN's packed linear at
// every size measured (benchmarks/README.md). The units of
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
// N. For the reverse sweeps' dh_{t-1} = dZ_t W_hh, W_hh (G·H, H) packed once per call: as
// fast as MKL's sgemm on the plain W_hh or faster, but at the largest size measured.
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

#endif  // __AVX512F__
