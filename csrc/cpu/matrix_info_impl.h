// Matrix-SSL forward and backward, device-generic orchestration (shared by
// csrc/cpu/matrix_info.cpp and csrc/cuda/matrix_info.cu).
//
// The K×K products go through at::mm (MKL/OpenBLAS on the CPU, cuBLAS on the GPU); the
// row passes and the trace reductions are the device's own fused kernels, supplied by the
// template parameter `Dev`:
//
//   Dev::rows_forward(p, z, W)          W = [p̂ - mean p̂ | ẑ - mean ẑ] (acc dtype), x̂ = x/max(‖x_n‖, 1e-12)
//   Dev::trace_dot(A, B), Dev::trace(A) Σ_ij A_ij B_ji = tr(A·B) without forming A·B; tr A
//   Dev::trace_dot_sym(A, B)            Σ_ij A_ij B_ij (= tr(A·B) for symmetric B), contiguous reads
//   Dev::lincomb(out, terms, d)         out = Σ c_i T_i + d·I in one pass (T_i any strided view)
//   Dev::rows_backward(x, G, col0, g)   dL/dx = g·(row-wise normalisation backward of G[:, col0:])
//
// Math (conventions §4; c_k = (-1)^{k+1}/k, n = order, h = ceil(n/2)):
//   pc, zc = centred normalised rows;  C = pcᵀzc/N, Sp = pcᵀpc/N, Sz = zcᵀzc/N
//   Xu = C + (μ-1)I,  P = Sp + μI,  Xa = Sz + (μ-1)I
//   U = -λ Σ_k c_k tr(Xu^k),      tr(Xu^k) = tr(Xu^a Xu^b), a = ceil(k/2), b = k - a
//   A = -Σ_k c_k tr(P Xa^k),      A_j = P Xa^j (chain), tr(P Xa^k) = tr(A_{k-1} Xa)
//   loss = U + γA
// Gradients (never through the chain):
//   dU/dXu = -λ q(Xu)ᵀ,  q(X) = Σ_{j<n} (-1)^j X^j        (Paterson–Stockmeyer with X^h)
//   dA/dP  = -f(Xa),     f(X) = Σ_k c_k X^k                (Xa, P symmetric)
//   dA/dXa = -Σ_k c_k Σ_{j+l=k-1} X^j P X^l = -(R + Rᵀ),  R = Σ_{j≤(n-1)/2} Xa^j D_j,
//            D_j = ½c_{2j+1} A_j + Σ_{l=j+1}^{n-1-j} c_{j+l+1} A_l       (Horner in Xa)
//   [dpc | dzc] = [pc | zc] · [[2 dSp, dC], [dCᵀ, 2 dSz]] / N     (one N×2K×K GEMM per input)
//   dp = (dp̂ - p̂ (p̂·dp̂)) / ‖p‖ row-wise (dp̂ = dpc: J is the identity on centred columns)
//
// Saved by the forward: Xu, P, Xa (Sp, Sz symmetrised) and the products it made
// (Xu^2..Xu^h, A_1..A_{n-1}); rows are recomputed in the backward. Scalings by 1/N ride on
// the GEMMs' alpha and Horner additions on their beta, so besides the GEMMs the CPU does a
// handful of fused passes (few parallel regions: they are costly on a busy machine).
// Products, order 4: forward 1 + 3, backward 1 (Xa²) + 1 (f) + 1 (R) + 1 (q) = 8 K×K
// products in all (7 when only p needs a gradient, the common case of a stop-gradient target);
// GEMMs 5NK² forward (6NK² for K < 128), 8NK² backward (4NK² when only p needs a gradient).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <vector>

#include "../no_autocast.h"

namespace sslops {
namespace matrix_info {

inline double taylor_coeff(int64_t k) { return (k % 2 ? 1.0 : -1.0) / static_cast<double>(k); }

inline int64_t half_order(int64_t order) { return (order + 1) / 2; }

// Number of K×K matrices the forward saves beside Xu, P, Xa.
inline int64_t saved_count(int64_t order) { return (half_order(order) - 1) + (order - 1); }

// A term c·T of a linear combination; T may be any strided 2-D view (e.g. m.t()).
struct Term {
  double c;
  at::Tensor t;
};

// out = Σ c_i T_i + diag·I, one pass (Dev::lincomb writes into `out`, any strides).
template <class Dev>
at::Tensor combine(const std::vector<Term>& terms, double diag, int64_t k, const at::TensorOptions& opt) {
  at::Tensor out = at::empty({k, k}, opt);
  Dev::lincomb(out, terms, diag);
  return out;
}

// Σ_{i=0}^{d} a_i X^i given pw = [X^1, ..., X^h] (X^0 = I implicit): blocks of h
// coefficients combined by Horner's rule in X^h (Paterson–Stockmeyer); each Horner step
// is one GEMM with beta = 1 (block + X^h·acc), no separate addition pass.
template <class Dev>
at::Tensor poly(const std::vector<at::Tensor>& pw, const std::vector<double>& a) {
  const int64_t h = static_cast<int64_t>(pw.size());
  const int64_t d = static_cast<int64_t>(a.size()) - 1;
  const int64_t k = pw[0].size(0);
  auto block = [&](int64_t start, double extra_h) {
    std::vector<Term> terms;
    for (int64_t r = 1; r < h && start + r <= d; ++r)
      if (a[start + r] != 0.0) terms.push_back({a[start + r], pw[r - 1]});
    if (extra_h != 0.0) terms.push_back({extra_h, pw[h - 1]});
    return combine<Dev>(terms, a[start], k, pw[0].options());
  };
  const int64_t nblocks = d / h + 1;
  int64_t b = nblocks - 1;
  at::Tensor acc;
  if (b * h == d && b > 0) {  // last block is a lone scalar: a_d·X^h needs no product
    acc = block((b - 1) * h, a[d]);
    b -= 1;
  } else {
    acc = block(b * h, 0.0);
  }
  for (--b; b >= 0; --b) acc = block(b * h, 0.0).addmm_(pw[h - 1], acc);  // in place: no copy of the block
  return acc;
}

// Forward. Returns (loss, Xu, P, Xa, saved) with Xu = C + (μ-1)I, P = Sp + μI,
// Xa = Sz + (μ-1)I (Sp, Sz exactly symmetric), saved = [Xu^2..Xu^h, P·Xa^1..P·Xa^{n-1}].
template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ssl_forward(const at::Tensor& p, const at::Tensor& z,
                                                                                     double lambd, double mu, double gamma,
                                                                                     int64_t order) {
  NoAutocast no_autocast;  // the at:: products below stay in the accumulation dtype (csrc/no_autocast.h)
  TORCH_CHECK(p.dim() == 2 && p.sizes() == z.sizes(), "matrix_ssl_fwd_cxx: p and z must be (N, K) of one shape");
  TORCH_CHECK(order >= 1, "matrix_ssl_fwd_cxx: order must be >= 1");
  const int64_t n = p.size(0), k = p.size(1);
  const auto acc = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opt = p.options().dtype(acc);
  at::Tensor w = at::empty({n, 2 * k}, opt);
  Dev::rows_forward(p, z, w);
  const at::Tensor pc = w.narrow(1, 0, k), zc = w.narrow(1, k, k);
  const double inv_n = 1.0 / static_cast<double>(n);
  at::Tensor both = at::empty({k, 2 * k}, opt);  // [Sp | C]
  at::Tensor szr = at::empty({k, k}, opt);
  if (k >= 128) {
    // Sp and Sz are symmetric: with the columns split in halves (1, 2) the block (2, 1) is
    // the transpose of (1, 2) and is not multiplied out (NK² of the forward's 6NK² saved).
    const int64_t k1 = k / 2, k2 = k - k1;
    at::Tensor top = both.narrow(0, 0, k1), bottom = both.narrow(0, k1, k2);
    at::addmm_out(top, top, pc.narrow(1, 0, k1).t(), w, 0, inv_n);                       // p1ᵀ[p1 p2 | z]
    at::Tensor b_rest = bottom.narrow(1, k1, k2 + k);
    at::addmm_out(b_rest, b_rest, pc.narrow(1, k1, k2).t(), w.narrow(1, k1, k2 + k), 0, inv_n);  // p2ᵀ[p2 | z]
    Dev::lincomb(bottom.narrow(1, 0, k1), {{1.0, top.narrow(1, k1, k2).t()}}, 0.0);
    at::Tensor s_top = szr.narrow(0, 0, k1), s_br = szr.narrow(0, k1, k2).narrow(1, k1, k2);
    at::addmm_out(s_top, s_top, zc.narrow(1, 0, k1).t(), zc, 0, inv_n);
    at::addmm_out(s_br, s_br, zc.narrow(1, k1, k2).t(), zc.narrow(1, k1, k2), 0, inv_n);
    Dev::lincomb(szr.narrow(0, k1, k2).narrow(1, 0, k1), {{1.0, s_top.narrow(1, k1, k2).t()}}, 0.0);
  } else {
    at::addmm_out(both, both, pc.t(), w, /*beta=*/0, /*alpha=*/inv_n);
    at::addmm_out(szr, szr, zc.t(), zc, /*beta=*/0, /*alpha=*/inv_n);
  }
  const at::Tensor sp_view = both.narrow(1, 0, k);
  const at::Tensor xu = combine<Dev>({{1.0, both.narrow(1, k, k)}}, mu - 1.0, k, opt);
  const at::Tensor pa = combine<Dev>({{0.5, sp_view}, {0.5, sp_view.t()}}, mu, k, opt);
  const at::Tensor xa = combine<Dev>({{0.5, szr}, {0.5, szr.t()}}, mu - 1.0, k, opt);

  const int64_t h = half_order(order);
  at::Tensor saved = at::empty({saved_count(order), k, k}, opt);
  std::vector<at::Tensor> pu{xu};
  for (int64_t i = 2; i <= h; ++i) {
    at::Tensor dst = saved[i - 2];
    at::mm_out(dst, pu.back(), xu);
    pu.push_back(dst);
  }
  at::Tensor loss = at::zeros({}, opt);
  for (int64_t kk = 1; kk <= order; ++kk) {
    const int64_t a = (kk + 1) / 2, b = kk - a;
    at::Tensor t = b == 0 ? Dev::trace(pu[a - 1]) : Dev::trace_dot(pu[a - 1], pu[b - 1]);
    loss.add_(t, -lambd * taylor_coeff(kk));
  }
  at::Tensor prev = pa;
  for (int64_t kk = 1; kk <= order; ++kk) {
    if (kk > 1) {
      at::Tensor dst = saved[h - 1 + kk - 2];
      at::mm_out(dst, prev, xa);
      prev = dst;
    }
    loss.add_(Dev::trace_dot_sym(prev, xa), -gamma * taylor_coeff(kk));  // Xa symmetric: Σ A_ij Xa_ij
  }
  return {loss, xu, pa, xa, saved};
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor> ssl_backward(const at::Tensor& grad, const at::Tensor& p, const at::Tensor& z,
                                                const at::Tensor& xu, const at::Tensor& pa, const at::Tensor& xa,
                                                const at::Tensor& saved, double lambd, double mu, double gamma, int64_t order,
                                                bool need_p, bool need_z) {
  NoAutocast no_autocast;  // csrc/no_autocast.h
  const int64_t n = p.size(0), k = p.size(1);
  const auto acc = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opt = p.options().dtype(acc);
  const int64_t h = half_order(order);
  if (!need_p && !need_z) return {at::zeros_like(p), at::zeros_like(z)};
  const at::Tensor g = grad.to(acc).reshape({1}).contiguous();

  // dU/dXu = -λ q(Xu)ᵀ
  std::vector<at::Tensor> pu{xu};
  for (int64_t i = 2; i <= h; ++i) pu.push_back(saved[i - 2]);
  std::vector<double> qa(order);
  for (int64_t j = 0; j < order; ++j) qa[j] = (j % 2 ? -1.0 : 1.0);
  const at::Tensor q = poly<Dev>(pu, qa);

  // dA/dP = -f(Xa) (symmetric; only p's gradient needs it)
  at::Tensor f;
  if (need_p) {
    std::vector<at::Tensor> pa_pw{xa};
    for (int64_t i = 2; i <= h; ++i) pa_pw.push_back(at::mm(pa_pw.back(), xa));
    std::vector<double> fa(order + 1, 0.0);
    for (int64_t kk = 1; kk <= order; ++kk) fa[kk] = taylor_coeff(kk);
    f = poly<Dev>(pa_pw, fa);
  }

  // dA/dXa = -(R + Rᵀ), R = Σ_j Xa^j D_j (Horner: one GEMM with beta = 1 per step; z only)
  at::Tensor r;
  if (need_z) {
    std::vector<at::Tensor> chain{pa};
    for (int64_t l = 1; l < order; ++l) chain.push_back(saved[h - 1 + l - 1]);
    const int64_t jmax = (order - 1) / 2;
    for (int64_t j = jmax; j >= 0; --j) {
      std::vector<Term> terms{{0.5 * taylor_coeff(2 * j + 1), chain[j]}};
      for (int64_t l = j + 1; l <= order - 1 - j; ++l) terms.push_back({taylor_coeff(j + l + 1), chain[l]});
      at::Tensor dj = combine<Dev>(terms, 0.0, k, opt);
      r = j == jmax ? dj : dj.addmm_(xa, r);
    }
  }

  // [dpc | dzc] = g·[pc | zc]·[[2 dSp, dC], [dCᵀ, 2 dSz]] / N, one GEMM with inner
  // dimension 2K per input that needs a gradient (the 2K×K right factor stacked by two
  // linear-combination passes; no 2K×2K matrix):
  //   dpc = [pc | zc]·[-2γ f; -λ q] / N,   dzc = [pc | zc]·[-λ qᵀ; -2γ (R + Rᵀ)] / N
  at::Tensor w = at::empty({n, 2 * k}, opt);
  Dev::rows_forward(p, z, w);
  const double inv_n = 1.0 / static_cast<double>(n);
  at::Tensor gp, gz;
  at::Tensor right = at::empty({2 * k, k}, opt);
  at::Tensor gx = at::empty({n, k}, opt);
  if (need_p) {
    Dev::lincomb(right.narrow(0, 0, k), {{-2.0 * gamma * inv_n, f}}, 0.0);
    Dev::lincomb(right.narrow(0, k, k), {{-lambd * inv_n, q}}, 0.0);
    at::mm_out(gx, w, right);
    gp = Dev::rows_backward(p, gx, 0, g);
  } else {
    gp = at::zeros_like(p);
  }
  if (need_z) {
    Dev::lincomb(right.narrow(0, 0, k), {{-lambd * inv_n, q.t()}}, 0.0);
    Dev::lincomb(right.narrow(0, k, k), {{-2.0 * gamma * inv_n, r}, {-2.0 * gamma * inv_n, r.t()}}, 0.0);
    at::mm_out(gx, w, right);
    gz = Dev::rows_backward(z, gx, 0, g);
  } else {
    gz = at::zeros_like(z);
  }
  return {gp, gz};
}

// ---------------------------------------------------------------------------------------
// Matrix cross-entropy MCE(P, Q) = tr(-P log Q + Q), log Q by the order-n Taylor series.
// P and Q are general K×K matrices (not necessarily symmetric); X = Q - I.
//   L = -Σ_k c_k tr(P X^k) + tr Q,  A_0 = P, A_j = A_{j-1} X,  tr(P X^k) = Dev::trace_dot(A_{k-1}, X)
// Gradients (never through the chain; d tr(P X^k) = Σ_{i<k} tr(X^{k-1-i} P X^i dX)):
//   dL/dP = -f(X)ᵀ,  f(X) = Σ_k c_k X^k                     (Paterson–Stockmeyer, X..X^h)
//   dL/dQ = -Gᵀ + I, G = Σ_{m<n} X^m D_m, D_m = Σ_{j=0}^{n-1-m} c_{m+j+1} A_j   (Horner in X)
// Both are formed negated and transposed (-f(Xᵀ) = -f(X)ᵀ from transposed views of the powers;
// the last Horner step as (D̃_0 + I)ᵀ + rᵀXᵀ, the I folded into its block), so one contiguous
// pass scales them by the incoming gradient (a device tensor) into the input dtype.
// Saved: X and A_1..A_{n-1}. K×K products: forward n-1, backward (h-1) + (products of
// `poly`) for P and n-1 for Q (order 4: 3 forward, 2 + 3 backward).

// Forward. Returns (loss, X, saved) with X = Q - I (acc dtype) and saved = [A_1..A_{n-1}].
template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mce_forward(const at::Tensor& p, const at::Tensor& q, int64_t order) {
  NoAutocast no_autocast;  // csrc/no_autocast.h
  TORCH_CHECK(p.dim() == 2 && p.size(0) == p.size(1) && p.sizes() == q.sizes(),
              "matrix_mce_fwd_cxx: p and q must be square (K, K) of one shape");
  TORCH_CHECK(p.scalar_type() == q.scalar_type(), "matrix_mce_fwd_cxx: p and q must have one dtype");
  TORCH_CHECK(order >= 1, "matrix_mce_fwd_cxx: order must be >= 1");
  const int64_t k = p.size(0);
  const auto acc = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opt = p.options().dtype(acc);
  const at::Tensor pa = p.to(acc), qa = q.to(acc);  // no copy when already in the acc dtype
  const at::Tensor x = combine<Dev>({{1.0, qa}}, -1.0, k, opt);
  at::Tensor saved = at::empty({order - 1, k, k}, opt);
  at::Tensor loss = Dev::trace(qa);  // + tr Q
  at::Tensor prev = pa;
  for (int64_t kk = 1; kk <= order; ++kk) {
    if (kk > 1) {
      at::Tensor dst = saved[kk - 2];
      at::mm_out(dst, prev, x);
      prev = dst;
    }
    loss.add_(Dev::trace_dot(prev, x), -taylor_coeff(kk));
  }
  return {loss, x, saved};
}

// Backward: (dL/dP, dL/dQ) times `grad`, in the inputs' dtype (zeros where not needed).
template <class Dev>
std::tuple<at::Tensor, at::Tensor> mce_backward(const at::Tensor& grad, const at::Tensor& p, const at::Tensor& x,
                                                const at::Tensor& saved, int64_t order, bool need_p, bool need_q) {
  NoAutocast no_autocast;  // csrc/no_autocast.h
  TORCH_CHECK(order >= 1, "matrix_mce_bwd_cxx: order must be >= 1");
  TORCH_CHECK(saved.dim() == 3 && saved.size(0) == order - 1, "matrix_mce_bwd_cxx: saved must hold order - 1 matrices");
  const int64_t k = p.size(0);
  const auto opt = x.options();
  const at::Tensor g = grad.to(x.scalar_type()).reshape({});
  const auto out_opt = p.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dp, dq;
  const bool same = p.scalar_type() == x.scalar_type();
  // dst = m·g in the input dtype (m contiguous, acc dtype): in place when the dtypes agree
  auto scaled = [&](at::Tensor m) {
    if (same) return m.mul_(g);
    at::Tensor dst = at::empty({k, k}, out_opt);
    at::mul_out(dst, m, g);
    return dst;
  };
  if (need_p) {  // -f(X)ᵀ = -f(Xᵀ): the polynomial evaluated on transposed views comes out transposed
    const int64_t h = half_order(order);
    std::vector<at::Tensor> pw{x};
    for (int64_t i = 2; i <= h; ++i) pw.push_back(at::mm(pw.back(), x));
    for (auto& t : pw) t = t.t();
    std::vector<double> fa(order + 1, 0.0);
    for (int64_t kk = 1; kk <= order; ++kk) fa[kk] = -taylor_coeff(kk);
    dp = scaled(poly<Dev>(pw, fa));
  } else {
    dp = at::zeros({k, k}, out_opt);
  }
  if (need_q) {  // -Gᵀ + I by Horner: r = D̃_m + X·r (one GEMM with beta = 1 per step), D̃_m = -D_m
    const at::Tensor pa = p.to(x.scalar_type());
    std::vector<at::Tensor> chain{pa};
    for (int64_t j = 1; j < order; ++j) chain.push_back(saved[j - 1]);
    auto block = [&](int64_t m) {
      std::vector<Term> terms;
      for (int64_t j = 0; j <= order - 1 - m; ++j) terms.push_back({-taylor_coeff(m + j + 1), chain[j]});
      return terms;
    };
    at::Tensor r;
    for (int64_t m = order - 1; m >= 1; --m) {
      at::Tensor dm = combine<Dev>(block(m), 0.0, k, opt);
      r = m == order - 1 ? dm : dm.addmm_(x, r);
    }
    // the last step written transposed, (D̃_0 + I + X·r)ᵀ = (D̃_0 + I)ᵀ + rᵀXᵀ: the result is -Gᵀ + I, contiguous
    at::Tensor gt = at::empty({k, k}, opt);
    Dev::lincomb(gt.t(), block(0), 1.0);
    if (order > 1) gt.addmm_(r.t(), x.t());
    dq = scaled(gt);
  } else {
    dq = at::zeros({k, k}, out_opt);
  }
  return {dp, dq};
}

// Device-generic fallbacks built from ATen ops (used by the CUDA kernels' Dev).
inline void lincomb_aten(at::Tensor out, const std::vector<Term>& terms, double diag) {
  out.zero_();
  for (const Term& t : terms) out.add_(t.t, t.c);
  if (diag != 0.0) out.diagonal().add_(diag);
}

}  // namespace matrix_info
}  // namespace sslops
