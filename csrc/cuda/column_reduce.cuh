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

// dst[tx] = Σ_ty v(ty, tx) / divisor: the block's kRowStride per-thread partials of each column
// added in a fixed order by the ty = 0 row; every thread passes its own v and reaches both barriers.
template <typename acc_t>
__device__ void column_rows_sum(acc_t v, acc_t (&partial)[kRowStride][kColumnSlice], acc_t* dst, acc_t divisor = acc_t(1)) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  partial[ty][tx] = v;
  __syncthreads();
  if (ty == 0) {
    acc_t t = 0;
    for (int i = 0; i < kRowStride; ++i) t += partial[i][tx];
    dst[tx] = t / divisor;
  }
  __syncthreads();
}

template <typename scalar_t, typename acc_t>
__device__ void block_column_moments(const scalar_t* __restrict__ z, int64_t r_lo, int64_t r_hi, int64_t k, int64_t col,
                                     acc_t (&partial)[kRowStride][kColumnSlice], acc_t* col_mean, acc_t* col_m2,
                                     const scalar_t* __restrict__ other = nullptr, acc_t* col_sq = nullptr) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const bool live = col < k;
  acc_t s = 0, e = 0;
  if (live) {
    if (other != nullptr) {
      for (int64_t r = r_lo + ty; r < r_hi; r += kRowStride) {
        const acc_t x = static_cast<acc_t>(z[r * k + col]);
        const acc_t d = x - static_cast<acc_t>(other[r * k + col]);
        s += x;
        e += d * d;
      }
    } else {
      for (int64_t r = r_lo + ty; r < r_hi; r += kRowStride) s += static_cast<acc_t>(z[r * k + col]);
    }
  }
  column_rows_sum(s, partial, col_mean, static_cast<acc_t>(r_hi - r_lo));
  const acc_t mu = col_mean[tx];
  acc_t q = 0;
  if (live)
    for (int64_t r = r_lo + ty; r < r_hi; r += kRowStride) {
      const acc_t d = static_cast<acc_t>(z[r * k + col]) - mu;
      q += d * d;
    }
  column_rows_sum(q, partial, col_m2);
  if (other != nullptr) column_rows_sum(e, partial, col_sq);  // uniform over the block: every thread reaches the barriers
}

// Per-chunk statistics → column statistics, one thread per column, chunks in index order:
//   mean = Σ_c n_c·mean_c / N,  m2 = Σ_c [m2_c + n_c·(mean_c − mean)²],  sq = Σ_c sq_c
// (every term of m2 a centred square: no cancellation). psq/sq nullptr: no sq. rstd non-null:
// also rstd = 1/sqrt(m2/N + eps) (Barlow's batch norm).
template <typename acc_t>
__global__ void column_merge_kernel(const acc_t* __restrict__ pmean, const acc_t* __restrict__ pm2, const acc_t* __restrict__ psq,
                                    int64_t n, int64_t k, int64_t chunk, int64_t chunks, acc_t* __restrict__ mean,
                                    acc_t* __restrict__ m2, acc_t* __restrict__ sq, acc_t* __restrict__ rstd, acc_t eps) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= k) return;
  acc_t s = 0, e = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const acc_t cnt = static_cast<acc_t>(chunk < n - c * chunk ? chunk : n - c * chunk);
    s += cnt * pmean[c * k + col];
    if (psq != nullptr) e += psq[c * k + col];
  }
  const acc_t mu = s / static_cast<acc_t>(n);
  acc_t q = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const acc_t cnt = static_cast<acc_t>(chunk < n - c * chunk ? chunk : n - c * chunk);
    const acc_t d = pmean[c * k + col] - mu;
    q += pm2[c * k + col] + cnt * d * d;
  }
  mean[col] = mu;
  m2[col] = q;
  if (sq != nullptr) sq[col] = e;
  if (rstd != nullptr) rstd[col] = acc_t(1) / sqrt(q / static_cast<acc_t>(n) + eps);
}

constexpr int kMergeThreads = 128;

// Column statistics of the chunks of one block's grid: blockIdx.x the column slice, blockIdx.y
// the row chunk; writes (mean, m2, sq) of the chunk to row blockIdx.y of the (chunks, K) buffers.
template <typename scalar_t, typename acc_t>
__global__ void column_chunk_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ other, int64_t n, int64_t k,
                                    int64_t chunk, acc_t* __restrict__ pmean, acc_t* __restrict__ pm2, acc_t* __restrict__ psq) {
  __shared__ acc_t partial[kRowStride][kColumnSlice];
  __shared__ acc_t col_mean[kColumnSlice], col_m2[kColumnSlice], col_sq[kColumnSlice];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColumnSlice + threadIdx.x;
  const int64_t r_lo = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t r_hi = r_lo + chunk < n ? r_lo + chunk : n;
  block_column_moments(z, r_lo, r_hi, k, col, partial, col_mean, col_m2, other, col_sq);
  if (threadIdx.y == 0 && col < k) {
    const int64_t i = static_cast<int64_t>(blockIdx.y) * k + col;
    pmean[i] = col_mean[threadIdx.x];
    pm2[i] = col_m2[threadIdx.x];
    if (other != nullptr) psq[i] = col_sq[threadIdx.x];
  }
}

}  // namespace sslops
