// The top-k soft-target KL with the bucket tail, its value and gradient in one pass over each
// row: `losses.topk_soft_target_loss_per_row` for small logits (up to losses.KERNEL_ELEMENTS,
// a classifier's batch), where eager PyTorch spends more time dispatching its ~30 small
// operations than computing them. Built on first use by `kd/kernels.py`; the same math
// as `losses._topk_kl` / `losses._topk_kl_grad`, tested against them (tests/test_losses.py).
//
// Per row of z = logits / T, with q = softmax(z), the teacher's cached log-probabilities
// lp_i = topk_logit_i / T - lse on its top-k ids, p_i = exp(lp_i), and its tail mass
// t = max(0, 1 - sum_i p_i) (only when k < C):
//   KL  = sum_{i: p_i > 0} p_i (lp_i - log q_{id_i}) + t (log t - log q_tail)
//   dKL/dz_j = q_j * mass - p_j on the top-k, q_j * mass - t * q_j / q_tail outside it,
// mass = sum_i p_i + t. The tail's logsumexp is taken over the tail alone, so a tail below
// exp's range stays exact, and a student with no tail (-inf logits) gets a finite gradient.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// One row: its KL, and (grad != nullptr) dKL/dz times `g_scale` written to grad[0..C), in
// the same pass, so that the backward only scales it. e_j = exp(z_j - max z) gives
// q_j = e_j / sum e; outside the top-k, exp(z_j - the tail's max) / their sum gives
// q_j / q_tail without underflow.
template <typename scalar_t>
double row_forward(const scalar_t* s, const int64_t* idx, const double* lp, int64_t C, int64_t k, double inv_T,
                   std::vector<char>& top, std::vector<double>& e, double g_scale, scalar_t* grad) {
  double m = -kInf;
  for (int64_t j = 0; j < C; ++j) m = std::max(m, s[j] * inv_T);
  double sum = 0;
  for (int64_t j = 0; j < C; ++j) sum += (e[j] = std::exp(s[j] * inv_T - m));
  const double lse = m + std::log(sum);
  const bool with_tail = k < C;
  double log_tail = -kInf, tail_sum = 0, mt = -kInf;  // log q_tail (-inf: the student has no tail)
  if (with_tail) {
    for (int64_t i = 0; i < k; ++i) top[idx[i]] = 1;
    for (int64_t j = 0; j < C; ++j) if (!top[j]) mt = std::max(mt, s[j] * inv_T);
    if (mt > -kInf) {
      for (int64_t j = 0; j < C; ++j) if (!top[j]) tail_sum += std::exp(s[j] * inv_T - mt);
      log_tail = mt + std::log(tail_sum) - lse;
    }
  }
  double kl = 0, kept = 0;
  for (int64_t i = 0; i < k; ++i) {
    const double p = std::exp(lp[i]);
    kept += p;
    if (p > 0) kl += p * (lp[i] - (s[idx[i]] * inv_T - lse));  // 0 log 0 = 0
  }
  double tail = 0;
  if (with_tail) {
    tail = std::max(0.0, 1.0 - kept);  // float16 rounding can push the kept mass a hair past 1
    if (tail > 0) kl += tail * (std::log(tail) - log_tail);
  }
  if (grad != nullptr) {
    const double mass = kept + tail;
    const bool has_tail = log_tail > -kInf;
    for (int64_t j = 0; j < C; ++j) {
      double g = e[j] / sum * mass;
      if (!top[j] && has_tail) g -= tail * std::exp(s[j] * inv_T - mt) / tail_sum;
      grad[j] = static_cast<scalar_t>(g_scale * g);
    }
    for (int64_t i = 0; i < k; ++i)
      grad[idx[i]] = static_cast<scalar_t>(g_scale * (e[idx[i]] / sum * mass - std::exp(lp[i])));
  }
  if (with_tail)
    for (int64_t i = 0; i < k; ++i) top[idx[i]] = 0;
  return kl;
}

// lp (B, k) = topk_logit / T - lse in double, read from the cache's dtypes (float16 and up)
// without intermediate tensors: at 10 classes each tensor operation costs as much as the loss.
Tensor teacher_log_probs(const Tensor& topk_logit, const Tensor& lse, double T) {
  const auto tl = topk_logit.contiguous(), tlse = lse.contiguous();
  const int64_t B = tl.size(0), k = tl.size(1);
  auto lp = torch::empty({B, k}, tl.options().dtype(torch::kDouble));
  double* out = lp.data_ptr<double>();
  std::vector<double> row_lse(B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tlse.scalar_type(), "topk_kl_lse", [&] {
    const scalar_t* l = tlse.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) row_lse[b] = static_cast<double>(l[b]);
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tl.scalar_type(), "topk_kl_logits", [&] {
    const scalar_t* t = tl.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < k; ++i) out[b * k + i] = static_cast<double>(t[b * k + i]) / T - row_lse[b];
  });
  return lp;
}

struct TopkKL : public torch::autograd::Function<TopkKL> {
  // logits (B, C) float32/float64; idx (B, k); topk_logit (B, k); lse (B,)
  // -> KL per row times `scale` (B,), or (reduce) their sum times `scale`, a scalar. The
  // gradient is computed here, in the same pass (logits that need one), and only scaled by the
  // backward: at this size a second pass costs more than the (B, C) it keeps.
  static Tensor forward(AutogradContext* ctx, const Tensor& logits, const Tensor& idx, const Tensor& topk_logit,
                        const Tensor& lse, double T, double scale, bool reduce) {
    TORCH_CHECK(logits.dim() == 2 && idx.dim() == 2 && topk_logit.sizes() == idx.sizes() && lse.dim() == 1,
                "topk_kl: logits (B, C), idx and topk_logit (B, k), lse (B,)");
    TORCH_CHECK(idx.size(0) == logits.size(0) && lse.size(0) == logits.size(0),
                "topk_kl: ", logits.size(0), " rows of logits against ", idx.size(0), " cached rows");
    const auto s = logits.contiguous();
    const auto ix = idx.to(torch::kLong).contiguous();
    const int64_t B = s.size(0), C = s.size(1), k = ix.size(1);
    TORCH_CHECK(k <= C, "topk_kl: ", k, " cached entries per row for ", C, " classes");
    const int64_t* ip = ix.data_ptr<int64_t>();
    for (int64_t n = 0; n < B * k; ++n)
      TORCH_CHECK(ip[n] >= 0 && ip[n] < C, "topk_kl: cached id ", ip[n], " outside the student's ", C, " classes");
    const auto lp = teacher_log_probs(topk_logit, lse, T);
    const bool with_grad = logits.requires_grad();
    Tensor grad = with_grad ? torch::empty_like(s) : Tensor();
    std::vector<double> kl(B);
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "topk_kl_forward", [&] {
      const scalar_t* sp = s.data_ptr<scalar_t>();
      const double* lpp = lp.data_ptr<double>();
      scalar_t* gp = with_grad ? grad.data_ptr<scalar_t>() : nullptr;
      std::vector<char> top(C, 0);
      std::vector<double> e(C);
      for (int64_t b = 0; b < B; ++b)
        kl[b] = row_forward(sp + b * C, ip + b * k, lpp + b * k, C, k, 1.0 / T, top, e, scale / T,
                            gp == nullptr ? nullptr : gp + b * C);
    });
    if (with_grad) ctx->save_for_backward({grad});
    ctx->saved_data["reduce"] = reduce;
    if (reduce) {
      double total = 0;
      for (const double v : kl) total += v;
      return torch::full({}, total * scale, s.options());
    }
    auto out = torch::empty({B}, s.options());
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "topk_kl_rows", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b) o[b] = static_cast<scalar_t>(kl[b] * scale);
    });
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const Tensor grad = ctx->get_saved_variables()[0];  // d(output)/d(logits), per row
    const Tensor& g = grad_out[0];  // a scalar (reduce) or (B,)
    return {ctx->saved_data["reduce"].toBool() ? grad * g : grad * g.unsqueeze(1),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor topk_kl(const Tensor& logits, const Tensor& idx, const Tensor& topk_logit, const Tensor& lse, double T,
               double scale, bool reduce) {
  return TopkKL::apply(logits, idx, topk_logit, lse, T, scale, reduce);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topk_kl", &topk_kl, "top-k soft-target KL, bucket tail (see kd/losses.py)");
}
