// Part of recurrent.cpp's one translation unit: included there, in order, inside its
// anonymous namespace (one unit, so every helper stays inlinable without LTO).
// The RNN on column panels; and what a build without AVX-512 has in place of the panels.

#if defined(__AVX512F__)

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
