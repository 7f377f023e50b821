// Part of recurrent.cpp's one translation unit: included there, in order, inside its
// anonymous namespace (one unit, so every helper stays inlinable without LTO).
// The RNN forward and backward passes, in portable C++ (float and double).

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
