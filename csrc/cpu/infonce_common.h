// What the CPU (csrc/cpu/infonce.cpp) and CUDA (csrc/cuda/infonce.cu) contrastive kernels share
// on the host: the schema's flags and what they mean, and the backward's per-row coefficients
// (plain ATen ops on (n,) columns, on the device of `opts`).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <limits>

namespace sslops {

// Flags of the contrastive ops' schema (sslops/ops/infonce.py holds the same values).
constexpr int64_t kSigmoid = 1, kNoInBatch = 2, kDecoupled = 4, kWeighted = 8, kNoNormalize = 16, kBidir = 32;

// The flags as the passes use them. A plain aggregate: the CUDA kernels take it by value.
struct ContrastiveMode {
  bool sigmoid = false, weighted = false, normalize = true;
  // an in-batch candidate j ≠ i of anchor i is in the denominator when: j ∈ P(i) ? keep_pos : keep_neg
  bool keep_pos = true, keep_neg = true;
  // the denominator depends on membership in P(i) (DECOUPLED or NO_INBATCH, not both)
  bool member_needed() const { return keep_pos != keep_neg; }
};

inline ContrastiveMode contrastive_mode(int64_t flags) {
  ContrastiveMode md;
  md.sigmoid = flags & kSigmoid;
  md.weighted = flags & kWeighted;
  md.normalize = !(flags & kNoNormalize);
  md.keep_pos = !(flags & kDecoupled);
  md.keep_neg = !(flags & kNoInBatch);
  return md;
}

// (5, n) in opts' dtype: rows a = ∂L/∂lse (∂L/∂softplus-sum for SigLIP), lse (+inf where a = 0,
// so that exp(x − lse) vanishes), gp = ∂L/∂pos, gq = ∂L/∂pse, lo = lse's rounding residual (0
// where a = 0), from the gradient grad (w, 3) of the forward's diff (w, 3) and its aux (w, 4)
// for the rows [w0, w1) of a set of n rows; zero (lse +inf) outside that window. The sigmoid
// form fills a only.
inline at::Tensor contrastive_coefficients(const at::Tensor& grad, const at::Tensor& diff, const at::Tensor& aux,
                                           int64_t n, int64_t w0, int64_t w1, bool sigmoid,
                                           const at::TensorOptions& opts) {
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor c = at::zeros({5, n}, opts);
  c[1].fill_(inf);
  if (w1 <= w0) return c;
  const at::Tensor g = grad.to(opts.dtype());
  const at::Tensor a = g.select(1, 0);
  c[0].narrow(0, w0, w1 - w0).copy_(a);
  if (!sigmoid) {
    const at::Tensor live = a != 0;
    c[1].narrow(0, w0, w1 - w0).copy_(at::where(live, diff.select(1, 0).to(opts.dtype()), at::full_like(a, inf)));
    c[2].narrow(0, w0, w1 - w0).copy_(g.select(1, 1));
    c[3].narrow(0, w0, w1 - w0).copy_(g.select(1, 2));
    c[4].narrow(0, w0, w1 - w0).copy_(at::where(live, aux.select(1, 3).to(opts.dtype()), at::zeros_like(a)));
  }
  return c;
}

}  // namespace sslops
