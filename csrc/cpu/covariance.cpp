// Covariance-family losses on the CPU: VICReg (per view, and the relation form's var/cov
// terms) and Barlow Twins, forward and backward.
//
// Notation: z is (N, K). Column statistics mean_k and m2_k = Σ_n (z_nk - mean_k)² come from
// two passes over the rows (accurate when |mean| >> std). The normalised views are
//
//   VICReg   Â = (z - mean) / sqrt(N - 1)            C = ÂᵀÂ is the unbiased covariance
//   Barlow   Â = (z - mean) · rstd / sqrt(N),        rstd = 1 / sqrt(m2/N + eps)
//            c = ÂᵀB̂ = bn(z_a)ᵀ bn(z_b) / N
//
// Only scalar reductions of the K×K products are needed, so every product is taken on the
// smaller side ("route"):
//
//   K×K route   C = ÂᵀB̂                (2NK² flops)      Σ_{j≠k} C_jk² summed directly
//   Gram route  Ga = ÂÂᵀ, Gb = B̂B̂ᵀ   (2N²K each)        ‖ÂᵀB̂‖_F² = ⟨Ga, Gb⟩_F, then minus Σ_k C_kk²
//
// (for VICReg Ga = Gb, one product). The diagonal C_kk is O(NK) (VICReg: m2_k/(N-1);
// Barlow: Σ_n Â_nk B̂_nk). VICReg's invariance sum Σ (z_a - z_b)² is fused into z_a's
// column-mean pass (the view op's optional `other`): per-column sums while the row slice of
// z_a is loaded, then added over the columns in order in double (deterministic). Products
// run through at::mm (MKL), everything else is a fused OpenMP loop over column chunks;
// accumulation is fp32 (fp64 for fp64 inputs), scalar sums in double.
//
// Gradients (g the incoming scalar gradient):
//   VICReg view, terms t0 = Σ_k relu(1 - sqrt(C_kk + eps)), t1 = Σ_{j≠k} C_jk², t2 = Σ (z - other)²:
//     ∂t0/∂z = -[std_k < 1] / std_k · Â / sqrt(N-1)
//     ∂t1/∂z = 4 (ÂC - Â diag C) / sqrt(N-1),   ÂC = (ÂÂᵀ)Â on the Gram route
//     ∂t2/∂z = 2 (z - other)   (the op layer passes 2·sim_coeff/(NK)·g as coef[2]; fused in dz's pass)
//   (the centring projection is exact here: Âᵀ1 = 0 makes both column means vanish).
//   Barlow, L = Σ_k (c_kk - 1)² + λ Σ_{j≠k} c_jk², dL/dc = 2λ c + diag(D), D_k = 2(1-λ)c_kk - 2:
//     dÂ = 2λ B̂cᵀ + B̂ diag(D)   (B̂cᵀ = Gb Â),      dB̂ = 2λ Âc + Â diag(D)   (Âc = Ga B̂)
//     dz = rstd/sqrt(N) · (dÂ - colmean(dÂ) - Â · colsum(dÂ ⊙ Â))      (batch-norm backward)
//
// Saved for backward: mean and m2 (VICReg) or mean and rstd (Barlow), (K,) each, and (when
// the forward is asked to save) the product the backward multiplies by — the N×N Gram(s) or
// the K×K matrix, min(N, K)² ≤ N·K elements, never more than an input — so the backward runs
// one product instead of two; Â is recomputed. The route is chosen by the Python op layer
// (sslops/ops/covariance.py: Gram iff 4N < 3K, for cost and to bound the cancellation of
// ‖ÂÂᵀ‖² - Σ C_kk²; route 0 here applies the same rule).
// Cost per call (flops): VICReg per view, forward 2·N·K·min(N, K), backward the same;
// Barlow, Gram route 4N²K forward + 4N²K backward, K×K route 2NK² + 4NK². Bytes: each input
// read 3 times by its forward (two statistics passes, one normalising pass) and the other view
// once more in z_a's mean pass (VICReg: 7·NK element reads for both views, one pass fewer than
// a separate Σ(z_a - z_b)² pass), an fp32 N×K copy per view written and read, the product
// written once, read twice.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../no_autocast.h"
#include "column_reduce.h"
#include "parallel.h"
#include "parallel_ops.h"

namespace sslops {
namespace {

constexpr int64_t kColGrain = 32;

// Route codes shared with the Python op layer: 0 = by shape, 1 = K×K, 2 = Gram (N×N).
bool use_gram(int64_t route, int64_t n, int64_t k, double gram_cost, double kk_cost) {
  if (route == 1) return false;
  if (route == 2) return true;
  return gram_cost < kk_cost;
}

at::ScalarType acc_dtype_of(const at::Tensor& z) { return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Rows per block of the row-blocked backward passes: at most N/8 (the blocks stay small next
// to the N×K gradients they replace), 128, and what keeps `buffers` (rows, K) fp32 buffers per
// thread within 512 KB (L2); at least 16 (BLAS efficiency).
int64_t block_rows(int64_t n, int64_t k, int64_t buffers) {
  const int64_t cap = std::min<int64_t>({128, n / 8, 131072 / std::max<int64_t>(1, k * buffers)});
  return std::max<int64_t>(16, cap);
}

// Column mean, m2 and the scaled centred copy out = (z - mean) · scale_k, scale_k = scale(m2_k).
// With `other` (same shape, contiguous) and !have_mean, the pass that sums the columns also
// accumulates sq_k = Σ_n (z_nk - other_nk)² (VICReg's invariance term): only `other` is read
// extra. The statistics are column_slice_moments' (column_reduce.h): thread-count independent.
// The mean is exact before it is rounded to the accumulation type; out is centred on the exact
// mean, out = ((z - mean) - r)·scale with r = exact mean − mean, so its columns sum to zero up
// to rounding. Centred on the rounded mean alone (off by up to half an ulp of |mean|: 0.004
// near 1e5), every column of out carried that offset, and VICReg's gradient, which omits the
// centring projection because Âᵀ1 = 0, kept it (10× plain PyTorch's error at a shift of 1e5).
// With have_mean, r is recomputed: one more (blocked) pass over z.
template <typename scalar_t, typename ScaleF>
void normalise_columns(const scalar_t* z, int64_t n, int64_t k, acc_t<scalar_t>* mean, acc_t<scalar_t>* m2,
                       acc_t<scalar_t>* out, const ScaleF& scale, bool have_mean, const scalar_t* other = nullptr,
                       acc_t<scalar_t>* sq = nullptr) {
  using acc = acc_t<scalar_t>;
  parallel_for(k, kColGrain, [&](int64_t c0, int64_t c1) {
    const int64_t w = c1 - c0;
    std::vector<acc> s(w, acc(0)), q(w, acc(0)), f(w), res(w);
    if (have_mean) {
      for (int64_t c = 0; c < w; ++c) s[c] = mean[c0 + c];
      std::vector<double> dev(w);
      column_sums<acc, 1>(n, w, dev.data(), [&](int64_t r, int64_t c, acc* t) { t[0] = static_cast<acc>(z[r * k + c0 + c]) - s[c]; });
      for (int64_t c = 0; c < w; ++c) res[c] = static_cast<acc>(dev[c] / static_cast<double>(n));
    } else {
      std::vector<acc> e(other != nullptr ? w : 0, acc(0));
      column_slice_moments(z, n, k, c0, w, s.data(), q.data(), other, e.data(), res.data());
      if (other != nullptr)
        for (int64_t c = 0; c < w; ++c) sq[c0 + c] = e[c];
      for (int64_t c = 0; c < w; ++c) {
        mean[c0 + c] = s[c];
        m2[c0 + c] = q[c];
      }
    }
    for (int64_t c = 0; c < w; ++c) f[c] = scale(c0 + c);
    for (int64_t r = 0; r < n; ++r) {
      const scalar_t* row = z + r * k + c0;
      acc* o = out + r * k + c0;
      for (int64_t c = 0; c < w; ++c) o[c] = ((static_cast<acc>(row[c]) - s[c]) - res[c]) * f[c];
    }
  });
}

// Σ_ij a_ij b_ij over two (rows, cols) contiguous matrices, skipping the diagonal when asked.
template <typename acc>
double dot_sum(const acc* a, const acc* b, int64_t rows, int64_t cols, bool skip_diag) {
  return at::parallel_reduce(
      0, rows, 16, 0.0,
      [&](int64_t r0, int64_t r1, double init) {
        double t = init;
        for (int64_t r = r0; r < r1; ++r) {
          const acc* x = a + r * cols;
          const acc* y = b + r * cols;
          double row = 0.0;
          for (int64_t c = 0; c < cols; ++c)
            if (!(skip_diag && c == r)) row += static_cast<double>(x[c]) * static_cast<double>(y[c]);
          t += row;
        }
        return t;
      },
      std::plus<double>());
}

// ---------------------------------------------------------------------------- VICReg (one view)

// terms = [Σ_k relu(1 - sqrt(m2_k/(N-1) + eps)), Σ_{j≠k} C_jk², Σ (z - other)²], mean, m2.
// The third term is accumulated per column in the mean pass (fp32, fp64 for fp64), and the
// columns are added in order in double; it is 0 without `other`.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vicreg_view_forward_cpu(const at::Tensor& z_in,
                                                                                const c10::optional<at::Tensor>& other_in,
                                                                                double eps, int64_t route, bool save) {
  NoAutocast no_autocast;
  TORCH_CHECK(z_in.dim() == 2 && z_in.size(0) >= 2, "vicreg_view_forward_cxx: z must be (N >= 2, K)");
  const bool has_other = other_in.has_value() && other_in->defined();
  TORCH_CHECK(!has_other || other_in->sizes() == z_in.sizes(), "vicreg_view_forward_cxx: other must have z's shape");
  const at::Tensor z = z_in.contiguous();
  const at::Tensor other = has_other ? other_in->to(z.scalar_type()).contiguous() : at::Tensor();
  const int64_t n = z.size(0), k = z.size(1);
  const auto acc_dtype = acc_dtype_of(z);
  auto opts = z.options().dtype(acc_dtype);
  at::Tensor mean = at::empty({k}, opts), m2 = at::empty({k}, opts), terms = at::empty({3}, opts);
  at::Tensor zh = at::empty({n, k}, opts), prod;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "vicreg_view_forward_cxx", [&] {
    using acc = acc_t<scalar_t>;
    const acc s = acc(1) / std::sqrt(static_cast<acc>(n - 1));
    std::vector<acc> sq(has_other ? k : 0);
    normalise_columns<scalar_t>(z.data_ptr<scalar_t>(), n, k, mean.data_ptr<acc>(), m2.data_ptr<acc>(), zh.data_ptr<acc>(),
                                [s](int64_t) { return s; }, false, has_other ? other.data_ptr<scalar_t>() : nullptr,
                                has_other ? sq.data() : nullptr);
    const acc* q = m2.data_ptr<acc>();
    double hinge = 0.0, diag_sq = 0.0, sq_diff = 0.0;
    for (int64_t c = 0; c < k; ++c) {
      const double var = static_cast<double>(q[c]) / static_cast<double>(n - 1);
      const double std_c = std::sqrt(static_cast<double>(static_cast<acc>(var) + static_cast<acc>(eps)));
      const double h = 1.0 - std_c;
      hinge += (h > 0.0 || std::isnan(h)) ? h : 0.0;
      diag_sq += var * var;
      if (has_other) sq_diff += static_cast<double>(sq[c]);
    }
    double off;
    if (use_gram(route, n, k, 4.0 * n, 3.0 * k)) {
      prod = at::mm(zh, zh.t());
      off = dot_sum<acc>(prod.data_ptr<acc>(), prod.data_ptr<acc>(), n, n, false) - diag_sq;
    } else {
      prod = at::mm(zh.t(), zh);
      off = dot_sum<acc>(prod.data_ptr<acc>(), prod.data_ptr<acc>(), k, k, true);
    }
    acc* t = terms.data_ptr<acc>();
    t[0] = static_cast<acc>(hinge);
    t[1] = static_cast<acc>(off);
    t[2] = static_cast<acc>(sq_diff);
  });
  if (!save) prod = at::empty({0, 0}, opts);
  return {terms, mean, m2, prod};
}

// dz = coef0·∂t0/∂z + coef1·∂t1/∂z + coef2·(z - other)      (other optional)
at::Tensor vicreg_view_backward_cpu(const at::Tensor& z_in, const c10::optional<at::Tensor>& other_in, const at::Tensor& mean,
                                    const at::Tensor& m2, const at::Tensor& prod, const at::Tensor& coef_in, double eps,
                                    int64_t route) {
  NoAutocast no_autocast;
  const at::Tensor z = z_in.contiguous();
  const int64_t n = z.size(0), k = z.size(1);
  const auto acc_dtype = acc_dtype_of(z);
  auto opts = z.options().dtype(acc_dtype);
  const at::Tensor coef = coef_in.to(acc_dtype).contiguous();
  const bool has_other = other_in.has_value() && other_in->defined();
  const at::Tensor other = has_other ? other_in->to(z.scalar_type()).contiguous() : at::Tensor();
  at::Tensor mean_c = mean.to(acc_dtype).contiguous(), m2_c = m2.to(acc_dtype).contiguous();
  at::Tensor dz = at::empty({n, k}, z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "vicreg_view_backward_cxx", [&] {
    using acc = acc_t<scalar_t>;
    const acc inv_s = std::sqrt(static_cast<acc>(n - 1));
    const acc s = acc(1) / inv_s;
    const bool gram = use_gram(route, n, k, 4.0 * n, 3.0 * k);
    const bool saved = prod.numel() > 0;
    const acc* cf = coef.data_ptr<acc>();
    const acc c_h = cf[0], c_off = cf[1], c_sim = cf[2];
    const acc* q = m2_c.data_ptr<acc>();
    std::vector<acc> w(k);
    for (int64_t c = 0; c < k; ++c) {
      const acc var = q[c] / static_cast<acc>(n - 1);
      const acc std_c = std::sqrt(var + static_cast<acc>(eps));
      const acc active = (acc(1) - std_c > acc(0)) ? acc(1) : acc(0);
      // (∂t0 + ∂t1 diagonal part) per unit of Â, then divided by sqrt(N-1) below
      w[c] = (std::isnan(std_c) ? std_c : -c_h * active / std_c) - acc(4) * c_off * var;
    }
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* op = has_other ? other.data_ptr<scalar_t>() : nullptr;
    scalar_t* out = dz.data_ptr<scalar_t>();
    const acc c4 = acc(4) * c_off * s;
    // rows [r0, r0 + m) of dz from the centred rows zhp and t = Ẑ·C (both with row stride k, from row r0)
    auto write_rows = [&](const acc* zhp, const acc* tp, int64_t r0, int64_t m) {
      for (int64_t i = 0; i < m; ++i) {
        const int64_t base = (r0 + i) * k;
        for (int64_t c = 0; c < k; ++c) {
          acc v = zhp[i * k + c] * w[c] * s + c4 * tp[i * k + c];
          if (op) v += c_sim * (static_cast<acc>(zp[base + c]) - static_cast<acc>(op[base + c]));
          out[base + c] = static_cast<scalar_t>(v);
        }
      }
    };
    if (!gram && saved) {
      // K×K route with the saved covariance: blocks of rows, one thread each, the centred rows
      // rebuilt and multiplied by C (single-thread GEMM) into block buffers: no N×K fp32 copy
      // of z and no N×K product (the backward's peak memory is dz and the blocks).
      const at::Tensor cov = prod.to(acc_dtype);
      const acc* mp = mean_c.data_ptr<acc>();
      // the mean's residual, as normalise_columns takes it: Σ_r (z_r - mean) / N in double
      std::vector<acc> res(k);
      parallel_for(k, kColGrain, [&](int64_t c0, int64_t c1) {
        std::vector<double> dev(c1 - c0);
        column_sums<acc, 1>(n, c1 - c0, dev.data(), [&](int64_t r, int64_t c, acc* t) { t[0] = static_cast<acc>(zp[r * k + c0 + c]) - mp[c0 + c]; });
        for (int64_t c = c0; c < c1; ++c) res[c] = static_cast<acc>(dev[c - c0] / static_cast<double>(n));
      });
      const int64_t rows = block_rows(n, k, 2), blocks = (n + rows - 1) / rows;
      parallel_for_ops(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        at::Tensor zb = at::empty({rows, k}, opts), tb = at::empty({rows, k}, opts);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t r0 = b * rows, m = std::min(rows, n - r0);
          acc* zbp = zb.data_ptr<acc>();
          for (int64_t i = 0; i < m; ++i)
            for (int64_t c = 0; c < k; ++c) zbp[i * k + c] = ((static_cast<acc>(zp[(r0 + i) * k + c]) - mp[c]) - res[c]) * s;
          at::Tensor tv = tb.narrow(0, 0, m);
          at::mm_out(tv, zb.narrow(0, 0, m), cov);
          write_rows(zbp, tb.data_ptr<acc>(), r0, m);
        }
      });
      return;
    }
    at::Tensor zh = at::empty({n, k}, opts);
    normalise_columns<scalar_t>(zp, n, k, mean_c.data_ptr<acc>(), nullptr, zh.data_ptr<acc>(), [s](int64_t) { return s; }, true);
    // the product saved by the forward (N×N Gram or K×K covariance), or recomputed
    const at::Tensor t = gram ? at::mm(saved ? prod.to(acc_dtype) : at::mm(zh, zh.t()), zh)
                              : at::mm(zh, saved ? prod.to(acc_dtype) : at::mm(zh.t(), zh));
    at::parallel_for(0, n, 8, [&](int64_t r0, int64_t r1) {
      write_rows(zh.data_ptr<acc>() + r0 * k, t.data_ptr<acc>() + r0 * k, r0, r1 - r0);
    });
  });
  return dz;
}

// ---------------------------------------------------------------------------- Barlow Twins

template <typename scalar_t>
void barlow_normalise(const at::Tensor& z, at::Tensor& mean, at::Tensor& rstd, at::Tensor& zh, double eps, bool have_stats) {
  using acc = acc_t<scalar_t>;
  const int64_t n = z.size(0), k = z.size(1);
  acc* rs = rstd.data_ptr<acc>();
  const acc root_n = std::sqrt(static_cast<acc>(n));
  if (have_stats) {
    normalise_columns<scalar_t>(z.data_ptr<scalar_t>(), n, k, mean.data_ptr<acc>(), nullptr, zh.data_ptr<acc>(),
                                [rs, root_n](int64_t c) { return rs[c] / root_n; }, true);
    return;
  }
  std::vector<acc> m2(k);
  acc* m2p = m2.data();
  normalise_columns<scalar_t>(
      z.data_ptr<scalar_t>(), n, k, mean.data_ptr<acc>(), m2p, zh.data_ptr<acc>(),
      [rs, m2p, n, eps, root_n](int64_t c) {
        rs[c] = acc(1) / std::sqrt(m2p[c] / static_cast<acc>(n) + static_cast<acc>(eps));
        return rs[c] / root_n;
      },
      false);
}

// d_c = Σ_n a_nc b_nc (Barlow's diagonal c_kk), column_sums' blocked summation.
template <typename acc>
std::vector<acc> column_dots(const acc* a, const acc* b, int64_t n, int64_t k) {
  std::vector<acc> d(k);
  parallel_for(k, kColGrain, [&](int64_t c0, int64_t c1) {
    std::vector<double> s(c1 - c0);
    column_sums<acc, 1>(n, c1 - c0, s.data(), [&](int64_t r, int64_t c, acc* t) { t[0] = a[r * k + c0 + c] * b[r * k + c0 + c]; });
    for (int64_t c = c0; c < c1; ++c) d[c] = static_cast<acc>(s[c - c0]);
  });
  return d;
}

using Tensor7 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (loss, mean_a, rstd_a, mean_b, rstd_b, prod_a, prod_b): the products saved for the backward
// are (Ga, Gb) on the Gram route, (c, empty) on the K×K route, both empty when !save.
Tensor7 barlow_twins_forward_cpu(const at::Tensor& za_in, const at::Tensor& zb_in, double lambd, double eps, int64_t route,
                                 bool save) {
  NoAutocast no_autocast;
  TORCH_CHECK(za_in.dim() == 2 && za_in.sizes() == zb_in.sizes(), "barlow_twins_forward_cxx: z_a, z_b must be (N, K)");
  const at::Tensor za = za_in.contiguous(), zb = zb_in.to(za_in.scalar_type()).contiguous();
  const int64_t n = za.size(0), k = za.size(1);
  auto opts = za.options().dtype(acc_dtype_of(za));
  at::Tensor mean_a = at::empty({k}, opts), rstd_a = at::empty({k}, opts);
  at::Tensor mean_b = at::empty({k}, opts), rstd_b = at::empty({k}, opts);
  at::Tensor ah = at::empty({n, k}, opts), bh = at::empty({n, k}, opts);
  at::Tensor loss = at::empty({}, opts), prod_a, prod_b = at::empty({0, 0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za.scalar_type(), "barlow_twins_forward_cxx", [&] {
    using acc = acc_t<scalar_t>;
    barlow_normalise<scalar_t>(za, mean_a, rstd_a, ah, eps, false);
    barlow_normalise<scalar_t>(zb, mean_b, rstd_b, bh, eps, false);
    const std::vector<acc> dg = column_dots<acc>(ah.data_ptr<acc>(), bh.data_ptr<acc>(), n, k);
    double on = 0.0, diag_sq = 0.0;
    for (int64_t c = 0; c < k; ++c) {
      const double d = static_cast<double>(dg[c]);
      on += (d - 1.0) * (d - 1.0);
      diag_sq += d * d;
    }
    double off;
    if (use_gram(route, n, k, 4.0 * n * n, 3.0 * n * k)) {
      prod_a = at::mm(ah, ah.t());
      prod_b = at::mm(bh, bh.t());
      off = dot_sum<acc>(prod_a.data_ptr<acc>(), prod_b.data_ptr<acc>(), n, n, false) - diag_sq;
    } else {
      prod_a = at::mm(ah.t(), bh);
      off = dot_sum<acc>(prod_a.data_ptr<acc>(), prod_a.data_ptr<acc>(), k, k, true);
    }
    *loss.data_ptr<acc>() = static_cast<acc>(on + lambd * off);
  });
  if (!save) {
    prod_a = at::empty({0, 0}, opts);
    prod_b = at::empty({0, 0}, opts);
  }
  return {loss, mean_a, rstd_a, mean_b, rstd_b, prod_a, prod_b};
}

// dz = rstd/sqrt(N) · (d - colmean(d) - Â · colsum(d ⊙ Â)), d = g·(2λ·P + other·D)
template <typename scalar_t>
void barlow_finish(const acc_t<scalar_t>* p, const acc_t<scalar_t>* self, const acc_t<scalar_t>* other, const acc_t<scalar_t>* dcoef,
                   const acc_t<scalar_t>* rstd, acc_t<scalar_t> g, acc_t<scalar_t> two_l, int64_t n, int64_t k, scalar_t* out) {
  using acc = acc_t<scalar_t>;
  const acc root_n = std::sqrt(static_cast<acc>(n));
  parallel_for(k, kColGrain, [&](int64_t c0, int64_t c1) {
    const int64_t w = c1 - c0;
    std::vector<double> sums(2 * w);  // column sums of d and of d ⊙ Â, blocked (column_reduce.h)
    column_sums<acc, 2>(n, w, sums.data(), [&](int64_t r, int64_t c, acc* t) {
      const int64_t b = r * k + c0 + c;
      t[0] = g * (two_l * p[b] + other[b] * dcoef[c0 + c]);
      t[1] = t[0] * self[b];
    });
    std::vector<acc> s1(w), s2(w);
    for (int64_t c = 0; c < w; ++c) {
      s1[c] = static_cast<acc>(sums[c] / static_cast<double>(n));
      s2[c] = static_cast<acc>(sums[w + c]);
    }
    for (int64_t r = 0; r < n; ++r) {
      const int64_t b = r * k + c0;
      for (int64_t c = 0; c < w; ++c) {
        const acc d = g * (two_l * p[b + c] + other[b + c] * dcoef[c0 + c]);
        out[b + c] = static_cast<scalar_t>(rstd[c0 + c] / root_n * (d - s1[c] - self[b + c] * s2[c]));
      }
    }
  });
}

// The K×K route's backward from the saved c = ÂᵀB̂, blocked over rows (no N×K fp32 buffer).
// With p = B̂cᵀ, q = Âc and d = g·(2λ·p + B̂·D) (D_k = 2(1-λ)·c̃_kk - 2, c̃_kk = Σ_r Â_rk B̂_rk),
// dz_a = rstd_a/√N · (d - mean_r d - Â ⊙ Σ_r d ⊙ Â), and the two column reductions need no
// pass over p: Σ_r p_r = c·(Σ_r B̂_r), Σ_r p_rk Â_rk = Σ_j c_kj² (since ÂᵀB̂ = c); the same
// for q with cᵀ. So one pass reads both inputs for the column sums of Â, B̂ and Â ⊙ B̂ (in
// double, each column in row order: independent of the thread count), then one pass over
// blocks of rows, one thread each, rebuilds Â and B̂ for the block, takes p and q by
// single-thread GEMMs and writes dz_a, dz_b. Same flops as the full-buffer route (4NK²).
template <typename scalar_t>
void barlow_backward_blocked(const at::Tensor& za, const at::Tensor& zb, const at::Tensor& ma, const at::Tensor& ra,
                             const at::Tensor& mb, const at::Tensor& rb, const at::Tensor& c, double lambd, double g,
                             at::Tensor& dza, at::Tensor& dzb) {
  using acc = acc_t<scalar_t>;
  const int64_t n = za.size(0), k = za.size(1);
  const scalar_t *ap = za.data_ptr<scalar_t>(), *bp = zb.data_ptr<scalar_t>();
  const acc root_n = std::sqrt(static_cast<acc>(n));
  std::vector<acc> fa(k), fb(k);  // Â = (z_a - mean_a)·fa
  for (int64_t j = 0; j < k; ++j) {
    fa[j] = ra.data_ptr<acc>()[j] / root_n;
    fb[j] = rb.data_ptr<acc>()[j] / root_n;
  }
  const acc *mpa = ma.data_ptr<acc>(), *mpb = mb.data_ptr<acc>();
  std::vector<double> sa(k, 0.0), sb(k, 0.0), sab(k, 0.0);  // Σ_r Â_r, Σ_r B̂_r, Σ_r Â_r ⊙ B̂_r
  parallel_for(k, kColGrain, [&](int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = c0; j < c1; ++j) {
        const double x = static_cast<double>((static_cast<acc>(ap[r * k + j]) - mpa[j]) * fa[j]);
        const double y = static_cast<double>((static_cast<acc>(bp[r * k + j]) - mpb[j]) * fb[j]);
        sa[j] += x;
        sb[j] += y;
        sab[j] += x * y;
      }
  });
  const acc* cp = c.data_ptr<acc>();
  std::vector<acc> dcoef(k), s1a(k), s2a(k), s1b(k), s2b(k);
  const double two_l = 2.0 * lambd;
  for (int64_t j = 0; j < k; ++j) dcoef[j] = static_cast<acc>(2.0 * (1.0 - lambd) * static_cast<acc>(sab[j]) - 2.0);
  for (int64_t i = 0; i < k; ++i) {
    double cb = 0.0, cta = 0.0, row_sq = 0.0, col_sq = 0.0;  // (c·ΣB̂)_i, (cᵀ·ΣÂ)_i, Σ_j c_ij², Σ_j c_ji²
    for (int64_t j = 0; j < k; ++j) {
      const double cij = cp[i * k + j], cji = cp[j * k + i];
      cb += cij * sb[j];
      cta += cji * sa[j];
      row_sq += cij * cij;
      col_sq += cji * cji;
    }
    s1a[i] = static_cast<acc>(g * (two_l * cb + sb[i] * dcoef[i]) / static_cast<double>(n));
    s2a[i] = static_cast<acc>(g * (two_l * row_sq + sab[i] * dcoef[i]));
    s1b[i] = static_cast<acc>(g * (two_l * cta + sa[i] * dcoef[i]) / static_cast<double>(n));
    s2b[i] = static_cast<acc>(g * (two_l * col_sq + sab[i] * dcoef[i]));
  }
  const acc ga = static_cast<acc>(g), tl = static_cast<acc>(two_l);
  scalar_t *oa = dza.data_ptr<scalar_t>(), *ob = dzb.data_ptr<scalar_t>();
  const int64_t rows = block_rows(n, k, 3), blocks = (n + rows - 1) / rows;
  const auto opts = c.options();
  parallel_for_ops(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor ab = at::empty({rows, k}, opts), bb = at::empty({rows, k}, opts), tb = at::empty({rows, k}, opts);
    acc *abp = ab.data_ptr<acc>(), *bbp = bb.data_ptr<acc>(), *tbp = tb.data_ptr<acc>();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * rows, m = std::min(rows, n - r0);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < k; ++j) {
          abp[i * k + j] = (static_cast<acc>(ap[(r0 + i) * k + j]) - mpa[j]) * fa[j];
          bbp[i * k + j] = (static_cast<acc>(bp[(r0 + i) * k + j]) - mpb[j]) * fb[j];
        }
      // out = rstd/√N · (d - s1 - self ⊙ s2), d = g·(2λ·t + other ⊙ D), t = p (for a) or q (for b)
      auto finish = [&](const acc* self, const acc* other, const acc* rs, const std::vector<acc>& s1, const std::vector<acc>& s2,
                        scalar_t* out) {
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < k; ++j) {
            const acc d = ga * (tl * tbp[i * k + j] + other[i * k + j] * dcoef[j]);
            out[(r0 + i) * k + j] = static_cast<scalar_t>(rs[j] / root_n * (d - s1[j] - self[i * k + j] * s2[j]));
          }
      };
      at::Tensor tv = tb.narrow(0, 0, m);
      at::mm_out(tv, bb.narrow(0, 0, m), c.t());  // p = B̂cᵀ
      finish(abp, bbp, ra.data_ptr<acc>(), s1a, s2a, oa);
      at::mm_out(tv, ab.narrow(0, 0, m), c);  // q = Âc
      finish(bbp, abp, rb.data_ptr<acc>(), s1b, s2b, ob);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> barlow_twins_backward_cpu(const at::Tensor& grad, const at::Tensor& za_in, const at::Tensor& zb_in,
                                                             const at::Tensor& mean_a, const at::Tensor& rstd_a,
                                                             const at::Tensor& mean_b, const at::Tensor& rstd_b,
                                                             const at::Tensor& prod_a, const at::Tensor& prod_b, double lambd,
                                                             int64_t route) {
  NoAutocast no_autocast;
  const at::Tensor za = za_in.contiguous(), zb = zb_in.to(za_in.scalar_type()).contiguous();
  const int64_t n = za.size(0), k = za.size(1);
  const auto acc_dtype = acc_dtype_of(za);
  auto opts = za.options().dtype(acc_dtype);
  at::Tensor ma = mean_a.to(acc_dtype).contiguous(), ra = rstd_a.to(acc_dtype).contiguous();
  at::Tensor mb = mean_b.to(acc_dtype).contiguous(), rb = rstd_b.to(acc_dtype).contiguous();
  at::Tensor dza = at::empty({n, k}, za.options()), dzb = at::empty({n, k}, za.options());
  const double g = grad.to(at::kDouble).item<double>();
  if (!use_gram(route, n, k, 4.0 * n * n, 3.0 * n * k) && prod_a.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za.scalar_type(), "barlow_twins_backward_cxx", [&] {
      barlow_backward_blocked<scalar_t>(za, zb, ma, ra, mb, rb, prod_a.to(acc_dtype).contiguous(), lambd, g, dza, dzb);
    });
    return {dza, dzb};
  }
  at::Tensor ah = at::empty({n, k}, opts), bh = at::empty({n, k}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za.scalar_type(), "barlow_twins_backward_cxx", [&] {
    using acc = acc_t<scalar_t>;
    barlow_normalise<scalar_t>(za, ma, ra, ah, 0.0, true);
    barlow_normalise<scalar_t>(zb, mb, rb, bh, 0.0, true);
    const std::vector<acc> dg = column_dots<acc>(ah.data_ptr<acc>(), bh.data_ptr<acc>(), n, k);
    std::vector<acc> dcoef(k);
    for (int64_t c = 0; c < k; ++c) dcoef[c] = acc(2) * (acc(1) - static_cast<acc>(lambd)) * dg[c] - acc(2);
    at::Tensor p, q;  // p = B̂cᵀ (for dÂ), q = Âc (for dB̂)
    const bool saved = prod_a.numel() > 0;
    if (use_gram(route, n, k, 4.0 * n * n, 3.0 * n * k)) {
      p = at::mm(saved ? prod_b.to(acc_dtype) : at::mm(bh, bh.t()), ah);
      q = at::mm(saved ? prod_a.to(acc_dtype) : at::mm(ah, ah.t()), bh);
    } else {
      at::Tensor c = saved ? prod_a.to(acc_dtype) : at::mm(ah.t(), bh);
      p = at::mm(bh, c.t());
      q = at::mm(ah, c);
    }
    const acc two_l = acc(2) * static_cast<acc>(lambd);
    barlow_finish<scalar_t>(p.data_ptr<acc>(), ah.data_ptr<acc>(), bh.data_ptr<acc>(), dcoef.data(), ra.data_ptr<acc>(),
                            static_cast<acc>(g), two_l, n, k, dza.data_ptr<scalar_t>());
    barlow_finish<scalar_t>(q.data_ptr<acc>(), bh.data_ptr<acc>(), ah.data_ptr<acc>(), dcoef.data(), rb.data_ptr<acc>(),
                            static_cast<acc>(g), two_l, n, k, dzb.data_ptr<scalar_t>());
  });
  return {dza, dzb};
}

}  // namespace
}  // namespace sslops

TORCH_LIBRARY_IMPL(sslops, CPU, m) {
  m.impl("vicreg_view_forward_cxx", &sslops::vicreg_view_forward_cpu);
  m.impl("vicreg_view_backward_cxx", &sslops::vicreg_view_backward_cpu);
  m.impl("barlow_twins_forward_cxx", &sslops::barlow_twins_forward_cpu);
  m.impl("barlow_twins_backward_cxx", &sslops::barlow_twins_backward_cpu);
}
