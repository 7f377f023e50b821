// Part of recurrent.cpp's one translation unit: included there, in order, inside its
// anonymous namespace (one unit, so every helper stays inlinable without LTO).
// Few-row inference: a layer, or a whole stack, without grad in one call.

// ------------------------------------------------------------------ few-row inference

// One layer and direction of a call without grad, without lengths, over a few rows in
// all (generating text: one token at batch 1), as one call from Python. Through the
// general path such a call made about fifteen ATen calls from Python around the two
// GEMVs, at 5-10 us each with caches cold from streaming the weights: more than the
// GEMVs themselves (2 x 650 RNN: 0.48 ms per call against torch.nn's 0.33). The step GEMM
// runs on W_hh^T as a view (whiteboard.backends.compiled.planning only sends calls that would not copy it
// anyway). Returns the output (T, B, H) and the final state(s), or nothing where a value
// was not finite: the caller then reruns the call on the torch loop.
// What every one-call inference shares (lstm_inference, gru_inference, rnn_inference): a
// layer's direction without grad in one call from Python, where the same work took about
// fifteen ATen calls and 150 us per layer (8 % of an LSTM inference call at config (a),
// 23 % of an RNN's).

// A pooled (T + 1, B, H) state buffer holding h0 at step 0. (From the pool, as the Python
// side's buffers: with fresh pages for the two 27 MB state buffers at config (d) the LSTM's call
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
