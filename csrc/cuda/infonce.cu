// Blockwise InfoNCE over a sparse relation G on the GPU, CUDA C++ (see csrc/cpu/infonce.cpp
// for the math; this file follows the same plan). Unverified on a GPU: registered with
// cuda_verified=False, so "auto" never picks it.
//
//   forward   one block per 32 anchor rows, 256 threads: thread (row = t/8, group = t%8)
//             owns 4 columns of every 32-column tile; the tile of ⟨z_r, z_c⟩ comes from
//             shared-memory K-slices of the raw rows and is scaled by the inverse norms (the
//             normalisation is fused). Online max/sum per row across the 8 lanes of a row
//             by warp shuffles; labels compared per element; pairs by a CSR kernel (a warp
//             per anchor, O(|P(i)|·K)).
//   backward  one block per 32 rows of all M rows and per 256-wide slice of K: recompute each
//             tile of s, form D = C + Cᵀ (anchor and candidate terms, 1/τ and the candidates'
//             inverse norms folded in) in shared memory and accumulate D·z_C in registers;
//             each row is owned by one block, so there are no atomics and reruns are
//             bit-identical. A per-row kernel (a warp per row) adds the CSR positives and
//             applies the normalisation backward.
//
// Saved: the split LSE (2, B): row max and log Σ exp(x − max), and |P(i)| (B,). Extra memory: norms (M,), a (M, K) dẑ buffer (fp32; fp64 for fp64).
// FLOPs: forward 2·B·M·K, backward 4·(2BM − B²)·K, plus 1 (forward) and 2 (backward) exp per pair.
// All row offsets are int64 (M·K and M·M may pass 2³¹).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>

#include <limits>

#include "stream.h"

namespace sslops {
namespace {

constexpr int kTile = 32;     // rows and columns of a similarity tile
constexpr int kSlice = 32;    // K-slice staged in shared memory
constexpr int kThreads = 256; // 8 threads per row, 4 columns each
constexpr int kKOut = 256;    // K-slice of dẑ a backward block accumulates in registers (32 per thread)
constexpr double kNormEps = 1e-12;

template <typename T> __device__ __forceinline__ T dexp(T x);
template <> __device__ __forceinline__ float dexp<float>(float x) { return expf(x); }
template <> __device__ __forceinline__ double dexp<double>(double x) { return exp(x); }
template <typename T> __device__ __forceinline__ T dlog(T x);
template <> __device__ __forceinline__ float dlog<float>(float x) { return logf(x); }
template <> __device__ __forceinline__ double dlog<double>(double x) { return log(x); }

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

template <typename acc>
__device__ __forceinline__ acc inv_norm(const acc* norm, int64_t i) {
  return acc(1) / fmax(norm[i], static_cast<acc>(kNormEps));
}

// s[q] = ⟨z_row, z_{c0 + 4·group + q}⟩ (raw rows), staged through shared memory.
template <typename scalar_t, typename acc>
__device__ __forceinline__ void sim_tile(const scalar_t* __restrict__ z, int64_t m_rows, int64_t k, int64_t r0,
                                         int64_t rows_end, int64_t c0, int64_t cols_end, acc (*as)[kSlice + 1],
                                         acc (*bs)[kSlice + 1], acc s[4]) {
  const int t = threadIdx.x, row = t >> 3, grp = t & 7;
  for (int q = 0; q < 4; ++q) s[q] = 0;
  for (int64_t k0 = 0; k0 < k; k0 += kSlice) {
    for (int e = t; e < kTile * kSlice; e += kThreads) {
      const int rr = e / kSlice, kk = e % kSlice;
      const int64_t gk = k0 + kk, ga = r0 + rr, gb = c0 + rr;
      as[rr][kk] = (ga < rows_end && gk < k) ? static_cast<acc>(z[ga * k + gk]) : acc(0);
      bs[rr][kk] = (gb < cols_end && gk < k) ? static_cast<acc>(z[gb * k + gk]) : acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kSlice; ++kk) {
      const acc a = as[row][kk];
      for (int q = 0; q < 4; ++q) s[q] += a * bs[grp * 4 + q][kk];
    }
    __syncthreads();
  }
  (void)m_rows;
}

template <typename scalar_t, typename acc>
__global__ void __launch_bounds__(kThreads) forward_kernel(const scalar_t* __restrict__ z, const acc* __restrict__ norm,
                                                           const int64_t* __restrict__ labels, const acc* __restrict__ pos_in,
                                                           const acc* __restrict__ cnt_in, int64_t m, int64_t k, int64_t rs,
                                                           int64_t re, acc inv_tau, acc* __restrict__ loss,
                                                           acc* __restrict__ count, acc* __restrict__ max_out,
                                                           acc* __restrict__ log_out) {
  __shared__ acc as[kTile][kSlice + 1];
  __shared__ acc bs[kTile][kSlice + 1];
  const int t = threadIdx.x, grp = t & 7;
  const int64_t r0 = rs + static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t gi = r0 + (t >> 3);
  const bool live = gi < re;
  const acc inv_i = live ? inv_norm(norm, gi) : acc(0);
  const int64_t lab_i = (labels && live) ? labels[gi] : 0;
  // run_top counts the lane's candidates equal to the running max (terms exactly 1), kept out
  // of run_sum and added once at the end (see csrc/cpu/infonce.cpp: the split LSE).
  acc run_max = -inf<acc>(), run_sum = 0, run_top = 0, pos = 0, cnt = 0;
  for (int64_t c0 = 0; c0 < m; c0 += kTile) {
    acc s[4];
    sim_tile<scalar_t, acc>(z, m, k, r0, re, c0, m, as, bs, s);
    acc x[4];
    bool valid[4];
    acc tmax = -inf<acc>();
    for (int q = 0; q < 4; ++q) {
      const int64_t gj = c0 + grp * 4 + q;
      valid[q] = live && gj < m && gj != gi;
      x[q] = valid[q] ? s[q] * inv_i * inv_norm(norm, gj) * inv_tau : -inf<acc>();
      tmax = fmax(tmax, x[q]);
      if (labels && valid[q] && labels[gj] == lab_i) {
        pos += x[q];
        cnt += 1;
      }
    }
    tmax = row_max(tmax);
    const acc new_max = fmax(run_max, tmax);
    const acc safe = new_max == -inf<acc>() ? acc(0) : new_max;
    if (new_max > run_max) {  // the old maximum's terms join the others, rescaled
      run_sum = (run_sum + run_top) * dexp(run_max - safe);
      run_top = 0;
    }
    acc part = 0;
    for (int q = 0; q < 4; ++q) {
      const bool top = valid[q] && x[q] == new_max;
      part += (valid[q] && !top) ? dexp(x[q] - safe) : acc(0);
      run_top += top ? acc(1) : acc(0);
    }
    run_sum += part;  // per-lane partial sums, one shared max
    run_max = new_max;
  }
  run_sum = row_sum(run_sum);
  run_top = row_sum(run_top);
  pos = row_sum(pos);
  cnt = row_sum(cnt);
  if (live && grp == 0) {
    if (!labels) {
      pos = pos_in[gi - rs];
      cnt = cnt_in[gi - rs];
    }
    const acc l = dlog(run_top + run_sum);  // LSE − max
    max_out[gi - rs] = run_max;
    log_out[gi - rs] = l;
    count[gi - rs] = cnt;
    loss[gi - rs] = cnt > 0 ? (run_max - pos / cnt) + l : acc(0);
  }
}

// Σ_{j∈P(i)} x_ij and |P(i)| from the CSR: one warp per anchor.
template <typename scalar_t, typename acc>
__global__ void pairs_positive_kernel(const scalar_t* __restrict__ z, const acc* __restrict__ norm,
                                      const int64_t* __restrict__ crow, const int64_t* __restrict__ col, int64_t rs,
                                      int64_t re, int64_t k, acc inv_tau, acc* __restrict__ pos, acc* __restrict__ cnt) {
  const int64_t i = rs + static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= re) return;
  const acc inv_i = inv_norm(norm, i);
  acc p = 0, n = 0;
  for (int64_t e = crow[i]; e < crow[i + 1]; ++e) {
    const int64_t j = col[e];
    if (j < 0) continue;
    acc d = 0;
    for (int64_t c = lane; c < k; c += 32) d += static_cast<acc>(z[i * k + c]) * static_cast<acc>(z[j * k + c]);
    for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
    p += d * inv_i * inv_norm(norm, j);
    n += 1;
  }
  if (lane == 0) {
    pos[i - rs] = p * inv_tau;
    cnt[i - rs] = n;
  }
}

template <typename scalar_t, typename acc>
__global__ void __launch_bounds__(kThreads) backward_tiles_kernel(const scalar_t* __restrict__ z, const acc* __restrict__ norm,
                                                                  const int64_t* __restrict__ labels, const acc* __restrict__ w,
                                                                  const acc* __restrict__ mx, const acc* __restrict__ lg,
                                                                  const acc* __restrict__ invc,
                                                                  int64_t m, int64_t k, int64_t rs, int64_t re, acc inv_tau,
                                                                  acc* __restrict__ dzh) {
  __shared__ acc as[kTile][kSlice + 1];
  __shared__ acc bs[kTile][kSlice + 1];
  __shared__ acc ds[kTile][kTile + 1];
  const int t = threadIdx.x, row = t >> 3, grp = t & 7;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t ko = static_cast<int64_t>(blockIdx.y) * kKOut;
  const int64_t gi = r0 + row;
  const bool live = gi < m;
  const acc inv_i = live ? inv_norm(norm, gi) : acc(0);
  const acc w_i = live ? w[gi] : acc(0), c_i = live ? invc[gi] : acc(0);
  const acc max_i = live ? mx[gi] : inf<acc>(), log_i = live ? lg[gi] : acc(0);
  const int64_t lab_i = (labels && live) ? labels[gi] : 0;
  const bool has_anchor = r0 < re && r0 + kTile > rs;
  const int64_t cbeg = has_anchor ? 0 : rs, cend = has_anchor ? m : re;
  acc dacc[kKOut / 8];
  for (int q = 0; q < kKOut / 8; ++q) dacc[q] = 0;
  for (int64_t c0 = cbeg; c0 < cend; c0 += kTile) {
    acc s[4];
    sim_tile<scalar_t, acc>(z, m, k, r0, m, c0, cend, as, bs, s);
    for (int q = 0; q < 4; ++q) {
      const int64_t gj = c0 + grp * 4 + q;
      acc d = 0;
      if (live && gj < cend && gj != gi) {
        const acc inv_j = inv_norm(norm, gj);
        const acc x = s[q] * inv_i * inv_j * inv_tau;
        const acc w_j = w[gj];
        acc p_ij = dexp((x - max_i) - log_i), p_ji = dexp((x - mx[gj]) - lg[gj]);
        if (labels && labels[gj] == lab_i) {  // p − G/|P| before scaling: exact for a dominant positive
          p_ij -= c_i;
          p_ji -= invc[gj];
        }
        d = (w_i * p_ij + w_j * p_ji) * (inv_tau * inv_j);
      }
      ds[row][grp * 4 + q] = d;
    }
    __syncthreads();
    for (int j = 0; j < kTile; ++j) {
      const int64_t gj = c0 + j;
      if (gj >= cend) break;
      const acc dj = ds[row][j];
      const scalar_t* zj = z + gj * k;
      for (int q = 0; q < kKOut / 8; ++q) {
        const int64_t kk = ko + grp + 8 * q;
        if (kk < k) dacc[q] += dj * static_cast<acc>(zj[kk]);
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

// Per row (a warp): dẑ += CSR positives' part; dz = (dẑ − ẑ⟨ẑ, dẑ⟩)/‖z‖ (dẑ/1e-12 when clamped).
template <typename scalar_t, typename acc>
__global__ void backward_rows_kernel(const scalar_t* __restrict__ z, const acc* __restrict__ norm, acc* __restrict__ dzh,
                                     const int64_t* __restrict__ crow, const int64_t* __restrict__ col,
                                     const acc* __restrict__ w, const acc* __restrict__ invc, int64_t m, int64_t k,
                                     acc inv_tau, scalar_t* __restrict__ dz) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= m) return;
  const acc nrm = norm[i], inv = acc(1) / fmax(nrm, static_cast<acc>(kNormEps));
  acc proj = 0;
  for (int64_t c = lane; c < k; c += 32) {
    acc g = dzh[i * k + c];
    if (crow) {
      const acc own = w[i] * invc[i];
      for (int64_t e = crow[i]; e < crow[i + 1]; ++e) {
        const int64_t j = col[e];
        if (j < 0) continue;
        const acc coef = -(own + w[j] * invc[j]) * inv_tau;
        g += coef * inv_norm(norm, j) * static_cast<acc>(z[j * k + c]);
      }
      dzh[i * k + c] = g;
    }
    proj += static_cast<acc>(z[i * k + c]) * inv * g;
  }
  for (int o = 16; o > 0; o >>= 1) proj += __shfl_xor_sync(0xffffffffu, proj, o);
  for (int64_t c = lane; c < k; c += 32) {
    const acc g = dzh[i * k + c];
    const acc zh = static_cast<acc>(z[i * k + c]) * inv;
    dz[i * k + c] = static_cast<scalar_t>(nrm < static_cast<acc>(kNormEps) ? g * inv : (g - zh * proj) * inv);
  }
}

// ----------------------------------------------------------------------------- ops

struct Inputs {
  at::Tensor z, labels, crow, col;
};

Inputs prepare(const at::Tensor& z_in, const c10::optional<at::Tensor>& labels, const c10::optional<at::Tensor>& crow,
               const c10::optional<at::Tensor>& col, int64_t rs, int64_t re) {
  TORCH_CHECK(z_in.dim() == 2, "info_nce: z must be 2-D, got ", z_in.dim(), "-D");
  TORCH_CHECK(0 <= rs && rs <= re && re <= z_in.size(0), "info_nce: need 0 <= row_start <= row_end <= M");
  TORCH_CHECK(labels.has_value() != crow.has_value(), "info_nce: give exactly one of labels or crow/col");
  Inputs in;
  in.z = z_in.contiguous();
  if (labels.has_value()) in.labels = labels->to(at::kLong).contiguous();
  if (crow.has_value()) {
    in.crow = crow->to(at::kLong).contiguous();
    in.col = col->to(at::kLong).contiguous();
  }
  return in;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_fwd_cuda(const at::Tensor& z_in, const c10::optional<at::Tensor>& labels_in,
                                                                 const c10::optional<at::Tensor>& crow_in,
                                                                 const c10::optional<at::Tensor>& col_in, double temperature,
                                                                 int64_t rs, int64_t re) {
  c10::DeviceGuard guard(z_in.device());
  const Inputs in = prepare(z_in, labels_in, crow_in, col_in, rs, re);
  const at::Tensor& z = in.z;
  const int64_t m = z.size(0), k = z.size(1), b = re - rs;
  const auto acc_dtype = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = z.options().dtype(acc_dtype);
  // lse is (2, B): the row maximum and log Σ exp(x − max) (csrc/cpu/infonce.cpp).
  at::Tensor loss = at::empty({b}, opts), count = at::empty({b}, opts), lse = at::empty({2, b}, opts);
  if (b == 0) return {loss, count, lse};
  at::Tensor norm = at::empty({m}, opts);
  at::Tensor pos = at::empty({in.crow.defined() ? b : 0}, opts), cnt = at::empty({in.crow.defined() ? b : 0}, opts);
  cudaStream_t stream = current_cuda_stream(z.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "info_nce_fwd_cxx", [&] {
    using acc = at::opmath_type<scalar_t>;
    const acc inv_tau = static_cast<acc>(1.0 / temperature);
    row_norm_kernel<scalar_t, acc><<<static_cast<unsigned>((m + 7) / 8), 256, 0, stream>>>(z.data_ptr<scalar_t>(), m, k,
                                                                                          norm.data_ptr<acc>());
    SSLOPS_CUDA_CHECK_LAUNCH();
    if (in.crow.defined()) {
      pairs_positive_kernel<scalar_t, acc><<<static_cast<unsigned>((b + 7) / 8), 256, 0, stream>>>(
          z.data_ptr<scalar_t>(), norm.data_ptr<acc>(), in.crow.data_ptr<int64_t>(), in.col.data_ptr<int64_t>(), rs, re, k,
          inv_tau, pos.data_ptr<acc>(), cnt.data_ptr<acc>());
      SSLOPS_CUDA_CHECK_LAUNCH();
    }
    forward_kernel<scalar_t, acc><<<static_cast<unsigned>((b + kTile - 1) / kTile), kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), norm.data_ptr<acc>(), ptr_or_null<int64_t>(in.labels), ptr_or_null<acc>(pos),
        ptr_or_null<acc>(cnt), m, k, rs, re, inv_tau, loss.data_ptr<acc>(), count.data_ptr<acc>(), lse.data_ptr<acc>(),
        lse.data_ptr<acc>() + b);
    SSLOPS_CUDA_CHECK_LAUNCH();
  });
  return {loss, count, lse};
}

at::Tensor info_nce_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& z_in, const c10::optional<at::Tensor>& labels_in,
                             const c10::optional<at::Tensor>& crow_in, const c10::optional<at::Tensor>& col_in,
                             const at::Tensor& pos_count, const at::Tensor& lse_in, double temperature, int64_t rs,
                             int64_t re) {
  c10::DeviceGuard guard(z_in.device());
  const Inputs in = prepare(z_in, labels_in, crow_in, col_in, rs, re);
  const at::Tensor& z = in.z;
  const int64_t m = z.size(0), k = z.size(1);
  const auto acc_dtype = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = z.options().dtype(acc_dtype);
  at::Tensor dz = at::empty({m, k}, z.options());
  if (m == 0 || k == 0) return dz.zero_();
  // a_k = g_k·[|P(k)| > 0] in the window (0 elsewhere), the split LSE (max +inf and log 0
  // where a_k = 0), 1/|P(k)|.
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == 2 && lse_in.size(1) == re - rs,
              "info_nce_bwd_cxx: lse must be the forward's (2, B) split LSE");
  const at::Tensor g = grad_rows.to(acc_dtype), cntv = pos_count.to(acc_dtype), has = cntv > 0;
  const double pinf = std::numeric_limits<double>::infinity();
  at::Tensor w = at::zeros({m}, opts), max_w = at::full({m}, pinf, opts), log_w = at::zeros({m}, opts),
             invc = at::zeros({m}, opts);
  w.narrow(0, rs, re - rs).copy_(at::where(has, g, at::zeros_like(g)));
  max_w.narrow(0, rs, re - rs).copy_(at::where(has, lse_in[0].to(acc_dtype), at::full_like(g, pinf)));
  log_w.narrow(0, rs, re - rs).copy_(at::where(has, lse_in[1].to(acc_dtype), at::zeros_like(g)));
  invc.narrow(0, rs, re - rs).copy_(at::where(has, cntv.clamp_min(1).reciprocal(), at::zeros_like(g)));
  at::Tensor norm = at::empty({m}, opts);
  at::Tensor dzh = at::empty({m, k}, opts);
  cudaStream_t stream = current_cuda_stream(z.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "info_nce_bwd_cxx", [&] {
    using acc = at::opmath_type<scalar_t>;
    const acc inv_tau = static_cast<acc>(1.0 / temperature);
    row_norm_kernel<scalar_t, acc><<<static_cast<unsigned>((m + 7) / 8), 256, 0, stream>>>(z.data_ptr<scalar_t>(), m, k,
                                                                                          norm.data_ptr<acc>());
    SSLOPS_CUDA_CHECK_LAUNCH();
    const dim3 grid(static_cast<unsigned>((m + kTile - 1) / kTile), static_cast<unsigned>((k + kKOut - 1) / kKOut));
    backward_tiles_kernel<scalar_t, acc><<<grid, kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), norm.data_ptr<acc>(), ptr_or_null<int64_t>(in.labels), w.data_ptr<acc>(),
        max_w.data_ptr<acc>(), log_w.data_ptr<acc>(), invc.data_ptr<acc>(), m, k, rs, re, inv_tau, dzh.data_ptr<acc>());
    SSLOPS_CUDA_CHECK_LAUNCH();
    backward_rows_kernel<scalar_t, acc><<<static_cast<unsigned>((m + 7) / 8), 256, 0, stream>>>(
        z.data_ptr<scalar_t>(), norm.data_ptr<acc>(), dzh.data_ptr<acc>(), ptr_or_null<int64_t>(in.crow),
        ptr_or_null<int64_t>(in.col), w.data_ptr<acc>(), invc.data_ptr<acc>(), m, k, inv_tau, dz.data_ptr<scalar_t>());
    SSLOPS_CUDA_CHECK_LAUNCH();
  });
  return dz;
}

}  // namespace
}  // namespace sslops

TORCH_LIBRARY_IMPL(sslops, CUDA, m) {
  m.impl("info_nce_fwd_cxx", &sslops::info_nce_fwd_cuda);
  m.impl("info_nce_bwd_cxx", &sslops::info_nce_bwd_cuda);
}
