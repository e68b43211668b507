// The blockwise contrastive pass on the GPU, CUDA C++ (InfoNCE/SupCon, queues, DCL, CLIP,
// SigLIP). The math, the two forms (square, two-set), the per-row statistics and the
// gradient are those of csrc/cpu/infonce.cpp; this file follows the same plan. Unverified on a
// GPU: registered with cuda_verified=False, so "auto" never picks it.
//
//   forward   one block per 32 anchor rows, 256 threads: thread (row = t/8, group = t%8)
//             owns 4 columns of every 32-column tile; the tile of ⟨x_r, c_j⟩ comes from
//             shared-memory K-slices of the raw rows and is scaled by the inverse norms (the
//             normalisation is fused). Online max, sum and Σ e·s per row across the 8 lanes
//             of a row by warp shuffles; labels compared per element; a CSR relation's
//             positives by a sparse kernel (a warp per anchor, O(|P(i)|·K)), its membership
//             (DCL, no in-batch negatives) by each thread walking the row's sorted entries
//             along with its columns. SigLIP sums softplus(−y x), h·s and h the same way.
//   backward  one block per 32 rows of a set and per 256-wide slice of K: recompute each tile
//             of s, form D (both directions' terms: the row's own and the column's, 1/‖c‖
//             folded in) in shared memory and accumulate D·c in registers; each row is owned
//             by one block, so there are no atomics and reruns are bit-identical. A per-row
//             kernel (a warp per row) adds the CSR positives and applies the normalisation
//             backward.
//
// Saved: diff (B, 3) and aux (B, 4), aux's last column lse's rounding residual lo (TwoSum of
// the row max and the log of the sum; nvcc does not reassociate, even under --use_fast_math):
// the backward's weights exp((t·s − lse) − lo) keep naive fp32's accuracy where lse ≈ 1/τ
// alone would perturb each by its ulp (csrc/cpu/infonce.cpp). Extra memory: norms, a (rows, K) dx̂ buffer (fp32; fp64 for
// fp64), the candidates [x; negatives] concatenated once in the input dtype when there are
// negatives. FLOPs: forward 2·B·C·K, backward 4·rows·columns·K per pass, plus 1 (forward) and
// 2 (backward) exp per pair. All row offsets are int64 (N·K and N·N may pass 2³¹). The
// products are FP32 (FP64) FMAs, not tensor cores: the Triton kernels are the fast GPU path.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>

#include <limits>

#include "../cpu/infonce_common.h"
#include "../no_autocast.h"
#include "stream.h"

namespace sslops {
namespace {

constexpr int kTile = 32;     // rows and columns of a similarity tile
constexpr int kSlice = 32;    // K-slice staged in shared memory
constexpr int kThreads = 256; // 8 threads per row, 4 columns each
constexpr int kKOut = 256;    // K-slice of dx̂ a backward block accumulates in registers (32 per thread)
constexpr double kNormEps = 1e-12;

template <typename T> __device__ __forceinline__ T dexp(T x);
template <> __device__ __forceinline__ float dexp<float>(float x) { return expf(x); }
template <> __device__ __forceinline__ double dexp<double>(double x) { return exp(x); }
template <typename T> __device__ __forceinline__ T dlog(T x);
template <> __device__ __forceinline__ float dlog<float>(float x) { return logf(x); }
template <> __device__ __forceinline__ double dlog<double>(double x) { return log(x); }
template <typename T> __device__ __forceinline__ T dlog1p(T x);
template <> __device__ __forceinline__ float dlog1p<float>(float x) { return log1pf(x); }
template <> __device__ __forceinline__ double dlog1p<double>(double x) { return log1p(x); }

template <typename T>
__device__ __forceinline__ T inf() { return std::numeric_limits<T>::infinity(); }

// Reductions over the 8 lanes that share a row (lanes differ in their low 3 bits).
template <typename T>
__device__ __forceinline__ T row_max(T v) {
  for (int o = 1; o < 8; o <<= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename T>
__device__ __forceinline__ T row_sum(T v) {
  for (int o = 1; o < 8; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// What every kernel needs to know about one call (plain values: passed by value).
// The schema's flags (csrc/cpu/infonce_common.h) and whether this pass walks a CSR relation for
// membership.
struct Mode : ContrastiveMode {
  bool member = false;
};

template <typename scalar_t, typename acc>
__global__ void row_norm_kernel(const scalar_t* __restrict__ z, int64_t m, int64_t k, acc* __restrict__ norm) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= m) return;
  acc ss = 0;
  for (int64_t c = lane; c < k; c += 32) {
    const acc v = static_cast<acc>(z[row * k + c]);
    ss += v * v;
  }
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (lane == 0) norm[row] = sqrt(ss);
}

// 1/max(‖row‖, eps), or 1 when the normalisation is off.
template <typename acc>
__device__ __forceinline__ acc inv_norm(const acc* norm, int64_t i, bool normalize) {
  return normalize ? acc(1) / fmax(norm[i], static_cast<acc>(kNormEps)) : acc(1);
}

// s[q] = ⟨a_row, b_{c0 + 4·group + q}⟩ (raw rows), staged through shared memory.
template <typename scalar_t, typename acc>
__device__ __forceinline__ void sim_tile(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t k, int64_t r0,
                                         int64_t rows_end, int64_t c0, int64_t cols_end, acc (*as)[kSlice + 1],
                                         acc (*bs)[kSlice + 1], acc s[4]) {
  const int t = threadIdx.x, row = t >> 3, grp = t & 7;
  for (int q = 0; q < 4; ++q) s[q] = 0;
  for (int64_t k0 = 0; k0 < k; k0 += kSlice) {
    for (int e = t; e < kTile * kSlice; e += kThreads) {
      const int rr = e / kSlice, kk = e % kSlice;
      const int64_t gk = k0 + kk, ga = r0 + rr, gb = c0 + rr;
      as[rr][kk] = (ga < rows_end && gk < k) ? static_cast<acc>(a[ga * k + gk]) : acc(0);
      bs[rr][kk] = (gb < cols_end && gk < k) ? static_cast<acc>(b[gb * k + gk]) : acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kSlice; ++kk) {
      const acc av = as[row][kk];
      for (int q = 0; q < 4; ++q) s[q] += av * bs[grp * 4 + q][kk];
    }
    __syncthreads();
  }
}

// Whether column j is among row i's sorted CSR entries; `ptr` walks the row as j increases.
__device__ __forceinline__ bool csr_walk(const int64_t* __restrict__ col, int64_t& ptr, int64_t end, int64_t j) {
  while (ptr < end && col[ptr] < j) ++ptr;
  return ptr < end && col[ptr] == j;
}

// The anchor-i/column-j relation of the softmax forms: (g, den). Square: j ≠ i; in-batch
// columns by the labels or the CSR membership; negatives' columns (j >= nb) always in D(i).
struct Rel {
  bool g, den;
};

__device__ __forceinline__ Rel relation(const Mode& md, bool self_excl, bool rows_extra, int64_t i, int64_t j, int64_t nb,
                                        bool positive) {
  if (self_excl && i == j) return {false, false};
  if (rows_extra || j >= nb) return {false, true};
  return {positive, positive ? md.keep_pos : md.keep_neg};
}

// ----------------------------------------------------------------------------- forward

// For one anchor from the CSR: Σ_{P(i)} s, |P(i)|, Σ_{P(i)} s e^{s/σ}, Σ_{P(i)} e^{s/σ} (a warp per anchor).
template <typename scalar_t, typename acc>
__global__ void pairs_positive_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ c, const acc* __restrict__ normx,
                                      const acc* __restrict__ normc, const int64_t* __restrict__ crow,
                                      const int64_t* __restrict__ col, int64_t rs, int64_t re, int64_t k, acc inv_sigma,
                                      Mode md, acc* __restrict__ out) {
  const int64_t i = rs + static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= re) return;
  const acc inv_i = inv_norm(normx, i, md.normalize);
  acc p = 0, n = 0, pse = 0, pe = 0;
  for (int64_t e = crow[i]; e < crow[i + 1]; ++e) {
    const int64_t j = col[e];
    if (j == i || (e > crow[i] && col[e - 1] == j)) continue;  // self-pair, duplicate
    acc d = 0;
    for (int64_t q = lane; q < k; q += 32) d += static_cast<acc>(x[i * k + q]) * static_cast<acc>(c[j * k + q]);
    for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
    const acc s = d * inv_i * inv_norm(normc, j, md.normalize);
    p += s;
    n += 1;
    if (md.weighted) {
      const acc w = dexp(s * inv_sigma);
      pse += s * w;
      pe += w;
    }
  }
  if (lane == 0) {
    acc* o = out + 4 * (i - rs);
    o[0] = p, o[1] = n, o[2] = pse, o[3] = pe;
  }
}

template <typename scalar_t, typename acc>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ c, const acc* __restrict__ normx, const acc* __restrict__ normc,
    const int64_t* __restrict__ labx, const int64_t* __restrict__ labc, const int64_t* __restrict__ crow,
    const int64_t* __restrict__ col, const acc* __restrict__ sparse, int64_t nc, int64_t nb, int64_t k, int64_t rs, int64_t re,
    const acc* __restrict__ scale_ptr, const acc* __restrict__ bias_ptr, acc inv_sigma, Mode md, bool self_excl,
    acc* __restrict__ diff, acc* __restrict__ aux) {
  __shared__ acc as[kTile][kSlice + 1];
  __shared__ acc bs[kTile][kSlice + 1];
  const int t = threadIdx.x, grp = t & 7;
  const int64_t r0 = rs + static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t gi = r0 + (t >> 3);
  const bool live = gi < re;
  const acc ts = *scale_ptr, bias = *bias_ptr;
  const acc inv_i = live ? inv_norm(normx, gi, md.normalize) : acc(0);
  const int64_t lab_i = (labx && live) ? labx[gi] : 0;
  int64_t walk = (md.member && live) ? crow[gi] : 0;
  const int64_t walk_end = (md.member && live) ? crow[gi + 1] : 0;
  // run_sum: the softmax terms below run_max; run_top: how many sit at it (each exactly 1), added
  // last so that a dominant term's 1 is rounded once, not with every later small term
  acc run_max = -inf<acc>(), run_sum = 0, run_top = 0, run_ms = 0, pos = 0, cnt = 0, pse = 0, pe = 0;
  for (int64_t c0 = 0; c0 < nc; c0 += kTile) {
    acc s[4];
    sim_tile<scalar_t, acc>(x, c, k, r0, re, c0, nc, as, bs, s);
    acc xv[4];
    bool den[4];
    acc tmax = -inf<acc>();
    for (int q = 0; q < 4; ++q) {
      const int64_t gj = c0 + grp * 4 + q;
      const bool valid = live && gj < nc;
      const acc sv = valid ? s[q] * (inv_i * inv_norm(normc, gj, md.normalize)) : acc(0);
      const bool in_batch = gj < nb;
      bool positive = false;
      if (valid && in_batch) positive = labx ? labc[gj] == lab_i : (md.member && csr_walk(col, walk, walk_end, gj));
      if (md.sigmoid) {
        den[q] = false;
        if (!valid) continue;
        const acc xs = sv * ts + bias;
        const acc v = positive ? -xs : xs;  // −y·x
        const acc u = dexp(-fabs(v));
        const acc sig = (v >= acc(0) ? acc(1) : u) / (acc(1) + u);
        const acc h = positive ? -sig : sig;
        pos += fmax(v, acc(0)) + dlog1p(u);
        run_ms += h * sv;
        run_sum += h;
        cnt += positive ? acc(1) : acc(0);
        continue;
      }
      const Rel rel = relation(md, self_excl, false, gi, gj, nb, positive);
      den[q] = valid && rel.den;
      xv[q] = den[q] ? sv * ts : -inf<acc>();
      tmax = fmax(tmax, xv[q]);
      s[q] = sv;
      if (valid && labx && rel.g) {
        pos += sv;
        cnt += 1;
        if (md.weighted) {
          const acc w = dexp(sv * inv_sigma);
          pse += sv * w;
          pe += w;
        }
      }
    }
    if (md.sigmoid) continue;
    tmax = row_max(tmax);
    const acc new_max = fmax(run_max, tmax);
    const acc safe = new_max == -inf<acc>() ? acc(0) : new_max;
    const acc f = dexp(run_max - safe);
    acc part = 0, part_top = 0, part_ms = 0;
    for (int q = 0; q < 4; ++q)
      if (den[q]) {
        const acc e = dexp(xv[q] - safe);
        const bool at_max = xv[q] == safe;
        part += at_max ? acc(0) : e;
        part_top += at_max ? acc(1) : acc(0);
        part_ms += e * s[q];
      }
    // per-lane partial sums, one shared max; the old maximum's terms fall below a new one
    const bool grew = new_max > run_max;
    run_sum = (grew ? (run_sum + run_top) * f : run_sum) + part;
    run_top = (grew ? acc(0) : run_top) + part_top;
    run_ms = run_ms * f + part_ms;
    run_max = new_max;
  }
  run_sum = row_sum(run_sum) + row_sum(run_top);
  run_ms = row_sum(run_ms);
  pos = row_sum(pos);
  cnt = row_sum(cnt);
  pse = row_sum(pse);
  pe = row_sum(pe);
  if (!live || grp != 0) return;
  acc* d = diff + 3 * (gi - rs);
  acc* a = aux + 4 * (gi - rs);
  if (md.sigmoid) {
    d[0] = pos, d[1] = 0, d[2] = 0;
    a[0] = cnt, a[1] = run_ms, a[2] = run_sum, a[3] = 0;
    return;
  }
  if (!labx) {
    const acc* sp = sparse + 4 * (gi - rs);
    pos = sp[0], cnt = sp[1], pse = sp[2], pe = sp[3];
  }
  const acc log_sum = dlog(run_sum);
  const acc lse = run_max + log_sum;
  const acc v = lse - run_max;  // TwoSum: run_max + log_sum = lse + lo exactly
  d[0] = lse;
  d[1] = pos;
  d[2] = pse;
  a[0] = cnt;
  a[1] = run_sum > 0 ? run_ms / run_sum : (run_sum != run_sum ? run_sum : acc(0));
  a[2] = pe;
  a[3] = isfinite(lse) ? (run_max - (lse - v)) + (log_sum - v) : acc(0);
}

// ----------------------------------------------------------------------------- backward

// Coefficients of a set of n rows, a (5, n) array: a, lse (+inf where a = 0), gp, gq, lo (0 where a = 0).
template <typename acc>
struct Coef {
  const acc* base;
  int64_t n;
  __device__ __forceinline__ acc a(int64_t i) const { return base[i]; }
  __device__ __forceinline__ acc lse(int64_t i) const { return base[n + i]; }
  __device__ __forceinline__ acc gp(int64_t i) const { return base[2 * n + i]; }
  __device__ __forceinline__ acc gq(int64_t i) const { return base[3 * n + i]; }
  __device__ __forceinline__ acc lo(int64_t i) const { return base[4 * n + i]; }
};

template <typename scalar_t, typename acc>
__global__ void __launch_bounds__(kThreads) backward_tiles_kernel(
    const scalar_t* __restrict__ r, const scalar_t* __restrict__ c, const acc* __restrict__ normr, const acc* __restrict__ normc,
    const int64_t* __restrict__ labr, const int64_t* __restrict__ labc, const int64_t* __restrict__ crow,
    const int64_t* __restrict__ col, Coef<acc> cr, Coef<acc> cc, int64_t nr, int64_t nc, int64_t nb_c, int64_t k, int64_t rw0,
    int64_t rw1, int64_t cw0, int64_t cw1, const acc* __restrict__ scale_ptr, const acc* __restrict__ bias_ptr, acc inv_sigma,
    Mode md, bool self_excl, bool rows_extra, acc* __restrict__ dzh) {
  __shared__ acc as[kTile][kSlice + 1];
  __shared__ acc bs[kTile][kSlice + 1];
  __shared__ acc ds[kTile][kTile + 1];
  const int t = threadIdx.x, row = t >> 3, grp = t & 7;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t ko = static_cast<int64_t>(blockIdx.y) * kKOut;
  const int64_t gi = r0 + row;
  const bool live = gi < nr;
  const acc ts = *scale_ptr, bias = *bias_ptr;
  const acc inv_i = live ? inv_norm(normr, gi, md.normalize) : acc(0);
  const acc a_i = live ? cr.a(gi) : acc(0);
  const acc lse_i = live ? cr.lse(gi) : inf<acc>(), lo_i = live ? cr.lo(gi) : acc(0);
  const acc gp_i = live ? cr.gp(gi) : acc(0), gq_i = live ? cr.gq(gi) : acc(0);
  const int64_t lab_i = (labr && live) ? labr[gi] : 0;
  const bool member = md.member && !rows_extra;
  int64_t walk = (member && live) ? crow[gi] : 0;
  const int64_t walk_end = (member && live) ? crow[gi + 1] : 0;
  // Rows outside their window have zero coefficients: only the other set's window matters.
  const bool has_anchor = r0 < rw1 && r0 + kTile > rw0;
  const int64_t cbeg = has_anchor ? 0 : cw0, cend = has_anchor ? nc : cw1;
  acc dacc[kKOut / 8];
  for (int q = 0; q < kKOut / 8; ++q) dacc[q] = 0;
  for (int64_t c0 = cbeg; c0 < cend; c0 += kTile) {
    acc s[4];
    sim_tile<scalar_t, acc>(r, c, k, r0, nr, c0, cend, as, bs, s);
    for (int q = 0; q < 4; ++q) {
      const int64_t gj = c0 + grp * 4 + q;
      acc d = 0;
      if (live && gj < cend) {
        const acc inv_j = inv_norm(normc, gj, md.normalize);
        const acc sv = s[q] * (inv_i * inv_j);  // as the forward: s_ij and s_ji round alike
        const bool in_batch = !rows_extra && gj < nb_c;
        bool positive = false;
        if (in_batch) positive = labr ? labc[gj] == lab_i : (member && csr_walk(col, walk, walk_end, gj));
        if (md.sigmoid) {
          const acc xs = sv * ts + bias;
          const acc v = positive ? -xs : xs;
          const acc u = dexp(-fabs(v));
          const acc sig = (v >= acc(0) ? acc(1) : u) / (acc(1) + u);
          d = (a_i + cc.a(gj)) * ts * (positive ? -sig : sig);
        } else {
          const Rel rel = relation(md, self_excl, rows_extra, gi, gj, nb_c, positive);
          const acc xs = sv * ts;
          if (rel.den) d = ts * (a_i * dexp((xs - lse_i) - lo_i) + cc.a(gj) * dexp((xs - cc.lse(gj)) - cc.lo(gj)));
          if (labr && rel.g) {  // a CSR's positives are added sparsely by backward_rows_kernel
            acc gpair = gp_i + cc.gp(gj);
            if (md.weighted) gpair += (gq_i + cc.gq(gj)) * dexp(sv * inv_sigma);
            d += gpair;
          }
        }
        d *= inv_j;
      }
      ds[row][grp * 4 + q] = d;
    }
    __syncthreads();
    for (int j = 0; j < kTile; ++j) {
      const int64_t gj = c0 + j;
      if (gj >= cend) break;
      const acc dj = ds[row][j];
      const scalar_t* cj = c + gj * k;
      for (int q = 0; q < kKOut / 8; ++q) {
        const int64_t kk = ko + grp + 8 * q;
        if (kk < k) dacc[q] += dj * static_cast<acc>(cj[kk]);
      }
    }
    __syncthreads();
  }
  if (live)
    for (int q = 0; q < kKOut / 8; ++q) {
      const int64_t kk = ko + grp + 8 * q;
      if (kk < k) dzh[gi * k + kk] = dacc[q];
    }
}

// Per row (a warp): dr̂ += the CSR positives' part; dr = (dr̂ − r̂⟨r̂, dr̂⟩)/‖r‖ (dr̂/1e-12 when
// clamped; dr̂ itself when not normalising).
template <typename scalar_t, typename acc>
__global__ void backward_rows_kernel(const scalar_t* __restrict__ r, const scalar_t* __restrict__ c, const acc* __restrict__ normr,
                                     const acc* __restrict__ normc, acc* __restrict__ dzh, const int64_t* __restrict__ crow,
                                     const int64_t* __restrict__ col, Coef<acc> cr, int64_t nr, int64_t k, acc inv_sigma, Mode md,
                                     scalar_t* __restrict__ dz) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= nr) return;
  const acc inv = inv_norm(normr, i, md.normalize);
  if (crow) {
    for (int64_t e = crow[i]; e < crow[i + 1]; ++e) {
      const int64_t j = col[e];
      if (j == i || (e > crow[i] && col[e - 1] == j)) continue;
      const acc inv_j = inv_norm(normc, j, md.normalize);
      acc coef = cr.gp(i) + cr.gp(j);
      if (md.weighted) {
        acc d = 0;
        for (int64_t q = lane; q < k; q += 32) d += static_cast<acc>(r[i * k + q]) * static_cast<acc>(c[j * k + q]);
        for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        coef += (cr.gq(i) + cr.gq(j)) * dexp(d * inv * inv_j * inv_sigma);
      }
      for (int64_t q = lane; q < k; q += 32) dzh[i * k + q] += coef * inv_j * static_cast<acc>(c[j * k + q]);
    }
  }
  acc proj = 0;
  for (int64_t q = lane; q < k; q += 32) proj += static_cast<acc>(r[i * k + q]) * inv * dzh[i * k + q];
  for (int o = 16; o > 0; o >>= 1) proj += __shfl_xor_sync(0xffffffffu, proj, o);
  const bool clamped = md.normalize && normr[i] < static_cast<acc>(kNormEps);
  for (int64_t q = lane; q < k; q += 32) {
    const acc g = dzh[i * k + q];
    const acc zh = static_cast<acc>(r[i * k + q]) * inv;
    dz[i * k + q] = static_cast<scalar_t>(!md.normalize ? g : (clamped ? g * inv : (g - zh * proj) * inv));
  }
}

// ----------------------------------------------------------------------------- ops

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

Mode make_mode(int64_t flags, bool member) {
  Mode md;
  static_cast<ContrastiveMode&>(md) = contrastive_mode(flags);
  md.member = member && !md.sigmoid && md.member_needed();
  return md;
}

// The inputs of one call: contiguous rows, the candidates of the square form [x; negatives],
// int64 labels, the norms (acc).
struct Prepared {
  bool square = true, bidir = false;
  int64_t nx = 0, ny = 0, nq = 0, k = 0;
  at::Tensor x, y, cand, norm_x, norm_c, lab_x, lab_c, crow, col, scale, bias;
  Mode md;
};

Prepared prepare(const at::Tensor& x_in, const c10::optional<at::Tensor>& y, const c10::optional<at::Tensor>& neg,
                 const c10::optional<at::Tensor>& labels_x, const c10::optional<at::Tensor>& labels_y,
                 const c10::optional<at::Tensor>& crow, const c10::optional<at::Tensor>& col, const at::Tensor& scale,
                 const at::Tensor& bias, int64_t xs, int64_t xe, int64_t ys, int64_t ye, int64_t flags) {
  TORCH_CHECK(x_in.dim() == 2, "contrastive: x must be 2-D, got ", x_in.dim(), "-D");
  Prepared p;
  p.square = !y.has_value();
  p.bidir = (flags & kBidir) && !p.square;
  p.x = x_in.contiguous();
  p.nx = p.x.size(0), p.k = p.x.size(1);
  p.nq = neg.has_value() ? neg->size(0) : 0;
  TORCH_CHECK(0 <= xs && xs <= xe && xe <= p.nx, "contrastive: need 0 <= x_start <= x_end <= rows of x");
  TORCH_CHECK(p.square || p.nq == 0, "contrastive: negatives go with the square (one-set) form only");
  if (p.square) {
    TORCH_CHECK(labels_x.has_value() != crow.has_value(), "contrastive: give exactly one of labels or crow/col");
  } else {
    TORCH_CHECK(labels_x.has_value() && labels_y.has_value() && !crow.has_value(),
                "contrastive: the two-set form takes labels for both sets (and no CSR)");
    p.y = y->contiguous();
    p.ny = p.y.size(0);
    TORCH_CHECK(p.y.size(1) == p.k, "contrastive: y must be (N_y, K)");
    TORCH_CHECK(!p.bidir || (0 <= ys && ys <= ye && ye <= p.ny), "contrastive: need 0 <= y_start <= y_end <= rows of y");
  }
  p.md = make_mode(flags, crow.has_value());
  TORCH_CHECK(!p.md.sigmoid || !p.square, "contrastive: the sigmoid form takes two sets");
  p.cand = p.square ? (p.nq ? at::cat({p.x, neg->contiguous()}) : p.x) : p.y;
  const auto acc_dtype = p.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = p.x.options().dtype(acc_dtype);
  p.norm_x = at::empty({p.nx}, opts);
  p.norm_c = p.cand.is_same(p.x) ? p.norm_x : at::empty({p.cand.size(0)}, opts);
  if (labels_x.has_value()) {
    p.lab_x = labels_x->to(at::kLong).contiguous();
    p.lab_c = p.square ? p.lab_x : labels_y->to(at::kLong).contiguous();
  } else {
    p.crow = crow->to(at::kLong).contiguous();
    p.col = col->to(at::kLong).contiguous();
  }
  p.scale = scale.to(opts).contiguous();
  p.bias = bias.to(opts).contiguous();
  cudaStream_t stream = current_cuda_stream(p.x.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "contrastive_norms", [&] {
    using acc = at::opmath_type<scalar_t>;
    if (p.nx) {
      row_norm_kernel<scalar_t, acc><<<static_cast<unsigned>((p.nx + 7) / 8), 256, 0, stream>>>(
          p.x.data_ptr<scalar_t>(), p.nx, p.k, p.norm_x.data_ptr<acc>());
      SSLOPS_CUDA_CHECK_LAUNCH();
    }
    if (!p.cand.is_same(p.x) && p.cand.size(0)) {
      row_norm_kernel<scalar_t, acc><<<static_cast<unsigned>((p.cand.size(0) + 7) / 8), 256, 0, stream>>>(
          p.cand.data_ptr<scalar_t>(), p.cand.size(0), p.k, p.norm_c.data_ptr<acc>());
      SSLOPS_CUDA_CHECK_LAUNCH();
    }
  });
  return p;
}

// (diff, aux) for anchors [rs, re) of a against the rows of c (nb in-batch).
std::pair<at::Tensor, at::Tensor> forward_rows(const Prepared& p, const at::Tensor& a, const at::Tensor& norm_a,
                                               const at::Tensor& lab_a, const at::Tensor& c, const at::Tensor& norm_c,
                                               const at::Tensor& lab_c, int64_t nb, bool self_excl, bool with_csr, int64_t rs,
                                               int64_t re, double sigma) {
  const auto opts = norm_a.options();
  const int64_t b = re - rs, k = p.k;
  at::Tensor diff = at::zeros({b, 3}, opts), aux = at::zeros({b, 4}, opts);
  if (b == 0) return {diff, aux};
  const bool csr = with_csr && p.crow.defined();
  at::Tensor sparse = at::empty({csr ? b : 0, 4}, opts);
  Mode md = p.md;
  md.member = md.member && csr;
  cudaStream_t stream = current_cuda_stream(a.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "contrastive_fwd_cxx", [&] {
    using acc = at::opmath_type<scalar_t>;
    const acc inv_sigma = static_cast<acc>(1.0 / sigma);
    if (csr && !md.sigmoid) {
      pairs_positive_kernel<scalar_t, acc><<<static_cast<unsigned>((b + 7) / 8), 256, 0, stream>>>(
          a.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), norm_a.data_ptr<acc>(), norm_c.data_ptr<acc>(),
          p.crow.data_ptr<int64_t>(), p.col.data_ptr<int64_t>(), rs, re, k, inv_sigma, md, sparse.data_ptr<acc>());
      SSLOPS_CUDA_CHECK_LAUNCH();
    }
    forward_kernel<scalar_t, acc><<<static_cast<unsigned>((b + kTile - 1) / kTile), kThreads, 0, stream>>>(
        a.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), norm_a.data_ptr<acc>(), norm_c.data_ptr<acc>(),
        ptr_or_null<int64_t>(lab_a), ptr_or_null<int64_t>(lab_c), csr ? p.crow.data_ptr<int64_t>() : nullptr,
        csr ? p.col.data_ptr<int64_t>() : nullptr, csr ? sparse.data_ptr<acc>() : nullptr, c.size(0), nb, k, rs, re,
        p.scale.data_ptr<acc>(), p.bias.data_ptr<acc>(), inv_sigma, md, self_excl, diff.data_ptr<acc>(), aux.data_ptr<acc>());
    SSLOPS_CUDA_CHECK_LAUNCH();
  });
  return {diff, aux};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_fwd_cuda(
    const at::Tensor& x, const c10::optional<at::Tensor>& y, const c10::optional<at::Tensor>& neg,
    const c10::optional<at::Tensor>& labels_x, const c10::optional<at::Tensor>& labels_y, const c10::optional<at::Tensor>& crow,
    const c10::optional<at::Tensor>& col, const at::Tensor& scale, const at::Tensor& bias, int64_t xs, int64_t xe, int64_t ys,
    int64_t ye, int64_t flags, double sigma) {
  NoAutocast no_autocast;  // csrc/no_autocast.h
  c10::DeviceGuard guard(x.device());
  const Prepared p = prepare(x, y, neg, labels_x, labels_y, crow, col, scale, bias, xs, xe, ys, ye, flags);
  const int64_t nb = p.square ? p.nx : p.ny;
  auto fx = forward_rows(p, p.x, p.norm_x, p.lab_x, p.cand, p.norm_c, p.lab_c, nb, p.square, true, xs, xe, sigma);
  at::Tensor diff_y = at::zeros({0, 3}, p.norm_x.options()), aux_y = at::zeros({0, 4}, p.norm_x.options());
  if (p.bidir) {
    auto fy = forward_rows(p, p.y, p.norm_c, p.lab_c, p.x, p.norm_x, p.lab_x, p.nx, false, false, ys, ye, sigma);
    diff_y = fy.first, aux_y = fy.second;
  }
  return {fx.first, fx.second, diff_y, aux_y};
}

// dr (r's dtype) from both directions' coefficients against the columns of c.
void backward_rows(const Prepared& p, const at::Tensor& r, const at::Tensor& norm_r, const at::Tensor& lab_r,
                   const at::Tensor& coef_r, const at::Tensor& c, const at::Tensor& norm_c, const at::Tensor& lab_c,
                   const at::Tensor& coef_c, int64_t nb_c, int64_t rw0, int64_t rw1, int64_t cw0, int64_t cw1, bool self_excl,
                   bool rows_extra, bool with_csr, double sigma, at::Tensor& out) {
  const int64_t nr = r.size(0), k = p.k;
  if (nr == 0) return;
  at::Tensor dzh = at::empty({nr, k}, norm_r.options());
  const bool csr = with_csr && p.crow.defined() && !p.md.sigmoid;
  Mode md = p.md;
  md.member = md.member && with_csr && p.crow.defined();
  cudaStream_t stream = current_cuda_stream(r.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "contrastive_bwd_cxx", [&] {
    using acc = at::opmath_type<scalar_t>;
    const acc inv_sigma = static_cast<acc>(1.0 / sigma);
    const Coef<acc> kr{coef_r.data_ptr<acc>(), nr}, kc{coef_c.data_ptr<acc>(), c.size(0)};
    const dim3 grid(static_cast<unsigned>((nr + kTile - 1) / kTile), static_cast<unsigned>((k + kKOut - 1) / kKOut));
    backward_tiles_kernel<scalar_t, acc><<<grid, kThreads, 0, stream>>>(
        r.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), norm_r.data_ptr<acc>(), norm_c.data_ptr<acc>(),
        rows_extra ? nullptr : ptr_or_null<int64_t>(lab_r), rows_extra ? nullptr : ptr_or_null<int64_t>(lab_c),
        md.member ? p.crow.data_ptr<int64_t>() : nullptr, md.member ? p.col.data_ptr<int64_t>() : nullptr, kr, kc, nr,
        c.size(0), nb_c, k, rw0, rw1, cw0, cw1, p.scale.data_ptr<acc>(), p.bias.data_ptr<acc>(), inv_sigma, md, self_excl,
        rows_extra, dzh.data_ptr<acc>());
    SSLOPS_CUDA_CHECK_LAUNCH();
    backward_rows_kernel<scalar_t, acc><<<static_cast<unsigned>((nr + 7) / 8), 256, 0, stream>>>(
        r.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), norm_r.data_ptr<acc>(), norm_c.data_ptr<acc>(), dzh.data_ptr<acc>(),
        csr ? p.crow.data_ptr<int64_t>() : nullptr, csr ? p.col.data_ptr<int64_t>() : nullptr, kr, nr, k, inv_sigma, md,
        out.data_ptr<scalar_t>());
    SSLOPS_CUDA_CHECK_LAUNCH();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_bwd_cuda(
    const at::Tensor& grad_x, const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& y,
    const c10::optional<at::Tensor>& neg, const c10::optional<at::Tensor>& labels_x, const c10::optional<at::Tensor>& labels_y,
    const c10::optional<at::Tensor>& crow, const c10::optional<at::Tensor>& col, const at::Tensor& diff_x,
    const at::Tensor& diff_y, const at::Tensor& aux_x, const at::Tensor& aux_y, const at::Tensor& scale, const at::Tensor& bias, int64_t xs, int64_t xe, int64_t ys, int64_t ye,
    int64_t flags, double sigma, bool need_x, bool need_y, bool need_neg) {
  NoAutocast no_autocast;  // csrc/no_autocast.h
  c10::DeviceGuard guard(x.device());
  const Prepared p = prepare(x, y, neg, labels_x, labels_y, crow, col, scale, bias, xs, xe, ys, ye, flags);
  const auto opts = p.norm_x.options();
  const int64_t k = p.k;
  at::Tensor dx = at::empty({need_x ? p.nx : 0, k}, p.x.options());
  at::Tensor dy = at::empty({need_y && !p.square ? p.ny : 0, k}, p.x.options());
  at::Tensor dneg = at::empty({need_neg ? p.nq : 0, k}, p.x.options());
  const at::Tensor cx = contrastive_coefficients(grad_x, diff_x, aux_x, p.nx, xs, xe, p.md.sigmoid, opts);
  if (p.square) {
    // the queue's rows are never anchors: zero coefficients (lse +inf), made once
    const at::Tensor cq = contrastive_coefficients(grad_x, diff_x, aux_x, p.nq, 0, 0, p.md.sigmoid, opts);
    const at::Tensor cc = at::cat({cx, cq}, 1);
    if (need_x)
      backward_rows(p, p.x, p.norm_x, p.lab_x, cx, p.cand, p.norm_c, p.lab_c, cc, p.nx, xs, xe, xs, xe, true, false, true,
                    sigma, dx);
    if (need_neg && p.nq) {
      const at::Tensor q = p.cand.narrow(0, p.nx, p.nq), norm_q = p.norm_c.narrow(0, p.nx, p.nq);
      backward_rows(p, q, norm_q, at::Tensor(), cq, p.x, p.norm_x, at::Tensor(), cx, p.nx, 0, 0, xs, xe, false, true, false,
                    sigma, dneg);
    }
    return {dx, dy, dneg};
  }
  const at::Tensor cy = p.bidir ? contrastive_coefficients(grad_y, diff_y, aux_y, p.ny, ys, ye, p.md.sigmoid, opts)
                                : contrastive_coefficients(grad_y, diff_y, aux_y, p.ny, 0, 0, p.md.sigmoid, opts);
  const int64_t yw0 = p.bidir ? ys : 0, yw1 = p.bidir ? ye : 0;
  if (need_x)
    backward_rows(p, p.x, p.norm_x, p.lab_x, cx, p.y, p.norm_c, p.lab_c, cy, p.ny, xs, xe, yw0, yw1, false, false, false, sigma,
                  dx);
  if (need_y)
    backward_rows(p, p.y, p.norm_c, p.lab_c, cy, p.x, p.norm_x, p.lab_x, cx, p.nx, yw0, yw1, xs, xe, false, false, false, sigma,
                  dy);
  return {dx, dy, dneg};
}

}  // namespace
}  // namespace sslops

TORCH_LIBRARY_IMPL(sslops, CUDA, m) {
  m.impl("contrastive_fwd_cxx", &sslops::contrastive_fwd_cuda);
  m.impl("contrastive_bwd_cxx", &sslops::contrastive_bwd_cuda);
}
