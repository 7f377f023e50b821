// Part of recurrent.cpp's one translation unit: included there, in order, inside its
// anonymous namespace (one unit, so every helper stays inlinable without LTO).
// The gate math of the LSTM and GRU as the AVX-512 panel GEMM's epilogue, 16 lanes at a time.

#if defined(__AVX512F__)

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
#endif  // __AVX512F__
