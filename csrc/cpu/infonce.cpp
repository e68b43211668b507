// Blockwise InfoNCE over a sparse relation G on the CPU: O(M·K) memory, never M×M.
//
// Math (SPEC §3). z is (M, K); anchors are the window rows [row_start, row_end), candidates
// all M rows. With ẑ = z / max(‖z‖, 1e-12), s_ij = ⟨ẑ_i, ẑ_j⟩, x_ij = s_ij / τ:
//
//   LSE_i = log Σ_{j≠i} exp(x_ij)                       (online: running max and sum)
//   ℓ_i   = LSE_i − (1/|P(i)|) Σ_{j∈P(i)} x_ij          (0 when P(i) = ∅)
//
// LSE is kept split, m_i + l_i with m_i = max_j x_ij and l_i = log Σ exp(x_ij − m_i), and
// the terms equal to m_i (exactly 1) are added to the others' sum last. A single fp32 LSE
// is rounded to the ulp of |x| (1e-6 at τ = 0.07), and exp(x − LSE) carried that error into
// the weight of a dominant positive, whose gradient p − 1 then lost up to 4× against
// lightly's and pytorch-metric-learning's formulations (close views at small τ).
//
// G is either `labels` (G_ij = [lab_i = lab_j], i ≠ j; compared tile by tile) or a CSR
// (crow (M+1), col) built once per call by sslops/ops/infonce.py, symmetric, with entries
// that must be skipped (duplicates, self-pairs) marked by col = −1.
//
// Gradient. With g_i the incoming gradient of ℓ_i, a_i = g_i·[|P(i)| > 0] (0 outside the
// window), p_ij = exp((x_ij − m_i) − l_i) and C_ij = a_i (p_ij − G_ij/|P(i)|)/τ for j ≠ i, the
// similarity is symmetric, so every row k collects its anchor term and its candidate term
// in one sum:
//
//   dL/dẑ_k = Σ_j (C_kj + C_jk) ẑ_j
//   dL/dz_k = (dẑ_k − ẑ_k ⟨ẑ_k, dẑ_k⟩) / ‖z_k‖      (dẑ_k / 1e-12 where the clamp is active)
//
// One pass over row blocks of all M rows computes D = C + Cᵀ tile by tile (the tile of
// s is recomputed, both p_kj and p_jk come from it) and accumulates D·Ẑ: each row is
// written by one thread in a fixed order, so the result is bit-identical from run to run
// and for any thread count, without atomics. Rows outside the window only need the
// columns inside it.
//
// Saved between forward and backward: the split LSE (2, B) and |P(i)| (B,); the row norms are
// recomputed (one light pass). Memory: Ẑ in the accumulation type (M·K) plus one
// (64 × 256) tile and a (64 × K) gradient block per thread.
// FLOPs: forward 2·B·M·K (+ B·M exp), backward 2·(2·B·M − B²)·K·2 (+ 2 exp per pair);
// bytes: forward reads z once per anchor block (M·K·B/64 elements, cache-resident tiles).
// The selects in exp_ps only if-convert (and the loops below only vectorise) when GCC may
// assume that float arithmetic does not trap; torch itself is built with -fno-trapping-math.
// It must come before the includes: std::min/max are inlined from them.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "blocked_sum.h"
#include "parallel.h"

namespace sslops {
namespace {

constexpr int64_t kRowBlock = 64;   // anchor (or gradient) rows per task
constexpr int64_t kColBlock = 256;  // candidate columns per similarity tile
constexpr double kNormEps = 1e-12;  // F.normalize's clamp of the row norm

// The relation in raw pointers: labels (M,) int64, or a symmetric CSR with col = −1 holes.
struct Relation {
  const int32_t* labels = nullptr;
  const int64_t* crow = nullptr;
  const int64_t* col = nullptr;
};

// Labels as dense int32 ids (equal labels, equal ids): a sort, O(M log M).
at::Tensor dense_label_ids(const at::Tensor& labels) {
  const at::Tensor lab = labels.to(at::kLong).contiguous();
  const int64_t m = lab.numel();
  const int64_t* l = lab.data_ptr<int64_t>();
  std::vector<int64_t> order(m);
  for (int64_t i = 0; i < m; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return l[a] < l[b]; });
  at::Tensor ids = at::empty({m}, lab.options().dtype(at::kInt));
  int32_t* out = ids.data_ptr<int32_t>();
  int32_t next = -1;
  for (int64_t t = 0; t < m; ++t) {
    if (t == 0 || l[order[t]] != l[order[t - 1]]) ++next;
    out[order[t]] = next;
  }
  return ids;
}

Relation make_relation(const at::Tensor& labels, const at::Tensor& crow, const at::Tensor& col) {
  Relation r;
  if (labels.defined()) r.labels = labels.data_ptr<int32_t>();
  if (crow.defined()) {
    r.crow = crow.data_ptr<int64_t>();
    r.col = col.data_ptr<int64_t>();
  }
  return r;
}

// ẑ (M, K) in acc_t and the row norms ‖z_k‖ (before the clamp).
template <typename scalar_t, typename acc>
void normalise_rows(const scalar_t* z, int64_t m, int64_t k, acc* zh, acc* norm) {
  parallel_for(m, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = z + r * k;
      const double ss = blocked_sum<acc>(k, [row](int64_t c) {
        const acc v = static_cast<acc>(row[c]);
        return v * v;
      });
      const acc nrm = static_cast<acc>(std::sqrt(ss));
      norm[r] = nrm;
      const acc inv = acc(1) / std::max(nrm, static_cast<acc>(kNormEps));
      acc* out = zh + r * k;
      for (int64_t c = 0; c < k; ++c) out[c] = static_cast<acc>(row[c]) * inv;
    }
  });
}

// exp in fp32 without a libm call, so `omp simd` loops vectorise: x = n·ln2 + r with
// |r| <= ln2/2 (Cody–Waite split of ln2), exp(r) by its degree-7 Taylor polynomial
// (relative error < 1e-8, below fp32 rounding), 2^n from the exponent bits. Below −87 it
// returns 0 (this covers −inf); NaN stays NaN. Arguments here are ≤ 0 up to rounding.
inline float exp_ps(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float y = xc * 1.44269504088896341f + 0.5f;
  int n = static_cast<int>(y);
  n -= static_cast<int>(y < static_cast<float>(n));  // floor(y)
  const float fn = static_cast<float>(n);
  const float r = (xc - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float e = p * scale;
  e = x < -87.0f ? 0.0f : e;
  e = x > 88.0f ? std::numeric_limits<float>::infinity() : e;
  return x != x ? x : e;
}
inline double exp_ps(double x) { return std::exp(x); }

template <typename acc>
acc dot(const acc* a, const acc* b, int64_t k) {
  return static_cast<acc>(blocked_sum<acc>(k, [a, b](int64_t c) { return a[c] * b[c]; }));
}

// The per-row loops over one similarity tile, kept out of line so that they are compiled
// under this file's options (inlined into ATen's parallel_for they would lose them).
// Labels are dense int32 ids here (int32 compares vectorise on every x86-64).

template <typename acc>
__attribute__((noinline)) acc span_max(const acc* s, int64_t j0, int64_t j1) {
  acc t = -std::numeric_limits<acc>::infinity();
#pragma omp simd reduction(max : t)
  for (int64_t j = j0; j < j1; ++j) t = std::max(t, s[j]);
  return t;
}

// Over [j0, j1): Σ exp(x_j − mx) for the x_j below mx, and the number of x_j equal to mx
// (their terms are exactly 1, counted apart: see forward_kernel); with labels also Σ x_j and
// the count over lab_j == li.
template <typename acc>
__attribute__((noinline)) void span_sums(const acc* s, const int32_t* lab, int32_t li, acc inv_tau, acc mx, int64_t j0,
                                         int64_t j1, acc& sum_out, acc& top_out, acc& pos_out, acc& cnt_out) {
  acc sum = 0, top = 0, p = 0, n = 0;
  if (lab) {
#pragma omp simd reduction(+ : sum, top, p, n)
    for (int64_t j = j0; j < j1; ++j) {
      const acc x = s[j] * inv_tau;
      const bool at_max = x == mx;
      sum += at_max ? acc(0) : exp_ps(x - mx);
      top += at_max ? acc(1) : acc(0);
      const bool eq = lab[j] == li;
      p += eq ? x : acc(0);
      n += eq ? acc(1) : acc(0);
    }
  } else {
#pragma omp simd reduction(+ : sum, top)
    for (int64_t j = j0; j < j1; ++j) {
      const acc x = s[j] * inv_tau;
      const bool at_max = x == mx;
      sum += at_max ? acc(0) : exp_ps(x - mx);
      top += at_max ? acc(1) : acc(0);
    }
  }
  sum_out += sum;
  top_out += top;
  pos_out += p;
  cnt_out += n;
}

// s_j <- D_ij = (a_i (p_ij − G_ij/|P(i)|) + a_j (p_ji − G_ij/|P(j)|)) / τ, in place (the
// diagonal is cleared by the caller), with p_ij = exp((x_ij − m_i) − l_i): m the row maximum,
// l = log Σ exp(x − m) (the forward's split LSE). Each p − G/|P| is formed before it is
// scaled: for a dominant positive both are near 1 and their difference is exact.
template <typename acc>
__attribute__((noinline)) void coef_row(acc* s, const int32_t* lab, int32_t li, acc inv_tau, acc ai, acc max_i, acc log_i,
                                        acc ci, const acc* w, const acc* mx, const acc* lg, const acc* inv_cnt, int64_t bc) {
  if (lab) {
#pragma omp simd
    for (int64_t j = 0; j < bc; ++j) {
      const acc x = s[j] * inv_tau;
      const bool eq = lab[j] == li;
      const acc pij = exp_ps((x - max_i) - log_i) - (eq ? ci : acc(0));
      const acc pji = exp_ps((x - mx[j]) - lg[j]) - (eq ? inv_cnt[j] : acc(0));
      s[j] = (ai * pij + w[j] * pji) * inv_tau;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < bc; ++j) {
      const acc x = s[j] * inv_tau;
      s[j] = (ai * exp_ps((x - max_i) - log_i) + w[j] * exp_ps((x - mx[j]) - lg[j])) * inv_tau;
    }
  }
}

// Run f(b, b + 1) for every block b < n, handing blocks to threads one at a time
// (dynamic schedule). Each block's result depends only on the block, never on the thread
// that ran it, so the output stays bit-identical; dynamic hand-out keeps both cores busy
// when the machine is shared and one thread is descheduled (a static split then waits).
template <typename F>
void parallel_blocks(int64_t n, const F& f) {
#ifdef _OPENMP
  const int threads = at::get_num_threads();
  if (n > 1 && threads > 1 && !at::in_parallel_region()) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t b = 0; b < n; ++b) f(b, b + 1);
    return;
  }
#endif
  if (n > 0) f(int64_t(0), n);
}

// ----------------------------------------------------------------------------- forward

template <typename acc>
void forward_kernel(const at::Tensor& zh_t, const Relation& rel, acc inv_tau, int64_t rs, int64_t re, acc* loss,
                    acc* count, acc* max_out, acc* log_out) {
  const int64_t m = zh_t.size(0), k = zh_t.size(1);
  const acc* zh = zh_t.data_ptr<acc>();
  const int64_t rows = re - rs;
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  parallel_blocks(blocks, [&](int64_t b0, int64_t b1) {
    at::Tensor tile = at::empty({kRowBlock, kColBlock}, zh_t.options());
    // Per row: the running max m, the number of candidates equal to it (each contributes
    // exp(0) = 1) and the sum of exp(x − m) over the others. Keeping the maximum's own terms
    // out of the running sum leaves one rounding near 1 (when they are added at the end)
    // instead of one per candidate: the weight of a dominant positive, and p − 1 in the
    // backward, keep a few ulp of 1 (pytorch-metric-learning's order of summation).
    std::vector<acc> run_max(kRowBlock), run_sum(kRowBlock), run_top(kRowBlock), pos(kRowBlock), cnt(kRowBlock);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = rs + b * kRowBlock, r1 = std::min(re, r0 + kRowBlock), br = r1 - r0;
      std::fill(run_max.begin(), run_max.end(), neg_inf);
      std::fill(run_sum.begin(), run_sum.end(), acc(0));
      std::fill(run_top.begin(), run_top.end(), acc(0));
      std::fill(pos.begin(), pos.end(), acc(0));
      std::fill(cnt.begin(), cnt.end(), acc(0));
      const at::Tensor anchors = zh_t.narrow(0, r0, br);
      for (int64_t c0 = 0; c0 < m; c0 += kColBlock) {
        const int64_t bc = std::min(m, c0 + kColBlock) - c0;
        at::Tensor s = tile.narrow(0, 0, br).narrow(1, 0, bc);
        at::mm_out(s, anchors, zh_t.narrow(0, c0, bc).t());
        const acc* sp = tile.data_ptr<acc>();
        for (int64_t i = 0; i < br; ++i) {
          const acc* srow = sp + i * kColBlock;
          const int64_t gi = r0 + i;
          // Columns [0, bc) minus the diagonal, as two contiguous spans.
          const int64_t d = gi - c0;
          const int64_t span[2][2] = {{0, std::min(std::max(d, int64_t(0)), bc)},
                                      {std::min(std::max(d + 1, int64_t(0)), bc), bc}};
          acc tmax = neg_inf;
          for (const auto& sp2 : span) tmax = std::max(tmax, span_max(srow, sp2[0], sp2[1]) * inv_tau);
          // A NaN similarity must not vanish in the max: the sum below carries it.
          if (tmax > run_max[i]) {
            run_sum[i] = (run_sum[i] + run_top[i]) * exp_ps(run_max[i] - tmax);  // all below the new max
            run_top[i] = 0;
            run_max[i] = tmax;
          }
          const acc mx = run_max[i];
          if (mx == neg_inf) continue;  // only the diagonal so far
          const int32_t li = rel.labels ? rel.labels[gi] : 0;
          const int32_t* lj = rel.labels ? rel.labels + c0 : nullptr;
          for (const auto& sp2 : span) span_sums(srow, lj, li, inv_tau, mx, sp2[0], sp2[1], run_sum[i], run_top[i], pos[i], cnt[i]);
        }
      }
      for (int64_t i = 0; i < br; ++i) {
        const int64_t gi = r0 + i;
        if (rel.crow) {
          acc p = 0, n = 0;
          for (int64_t e = rel.crow[gi]; e < rel.crow[gi + 1]; ++e) {
            const int64_t j = rel.col[e];
            if (j < 0) continue;
            p += dot(zh + gi * k, zh + j * k, k);
            n += 1;
          }
          pos[i] = p * inv_tau;
          cnt[i] = n;
        }
        const acc l = std::log(run_top[i] + run_sum[i]);  // LSE_i − m_i
        const int64_t o = gi - rs;
        max_out[o] = run_max[i];
        log_out[o] = l;
        count[o] = cnt[i];
        loss[o] = cnt[i] > 0 ? (run_max[i] - pos[i] / cnt[i]) + l : acc(0);
      }
    }
  });
}

// ----------------------------------------------------------------------------- backward

template <typename scalar_t, typename acc>
void backward_kernel(const at::Tensor& zh_t, const acc* norm, const Relation& rel, acc inv_tau, int64_t rs, int64_t re,
                     const acc* weight, const acc* max_w, const acc* log_w, const acc* inv_cnt, scalar_t* dz) {
  // weight/max_w/log_w/inv_cnt are (M,): a_k, the split LSE_k = max_k + log_k and 1/|P(k)|
  // (a_k = 0 and max_k = +inf outside the window).
  const int64_t m = zh_t.size(0), k = zh_t.size(1);
  const acc* zh = zh_t.data_ptr<acc>();
  const int64_t blocks = (m + kRowBlock - 1) / kRowBlock;
  parallel_blocks(blocks, [&](int64_t b0, int64_t b1) {
    at::Tensor tile = at::empty({kRowBlock, kColBlock}, zh_t.options());
    at::Tensor grad = at::empty({kRowBlock, k}, zh_t.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock, r1 = std::min(m, r0 + kRowBlock), br = r1 - r0;
      grad.zero_();
      at::Tensor g = grad.narrow(0, 0, br);
      const at::Tensor rows = zh_t.narrow(0, r0, br);
      // Rows outside the window have no anchor term: only the window's columns matter.
      const bool has_anchor = r0 < re && r1 > rs;
      const int64_t cbeg = has_anchor ? 0 : rs, cend = has_anchor ? m : re;
      for (int64_t c0 = cbeg; c0 < cend; c0 += kColBlock) {
        const int64_t bc = std::min(cend, c0 + kColBlock) - c0;
        at::Tensor s = tile.narrow(0, 0, br).narrow(1, 0, bc);
        at::mm_out(s, rows, zh_t.narrow(0, c0, bc).t());
        acc* sp = tile.data_ptr<acc>();
        for (int64_t i = 0; i < br; ++i) {
          acc* srow = sp + i * kColBlock;
          const int64_t gi = r0 + i;
          coef_row(srow, rel.labels ? rel.labels + c0 : nullptr, rel.labels ? rel.labels[gi] : 0, inv_tau, weight[gi],
                   max_w[gi], log_w[gi], inv_cnt[gi], weight + c0, max_w + c0, log_w + c0, inv_cnt + c0, bc);
          if (gi >= c0 && gi < c0 + bc) srow[gi - c0] = 0;  // no j = i term
        }
        g.addmm_(s, zh_t.narrow(0, c0, bc));
      }
      acc* gp = grad.data_ptr<acc>();
      for (int64_t i = 0; i < br; ++i) {
        const int64_t gi = r0 + i;
        acc* gr = gp + i * k;
        if (rel.crow) {
          const acc own = weight[gi] * inv_cnt[gi];
          for (int64_t e = rel.crow[gi]; e < rel.crow[gi + 1]; ++e) {
            const int64_t j = rel.col[e];
            if (j < 0) continue;
            const acc coef = -(own + weight[j] * inv_cnt[j]) * inv_tau;
            if (coef == 0) continue;
            const acc* zj = zh + j * k;
            for (int64_t c = 0; c < k; ++c) gr[c] += coef * zj[c];
          }
        }
        const acc* zi = zh + gi * k;
        const acc nrm = norm[gi];
        scalar_t* out = dz + gi * k;
        if (nrm >= static_cast<acc>(kNormEps)) {
          const acc proj = dot(zi, gr, k), inv = acc(1) / nrm;
          for (int64_t c = 0; c < k; ++c) out[c] = static_cast<scalar_t>((gr[c] - zi[c] * proj) * inv);
        } else {
          const acc inv = acc(1) / static_cast<acc>(kNormEps);
          for (int64_t c = 0; c < k; ++c) out[c] = static_cast<scalar_t>(gr[c] * inv);
        }
      }
    }
  });
}

// ----------------------------------------------------------------------------- ops

void check_window(const at::Tensor& z, int64_t rs, int64_t re) {
  TORCH_CHECK(z.dim() == 2, "info_nce: z must be 2-D, got ", z.dim(), "-D");
  TORCH_CHECK(0 <= rs && rs <= re && re <= z.size(0), "info_nce: need 0 <= row_start <= row_end <= M, got ", rs, ", ",
              re, ", M = ", z.size(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_fwd_cpu(const at::Tensor& z_in, const c10::optional<at::Tensor>& labels_in,
                                                                const c10::optional<at::Tensor>& crow_in,
                                                                const c10::optional<at::Tensor>& col_in, double temperature,
                                                                int64_t row_start, int64_t row_end) {
  check_window(z_in, row_start, row_end);
  TORCH_CHECK(labels_in.has_value() != crow_in.has_value(), "info_nce_fwd_cxx: give exactly one of labels or crow/col");
  const at::Tensor z = z_in.contiguous();
  const at::Tensor labels = labels_in.has_value() ? dense_label_ids(*labels_in) : at::Tensor();
  const at::Tensor crow = crow_in.has_value() ? crow_in->to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor col = col_in.has_value() ? col_in->to(at::kLong).contiguous() : at::Tensor();
  const int64_t m = z.size(0), k = z.size(1), b = row_end - row_start;
  const auto acc_dtype = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = z.options().dtype(acc_dtype);
  // lse is (2, B): the row maximum m_i and l_i = log Σ_{j≠i} exp(x_ij − m_i) (LSE_i = m_i + l_i).
  at::Tensor loss = at::empty({b}, opts), count = at::empty({b}, opts), lse = at::empty({2, b}, opts);
  if (b == 0) return {loss, count, lse};
  at::Tensor zh = at::empty({m, k}, opts), norm = at::empty({m}, opts);
  const Relation rel = make_relation(labels, crow, col);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "info_nce_fwd_cxx", [&] {
    using acc = acc_t<scalar_t>;
    normalise_rows<scalar_t, acc>(z.data_ptr<scalar_t>(), m, k, zh.data_ptr<acc>(), norm.data_ptr<acc>());
    forward_kernel<acc>(zh, rel, static_cast<acc>(1.0 / temperature), row_start, row_end, loss.data_ptr<acc>(),
                        count.data_ptr<acc>(), lse.data_ptr<acc>(), lse.data_ptr<acc>() + b);
  });
  return {loss, count, lse};
}

at::Tensor info_nce_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& z_in, const c10::optional<at::Tensor>& labels_in,
                            const c10::optional<at::Tensor>& crow_in, const c10::optional<at::Tensor>& col_in,
                            const at::Tensor& pos_count, const at::Tensor& lse, double temperature, int64_t row_start,
                            int64_t row_end) {
  check_window(z_in, row_start, row_end);
  TORCH_CHECK(labels_in.has_value() != crow_in.has_value(), "info_nce_bwd_cxx: give exactly one of labels or crow/col");
  const at::Tensor z = z_in.contiguous();
  const at::Tensor labels = labels_in.has_value() ? dense_label_ids(*labels_in) : at::Tensor();
  const at::Tensor crow = crow_in.has_value() ? crow_in->to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor col = col_in.has_value() ? col_in->to(at::kLong).contiguous() : at::Tensor();
  const int64_t m = z.size(0), k = z.size(1);
  const auto acc_dtype = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = z.options().dtype(acc_dtype);
  at::Tensor dz = at::empty({m, k}, z.options());
  if (m == 0 || k == 0) return dz.zero_();
  // Per-row (M,) weights: a_k = g_k·[|P(k)| > 0] in the window, 0 elsewhere; the split LSE_k
  // (max +inf and log 0 where a_k = 0, so that every exp vanishes); 1/|P(k)|.
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == 2 && lse.size(1) == row_end - row_start,
              "info_nce_bwd_cxx: lse must be the forward's (2, B) split LSE");
  const at::Tensor g = grad_rows.to(acc_dtype);
  const at::Tensor cnt = pos_count.to(acc_dtype);
  const at::Tensor has = cnt > 0;
  at::Tensor weight = at::zeros({m}, opts), max_w = at::full({m}, std::numeric_limits<double>::infinity(), opts),
             log_w = at::zeros({m}, opts), inv_cnt = at::zeros({m}, opts);
  weight.narrow(0, row_start, row_end - row_start).copy_(at::where(has, g, at::zeros_like(g)));
  max_w.narrow(0, row_start, row_end - row_start).copy_(at::where(has, lse[0].to(acc_dtype), at::full_like(g, INFINITY)));
  log_w.narrow(0, row_start, row_end - row_start).copy_(at::where(has, lse[1].to(acc_dtype), at::zeros_like(g)));
  inv_cnt.narrow(0, row_start, row_end - row_start).copy_(at::where(has, cnt.reciprocal(), at::zeros_like(cnt)));
  at::Tensor zh = at::empty({m, k}, opts), norm = at::empty({m}, opts);
  const Relation rel = make_relation(labels, crow, col);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "info_nce_bwd_cxx", [&] {
    using acc = acc_t<scalar_t>;
    normalise_rows<scalar_t, acc>(z.data_ptr<scalar_t>(), m, k, zh.data_ptr<acc>(), norm.data_ptr<acc>());
    backward_kernel<scalar_t, acc>(zh, norm.data_ptr<acc>(), rel, static_cast<acc>(1.0 / temperature), row_start, row_end,
                                   weight.data_ptr<acc>(), max_w.data_ptr<acc>(), log_w.data_ptr<acc>(), inv_cnt.data_ptr<acc>(),
                                   dz.data_ptr<scalar_t>());
  });
  return dz;
}

}  // namespace
}  // namespace sslops

TORCH_LIBRARY_IMPL(sslops, CPU, m) {
  m.impl("info_nce_fwd_cxx", &sslops::info_nce_fwd_cpu);
  m.impl("info_nce_bwd_cxx", &sslops::info_nce_bwd_cpu);
}
