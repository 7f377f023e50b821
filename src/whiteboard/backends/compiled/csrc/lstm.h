// Part of recurrent.cpp's one translation unit: included there, in order, inside its
// anonymous namespace (one unit, so every helper stays inlinable without LTO).
// The LSTM forward and backward passes, in portable C++ (float and double).

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
