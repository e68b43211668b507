// Column statistics of a row-major z (N, K) on the CPU, shared by column_moments.cpp and
// covariance.cpp (the GPU counterpart is csrc/cuda/column_reduce.cuh).
//
// One fp32 running total per column loses precision with N and with |mean|/std: Barlow
// Twins' loss was 700× (N = 32768) and 50× (N = 256, columns shifted by 1e5) farther from
// float64 than plain fp32 PyTorch's. Here the rows are taken in blocks of kSumRows
// (blocked_sum.h), with Chan, Golub & LeVeque's corrected two-pass algorithm per block:
//   pass 1:  S = Σ x in double                  (and the block's Σ (x − other)², fp32)
//   pass 2:  d = x − u with u = S/n_b rounded to the accumulation type;  v = Σ d,  q = Σ d²
//   block mean = S/n_b,  block m2 = q − v²/n_b
// (d is exact when |mean| ≫ std, and v repairs m2 for u's rounding), then the blocks'
// (n_b, mean_b, m2_b) are merged in double by Chan et al.'s formula. A shift by a sample row
// instead of the double sum was tried: subtracting one constant from many values of a binade
// rounds them all the same way, and the mean picked up a bias of ~eps·std.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "blocked_sum.h"
#include "parallel.h"

namespace sslops {

// Columns [c0, c0 + w) of z: mean[c] = Σ_r z_r,c / n and m2[c] = Σ_r (z_r,c − mean[c])²; with
// `other` (same shape and layout) also sq[c] = Σ_r (z_r,c − other_r,c)², summed while z's row
// slice is loaded. Per block as above; the blocks are merged in row order,
//   m2 += m2_b + δ²·n·n_b/(n + n_b),   mean += δ·n_b/(n + n_b),   δ = mean_b − mean.
// With `resid`, also resid[c] = exact mean − mean[c] (what rounding the mean left out).
// Each column is reduced on its own over the rows in order, so the result does not depend on
// how the columns are split between threads. Outputs need no initial value.
template <typename scalar_t>
void column_slice_moments(const scalar_t* z, int64_t n, int64_t k, int64_t c0, int64_t w, acc_t<scalar_t>* mean,
                          acc_t<scalar_t>* m2, const scalar_t* other = nullptr, acc_t<scalar_t>* sq = nullptr,
                          acc_t<scalar_t>* resid = nullptr) {
  using acc = acc_t<scalar_t>;
  std::vector<double> bs(w);
  std::vector<acc> u(w), bv(w), bq(w), be(w);
  std::vector<double> mu(w, 0.0), q(w, 0.0), e(w, 0.0);  // merged over the blocks so far
  int64_t seen = 0;
  for (int64_t r0 = 0; r0 < n; r0 += kSumRows) {
    const int64_t r1 = std::min(n, r0 + kSumRows), nb = r1 - r0;
    std::fill(bs.begin(), bs.end(), 0.0);
    std::fill(bv.begin(), bv.end(), acc(0));
    std::fill(bq.begin(), bq.end(), acc(0));
    if (other != nullptr) {
      std::fill(be.begin(), be.end(), acc(0));
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = z + r * k + c0;
        const scalar_t* orow = other + r * k + c0;
        for (int64_t c = 0; c < w; ++c) {
          const acc x = static_cast<acc>(row[c]);
          const acc d = x - static_cast<acc>(orow[c]);
          bs[c] += static_cast<double>(x);
          be[c] += d * d;
        }
      }
    } else {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = z + r * k + c0;
        for (int64_t c = 0; c < w; ++c) bs[c] += static_cast<double>(row[c]);
      }
    }
    for (int64_t c = 0; c < w; ++c) {
      bs[c] /= static_cast<double>(nb);  // the block's mean
      u[c] = static_cast<acc>(bs[c]);
    }
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = z + r * k + c0;
      for (int64_t c = 0; c < w; ++c) {
        const acc d = static_cast<acc>(row[c]) - u[c];
        bv[c] += d;
        bq[c] += d * d;
      }
    }
    const double total = static_cast<double>(seen + nb);
    const double wb = static_cast<double>(nb) / total, wq = static_cast<double>(seen) * wb;
    for (int64_t c = 0; c < w; ++c) {
      const double v = static_cast<double>(bv[c]);
      const double delta = bs[c] - mu[c];
      mu[c] += delta * wb;
      q[c] += (static_cast<double>(bq[c]) - v * v / static_cast<double>(nb)) + delta * delta * wq;
      e[c] += static_cast<double>(be[c]);
    }
    seen += nb;
  }
  for (int64_t c = 0; c < w; ++c) {
    mean[c] = static_cast<acc>(mu[c]);
    if (resid != nullptr) resid[c] = static_cast<acc>(mu[c] - static_cast<double>(mean[c]));
    m2[c] = static_cast<acc>(q[c]);
    if (other != nullptr) sq[c] = static_cast<acc>(e[c]);
  }
}

}  // namespace sslops
