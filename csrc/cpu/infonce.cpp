// The blockwise contrastive pass on the CPU (InfoNCE/SupCon, queues, DCL, CLIP, SigLIP):
// O((N + M)·K) memory, never an N×N or N×M matrix. Math: docs/conventions.md §3, §3b.
//
// Two shapes of one pass (sslops/ops/infonce.py builds the calls):
//
//   square   anchors are the window rows [xs, xe) of x (Nx, K); candidates are x's own rows
//            (the in-batch block, labels or a CSR relation, an anchor never its own
//            candidate) followed by the extra `negatives` (M, K) (a queue: always candidates,
//            never positives).
//   two-set  anchors are rows [xs, xe) of x against the rows of y (Ny, K) and, with BIDIR,
//            rows [ys, ye) of y against x (CLIP's two directions); labels compared across the
//            sets (G_ij = [lab_x_i = lab_y_j]); no self-exclusion.
//
// With x̂ = x / max(‖x‖, 1e-12) (or x as given under NO_NORMALIZE), s_ij = ⟨x̂_i, ĉ_j⟩, scale t
// and bias b (0-d tensors: learnable), per anchor row i the forward writes
//
//   softmax forms   diff = [lse_i, pos_i, pse_i], aux = [|P(i)|, ms_i, pe_i, lo_i]
//                   lse_i = log Σ_{j∈D(i)} exp(t·s_ij)        online: running max and sum
//                   lo_i: lse_i's rounding residual, (m_i + log Σ exp(t·s − m_i)) − lse_i exactly
//                   (two_sum below), so that the backward's weights see the unrounded sum
//                   pos_i = Σ_{j∈P(i)} s_ij,  ms_i = Σ_{j∈D(i)} p_ij s_ij  (= ∂lse_i/∂t)
//                   pse_i = Σ_{j∈P(i)} s_ij e^{s_ij/σ}, pe_i = Σ_{j∈P(i)} e^{s_ij/σ}  (WEIGHTED: DCLW)
//                   D(i) = in-batch rows j ≠ i with [j ∈ P(i)] ? !DECOUPLED : !NO_INBATCH, and the negatives
//   sigmoid (SigLIP) diff = [Σ_j softplus(−y_ij x_ij), 0, 0], aux = [|P(i)|, Σ_j h_ij s_ij, Σ_j h_ij, 0]
//                   x_ij = t·s_ij + b, y_ij = ±1, h_ij = ∂softplus(−y x)/∂x = −y_ij σ(−y_ij x_ij)
//
// and the loss is assembled from these rows in Python (autograd through plain torch ops).
// The backward takes the gradients (a_i, gp_i, gq_i) of (lse_i, pos_i, pse_i) (of the softplus
// sum for SigLIP) and, since pse's derivative is taken with its weight e^{s/σ} held constant
// (DCLW's weights are detached), the gradient of s_ij from anchor i is
//
//   C_ij = [j∈D(i)]·a_i·t·exp((t s_ij − lse_i) − lo_i) + [j∈P(i)]·(gp_i + gq_i e^{s_ij/σ})      softmax
//   C_ij = a_i·t·h_ij                                                                 sigmoid
//
// dx̂_r = Σ_j (C_rj + C_jr) ĉ_j: the pass over the rows r of one set walks the other set's
// tiles and adds both directions' terms (in the square case C + Cᵀ, the relation being
// symmetric), so each row is written by one task in a fixed order: bit-identical reruns for
// any thread count, no atomics. The gradients of t and b are the per-row statistics above
// (Σ a_i ms_i, Σ a_i aux_i) taken in Python. A CSR relation adds its positives' terms
// sparsely (O(nnz·K)); where the denominator depends on membership (DECOUPLED, NO_INBATCH)
// the tile marks the row's CSR entries (sorted per row) in place.
//
// lse_i ~ 1/τ is rounded to its ulp (1e-6 at 14, τ = 0.07): exp(t·s − lse_i) from the rounded
// value alone perturbs every weight by that much, and a dominant positive's gradient p − 1
// loses digits. With lo_i, t·s − lse_i is exact near the row's maximum (Sterbenz) and the
// residual enters below the ulp of 1: the weights are as good as naive fp32 PyTorch's.
//
// Saved between forward and backward: diff (B, 3) and aux (B, 4); norms are recomputed.
// Memory: x̂ (and ŷ, the negatives' rows) in the accumulation type, one (64 × 256) tile and a
// (64 × K) gradient block per thread. FLOPs: forward 2·B·C·K (C candidates), backward
// 2·2·(rows)·(columns)·K per pass (the tile recomputed, then the product); exp per tile entry
// (two in the softmax backward, plus one for DCLW's positives).
//
// The vectorised per-row loops over one tile (logits, online sums, the backward's
// coefficients) are in csrc/cpu/infonce_rows_impl.h, compiled for the baseline ISA, AVX2 and
// AVX-512 and chosen per call (csrc/cpu/cpu_capability.h: SSLOPS_CPU_CAPABILITY caps it);
// results agree across levels to rounding, and are bit-identical between runs at one level.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../no_autocast.h"
#include "infonce_common.h"
#include "infonce_rows.h"
#include "parallel.h"

namespace sslops {
namespace {

constexpr int64_t kRowBlock = 64;   // anchor (or gradient) rows per task
constexpr int64_t kColBlock = 256;  // candidate columns per similarity tile
constexpr double kNormEps = 1e-12;  // F.normalize's clamp of the row norm

using Mode = ContrastiveMode;  // csrc/cpu/infonce_common.h

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

// A symmetric CSR over the in-batch rows: columns sorted within each row; an entry equal to
// its predecessor in the row (a duplicate) or to the row itself (a self-pair) is skipped.
struct Csr {
  const int64_t* crow = nullptr;
  const int64_t* col = nullptr;
  bool live(int64_t row, int64_t e) const {
    const int64_t j = col[e];
    return j != row && (e == crow[row] || col[e - 1] != j);
  }
};

// x̂ (rows, K) in acc_t and the row norms ‖x_r‖ (before the clamp); as given (norm 1) when
// the normalisation is off.
template <typename scalar_t, typename acc>
void normalise_rows(const at::Tensor& x_in, bool normalize, acc* xh, acc* norm) {
  const at::Tensor x = x_in.contiguous();
  const scalar_t* z = x.data_ptr<scalar_t>();
  const int64_t m = x.size(0), k = x.size(1);
  parallel_for(m, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = z + r * k;
      acc* out = xh + r * k;
      if (!normalize) {
        norm[r] = 1;
        for (int64_t c = 0; c < k; ++c) out[c] = static_cast<acc>(row[c]);
        continue;
      }
      acc ss = 0;
      for (int64_t c = 0; c < k; ++c) {
        const acc v = static_cast<acc>(row[c]);
        ss += v * v;
      }
      const acc nrm = std::sqrt(ss);
      norm[r] = nrm;
      const acc inv = acc(1) / std::max(nrm, static_cast<acc>(kNormEps));
      for (int64_t c = 0; c < k; ++c) out[c] = static_cast<acc>(row[c]) * inv;
    }
  });
}

template <typename acc>
acc dot(const acc* a, const acc* b, int64_t k) {
  acc s = 0;
  for (int64_t c = 0; c < k; ++c) s += a[c] * b[c];
  return s;
}

// The rounding residual of hi = fl(a + b): a + b = hi + lo exactly (Knuth's TwoSum; this file is
// compiled without reassociation). 0 where hi is not finite (no candidate, or a NaN row).
template <typename acc>
acc two_sum_residual(acc a, acc b, acc hi) {
  if (!std::isfinite(hi)) return 0;
  const acc v = hi - a;
  return (a - (hi - v)) + (b - v);
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

// Everything one pass needs, in raw pointers: rows R (anchors, or gradient rows) against
// columns C (candidates); C's first nb rows are the in-batch block, the rest extra negatives.
template <typename acc>
struct Pass {
  at::Tensor rows_t, cols_t;     // (nR, K), (nC, K) acc views
  int64_t nb = 0;                // in-batch columns
  bool self_excl = false;        // square: row r and column r are the same row
  const int32_t* lab_r = nullptr;  // dense label ids of R (in-batch rows) and of C's in-batch block
  const int32_t* lab_c = nullptr;
  Csr csr;                       // square with pairs: R's rows indexed like C's in-batch block
  bool rows_extra = false;       // backward over the negatives' rows: no relation, always candidates
  Mode md;
  acc t = 1, b = 0, inv_sigma = 2;
  const ContrastiveRows<acc>* rows = nullptr;  // the row loops at the call's CPU capability
};

// Columns [c0, c0 + ib) of the row of anchor gi that are in-batch positives by the CSR:
// set xr to t·s (keep_pos) or −inf for them.
template <typename acc>
void mark_csr_row(const Csr& csr, int64_t gi, int64_t c0, int64_t ib, const acc* s, acc* xr, acc t, bool keep_pos) {
  const int64_t* beg = csr.col + csr.crow[gi];
  const int64_t* end = csr.col + csr.crow[gi + 1];
  for (const int64_t* p = std::lower_bound(beg, end, c0); p != end && *p < c0 + ib; ++p)
    xr[*p - c0] = keep_pos ? s[*p - c0] * t : -std::numeric_limits<acc>::infinity();
}

template <typename acc>
void forward_pass(const Pass<acc>& ps, int64_t rs, int64_t re, acc* diff, acc* aux) {
  const int64_t nc = ps.cols_t.size(0), k = ps.cols_t.size(1);
  const acc* rh = ps.rows_t.template data_ptr<acc>();
  const acc* ch = ps.cols_t.template data_ptr<acc>();
  const int64_t blocks = (re - rs + kRowBlock - 1) / kRowBlock;
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  const Mode& md = ps.md;
  const ContrastiveRows<acc>& rk = *ps.rows;
  parallel_blocks(blocks, [&](int64_t b0, int64_t b1) {
    at::Tensor tile = at::empty({kRowBlock, kColBlock}, ps.cols_t.options());
    // run_sum: the terms below run_max; run_top: how many sit at it (each contributes exactly 1)
    std::vector<acc> xr(kColBlock), run_max(kRowBlock), run_sum(kRowBlock), run_top(kRowBlock), run_ms(kRowBlock),
        st(4 * kRowBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = rs + blk * kRowBlock, r1 = std::min(re, r0 + kRowBlock), br = r1 - r0;
      std::fill(run_max.begin(), run_max.end(), neg_inf);
      std::fill(run_sum.begin(), run_sum.end(), acc(0));
      std::fill(run_top.begin(), run_top.end(), acc(0));
      std::fill(run_ms.begin(), run_ms.end(), acc(0));
      std::fill(st.begin(), st.end(), acc(0));
      const at::Tensor anchors = ps.rows_t.narrow(0, r0, br);
      for (int64_t c0 = 0; c0 < nc; c0 += kColBlock) {
        const int64_t bc = std::min(nc, c0 + kColBlock) - c0;
        const int64_t ib = std::min(std::max(ps.nb - c0, int64_t(0)), bc);
        at::Tensor s_t = tile.narrow(0, 0, br).narrow(1, 0, bc);
        at::mm_out(s_t, anchors, ps.cols_t.narrow(0, c0, bc).t());
        const acc* sp = tile.template data_ptr<acc>();
        for (int64_t i = 0; i < br; ++i) {
          const acc* srow = sp + i * kColBlock;
          const int64_t gi = r0 + i;
          const int32_t li = ps.lab_r ? ps.lab_r[gi] : 0;
          const int32_t* lj = ps.lab_c ? ps.lab_c + c0 : nullptr;
          acc* sti = st.data() + 4 * i;
          if (md.sigmoid) {
            rk.span_sigmoid(srow, lj, li, ps.t, ps.b, bc, sti);
            continue;
          }
          acc tmax;
          if (lj) {  // labels: logits, positives and max in one pass (the diagonal left out: two spans)
            const auto labelled = md.weighted ? rk.span_logits_positives_weighted : rk.span_logits_positives;
            const int64_t d = ps.self_excl ? gi - c0 : -1;
            if (d >= 0 && d < ib) {
              tmax = std::max(labelled(srow, xr.data(), lj, li, md.keep_pos, md.keep_neg, ps.t, ps.inv_sigma, 0, d, sti),
                              labelled(srow, xr.data(), lj, li, md.keep_pos, md.keep_neg, ps.t, ps.inv_sigma, d + 1, ib, sti));
              xr[d] = neg_inf;
            } else {
              tmax = labelled(srow, xr.data(), lj, li, md.keep_pos, md.keep_neg, ps.t, ps.inv_sigma, 0, ib, sti);
            }
            if (ib < bc) tmax = std::max(tmax, rk.span_logits(srow, xr.data(), ps.t, ib, bc));
          } else {  // a CSR: the denominator by membership, the positives summed sparsely below
            rk.masked_logits(srow, xr.data(), ps.t, md.keep_neg, ib, bc);
            if (ps.csr.crow && md.member_needed()) mark_csr_row(ps.csr, gi, c0, ib, srow, xr.data(), ps.t, md.keep_pos);
            if (ps.self_excl && gi >= c0 && gi < c0 + ib) xr[gi - c0] = neg_inf;
            tmax = rk.span_max(xr.data(), bc);
          }
          // A NaN similarity must not vanish in the max: the sum below carries it.
          if (tmax > run_max[i]) {
            const acc f = std::exp(run_max[i] - tmax);
            run_sum[i] = (run_sum[i] + run_top[i]) * f;  // the old maximum's terms fall below the new one
            run_top[i] = 0;
            run_ms[i] *= f;
            run_max[i] = tmax;
          }
          if (run_max[i] == neg_inf) continue;  // nothing in the denominator so far
          rk.span_exp_sums(xr.data(), srow, run_max[i], bc, run_sum[i], run_top[i], run_ms[i]);
        }
      }
      for (int64_t i = 0; i < br; ++i) {
        const int64_t gi = r0 + i, o = gi - rs;
        acc* sti = st.data() + 4 * i;
        acc* d = diff + 3 * o;
        acc* a = aux + 4 * o;
        if (md.sigmoid) {
          d[0] = sti[0], d[1] = 0, d[2] = 0;
          a[0] = sti[3], a[1] = sti[1], a[2] = sti[2];
          continue;
        }
        if (ps.csr.crow) {  // positives from the CSR, O(|P(i)|·K)
          for (int64_t e = ps.csr.crow[gi]; e < ps.csr.crow[gi + 1]; ++e) {
            if (!ps.csr.live(gi, e)) continue;
            const acc sv = dot(rh + gi * k, ch + ps.csr.col[e] * k, k);
            sti[0] += sv;
            sti[1] += 1;
            if (md.weighted) {
              const acc ev = std::exp(sv * ps.inv_sigma);
              sti[2] += sv * ev;
              sti[3] += ev;
            }
          }
        }
        const acc sum = run_sum[i] + run_top[i];  // the terms at the maximum added last
        const bool any = sum > 0 || sum != sum;
        const acc log_sum = std::log(sum);
        d[0] = run_max[i] + log_sum;
        d[1] = sti[0];
        d[2] = sti[2];
        a[0] = sti[1];
        a[1] = any ? run_ms[i] / sum : acc(0);
        a[2] = sti[3];
        a[3] = two_sum_residual(run_max[i], log_sum, d[0]);
      }
    }
  });
}

// ----------------------------------------------------------------------------- backward

// Per-row gradient coefficients of one set (length = its rows): a = ∂L/∂lse (∂L/∂softplus-sum
// for SigLIP), lse (+inf where a = 0, so that exp(x − lse) vanishes), gp = ∂L/∂pos, gq = ∂L/∂pse,
// lo = lse's rounding residual (0 where a = 0).
template <typename acc>
struct Coef {
  const acc* a = nullptr;
  const acc* lse = nullptr;
  const acc* gp = nullptr;
  const acc* gq = nullptr;
  const acc* lo = nullptr;
};

// dR̂ (nR, K) in acc: rows of R against the columns of C, both directions' coefficients.
// Rows outside [rw0, rw1) have zero coefficients and only need C's window [cw0, cw1).
template <typename acc>
void backward_pass(const Pass<acc>& ps, const Coef<acc>& cr, const Coef<acc>& cc, int64_t rw0, int64_t rw1, int64_t cw0,
                   int64_t cw1, acc* gout) {
  const int64_t nr = ps.rows_t.size(0), nc = ps.cols_t.size(0), k = ps.cols_t.size(1);
  const int64_t blocks = (nr + kRowBlock - 1) / kRowBlock;
  const Mode& md = ps.md;
  const ContrastiveRows<acc>& rk = *ps.rows;
  const acc zero = 0, inf = std::numeric_limits<acc>::infinity();
  parallel_blocks(blocks, [&](int64_t b0, int64_t b1) {
    at::Tensor tile = at::empty({kRowBlock, kColBlock}, ps.cols_t.options());
    std::vector<acc> keep(kColBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kRowBlock, r1 = std::min(nr, r0 + kRowBlock), br = r1 - r0;
      at::Tensor g = at::from_blob(gout + r0 * k, {br, k}, ps.cols_t.options());
      g.zero_();
      const at::Tensor rows = ps.rows_t.narrow(0, r0, br);
      const bool has_anchor = r0 < rw1 && r1 > rw0;
      const int64_t cbeg = has_anchor ? 0 : cw0, cend = has_anchor ? nc : cw1;
      for (int64_t c0 = cbeg; c0 < cend; c0 += kColBlock) {
        const int64_t bc = std::min(cend, c0 + kColBlock) - c0;
        const int64_t ib = ps.rows_extra ? 0 : std::min(std::max(ps.nb - c0, int64_t(0)), bc);
        at::Tensor s_t = tile.narrow(0, 0, br).narrow(1, 0, bc);
        at::mm_out(s_t, rows, ps.cols_t.narrow(0, c0, bc).t());
        acc* sp = tile.template data_ptr<acc>();
        for (int64_t i = 0; i < br; ++i) {
          acc* srow = sp + i * kColBlock;
          const int64_t gi = r0 + i;
          const int32_t li = ps.lab_r ? ps.lab_r[gi] : 0;
          const int32_t* lj = ps.lab_c ? ps.lab_c + c0 : nullptr;
          const acc ar = cr.a ? cr.a[gi] : zero;
          if (md.sigmoid) {
            rk.coef_row_sigmoid(srow, lj, li, ps.t, ps.b, ar, cc.a + c0, bc);
            continue;
          }
          const acc lr = cr.a ? cr.lse[gi] : inf, lor = cr.a ? cr.lo[gi] : zero;
          const acc gpr = cr.a ? cr.gp[gi] : zero, gqr = cr.a ? cr.gq[gi] : zero;
          if (!lj && ib > 0) {  // CSR relation: the denominator by membership, the positives added sparsely
            std::fill(keep.begin(), keep.begin() + ib, md.keep_neg ? acc(1) : acc(0));
            if (ps.csr.crow && md.member_needed()) {
              const int64_t* beg = ps.csr.col + ps.csr.crow[gi];
              const int64_t* end = ps.csr.col + ps.csr.crow[gi + 1];
              for (const int64_t* p = std::lower_bound(beg, end, c0); p != end && *p < c0 + ib; ++p)
                keep[*p - c0] = md.keep_pos ? acc(1) : acc(0);
            }
          }
          if (md.weighted)
            rk.coef_row_softmax_weighted(srow, lj, li, md.keep_pos, md.keep_neg, ps.t, ps.inv_sigma, ar, lr, lor, gpr,
                                         gqr, cc.a + c0, cc.lse + c0, cc.lo + c0, cc.gp + c0, cc.gq + c0, ib, bc,
                                         keep.data(), ps.rows_extra);
          else
            rk.coef_row_softmax(srow, lj, li, md.keep_pos, md.keep_neg, ps.t, ps.inv_sigma, ar, lr, lor, gpr, gqr,
                                cc.a + c0, cc.lse + c0, cc.lo + c0, cc.gp + c0, cc.gq + c0, ib, bc, keep.data(),
                                ps.rows_extra);
          if (ps.self_excl && gi >= c0 && gi < c0 + bc) srow[gi - c0] = 0;  // no j = i term
        }
        g.addmm_(s_t, ps.cols_t.narrow(0, c0, bc));
      }
    }
  });
}

// The CSR positives' part of dx̂ for every row, O(nnz·K): gp_r + gp_j + (gq_r + gq_j)·e^{s/σ}.
template <typename acc>
void csr_positive_grad(const Pass<acc>& ps, const Coef<acc>& cr, acc* gout) {
  const int64_t nr = ps.rows_t.size(0), k = ps.rows_t.size(1);
  const acc* rh = ps.rows_t.template data_ptr<acc>();
  const acc* ch = ps.cols_t.template data_ptr<acc>();
  parallel_for(nr, 64, [&](int64_t a0, int64_t a1) {
    for (int64_t r = a0; r < a1; ++r) {
      acc* gr = gout + r * k;
      for (int64_t e = ps.csr.crow[r]; e < ps.csr.crow[r + 1]; ++e) {
        if (!ps.csr.live(r, e)) continue;
        const int64_t j = ps.csr.col[e];
        acc coef = cr.gp[r] + cr.gp[j];
        if (ps.md.weighted) coef += (cr.gq[r] + cr.gq[j]) * std::exp(dot(rh + r * k, ch + j * k, k) * ps.inv_sigma);
        if (coef == 0) continue;
        const acc* cj = ch + j * k;
        for (int64_t c = 0; c < k; ++c) gr[c] += coef * cj[c];
      }
    }
  });
}

// dz from dẑ: (dẑ − ẑ⟨ẑ, dẑ⟩)/‖z‖ (dẑ/1e-12 where the clamp is active; dẑ itself when the
// normalisation is off), cast to the input dtype.
template <typename scalar_t, typename acc>
void normalise_backward(const acc* xh, const acc* norm, const acc* g, bool normalize, int64_t m, int64_t k, scalar_t* out) {
  parallel_for(m, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const acc* gr = g + r * k;
      const acc* zr = xh + r * k;
      scalar_t* o = out + r * k;
      if (!normalize) {
        for (int64_t c = 0; c < k; ++c) o[c] = static_cast<scalar_t>(gr[c]);
      } else if (norm[r] >= static_cast<acc>(kNormEps)) {
        const acc proj = dot(zr, gr, k), inv = acc(1) / norm[r];
        for (int64_t c = 0; c < k; ++c) o[c] = static_cast<scalar_t>((gr[c] - zr[c] * proj) * inv);
      } else {
        const acc inv = acc(1) / static_cast<acc>(kNormEps);
        for (int64_t c = 0; c < k; ++c) o[c] = static_cast<scalar_t>(gr[c] * inv);
      }
    }
  });
}

// ----------------------------------------------------------------------------- ops

// The inputs of one call, normalised once: Ĉ = [x̂ or ŷ; q̂] (the square case's x̂ is a prefix).
struct Prepared {
  bool square = true, bidir = false;
  int64_t nx = 0, ny = 0, nq = 0, k = 0;
  at::Tensor xh, yh, ch, norm_x, norm_c;   // acc; ch = in-batch rows then the negatives
  at::Tensor lab_x, lab_c;                 // dense int32 ids (undefined without labels)
  at::Tensor crow, col;
  Mode md;
  CpuCapability level = CpuCapability::kDefault;  // the row loops' ISA, read once per call
};

Prepared prepare(const at::Tensor& x, const c10::optional<at::Tensor>& y, const c10::optional<at::Tensor>& neg,
                 const c10::optional<at::Tensor>& labels_x, const c10::optional<at::Tensor>& labels_y,
                 const c10::optional<at::Tensor>& crow, const c10::optional<at::Tensor>& col, int64_t xs, int64_t xe,
                 int64_t ys, int64_t ye, int64_t flags) {
  TORCH_CHECK(x.dim() == 2, "contrastive: x must be 2-D, got ", x.dim(), "-D");
  Prepared p;
  p.md = contrastive_mode(flags);
  p.level = cpu_capability();
  p.square = !y.has_value();
  p.bidir = (flags & kBidir) && !p.square;
  p.nx = x.size(0), p.k = x.size(1);
  p.ny = p.square ? 0 : y->size(0);
  p.nq = neg.has_value() ? neg->size(0) : 0;
  TORCH_CHECK(0 <= xs && xs <= xe && xe <= p.nx, "contrastive: need 0 <= x_start <= x_end <= rows of x");
  TORCH_CHECK(p.square || (y->dim() == 2 && y->size(1) == p.k), "contrastive: y must be (N_y, K)");
  TORCH_CHECK(!p.bidir || (0 <= ys && ys <= ye && ye <= p.ny), "contrastive: need 0 <= y_start <= y_end <= rows of y");
  TORCH_CHECK(!neg.has_value() || (neg->dim() == 2 && neg->size(1) == p.k), "contrastive: negatives must be (M, K)");
  TORCH_CHECK(p.square || p.nq == 0, "contrastive: negatives go with the square (one-set) form only");
  TORCH_CHECK(!p.md.sigmoid || (!p.square && labels_x.has_value() && labels_y.has_value()),
              "contrastive: the sigmoid form takes two sets and labels for both");
  if (p.square) {
    TORCH_CHECK(labels_x.has_value() != crow.has_value(), "contrastive: give exactly one of labels or crow/col");
  } else {
    TORCH_CHECK(labels_x.has_value() && labels_y.has_value() && !crow.has_value(),
                "contrastive: the two-set form takes labels for both sets (and no CSR)");
  }
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = x.options().dtype(acc_dtype);
  const int64_t nb = p.square ? p.nx : p.ny;
  p.ch = at::empty({nb + p.nq, p.k}, opts);
  p.norm_c = at::empty({nb + p.nq}, opts);
  at::Tensor norm_q = p.norm_c.narrow(0, nb, p.nq);
  if (p.square) {
    p.xh = p.ch.narrow(0, 0, p.nx);
    p.norm_x = p.norm_c.narrow(0, 0, p.nx);
  } else {
    p.xh = at::empty({p.nx, p.k}, opts);
    p.norm_x = at::empty({p.nx}, opts);
    p.yh = p.ch.narrow(0, 0, p.ny);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "contrastive_prepare", [&] {
    using acc = acc_t<scalar_t>;
    normalise_rows<scalar_t, acc>(x, p.md.normalize, p.xh.data_ptr<acc>(), p.norm_x.data_ptr<acc>());
    if (!p.square) normalise_rows<scalar_t, acc>(*y, p.md.normalize, p.yh.data_ptr<acc>(), p.norm_c.data_ptr<acc>());
    if (p.nq) normalise_rows<scalar_t, acc>(*neg, p.md.normalize, p.ch.data_ptr<acc>() + nb * p.k, norm_q.data_ptr<acc>());
  });
  if (labels_x.has_value()) {
    if (p.square) {
      p.lab_x = p.lab_c = dense_label_ids(*labels_x);
    } else {
      const at::Tensor ids = dense_label_ids(at::cat({labels_x->to(at::kLong), labels_y->to(at::kLong)}));
      p.lab_x = ids.narrow(0, 0, p.nx).contiguous();
      p.lab_c = ids.narrow(0, p.nx, p.ny).contiguous();
    }
  } else {
    p.crow = crow->to(at::kLong).contiguous();
    p.col = col->to(at::kLong).contiguous();
  }
  return p;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename acc>
Pass<acc> make_pass(const Prepared& p, const at::Tensor& rows, const at::Tensor& cols, int64_t nb, const at::Tensor& lab_r,
                    const at::Tensor& lab_c, const at::Tensor& scale, const at::Tensor& bias, double sigma) {
  Pass<acc> ps;
  ps.rows_t = rows;
  ps.cols_t = cols;
  ps.nb = nb;
  ps.lab_r = ptr_or_null<int32_t>(lab_r);
  ps.lab_c = ptr_or_null<int32_t>(lab_c);
  ps.md = p.md;
  ps.t = scale.to(rows.scalar_type()).item<acc>();
  ps.b = bias.to(rows.scalar_type()).item<acc>();
  ps.inv_sigma = static_cast<acc>(1.0 / sigma);
  ps.rows = &contrastive_rows<acc>(p.level);
  return ps;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_fwd_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& y, const c10::optional<at::Tensor>& neg,
    const c10::optional<at::Tensor>& labels_x, const c10::optional<at::Tensor>& labels_y, const c10::optional<at::Tensor>& crow,
    const c10::optional<at::Tensor>& col, const at::Tensor& scale, const at::Tensor& bias, int64_t xs, int64_t xe, int64_t ys,
    int64_t ye, int64_t flags, double sigma) {
  NoAutocast no_autocast;  // csrc/no_autocast.h
  const Prepared p = prepare(x, y, neg, labels_x, labels_y, crow, col, xs, xe, ys, ye, flags);
  const auto opts = p.ch.options();
  const int64_t by = p.bidir ? ye - ys : 0;
  at::Tensor diff_x = at::zeros({xe - xs, 3}, opts), aux_x = at::zeros({xe - xs, 4}, opts);
  at::Tensor diff_y = at::zeros({by, 3}, opts), aux_y = at::zeros({by, 4}, opts);
  AT_DISPATCH_FLOATING_TYPES(p.ch.scalar_type(), "contrastive_fwd_cxx", [&] {
    using acc = scalar_t;
    const int64_t nb = p.square ? p.nx : p.ny;
    Pass<acc> px = make_pass<acc>(p, p.xh, p.ch, nb, p.lab_x, p.lab_c, scale, bias, sigma);
    px.self_excl = p.square;
    if (p.crow.defined()) px.csr = Csr{p.crow.data_ptr<int64_t>(), p.col.data_ptr<int64_t>()};
    if (xe > xs) forward_pass<acc>(px, xs, xe, diff_x.data_ptr<acc>(), aux_x.data_ptr<acc>());
    if (by > 0) {
      Pass<acc> py = make_pass<acc>(p, p.yh, p.xh, p.nx, p.lab_c, p.lab_x, scale, bias, sigma);
      forward_pass<acc>(py, ys, ye, diff_y.data_ptr<acc>(), aux_y.data_ptr<acc>());
    }
  });
  return {diff_x, aux_x, diff_y, aux_y};
}

template <typename acc>
Coef<acc> coef_ptrs(const at::Tensor& c) {
  Coef<acc> out;
  const acc* base = c.data_ptr<acc>();
  const int64_t n = c.size(1);
  out.a = base, out.lse = base + n, out.gp = base + 2 * n, out.gq = base + 3 * n, out.lo = base + 4 * n;
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_bwd_cpu(
    const at::Tensor& grad_x, const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& y,
    const c10::optional<at::Tensor>& neg, const c10::optional<at::Tensor>& labels_x, const c10::optional<at::Tensor>& labels_y,
    const c10::optional<at::Tensor>& crow, const c10::optional<at::Tensor>& col, const at::Tensor& diff_x,
    const at::Tensor& diff_y, const at::Tensor& aux_x, const at::Tensor& aux_y, const at::Tensor& scale, const at::Tensor& bias, int64_t xs, int64_t xe, int64_t ys, int64_t ye,
    int64_t flags, double sigma, bool need_x, bool need_y, bool need_neg) {
  NoAutocast no_autocast;  // csrc/no_autocast.h
  const Prepared p = prepare(x, y, neg, labels_x, labels_y, crow, col, xs, xe, ys, ye, flags);
  const auto opts = p.ch.options();
  const int64_t k = p.k, nb = p.square ? p.nx : p.ny;
  at::Tensor dx = at::zeros({need_x ? p.nx : 0, k}, x.options());
  at::Tensor dy = at::zeros({need_y && !p.square ? p.ny : 0, k}, x.options());
  at::Tensor dneg = at::zeros({need_neg ? p.nq : 0, k}, x.options());
  const at::Tensor cx = contrastive_coefficients(grad_x, diff_x, aux_x, p.nx, xs, xe, p.md.sigmoid, opts);
  const at::Tensor cy = p.bidir ? contrastive_coefficients(grad_y, diff_y, aux_y, p.ny, ys, ye, p.md.sigmoid, opts)
                                : contrastive_coefficients(grad_y, diff_y, aux_y, nb + p.nq, 0, 0, p.md.sigmoid, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "contrastive_bwd_cxx", [&] {
    using acc = acc_t<scalar_t>;
    if (p.square) {
      // columns [x; negatives]: the x rows' own coefficients, zeros for the negatives
      at::Tensor cc = at::zeros({5, p.nx + p.nq}, opts);
      cc.narrow(1, 0, p.nx).copy_(cx);
      cc[1].narrow(0, p.nx, p.nq).fill_(std::numeric_limits<double>::infinity());
      if (need_x && p.nx) {
        Pass<acc> ps = make_pass<acc>(p, p.xh, p.ch, p.nx, p.lab_x, p.lab_c, scale, bias, sigma);
        ps.self_excl = true;
        if (p.crow.defined()) ps.csr = Csr{p.crow.data_ptr<int64_t>(), p.col.data_ptr<int64_t>()};
        at::Tensor g = at::empty({p.nx, k}, opts);
        backward_pass<acc>(ps, coef_ptrs<acc>(cx), coef_ptrs<acc>(cc), xs, xe, xs, xe, g.data_ptr<acc>());
        if (ps.csr.crow) csr_positive_grad<acc>(ps, coef_ptrs<acc>(cx), g.data_ptr<acc>());
        normalise_backward<scalar_t, acc>(p.xh.data_ptr<acc>(), p.norm_x.data_ptr<acc>(), g.data_ptr<acc>(), p.md.normalize,
                                          p.nx, k, dx.data_ptr<scalar_t>());
      }
      if (need_neg && p.nq) {
        const at::Tensor qh = p.ch.narrow(0, p.nx, p.nq);
        Pass<acc> ps = make_pass<acc>(p, qh, p.xh, p.nx, at::Tensor(), at::Tensor(), scale, bias, sigma);
        ps.rows_extra = true;
        at::Tensor g = at::empty({p.nq, k}, opts);
        backward_pass<acc>(ps, Coef<acc>(), coef_ptrs<acc>(cx), 0, 0, xs, xe, g.data_ptr<acc>());
        normalise_backward<scalar_t, acc>(qh.data_ptr<acc>(), p.norm_c.data_ptr<acc>() + p.nx, g.data_ptr<acc>(),
                                          p.md.normalize, p.nq, k, dneg.data_ptr<scalar_t>());
      }
      return;
    }
    const Coef<acc> kx = coef_ptrs<acc>(cx), ky = coef_ptrs<acc>(cy);
    const int64_t yw0 = p.bidir ? ys : 0, yw1 = p.bidir ? ye : 0;
    if (need_x && p.nx) {
      Pass<acc> ps = make_pass<acc>(p, p.xh, p.yh, p.ny, p.lab_x, p.lab_c, scale, bias, sigma);
      at::Tensor g = at::empty({p.nx, k}, opts);
      backward_pass<acc>(ps, kx, ky, xs, xe, yw0, yw1, g.data_ptr<acc>());
      normalise_backward<scalar_t, acc>(p.xh.data_ptr<acc>(), p.norm_x.data_ptr<acc>(), g.data_ptr<acc>(), p.md.normalize,
                                        p.nx, k, dx.data_ptr<scalar_t>());
    }
    if (need_y && p.ny) {
      Pass<acc> ps = make_pass<acc>(p, p.yh, p.xh, p.nx, p.lab_c, p.lab_x, scale, bias, sigma);
      at::Tensor g = at::empty({p.ny, k}, opts);
      backward_pass<acc>(ps, ky, kx, yw0, yw1, xs, xe, g.data_ptr<acc>());
      normalise_backward<scalar_t, acc>(p.yh.data_ptr<acc>(), p.norm_c.data_ptr<acc>(), g.data_ptr<acc>(), p.md.normalize,
                                        p.ny, k, dy.data_ptr<scalar_t>());
    }
  });
  return {dx, dy, dneg};
}

}  // namespace
}  // namespace sslops

TORCH_LIBRARY_IMPL(sslops, CPU, m) {
  m.impl("contrastive_fwd_cxx", &sslops::contrastive_fwd_cpu);
  m.impl("contrastive_bwd_cxx", &sslops::contrastive_bwd_cpu);
}
