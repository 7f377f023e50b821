// Part of recurrent.cpp's one translation unit: included there, in order, inside its
// anonymous namespace (one unit, so every helper stays inlinable without LTO).
// The GRU forward and backward passes, in portable C++ (float and double).

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
