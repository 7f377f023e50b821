// Part of recurrent.cpp's one translation unit: included there, in order, inside its
// anonymous namespace (one unit, so every helper stays inlinable without LTO).
// The entry points Python calls: argument checks, then the pass for the dtype and the kernel.

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
