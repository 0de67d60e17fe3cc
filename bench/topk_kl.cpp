#include <torch/extension.h>
#include <cmath>
#include <vector>

// What-if prototype for bench/fused.py (not used by the pipeline): the top-k soft-target loss
// of pipeline/losses.py, tail="bucket", as ONE op: T^2 * mean over rows of KL(teacher || student)
// from a cached row (topk_idx, topk_logit, lse at T). Returns (loss scalar, d loss / d logits):
// the closed-form gradient is computed in the same pass over each row, so backward is one multiply.
// logits: (B, C); idx, tl: (B, k); lse: (B,).
std::vector<at::Tensor> topk_kl_forward(at::Tensor logits, at::Tensor idx, at::Tensor tl, at::Tensor lse, double T) {
  logits = logits.contiguous().to(at::kFloat);
  idx = idx.contiguous().to(at::kLong);
  tl = tl.contiguous().to(at::kFloat);
  lse = lse.contiguous().to(at::kFloat);
  const int64_t B = logits.size(0), C = logits.size(1), K = idx.size(1);
  auto grad = at::empty({B, C}, logits.options());
  const float* z = logits.data_ptr<float>();
  const int64_t* ix = idx.data_ptr<int64_t>();
  const float* t = tl.data_ptr<float>();
  const float* l = lse.data_ptr<float>();
  float* g = grad.data_ptr<float>();
  std::vector<char> in_topk(C, 0);
  std::vector<double> q(C);
  double total = 0.0;
  const double scale = T / (double)B;  // d(T^2 mean kl)/dz = T^2/B * dkl/ds * 1/T
  for (int64_t b = 0; b < B; ++b) {
    const float* zb = z + b * C;
    double m = -INFINITY;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, (double)zb[c] / T);
    double sum = 0.0;
    for (int64_t c = 0; c < C; ++c) { q[c] = std::exp((double)zb[c] / T - m); sum += q[c]; }
    const double lse_s = m + std::log(sum);
    for (int64_t c = 0; c < C; ++c) q[c] /= sum;
    double kept_p = 0.0, kept_q = 0.0, kl = 0.0;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t c = ix[b * K + j];
      in_topk[c] = 1;
      const double logp = (double)t[b * K + j] / T - (double)l[b];
      const double p = std::exp(logp);
      kept_p += p;
      kept_q += q[c];
      if (p > 0) kl += p * (logp - ((double)zb[c] / T - lse_s));
    }
    double p_tail = 0.0, q_tail = 0.0;
    if (K < C) {
      p_tail = std::max(0.0, 1.0 - kept_p);
      for (int64_t c = 0; c < C; ++c) if (!in_topk[c]) q_tail += q[c];
      if (p_tail > 0) kl += p_tail * (std::log(p_tail) - std::log(q_tail));
    }
    const double mass = kept_p + p_tail;
    float* gb = g + b * C;
    for (int64_t c = 0; c < C; ++c) {
      double target = in_topk[c] ? 0.0 : (q_tail > 0 ? p_tail * q[c] / q_tail : 0.0);
      gb[c] = (float)(scale * (mass * q[c] - target));
    }
    for (int64_t j = 0; j < K; ++j) {
      const int64_t c = ix[b * K + j];
      const double p = std::exp((double)t[b * K + j] / T - (double)l[b]);
      gb[c] -= (float)(scale * p);
      in_topk[c] = 0;
    }
    total += kl;
  }
  return {at::scalar_tensor(total / B * T * T, logits.options()), grad};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("forward", &topk_kl_forward); }
