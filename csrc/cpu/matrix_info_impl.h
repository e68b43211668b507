// Matrix-SSL and matrix cross-entropy: the K×K stages shared by every device
// (csrc/cpu/matrix_info.cpp, csrc/cuda/matrix_info.cu), and the full-buffer row stages the
// CUDA kernels use (the CPU has its own, blocked over rows, in matrix_info.cpp).
//
// The device supplies, through the template parameter `Dev`:
//
//   Dev::gemm(out, A, B, beta)          out = beta·out + A·B (BLAS; A, B any strided views)
//   Dev::gemm_sym(out, A, B, beta)      the same when out and A·B are symmetric (may skip half a block)
//   Dev::trace_dot(A, B), Dev::trace(A) Σ_ij A_ij B_ji = tr(A·B) without forming A·B; tr A
//   Dev::trace_dot_sym(A, B)            Σ_ij A_ij B_ij (= tr(A·B) for symmetric B), contiguous reads
//   Dev::lincomb(out, terms, d)         out = Σ c_i T_i + d·I in one pass (T_i any strided view)
//   Dev::rows_forward(p, z, W)          (full-buffer route) W = [p̂ - mean p̂ | ẑ - mean ẑ], x̂ = x/max(‖x_n‖, 1e-12)
//   Dev::rows_backward(x, G, col0, g)   (full-buffer route) g·(row-wise normalisation backward of G[:, col0:])
//
// Math (conventions §4, arXiv 2305.17326; c_k = (-1)^{k+1}/k, n = order, h = ceil(n/2)):
//   pc, zc = centred normalised rows;  C = pcᵀzc/N, Sp = pcᵀpc/N, Sz = zcᵀzc/N
//   Xu = C + (μ-1)I,  P = Sp + μI,  Xa = Sz + (μ-1)I
//   U = -λ Σ_k c_k tr(Xu^k),      tr(Xu^k) = tr(Xu^a Xu^b), a = ceil(k/2), b = k - a
//   A = -Σ_k c_k tr(P Xa^k),      A_j = P Xa^j (chain), tr(P Xa^k) = tr(A_{k-1} Xa);
//       from order 3 the chain stops at A_{n-2} and Xa² (symmetric, 3/4 of a product) replaces
//       A_{n-1}: tr(P Xa^n) = tr(A_{n-2} Xa²)
//   loss = U + γA
// Gradients (never through the chain):
//   dU/dXu = -λ q(Xu)ᵀ,  q(X) = Σ_{j<n} (-1)^j X^j        (Paterson–Stockmeyer with X^h)
//   dA/dP  = -f(Xa),     f(X) = Σ_k c_k X^k                (Xa, P symmetric)
//   dA/dXa = -Σ_k c_k Σ_{j+l=k-1} X^j P X^l = -(R + Rᵀ),  R = Σ_{j≤(n-1)/2} Xa^j D_j,
//            D_j = ½c_{2j+1} A_j + Σ_{l=j+1}^{n-1-j} c_{j+l+1} A_l       (Horner in Xa);
//            from order 3 D_0's c_n A_{n-1} is replaced by c_n A_{n-2}ᵀ in D_1 (Xa·A_{n-2}ᵀ =
//            Xa^{n-1}P is the transpose of A_{n-1}, and only R + Rᵀ is used)
//   [dpc | dzc] = [pc | zc] · [[2 dSp, dC], [dCᵀ, 2 dSz]] / N
//   dp = (dp̂ - p̂ (p̂·dp̂)) / ‖p‖ row-wise (dp̂ = dpc: J is the identity on centred columns)
//
// Saved by the forward: Xu, P, Xa (Sp, Sz exactly symmetric) and the products it made
// (Xu^2..Xu^h, A_1..A_{n-2}, Xa²; A_1..A_{n-1} below order 3); rows are recomputed in the
// backward. K×K products, order 4 (a symmetric one, Dev::gemm_sym, counted as 3/4): forward
// 1 (Xu²) + 2 (A_1, A_2) + 3/4 (Xa²); backward 1 (q) always, + 3/4 (f's Horner step) when p
// needs a gradient, + 1 (R) when z does: 6.5 in all with both, 5.75 for the online branch z
// alone (the training case: p is a detached teacher output). GEMMs N×K×K: the forward's
// covariances on and above the block diagonal only (CPU: 4.5NK² at K = 512, see
// column_blocks in matrix_info.cpp; CUDA: 5NK²), backward 4NK² per input that needs a gradient.
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

// A new K×K matrix a·b (Dev::gemm: out = beta·out + a·b, any strided a, b).
template <class Dev>
at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  Dev::gemm(out, a, b, 0.0);
  return out;
}

// Σ_{i=0}^{d} a_i X^i given pw = [X^1, ..., X^h] (X^0 = I implicit): blocks of h
// coefficients combined by Horner's rule in X^h (Paterson–Stockmeyer); each Horner step
// is one GEMM with beta = 1 (block + X^h·acc), no separate addition pass. `out`: a K×K view
// the result is written into (undefined: a new matrix). `symmetric`: X is symmetric, so every
// Horner product is too (Dev::gemm_sym may skip half a block).
template <class Dev>
at::Tensor poly(const std::vector<at::Tensor>& pw, const std::vector<double>& a, const at::Tensor& out = at::Tensor(),
                bool symmetric = false) {
  const int64_t h = static_cast<int64_t>(pw.size());
  const int64_t d = static_cast<int64_t>(a.size()) - 1;
  const int64_t k = pw[0].size(0);
  auto block = [&](int64_t start, double extra_h, bool last) {
    std::vector<Term> terms;
    for (int64_t r = 1; r < h && start + r <= d; ++r)
      if (a[start + r] != 0.0) terms.push_back({a[start + r], pw[r - 1]});
    if (extra_h != 0.0) terms.push_back({extra_h, pw[h - 1]});
    at::Tensor dst = last && out.defined() ? out : at::empty({k, k}, pw[0].options());
    Dev::lincomb(dst, terms, a[start]);
    return dst;
  };
  const int64_t nblocks = d / h + 1;
  int64_t b = nblocks - 1;
  at::Tensor acc;
  if (b * h == d && b > 0) {  // last block is a lone scalar: a_d·X^h needs no product
    acc = block((b - 1) * h, a[d], b == 1);
    b -= 1;
  } else {
    acc = block(b * h, 0.0, b == 0);
  }
  for (--b; b >= 0; --b) {  // in place: no copy of the block
    at::Tensor next = block(b * h, 0.0, b == 0);
    if (symmetric) {
      Dev::gemm_sym(next, pw[h - 1], acc, 1.0);
    } else {
      Dev::gemm(next, pw[h - 1], acc, 1.0);
    }
    acc = next;
  }
  return acc;
}

// The alignment's saved products (order n ≥ 3, the "short chain"): A_1..A_{n-2} = P·Xa^j and
// Xa² (symmetric: Dev::gemm_sym, 3/4 of a product), which stands in for A_{n-1}:
// tr(P Xa^n) = tr(A_{n-2} Xa²), and the backward's A_{n-1} term is moved into its Horner step
// (see kk_backward). Order ≤ 2 keeps the full chain A_1..A_{n-1}.
inline bool short_chain(int64_t order) { return order >= 3; }

// K×K stage of the forward, shared by every device: the loss from Xu, P, Xa, and the
// products it makes written into `saved` = [Xu^2..Xu^h, A_1..A_{n-2}, Xa²] (A_j = P·Xa^j;
// [Xu^2..Xu^h, A_1..A_{n-1}] for order ≤ 2).
template <class Dev>
at::Tensor kk_forward(const at::Tensor& xu, const at::Tensor& pa, const at::Tensor& xa, const at::Tensor& saved, double lambd,
                      double gamma, int64_t order) {
  const int64_t h = half_order(order);
  std::vector<at::Tensor> pu{xu};
  for (int64_t i = 2; i <= h; ++i) {
    at::Tensor dst = saved[i - 2];
    Dev::gemm(dst, pu.back(), xu, 0.0);
    pu.push_back(dst);
  }
  at::Tensor loss = at::zeros({}, xu.options());
  for (int64_t kk = 1; kk <= order; ++kk) {
    const int64_t a = (kk + 1) / 2, b = kk - a;
    at::Tensor t = b == 0 ? Dev::trace(pu[a - 1]) : Dev::trace_dot(pu[a - 1], pu[b - 1]);
    loss.add_(t, -lambd * taylor_coeff(kk));
  }
  const bool shortc = short_chain(order);
  const int64_t chain_end = shortc ? order - 1 : order;  // tr(P Xa^kk) along the chain up to here
  at::Tensor prev = pa;
  for (int64_t kk = 1; kk <= chain_end; ++kk) {
    if (kk > 1) {
      at::Tensor dst = saved[h - 1 + kk - 2];
      Dev::gemm(dst, prev, xa, 0.0);
      prev = dst;
    }
    loss.add_(Dev::trace_dot_sym(prev, xa), -gamma * taylor_coeff(kk));  // Xa symmetric: Σ A_ij Xa_ij
  }
  if (shortc) {  // tr(P Xa^n) = Σ A_{n-2} ∘ Xa² (Xa² symmetric)
    at::Tensor xa2 = saved[saved.size(0) - 1];
    Dev::gemm_sym(xa2, xa, xa, 0.0);
    loss.add_(Dev::trace_dot_sym(prev, xa2), -gamma * taylor_coeff(order));
  }
  return loss;
}

// K×K stage of the backward, shared by every device: per unit of incoming gradient,
// dU/dXu = -λ·qᵀ, dA/dP = -f and dA/dXa = -(R + Rᵀ) (q always; f when p needs a gradient,
// R when z does; the others undefined). Each caller folds -λ, -2γ, 1/N and the incoming
// gradient into its next pass, or asks for them here: `to` gives optional destinations
// (K×K views) and scales for q and f, written there without another pass.
struct KKGrads {
  at::Tensor q, f, r;
};

struct KKTargets {
  at::Tensor q, f;  // where s_q·q and s_f·f go; undefined: new matrices
  double s_q = 1.0, s_f = 1.0;
};

template <class Dev>
KKGrads kk_backward(const at::Tensor& xu, const at::Tensor& pa, const at::Tensor& xa, const at::Tensor& saved, int64_t order,
                    bool need_p, bool need_z, const KKTargets& to = KKTargets()) {
  const int64_t k = xu.size(0), h = half_order(order);
  KKGrads out;
  // q(Xu) = Σ_{j<n} (-1)^j Xu^j
  std::vector<at::Tensor> pu{xu};
  for (int64_t i = 2; i <= h; ++i) pu.push_back(saved[i - 2]);
  std::vector<double> qa(order);
  for (int64_t j = 0; j < order; ++j) qa[j] = (j % 2 ? -1.0 : 1.0) * to.s_q;
  out.q = poly<Dev>(pu, qa, to.q);
  // f(Xa) = Σ_k c_k Xa^k (symmetric)
  if (need_p) {
    std::vector<at::Tensor> pa_pw{xa};
    for (int64_t i = 2; i <= h; ++i) {
      if (i == 2 && short_chain(order)) {  // Xa², saved by the forward
        pa_pw.push_back(saved[saved.size(0) - 1]);
        continue;
      }
      at::Tensor next = at::empty({k, k}, xa.options());
      Dev::gemm_sym(next, pa_pw.back(), xa, 0.0);
      pa_pw.push_back(next);
    }
    std::vector<double> fa(order + 1, 0.0);
    for (int64_t kk = 1; kk <= order; ++kk) fa[kk] = taylor_coeff(kk) * to.s_f;
    out.f = poly<Dev>(pa_pw, fa, to.f, /*symmetric=*/true);
  }
  // R = Σ_j Xa^j D_j (Horner: one GEMM with beta = 1 per step). With the short chain (no
  // A_{n-1}), D_0's term c_n·A_{n-1} = c_n·P Xa^{n-1} becomes c_n·A_{n-2}ᵀ in D_1: Xa·A_{n-2}ᵀ =
  // Xa^{n-1} P, its transpose, and only R + Rᵀ is used.
  if (need_z) {
    const bool shortc = short_chain(order);
    std::vector<at::Tensor> chain{pa};
    for (int64_t l = 1; l < (shortc ? order - 1 : order); ++l) chain.push_back(saved[h - 1 + l - 1]);
    const int64_t jmax = (order - 1) / 2;
    for (int64_t j = jmax; j >= 0; --j) {
      std::vector<Term> terms{{0.5 * taylor_coeff(2 * j + 1), chain[j]}};
      for (int64_t l = j + 1; l <= order - 1 - j; ++l)
        if (!(shortc && l == order - 1)) terms.push_back({taylor_coeff(j + l + 1), chain[l]});
      if (shortc && j == 1) terms.push_back({taylor_coeff(order), chain[order - 2].t()});
      at::Tensor dj = combine<Dev>(terms, 0.0, k, xu.options());
      if (j < jmax) Dev::gemm(dj, xa, out.r, 1.0);
      out.r = dj;
    }
  }
  return out;
}

// Forward on a full centred-row buffer (the CUDA kernels' route; the CPU has its own row
// stage in matrix_info.cpp). Returns (loss, Xu, P, Xa, saved) with Xu = C + (μ-1)I,
// P = Sp + μI, Xa = Sz + (μ-1)I (Sp, Sz exactly symmetric), saved = [Xu^2..Xu^h, P·Xa^1..P·Xa^{n-1}].
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
  at::Tensor pc = w.narrow(1, 0, k), zc = w.narrow(1, k, k);
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
  w.reset(), pc.reset(), zc.reset();  // the centred rows are recomputed in the backward
  const at::Tensor xu = combine<Dev>({{1.0, both.narrow(1, k, k)}}, mu - 1.0, k, opt);
  const at::Tensor pa = combine<Dev>({{0.5, both.narrow(1, 0, k)}, {0.5, both.narrow(1, 0, k).t()}}, mu, k, opt);
  const at::Tensor xa = combine<Dev>({{0.5, szr}, {0.5, szr.t()}}, mu - 1.0, k, opt);
  both.reset(), szr.reset();
  at::Tensor saved = at::empty({saved_count(order), k, k}, opt);
  at::Tensor loss = kk_forward<Dev>(xu, pa, xa, saved, lambd, gamma, order);
  return {loss, xu, pa, xa, saved};
}

// Backward on full buffers (the CUDA kernels' route; see matrix_info.cpp for the CPU's).
template <class Dev>
std::tuple<at::Tensor, at::Tensor> ssl_backward(const at::Tensor& grad, const at::Tensor& p, const at::Tensor& z,
                                                const at::Tensor& xu, const at::Tensor& pa, const at::Tensor& xa,
                                                const at::Tensor& saved, double lambd, double mu, double gamma, int64_t order,
                                                bool need_p, bool need_z) {
  NoAutocast no_autocast;  // csrc/no_autocast.h
  const int64_t n = p.size(0), k = p.size(1);
  const auto acc = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opt = p.options().dtype(acc);
  if (!need_p && !need_z) return {at::empty({0}, p.options()), at::empty({0}, z.options())};
  const at::Tensor g = grad.to(acc).reshape({1}).contiguous();
  const KKGrads kk = kk_backward<Dev>(xu, pa, xa, saved, order, need_p, need_z);

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
    Dev::lincomb(right.narrow(0, 0, k), {{-2.0 * gamma * inv_n, kk.f}}, 0.0);
    Dev::lincomb(right.narrow(0, k, k), {{-lambd * inv_n, kk.q}}, 0.0);
    at::mm_out(gx, w, right);
    gp = Dev::rows_backward(p, gx, 0, g);
  } else {
    gp = at::empty({0}, p.options());  // not asked for: not allocated
  }
  if (need_z) {
    Dev::lincomb(right.narrow(0, 0, k), {{-lambd * inv_n, kk.q.t()}}, 0.0);
    Dev::lincomb(right.narrow(0, k, k), {{-2.0 * gamma * inv_n, kk.r}, {-2.0 * gamma * inv_n, kk.r.t()}}, 0.0);
    at::mm_out(gx, w, right);
    gz = Dev::rows_backward(z, gx, 0, g);
  } else {
    gz = at::empty({0}, z.options());
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
      Dev::gemm(dst, prev, x, 0.0);
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
    for (int64_t i = 2; i <= h; ++i) pw.push_back(product<Dev>(pw.back(), x));
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
    // two K×K buffers in turn: each step writes D̃_m into the one r does not hold
    at::Tensor r, spare;
    for (int64_t m = order - 1; m >= 1; --m) {
      at::Tensor dm = spare.defined() ? spare : at::empty({k, k}, opt);
      Dev::lincomb(dm, block(m), 0.0);
      if (m < order - 1) Dev::gemm(dm, x, r, 1.0);
      spare = r;
      r = dm;
    }
    // the last step written transposed, (D̃_0 + I + X·r)ᵀ = (D̃_0 + I)ᵀ + rᵀXᵀ: the result is -Gᵀ + I, contiguous
    at::Tensor gt = spare.defined() ? spare : at::empty({k, k}, opt);
    spare.reset();
    Dev::lincomb(gt.t(), block(0), 1.0);
    if (order > 1) Dev::gemm(gt, r.t(), x.t(), 1.0);
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
