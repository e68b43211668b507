// Covariance-family losses on the GPU (CUDA C++): VICReg per view and Barlow Twins, forward
// and backward. Same decomposition and gradients as csrc/cpu/covariance.cpp (see there):
//
//   normalise_kernel   column mean, m2 (two passes over the rows), then the scaled centred
//                      copy Â = (z - mean)·scale in fp32 (fp64 for fp64); for VICReg's first
//                      view the mean pass also sums Σ_n (z_a - z_b)² per column (the view op's
//                      `other`: z_b read once there, no invariance pass of its own), columns
//                      then added in double by at::sum (deterministic). Grid: 32-column slices
//                      × row chunks sized to ~4 blocks per SM (row_chunks, column_reduce.cuh);
//                      with one chunk one fused launch, with several per-chunk (mean, m2, sq)
//                      merged in chunk order by Chan's formula (column_merge_kernel: no
//                      atomics, bit-identical reruns), then Â on the same grid
//   at::mm             the product on the cheaper side: ÂᵀB̂ (K×K) or ÂÂᵀ, B̂B̂ᵀ (N×N Gram)
//   dot_partials       Σ a⊙b of two products (diagonal skipped on the K×K route), per-block
//                      partials in double, added by at::sum (deterministic, no atomics)
//   vicreg_dz_kernel   VICReg's whole dz in one elementwise pass: hinge, diagonal and
//                      covariance terms plus the fused invariance term coef·(z - other)
//   bn_finish_kernel   Barlow's dÂ = g(2λ·P + B̂·D) and the batch-norm backward
//                      rstd/sqrt(N)·(dÂ - colmean dÂ - Â·colsum(dÂ ⊙ Â)), on the same
//                      (column slice, row chunk) grid; with several chunks the column sums
//                      come per chunk from bn_sums_kernel, added over chunks by at::sum
//
// Scalars that live on the device (the incoming gradient, coefficients) are read by the
// kernels from device memory: no host synchronisation in forward or backward.
// Saved: mean, m2 (VICReg) or mean, rstd (Barlow), (K,) each, and the min(N,K)² product the
// backward multiplies by (no larger than an input), so the backward runs one product, not two. FLOPs as on the CPU:
// forward min(2NK², 2N²K) per VICReg view, min(2NK², 4N²K) for Barlow; backward twice that.
// Bytes: each input read 3 times by its forward, plus z_b once in z_a's mean pass (7·NK reads
// for VICReg's two views, one pass fewer than a separate Σ(z_a - z_b)² pass), an fp32 NK copy
// written and read, the min(N,K)² product; with several row chunks + (3 or 4)·chunks·K
// accumulator-sized partials (chunks ≤ 4·SMs), negligible next to NK.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isnan.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "../no_autocast.h"
#include "column_reduce.cuh"
#include "stream.h"

namespace sslops {
namespace {

constexpr int kCols = kColumnSlice;
constexpr int kRows = kRowStride;

bool use_gram(int64_t route, double gram_cost, double kk_cost) {
  if (route == 1) return false;
  if (route == 2) return true;
  return gram_cost < kk_cost;
}

at::ScalarType acc_dtype_of(const at::Tensor& z) { return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// MODE 0 (VICReg): scale = 1/sqrt(N-1).  MODE 1 (Barlow): rstd = 1/sqrt(m2/N + eps), scale = rstd/sqrt(N).
// Block (blockIdx.x, blockIdx.y) writes Â on rows [blockIdx.y·chunk, +chunk) of its 32 columns.
// HAVE_STATS: mean (and rstd for MODE 1) are given; only Â is written. Otherwise (a grid of one
// row chunk: every row) the block first computes mean, m2 (and rstd) of its columns and, with
// other non-null, sq[col] = Σ_n (z - other)² from the mean pass.
template <typename scalar_t, typename acc_t, int MODE, bool HAVE_STATS>
__global__ void normalise_kernel(const scalar_t* __restrict__ z, int64_t n, int64_t k, int64_t chunk, acc_t* __restrict__ mean,
                                 acc_t* __restrict__ m2, acc_t* __restrict__ rstd, acc_t eps, acc_t* __restrict__ out,
                                 const scalar_t* __restrict__ other, acc_t* __restrict__ sq) {
  __shared__ double partial[kRows][kCols];
  __shared__ acc_t col_mean[kCols];
  __shared__ acc_t col_scale[kCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + tx;
  const int64_t r_lo = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t r_hi = r_lo + chunk < n ? r_lo + chunk : n;
  const bool live = col < k;
  if (HAVE_STATS) {
    if (ty == 0) {
      col_mean[tx] = live ? mean[col] : acc_t(0);
      col_scale[tx] = live ? (MODE == 0 ? acc_t(1) / sqrt(static_cast<acc_t>(n - 1)) : rstd[col] / sqrt(static_cast<acc_t>(n)))
                           : acc_t(0);
    }
    __syncthreads();
  } else {
    __shared__ acc_t col_m2[kCols];
    __shared__ acc_t col_sq[kCols];
    block_column_moments(z, r_lo, r_hi, k, col, partial, col_mean, col_m2, other, col_sq);
    if (ty == 0) {
      const acc_t t = col_m2[tx];
      acc_t scale;
      if (MODE == 0) {
        scale = acc_t(1) / sqrt(static_cast<acc_t>(n - 1));
      } else {
        const acc_t rs = acc_t(1) / sqrt(t / static_cast<acc_t>(n) + eps);
        if (live) rstd[col] = rs;
        scale = rs / sqrt(static_cast<acc_t>(n));
      }
      col_scale[tx] = scale;
      if (live) {
        mean[col] = col_mean[tx];
        m2[col] = t;
        if (other != nullptr) sq[col] = col_sq[tx];
      }
    }
    __syncthreads();
  }
  if (!live) return;
  const acc_t mu = col_mean[tx], sc = col_scale[tx];
  for (int64_t r = r_lo + ty; r < r_hi; r += kRows) out[r * k + col] = (static_cast<acc_t>(z[r * k + col]) - mu) * sc;
}

constexpr int kReduceThreads = 256;

// partials[blockIdx.x] = Σ of t over the block's kReduceThreads threads (tree reduction in shared memory).
__device__ void store_block_sum(double t, double* __restrict__ partials) {
  __shared__ double buf[kReduceThreads];
  buf[threadIdx.x] = t;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = buf[0];
}

// partials[block] = Σ_{i in block's stride} a_i b_i (in double), skipping the diagonal of a (d×d) matrix if asked.
template <typename acc_t>
__global__ void dot_partials_kernel(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t numel, int64_t d,
                                    bool skip_diag, double* __restrict__ partials) {
  double t = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    if (skip_diag && (i / d) == (i % d)) continue;
    t += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  }
  store_block_sum(t, partials);
}

// Σ a⊙b over two contiguous tensors of the same shape, as a 0-d double tensor on the device.
at::Tensor dot_sum(const at::Tensor& a, const at::Tensor& b, bool skip_diag, int64_t d, cudaStream_t stream) {
  const int64_t numel = a.numel();
  const int blocks = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(1, (numel + kReduceThreads - 1) / kReduceThreads)));
  at::Tensor partials = at::empty({blocks}, a.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "dot_sum", [&] {
    dot_partials_kernel<scalar_t><<<blocks, kReduceThreads, 0, stream>>>(a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), numel,
                                                                         d, skip_diag, partials.data_ptr<double>());
  });
  SSLOPS_CUDA_CHECK_LAUNCH();
  return partials.sum();
}

// dz = Â·w[c] + coef[0]·T + coef[1]·(z - other)
template <typename scalar_t, typename acc_t>
__global__ void vicreg_dz_kernel(const acc_t* __restrict__ zh, const acc_t* __restrict__ t, const acc_t* __restrict__ w,
                                 const acc_t* __restrict__ coef, const scalar_t* __restrict__ z, const scalar_t* __restrict__ other,
                                 int64_t n, int64_t k, scalar_t* __restrict__ out) {
  const int64_t numel = n * k;
  const acc_t c0 = coef[0], c1 = coef[1];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    acc_t v = zh[i] * w[i % k] + c0 * t[i];
    if (other != nullptr) v += c1 * (static_cast<acc_t>(z[i]) - static_cast<acc_t>(other[i]));
    out[i] = static_cast<scalar_t>(v);
  }
}

// d = c0·p + other·w[c]; over rows [r_lo, r_hi): sum_d = Σ d, sum_ds = Σ d ⊙ self (RunSum per
// thread, the block's threads added in double in a fixed order: column_reduce.cuh)
template <typename acc_t>
__device__ void bn_block_sums(const acc_t* __restrict__ p, const acc_t* __restrict__ self, const acc_t* __restrict__ other,
                              acc_t c0, acc_t wc, int64_t r_lo, int64_t r_hi, int64_t k, int64_t col,
                              double (&partial)[kRows][kCols], acc_t& sum_d, acc_t& sum_ds) {
  RunSum<acc_t> s1, s2;
  if (col < k)
    for (int64_t r = r_lo + threadIdx.y; r < r_hi; r += kRows) {
      const int64_t i = r * k + col;
      const acc_t d = c0 * p[i] + other[i] * wc;
      s1.add(d);
      s2.add(d * self[i]);
    }
  sum_d = static_cast<acc_t>(column_rows_total(s1.value(), partial));
  sum_ds = static_cast<acc_t>(column_rows_total(s2.value(), partial));
}

template <typename acc_t>
__global__ void bn_sums_kernel(const acc_t* __restrict__ p, const acc_t* __restrict__ self, const acc_t* __restrict__ other,
                               const acc_t* __restrict__ w, const acc_t* __restrict__ coef, int64_t n, int64_t k, int64_t chunk,
                               acc_t* __restrict__ part) {
  __shared__ double partial[kRows][kCols];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  const int64_t r_lo = static_cast<int64_t>(blockIdx.y) * chunk, r_hi = r_lo + chunk < n ? r_lo + chunk : n;
  acc_t a, b;
  bn_block_sums(p, self, other, coef[0], col < k ? w[col] : acc_t(0), r_lo, r_hi, k, col, partial, a, b);
  if (threadIdx.y == 0 && col < k) {
    const int64_t i = static_cast<int64_t>(blockIdx.y) * k + col;
    part[i] = a;
    part[static_cast<int64_t>(gridDim.y) * k + i] = b;
  }
}

// out = scale[c]·(d - colmean d - self·colsum(d ⊙ self)) on rows [blockIdx.y·chunk, +chunk);
// sums (2, K) = (Σ d, Σ d ⊙ self) given, or nullptr (a one-chunk grid: the block computes them).
template <typename scalar_t, typename acc_t>
__global__ void bn_finish_kernel(const acc_t* __restrict__ p, const acc_t* __restrict__ self, const acc_t* __restrict__ other,
                                 const acc_t* __restrict__ w, const acc_t* __restrict__ coef, const acc_t* __restrict__ rstd,
                                 const acc_t* __restrict__ sums, int64_t n, int64_t k, int64_t chunk, scalar_t* __restrict__ out) {
  __shared__ double partial[kRows][kCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + tx;
  const int64_t r_lo = static_cast<int64_t>(blockIdx.y) * chunk, r_hi = r_lo + chunk < n ? r_lo + chunk : n;
  const bool live = col < k;
  const acc_t c0 = coef[0];
  const acc_t wc = live ? w[col] : acc_t(0);
  acc_t sum_d = 0, dot = 0;
  if (sums == nullptr) {  // uniform over the grid
    bn_block_sums(p, self, other, c0, wc, r_lo, r_hi, k, col, partial, sum_d, dot);
  } else if (live) {
    sum_d = sums[col];
    dot = sums[k + col];
  }
  if (!live) return;
  const acc_t mean_d = sum_d / static_cast<acc_t>(n);
  const acc_t scale = rstd[col] / sqrt(static_cast<acc_t>(n));
  for (int64_t r = r_lo + ty; r < r_hi; r += kRows) {
    const int64_t i = r * k + col;
    const acc_t d = c0 * p[i] + other[i] * wc;
    out[i] = static_cast<scalar_t>(scale * (d - mean_d - self[i] * dot));
  }
}

// dA → dz for one view: one launch when the rows form one chunk, else per-chunk column sums,
// added over chunks by at::sum (fixed order), then the elementwise pass on the chunk grid.
template <typename scalar_t, typename acc_t>
void bn_finish(const at::Tensor& p, const at::Tensor& self, const at::Tensor& other, const at::Tensor& w, const at::Tensor& c,
               const at::Tensor& rs, at::Tensor& out, cudaStream_t stream) {
  const int64_t n = self.size(0), k = self.size(1);
  const int64_t col_blocks = (k + kCols - 1) / kCols;
  const std::pair<int64_t, int64_t> split = row_chunks(n, col_blocks, self.device().index());
  const int64_t chunk = split.first, chunks = split.second;
  const dim3 block(kCols, kRows), grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks));
  at::Tensor sums;
  if (chunks > 1) {
    at::Tensor part = at::empty({2, chunks, k}, self.options());
    bn_sums_kernel<acc_t><<<grid, block, 0, stream>>>(p.data_ptr<acc_t>(), self.data_ptr<acc_t>(), other.data_ptr<acc_t>(),
                                                      w.data_ptr<acc_t>(), c.data_ptr<acc_t>(), n, k, chunk, part.data_ptr<acc_t>());
    SSLOPS_CUDA_CHECK_LAUNCH();
    sums = part.sum(1).contiguous();
  }
  bn_finish_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(p.data_ptr<acc_t>(), self.data_ptr<acc_t>(), other.data_ptr<acc_t>(),
                                                                w.data_ptr<acc_t>(), c.data_ptr<acc_t>(), rs.data_ptr<acc_t>(),
                                                                sums.defined() ? sums.data_ptr<acc_t>() : nullptr, n, k, chunk,
                                                                out.data_ptr<scalar_t>());
  SSLOPS_CUDA_CHECK_LAUNCH();
}

int grid_for(int64_t numel) { return static_cast<int>(std::min<int64_t>(4096, std::max<int64_t>(1, (numel + 255) / 256))); }

// Â (fp32/fp64) and, when !have_stats, mean/m2/rstd (and, given other and sq, sq_k = Σ_n (z - other)²).
// Grid (32-column slices) × (row chunks, row_chunks in column_reduce.cuh). Statistics with one
// chunk: normalise_kernel computes them and writes Â in one launch. With several: per-chunk
// statistics (column_chunk_kernel), merged in chunk order (column_merge_kernel), then Â.
template <int MODE>
void normalise(const at::Tensor& z, at::Tensor& mean, at::Tensor& m2, at::Tensor& rstd, double eps, at::Tensor& out, bool have_stats,
               cudaStream_t stream, const at::Tensor* other = nullptr, at::Tensor* sq = nullptr) {
  const int64_t n = z.size(0), k = z.size(1);
  if (k == 0 || n == 0) return;
  const int64_t col_blocks = (k + kCols - 1) / kCols;
  const std::pair<int64_t, int64_t> split = row_chunks(n, col_blocks, z.device().index());
  const int64_t chunk = split.first, chunks = split.second;
  const dim3 block(kCols, kRows), grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "covariance_normalise", [&] {
    using acc = at::opmath_type<scalar_t>;
    acc* m2p = m2.defined() ? m2.data_ptr<acc>() : nullptr;
    acc* rsp = rstd.defined() ? rstd.data_ptr<acc>() : nullptr;
    const bool fuse = !have_stats && other != nullptr && sq != nullptr;
    const scalar_t* op = fuse ? other->data_ptr<scalar_t>() : nullptr;
    acc* sqp = fuse ? sq->data_ptr<acc>() : nullptr;
    if (!have_stats && chunks == 1) {
      normalise_kernel<scalar_t, acc, MODE, false><<<grid, block, 0, stream>>>(z.data_ptr<scalar_t>(), n, k, chunk, mean.data_ptr<acc>(),
                                                                               m2p, rsp, static_cast<acc>(eps), out.data_ptr<acc>(), op,
                                                                               sqp);
      return;
    }
    if (!have_stats) {
      at::Tensor pmean = at::empty({chunks, k}, mean.options().dtype(at::kDouble)), pm2 = at::empty({chunks, k}, mean.options());
      at::Tensor psq = fuse ? at::empty({chunks, k}, mean.options()) : at::Tensor();
      acc* psqp = fuse ? psq.data_ptr<acc>() : nullptr;
      column_chunk_kernel<scalar_t, acc><<<grid, block, 0, stream>>>(z.data_ptr<scalar_t>(), op, n, k, chunk, nullptr,
                                                                     pmean.data_ptr<double>(), pm2.data_ptr<acc>(), psqp);
      SSLOPS_CUDA_CHECK_LAUNCH();
      const unsigned merge_blocks = static_cast<unsigned>((k + kMergeThreads - 1) / kMergeThreads);
      column_merge_kernel<acc><<<merge_blocks, kMergeThreads, 0, stream>>>(pmean.data_ptr<double>(), pm2.data_ptr<acc>(), psqp, n, k,
                                                                          chunk, chunks, mean.data_ptr<acc>(), m2p, sqp,
                                                                          MODE == 1 ? rsp : nullptr, static_cast<acc>(eps));
      SSLOPS_CUDA_CHECK_LAUNCH();
    }
    normalise_kernel<scalar_t, acc, MODE, true><<<grid, block, 0, stream>>>(z.data_ptr<scalar_t>(), n, k, chunk, mean.data_ptr<acc>(), m2p,
                                                                            rsp, static_cast<acc>(eps), out.data_ptr<acc>(), nullptr,
                                                                            nullptr);
  });
  SSLOPS_CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------- VICReg (one view)

// terms = [hinge, Σ_{j≠k} C_jk², Σ (z - other)²] (the last 0 without other), mean, m2, prod.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vicreg_view_forward_cuda(const at::Tensor& z_in,
                                                                                 const c10::optional<at::Tensor>& other_in, double eps,
                                                                                 int64_t route, bool save) {
  NoAutocast no_autocast;
  TORCH_CHECK(z_in.dim() == 2 && z_in.size(0) >= 2, "vicreg_view_forward_cxx: z must be (N >= 2, K)");
  const bool has_other = other_in.has_value() && other_in->defined();
  TORCH_CHECK(!has_other || (other_in->sizes() == z_in.sizes() && other_in->device() == z_in.device()),
              "vicreg_view_forward_cxx: other must have z's shape and device");
  c10::DeviceGuard guard(z_in.device());
  cudaStream_t stream = current_cuda_stream(z_in.device().index());
  const at::Tensor z = z_in.contiguous();
  const at::Tensor other = has_other ? other_in->to(z.scalar_type()).contiguous() : at::Tensor();
  const int64_t n = z.size(0), k = z.size(1);
  auto opts = z.options().dtype(acc_dtype_of(z));
  at::Tensor mean = at::empty({k}, opts), m2 = at::empty({k}, opts), rstd, zh = at::empty({n, k}, opts);
  at::Tensor sq_col = has_other ? at::zeros({k}, opts) : at::Tensor();
  normalise<0>(z, mean, m2, rstd, eps, zh, false, stream, has_other ? &other : nullptr, has_other ? &sq_col : nullptr);
  // per-column sums added in double by one reduction of fixed shape (same order every run)
  at::Tensor sq_sum = has_other ? sq_col.to(at::kDouble).sum().to(opts.dtype()) : at::zeros({}, opts);
  at::Tensor var = m2 / static_cast<double>(n - 1);
  at::Tensor hinge = at::relu(1.0 - at::sqrt(var + eps)).sum();
  at::Tensor off, prod;
  if (use_gram(route, 4.0 * n, 3.0 * k)) {
    prod = at::mm(zh, zh.t());
    off = dot_sum(prod, prod, false, n, stream) - (var.to(at::kDouble) * var.to(at::kDouble)).sum();
  } else {
    prod = at::mm(zh.t(), zh);
    off = dot_sum(prod, prod, true, k, stream);
  }
  if (!save) prod = at::empty({0, 0}, opts);
  return {at::stack({hinge, off.to(opts.dtype()), sq_sum}), mean, m2, prod};
}

at::Tensor vicreg_view_backward_cuda(const at::Tensor& z_in, const c10::optional<at::Tensor>& other_in, const at::Tensor& mean_in,
                                     const at::Tensor& m2_in, const at::Tensor& prod, const at::Tensor& coef_in, double eps,
                                     int64_t route) {
  NoAutocast no_autocast;
  c10::DeviceGuard guard(z_in.device());
  cudaStream_t stream = current_cuda_stream(z_in.device().index());
  const at::Tensor z = z_in.contiguous();
  const int64_t n = z.size(0), k = z.size(1);
  const auto acc = acc_dtype_of(z);
  auto opts = z.options().dtype(acc);
  at::Tensor mean = mean_in.to(acc).contiguous(), m2 = m2_in.to(acc).contiguous(), coef = coef_in.to(acc).contiguous();
  const bool has_other = other_in.has_value() && other_in->defined();
  const at::Tensor other = has_other ? other_in->to(z.scalar_type()).contiguous() : at::Tensor();
  at::Tensor none, zh = at::empty({n, k}, opts);
  normalise<0>(z, mean, none, none, eps, zh, true, stream);
  const double s = 1.0 / std::sqrt(static_cast<double>(n - 1));
  at::Tensor var = m2 / static_cast<double>(n - 1);
  at::Tensor std_ = at::sqrt(var + eps);
  at::Tensor active = (1.0 - std_).gt(0).to(acc);
  at::Tensor hinge_w = at::where(at::isnan(std_), std_, -coef.select(0, 0) * active / std_);
  at::Tensor w = ((hinge_w - 4.0 * coef.select(0, 1) * var) * s).contiguous();
  at::Tensor c = at::stack({coef.select(0, 1) * (4.0 * s), coef.select(0, 2)}).contiguous();
  const bool saved = prod.numel() > 0;
  at::Tensor t = use_gram(route, 4.0 * n, 3.0 * k) ? at::mm(saved ? prod.to(acc) : at::mm(zh, zh.t()), zh)
                                                       : at::mm(zh, saved ? prod.to(acc) : at::mm(zh.t(), zh));
  at::Tensor dz = at::empty({n, k}, z.options());
  if (n * k == 0) return dz;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "vicreg_view_backward_cxx", [&] {
    using a_t = at::opmath_type<scalar_t>;
    vicreg_dz_kernel<scalar_t, a_t><<<grid_for(n * k), 256, 0, stream>>>(
        zh.data_ptr<a_t>(), t.data_ptr<a_t>(), w.data_ptr<a_t>(), c.data_ptr<a_t>(), z.data_ptr<scalar_t>(),
        has_other ? other.data_ptr<scalar_t>() : nullptr, n, k, dz.data_ptr<scalar_t>());
  });
  SSLOPS_CUDA_CHECK_LAUNCH();
  return dz;
}

// ---------------------------------------------------------------------------- Barlow Twins

using Tensor7 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Tensor7 barlow_twins_forward_cuda(const at::Tensor& za_in, const at::Tensor& zb_in, double lambd, double eps, int64_t route,
                                  bool save) {
  NoAutocast no_autocast;
  TORCH_CHECK(za_in.dim() == 2 && za_in.sizes() == zb_in.sizes(), "barlow_twins_forward_cxx: z_a, z_b must be (N, K)");
  c10::DeviceGuard guard(za_in.device());
  cudaStream_t stream = current_cuda_stream(za_in.device().index());
  const at::Tensor za = za_in.contiguous(), zb = zb_in.to(za_in.scalar_type()).contiguous();
  const int64_t n = za.size(0), k = za.size(1);
  auto opts = za.options().dtype(acc_dtype_of(za));
  at::Tensor mean_a = at::empty({k}, opts), m2_a = at::empty({k}, opts), rstd_a = at::empty({k}, opts);
  at::Tensor mean_b = at::empty({k}, opts), m2_b = at::empty({k}, opts), rstd_b = at::empty({k}, opts);
  at::Tensor ah = at::empty({n, k}, opts), bh = at::empty({n, k}, opts);
  normalise<1>(za, mean_a, m2_a, rstd_a, eps, ah, false, stream);
  normalise<1>(zb, mean_b, m2_b, rstd_b, eps, bh, false, stream);
  at::Tensor diag = (ah * bh).sum(0).to(at::kDouble);
  at::Tensor on = (diag - 1.0).pow(2).sum();
  at::Tensor off, prod_a, prod_b = at::empty({0, 0}, opts);
  if (use_gram(route, 4.0 * n, 3.0 * k)) {
    prod_a = at::mm(ah, ah.t());
    prod_b = at::mm(bh, bh.t());
    off = dot_sum(prod_a, prod_b, false, n, stream) - (diag * diag).sum();
  } else {
    prod_a = at::mm(ah.t(), bh);
    off = dot_sum(prod_a, prod_a, true, k, stream);
  }
  at::Tensor loss = (on + lambd * off).to(opts.dtype());
  if (!save) {
    prod_a = at::empty({0, 0}, opts);
    prod_b = at::empty({0, 0}, opts);
  }
  return {loss, mean_a, rstd_a, mean_b, rstd_b, prod_a, prod_b};
}

std::tuple<at::Tensor, at::Tensor> barlow_twins_backward_cuda(const at::Tensor& grad, const at::Tensor& za_in, const at::Tensor& zb_in,
                                                              const at::Tensor& mean_a, const at::Tensor& rstd_a,
                                                              const at::Tensor& mean_b, const at::Tensor& rstd_b,
                                                              const at::Tensor& prod_a, const at::Tensor& prod_b, double lambd,
                                                              int64_t route) {
  NoAutocast no_autocast;
  c10::DeviceGuard guard(za_in.device());
  cudaStream_t stream = current_cuda_stream(za_in.device().index());
  const at::Tensor za = za_in.contiguous(), zb = zb_in.to(za_in.scalar_type()).contiguous();
  const int64_t n = za.size(0), k = za.size(1);
  const auto acc = acc_dtype_of(za);
  auto opts = za.options().dtype(acc);
  at::Tensor ma = mean_a.to(acc).contiguous(), ra = rstd_a.to(acc).contiguous();
  at::Tensor mb = mean_b.to(acc).contiguous(), rb = rstd_b.to(acc).contiguous();
  at::Tensor none, ah = at::empty({n, k}, opts), bh = at::empty({n, k}, opts);
  normalise<1>(za, ma, none, ra, 0.0, ah, true, stream);
  normalise<1>(zb, mb, none, rb, 0.0, bh, true, stream);
  at::Tensor g = grad.to(acc);
  at::Tensor diag = (ah * bh).sum(0);
  at::Tensor w = (g * (2.0 * (1.0 - lambd) * diag - 2.0)).contiguous();
  at::Tensor c = (g * (2.0 * lambd)).reshape({1}).contiguous();
  at::Tensor p, q;
  const bool saved = prod_a.numel() > 0;
  if (use_gram(route, 4.0 * n, 3.0 * k)) {
    p = at::mm(saved ? prod_b.to(acc) : at::mm(bh, bh.t()), ah);
    q = at::mm(saved ? prod_a.to(acc) : at::mm(ah, ah.t()), bh);
  } else {
    at::Tensor cm = saved ? prod_a.to(acc) : at::mm(ah.t(), bh);
    p = at::mm(bh, cm.t());
    q = at::mm(ah, cm);
  }
  at::Tensor dza = at::empty({n, k}, za.options()), dzb = at::empty({n, k}, za.options());
  if (n * k == 0) return {dza, dzb};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za.scalar_type(), "barlow_twins_backward_cxx", [&] {
    using a_t = at::opmath_type<scalar_t>;
    bn_finish<scalar_t, a_t>(p, ah, bh, w, c, ra, dza, stream);
    bn_finish<scalar_t, a_t>(q, bh, ah, w, c, rb, dzb, stream);
  });
  return {dza, dzb};
}

}  // namespace
}  // namespace sslops

TORCH_LIBRARY_IMPL(sslops, CUDA, m) {
  m.impl("vicreg_view_forward_cxx", &sslops::vicreg_view_forward_cuda);
  m.impl("vicreg_view_backward_cxx", &sslops::vicreg_view_backward_cuda);
  m.impl("barlow_twins_forward_cxx", &sslops::barlow_twins_forward_cuda);
  m.impl("barlow_twins_backward_cxx", &sslops::barlow_twins_backward_cuda);
}
