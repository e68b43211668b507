// Two-pass column statistics of one 32-column slice of z (N, K), shared by the CUDA kernels.
//
// A block of kColumnSlice × kRowStride threads owns kColumnSlice consecutive columns; its
// threads stride over the rows, reduce through shared memory, and make a second pass for
// the centred squares (no Σz² − N·mean² cancellation):
//   col_mean[tx] = Σ_n z_n,col / N        col_m2[tx] = Σ_n (z_n,col − col_mean[tx])²
// With `other` (same shape and layout as z; nullptr for none, the same for the whole block) the
// first pass also accumulates col_sq[tx] = Σ_n (z_n,col − other_n,col)² while z's element is in a
// register (VICReg's invariance term), reduced in the same fixed order (deterministic).
// Every thread of the block must call it (it synchronises); columns ≥ K read as zeros.
#pragma once
#include <cstdint>

namespace sslops {

constexpr int kColumnSlice = 32;
constexpr int kRowStride = 8;

template <typename scalar_t, typename acc_t>
__device__ void block_column_moments(const scalar_t* __restrict__ z, int64_t n, int64_t k, int64_t col,
                                     acc_t (&partial)[kRowStride][kColumnSlice], acc_t* col_mean, acc_t* col_m2,
                                     const scalar_t* __restrict__ other = nullptr, acc_t* col_sq = nullptr) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const bool live = col < k;
  acc_t s = 0, e = 0;
  if (live) {
    if (other != nullptr) {
      for (int64_t r = ty; r < n; r += kRowStride) {
        const acc_t x = static_cast<acc_t>(z[r * k + col]);
        const acc_t d = x - static_cast<acc_t>(other[r * k + col]);
        s += x;
        e += d * d;
      }
    } else {
      for (int64_t r = ty; r < n; r += kRowStride) s += static_cast<acc_t>(z[r * k + col]);
    }
  }
  partial[ty][tx] = s;
  __syncthreads();
  if (ty == 0) {
    acc_t t = 0;
    for (int i = 0; i < kRowStride; ++i) t += partial[i][tx];
    col_mean[tx] = t / static_cast<acc_t>(n);
  }
  __syncthreads();
  const acc_t mu = col_mean[tx];
  acc_t q = 0;
  if (live)
    for (int64_t r = ty; r < n; r += kRowStride) {
      const acc_t d = static_cast<acc_t>(z[r * k + col]) - mu;
      q += d * d;
    }
  partial[ty][tx] = q;
  __syncthreads();
  if (ty == 0) {
    acc_t t = 0;
    for (int i = 0; i < kRowStride; ++i) t += partial[i][tx];
    col_m2[tx] = t;
  }
  __syncthreads();
  if (other != nullptr) {  // uniform over the block: the barriers below are reached by all threads
    partial[ty][tx] = e;
    __syncthreads();
    if (ty == 0) {
      acc_t t = 0;
      for (int i = 0; i < kRowStride; ++i) t += partial[i][tx];
      col_sq[tx] = t;
    }
    __syncthreads();
  }
}

}  // namespace sslops
