// Column statistics of z (N, K) on the GPU, shared by column_moments.cu and covariance.cu.
//
// Grid: one block of kColumnSlice × kRowStride threads per (32-column slice, row chunk). The
// rows are split into chunks (row_chunks below) so that K = 256 columns at N = 65536 still
// launch ~4 blocks per SM instead of 8 blocks in all. A block owns rows [r_lo, r_hi) of its
// 32 columns; its threads stride over those rows, reduce through shared memory in a fixed
// order, and make a second pass for the centred squares (no Σz² − n·mean² cancellation):
//   col_mean[tx] = Σ_r z_r,col / n_chunk        col_m2[tx] = Σ_r (z_r,col − col_mean[tx])²
// With `other` (same shape and layout as z; nullptr for none, the same for the whole block) the
// first pass also accumulates col_sq[tx] = Σ_r (z_r,col − other_r,col)² while z's element is in a
// register (VICReg's invariance term).
// With one chunk these are the column statistics. With several, each block writes its chunk's
// (mean, m2, sq) to (chunks, K) buffers and column_merge_kernel combines them column by column,
// chunks in index order (Chan et al.'s merge of (count, mean, m2)): no atomics, so reruns are
// bit-identical; a NaN in any chunk reaches the merged mean and m2.
// Precision (as csrc/cpu/column_reduce.h): the mean pass sums in double (the mean is exact to
// its last rounding even when |mean| ≫ std); the second pass centres on that mean rounded to
// acc_t, u, and also sums v = Σ (x − u), so m2 = Σ (x − u)² − v²/n (Chan, Golub & LeVeque's
// corrected two-pass algorithm); its sums run kSumRun rows per thread in acc_t before moving to
// a double total (RunSum), and the block's and the merge's sums are in double: the error does
// not grow with the rows per thread, which reach N/8 when the column slices alone fill the GPU
// (one chunk), nor with the number of chunks. Chunk means reach the merge in double.
// Bytes: 2 reads of z (+1 of other) per chunk pass (the second read of a chunk mostly hits
// L2), 3·chunks·K partials written and read when chunks > 1.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace sslops {

constexpr int kColumnSlice = 32;
constexpr int kRowStride = 8;
constexpr int64_t kMinChunkRows = 256;
constexpr int kBlocksPerSm = 4;
constexpr int kSumRun = 32;  // rows a thread adds in acc_t before moving the partial to double

// A running sum whose error does not grow with its length: terms added in acc_t, every kSumRun
// terms the partial is moved to a double total (csrc/cpu/blocked_sum.h on the CPU).
template <typename acc_t>
struct RunSum {
  acc_t part = 0;
  double total = 0;
  int run = 0;
  __device__ void add(acc_t v) {
    part += v;
    if (++run == kSumRun) {
      total += static_cast<double>(part);
      part = 0;
      run = 0;
    }
  }
  __device__ double value() const { return total + static_cast<double>(part); }
};

// (rows per chunk, number of chunks) for a column reduction of n rows over col_blocks column
// slices on `device`: ~kBlocksPerSm blocks per SM, at least kMinChunkRows rows a chunk; one
// chunk when the column slices alone fill the GPU (then the path is the single-pass one).
inline std::pair<int64_t, int64_t> row_chunks(int64_t n, int64_t col_blocks, int device) {
  static int sm_cache[64] = {0};
  int sms = device >= 0 && device < 64 ? sm_cache[device] : 0;
  if (sms == 0) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
      (void)cudaGetLastError();
      sms = 132;
    }
    if (device >= 0 && device < 64) sm_cache[device] = sms;
  }
  const int64_t want = std::max<int64_t>(1, static_cast<int64_t>(kBlocksPerSm) * sms / std::max<int64_t>(1, col_blocks));
  int64_t chunk = std::max<int64_t>(kMinChunkRows, (n + want - 1) / want);
  chunk = (chunk + kRowStride - 1) / kRowStride * kRowStride;
  const int64_t chunks = std::max<int64_t>(1, (n + chunk - 1) / chunk);
  return {chunk, chunks};
}

// Σ_ty v(ty, tx): the block's kRowStride per-thread partials of each column, added in a fixed
// order by every thread of the column (all get the total); every thread reaches both barriers.
__device__ inline double column_rows_total(double v, double (&partial)[kRowStride][kColumnSlice]) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  partial[ty][tx] = v;
  __syncthreads();
  double t = 0;
  for (int i = 0; i < kRowStride; ++i) t += partial[i][tx];
  __syncthreads();
  return t;
}

// Rows [r_lo, r_hi) of column col: col_mean[tx] = mean, col_m2[tx] = Σ (z − mean)², with other
// col_sq[tx] = Σ (z − other)², and (when non-null) col_mean64[tx] = the mean in double, the form
// column_merge_kernel merges. Written by the ty = 0 threads, followed by a barrier.
template <typename scalar_t, typename acc_t>
__device__ void block_column_moments(const scalar_t* __restrict__ z, int64_t r_lo, int64_t r_hi, int64_t k, int64_t col,
                                     double (&partial)[kRowStride][kColumnSlice], acc_t* col_mean, acc_t* col_m2,
                                     const scalar_t* __restrict__ other = nullptr, acc_t* col_sq = nullptr,
                                     double* col_mean64 = nullptr) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const bool live = col < k;
  double s = 0;
  RunSum<acc_t> e;
  if (live) {
    for (int64_t r = r_lo + ty; r < r_hi; r += kRowStride) {
      const acc_t x = static_cast<acc_t>(z[r * k + col]);
      s += static_cast<double>(x);
      if (other != nullptr) {
        const acc_t d = x - static_cast<acc_t>(other[r * k + col]);
        e.add(d * d);
      }
    }
  }
  const double rows = static_cast<double>(r_hi - r_lo);
  const double mu = column_rows_total(s, partial) / rows;
  const acc_t u = static_cast<acc_t>(mu);
  RunSum<acc_t> v, q;
  if (live)
    for (int64_t r = r_lo + ty; r < r_hi; r += kRowStride) {
      const acc_t d = static_cast<acc_t>(z[r * k + col]) - u;
      v.add(d);
      q.add(d * d);
    }
  const double vt = column_rows_total(v.value(), partial);
  const double m2 = column_rows_total(q.value(), partial) - vt * vt / rows;
  const double sq = other != nullptr ? column_rows_total(e.value(), partial) : 0.0;  // uniform over the block
  if (ty == 0) {
    col_mean[tx] = u;
    col_m2[tx] = static_cast<acc_t>(m2);
    if (other != nullptr) col_sq[tx] = static_cast<acc_t>(sq);
    if (col_mean64 != nullptr) col_mean64[tx] = mu;
  }
  __syncthreads();
}

// Per-chunk statistics → column statistics, one thread per column, chunks in index order, in
// double:  mean = Σ_c n_c·mean_c / N,  m2 = Σ_c [m2_c + n_c·(mean_c − mean)²],  sq = Σ_c sq_c
// (every term of m2 a centred square: no cancellation; the chunk means are double: rounded to
// fp32 near 1e5 they would spoil the n_c·(mean_c − mean)² terms). psq/sq nullptr: no sq.
// rstd non-null: also rstd = 1/sqrt(m2/N + eps) (Barlow's batch norm).
template <typename acc_t>
__global__ void column_merge_kernel(const double* __restrict__ pmean, const acc_t* __restrict__ pm2, const acc_t* __restrict__ psq,
                                    int64_t n, int64_t k, int64_t chunk, int64_t chunks, acc_t* __restrict__ mean,
                                    acc_t* __restrict__ m2, acc_t* __restrict__ sq, acc_t* __restrict__ rstd, acc_t eps) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= k) return;
  double s = 0, e = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const double cnt = static_cast<double>(chunk < n - c * chunk ? chunk : n - c * chunk);
    s += cnt * pmean[c * k + col];
    if (psq != nullptr) e += static_cast<double>(psq[c * k + col]);
  }
  const double mu = s / static_cast<double>(n);
  double q = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const double cnt = static_cast<double>(chunk < n - c * chunk ? chunk : n - c * chunk);
    const double d = pmean[c * k + col] - mu;
    q += static_cast<double>(pm2[c * k + col]) + cnt * d * d;
  }
  mean[col] = static_cast<acc_t>(mu);
  m2[col] = static_cast<acc_t>(q);
  if (sq != nullptr) sq[col] = static_cast<acc_t>(e);
  if (rstd != nullptr) rstd[col] = acc_t(1) / sqrt(static_cast<acc_t>(q) / static_cast<acc_t>(n) + eps);
}

constexpr int kMergeThreads = 128;

// Column statistics of the chunks of one block's grid: blockIdx.x the column slice, blockIdx.y
// the row chunk; writes (mean, m2, sq) of the chunk to row blockIdx.y of the (chunks, K) buffers:
// the mean to pmean64 (double, for column_merge_kernel) when it is non-null, else to pmean.
template <typename scalar_t, typename acc_t>
__global__ void column_chunk_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ other, int64_t n, int64_t k,
                                    int64_t chunk, acc_t* __restrict__ pmean, double* __restrict__ pmean64, acc_t* __restrict__ pm2,
                                    acc_t* __restrict__ psq) {
  __shared__ double partial[kRowStride][kColumnSlice];
  __shared__ acc_t col_mean[kColumnSlice], col_m2[kColumnSlice], col_sq[kColumnSlice];
  __shared__ double col_mean64[kColumnSlice];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColumnSlice + threadIdx.x;
  const int64_t r_lo = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t r_hi = r_lo + chunk < n ? r_lo + chunk : n;
  block_column_moments(z, r_lo, r_hi, k, col, partial, col_mean, col_m2, other, col_sq, col_mean64);
  if (threadIdx.y == 0 && col < k) {
    const int64_t i = static_cast<int64_t>(blockIdx.y) * k + col;
    if (pmean64 != nullptr)
      pmean64[i] = col_mean64[threadIdx.x];
    else
      pmean[i] = col_mean[threadIdx.x];
    pm2[i] = col_m2[threadIdx.x];
    if (other != nullptr) psq[i] = col_sq[threadIdx.x];
  }
}

}  // namespace sslops
