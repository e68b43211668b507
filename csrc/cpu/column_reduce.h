// Column statistics of a row-major z (N, K) on the CPU, shared by column_moments.cpp and
// covariance.cpp (the GPU counterpart is csrc/cuda/column_reduce.cuh).
#pragma once
#include <cstdint>

#include "parallel.h"

namespace sslops {

// Columns [c0, c0 + w) of z: mean[c] = Σ_r z_r,c / n and m2[c] = Σ_r (z_r,c − mean[c])², two
// passes over the rows (no Σz² − n·mean² cancellation); with `other` (same shape and layout)
// the first pass also sums sq[c] = Σ_r (z_r,c − other_r,c)² while z's row slice is loaded.
// Each column is summed over the rows in order, so the result does not depend on how the
// columns are split between threads. mean, m2 (and sq) hold w zeros on entry.
template <typename scalar_t>
void column_slice_moments(const scalar_t* z, int64_t n, int64_t k, int64_t c0, int64_t w, acc_t<scalar_t>* mean,
                          acc_t<scalar_t>* m2, const scalar_t* other = nullptr, acc_t<scalar_t>* sq = nullptr) {
  using acc = acc_t<scalar_t>;
  if (other != nullptr) {
    for (int64_t r = 0; r < n; ++r) {
      const scalar_t* row = z + r * k + c0;
      const scalar_t* orow = other + r * k + c0;
      for (int64_t c = 0; c < w; ++c) {
        const acc x = static_cast<acc>(row[c]);
        const acc d = x - static_cast<acc>(orow[c]);
        mean[c] += x;
        sq[c] += d * d;
      }
    }
  } else {
    for (int64_t r = 0; r < n; ++r) {
      const scalar_t* row = z + r * k + c0;
      for (int64_t c = 0; c < w; ++c) mean[c] += static_cast<acc>(row[c]);
    }
  }
  for (int64_t c = 0; c < w; ++c) mean[c] /= static_cast<acc>(n);
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* row = z + r * k + c0;
    for (int64_t c = 0; c < w; ++c) {
      const acc d = static_cast<acc>(row[c]) - mean[c];
      m2[c] += d * d;
    }
  }
}

}  // namespace sslops
