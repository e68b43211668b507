// Matrix-SSL on the CPU: fused row passes and trace reductions around ATen's BLAS products.
//
// Math, gradient and what is saved: see matrix_info_impl.h (and sslops/ops/matrix_info.py).
// Kernels here:
//   normalize_centre    one pass over the rows (norm, scale, write acc dtype), then the
//                       column mean is subtracted: 3 reads+writes of N·K, 4NK flops
//   trace_dot(A, B)     Σ_ij A_ij B_ji over 64×64 tiles (B's tile transposed into a local
//                       buffer, SIMD dots), fp64 across rows: 2K² flops, 2K² reads, no product;
//                       trace_dot_sym for symmetric B reads both row-major
//   lincomb             Σ c_i T_i + d·I in one pass (strided operands by 64×64 tiles)
//   normalize_backward  dx = (g - x̂ (x̂·g)) / ‖x‖ row-wise (g / 1e-12 below the clamp), 5NK flops
// Matrix cross-entropy (mce_forward/mce_backward in matrix_info_impl.h) reuses trace_dot,
// trace and lincomb: forward (n-1)·2K³ flops + n trace_dots (2K² each), backward
// (h-1 + PS products)·2K³ for p and (n-1)·2K³ for q plus ~n²/2 K² lincomb reads; saved
// X and A_1..A_{n-1} (n K×K matrices).
// Matrix-SSL per call (order n = 4, fp32, N rows, K features): forward 5NK² + 4·2K³ flops (symmetric half-blocks; 6NK² for K < 128), backward
// 8NK² + 4·2K³ flops (4NK² when only p needs a gradient); memory beyond the inputs: the
// N×2K centred rows (recomputed, not saved) and 3 + (h-1) + (n-1) = 7 saved K×K matrices.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "matrix_info_impl.h"
#include "parallel.h"

namespace sslops {
namespace {

constexpr double kNormEps = 1e-12;  // F.normalize's eps
constexpr int64_t kTile = 64;
// Passes over fewer elements than this run on one thread (a parallel region costs more
// than it saves there); K×K passes from K = 256 up use every thread.
constexpr int64_t kSerialElements = int64_t(1) << 16;

template <typename acc>
void normalize_rows(const at::Tensor& x, acc* wp, int64_t ld, acc* colsum, int64_t nthreads_slots) {
  const int64_t n = x.size(0), k = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "matrix_ssl rows_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
      acc* sums = colsum + std::min<int64_t>(at::get_thread_num(), nthreads_slots - 1) * k;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = xp + r * k;
        acc* out = wp + r * ld;
        acc ss = 0;
_Pragma("omp simd reduction(+ : ss)")
        for (int64_t c = 0; c < k; ++c) {
          const acc v = static_cast<acc>(row[c]);
          out[c] = v;
          ss += v * v;
        }
        const acc nrm = std::sqrt(ss);
        const acc inv = acc(1) / (nrm > acc(kNormEps) ? nrm : acc(kNormEps));
        for (int64_t c = 0; c < k; ++c) {
          out[c] *= inv;
          sums[c] += out[c];
        }
      }
    });
  });
}

struct CpuDev {
  // W = [p̂ - mean | ẑ - mean]: one pass over the rows of both (norm, scale, per-thread
  // column sums), then one pass subtracting the means.
  static void rows_forward(const at::Tensor& p_in, const at::Tensor& z_in, at::Tensor& w) {
    const at::Tensor p = p_in.contiguous(), z = z_in.contiguous();
    const int64_t n = p.size(0), k = p.size(1), ld = w.size(1);
    const int64_t slots = at::get_num_threads();
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "matrix_ssl rows_forward", [&] {
      using acc = scalar_t;
      std::vector<acc> colsum(static_cast<size_t>(slots * 2 * k), acc(0));
      acc* wp = w.data_ptr<acc>();
      normalize_rows<acc>(p, wp, ld, colsum.data(), slots);
      normalize_rows<acc>(z, wp + k, ld, colsum.data() + slots * k, slots);
      std::vector<acc> mean(static_cast<size_t>(2 * k), acc(0));
      for (int64_t half = 0; half < 2; ++half)
        for (int64_t t = 0; t < slots; ++t)
          for (int64_t c = 0; c < k; ++c) mean[half * k + c] += colsum[(half * slots + t) * k + c];
      for (auto& m : mean) m /= static_cast<acc>(n);
      at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          acc* out = wp + r * ld;
          const acc* mp = mean.data();
_Pragma("omp simd")
          for (int64_t c = 0; c < 2 * k; ++c) out[c] -= mp[c];
        }
      });
    });
  }

  static at::Tensor trace(const at::Tensor& a) { return a.diagonal().sum(); }

  // Σ_ij A_ij B_ji: B's 64×64 tile is copied transposed into a local buffer so that the
  // inner dot products read both operands contiguously (SIMD).
  static at::Tensor trace_dot(const at::Tensor& a_in, const at::Tensor& b_in) {
    const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
    const int64_t k = a.size(0);
    const int64_t tiles = (k + kTile - 1) / kTile;
    const int64_t grain = std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, k * kTile));
    at::Tensor out = at::empty({}, a.options());
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "matrix_ssl trace_dot", [&] {
      const scalar_t* ap = a.data_ptr<scalar_t>();
      const scalar_t* bp = b.data_ptr<scalar_t>();
      std::vector<double> partial(tiles, 0.0);
      at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
        std::vector<scalar_t> bt(kTile * kTile);
        for (int64_t ti = t0; ti < t1; ++ti) {
          double s = 0;
          const int64_t i0 = ti * kTile, i1 = std::min(k, i0 + kTile);
          for (int64_t j0 = 0; j0 < k; j0 += kTile) {
            const int64_t j1 = std::min(k, j0 + kTile), jw = j1 - j0;
            for (int64_t j = j0; j < j1; ++j) {  // bt[i - i0][j - j0] = B[j][i]
              const scalar_t* brow = bp + j * k;
              for (int64_t i = i0; i < i1; ++i) bt[(i - i0) * kTile + (j - j0)] = brow[i];
            }
            for (int64_t i = i0; i < i1; ++i) {
              const scalar_t* arow = ap + i * k + j0;
              const scalar_t* brow = bt.data() + (i - i0) * kTile;
              scalar_t ls = 0;
_Pragma("omp simd reduction(+ : ls)")
              for (int64_t j = 0; j < jw; ++j) ls += arow[j] * brow[j];
              s += static_cast<double>(ls);
            }
          }
          partial[ti] = s;
        }
      });
      double total = 0;
      for (double v : partial) total += v;  // fixed order: deterministic for any thread count
      out.fill_(total);
    });
    return out;
  }

  static at::Tensor trace_dot_sym(const at::Tensor& a_in, const at::Tensor& b_in) {
    const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
    const int64_t k = a.size(0);
    const int64_t grain = std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, k));
    at::Tensor out = at::empty({}, a.options());
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "matrix_ssl trace_dot_sym", [&] {
      const scalar_t* ap = a.data_ptr<scalar_t>();
      const scalar_t* bp = b.data_ptr<scalar_t>();
      std::vector<double> partial(k, 0.0);
      at::parallel_for(0, k, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
          const scalar_t* ar = ap + i * k;
          const scalar_t* br = bp + i * k;
          scalar_t ls = 0;
_Pragma("omp simd reduction(+ : ls)")
          for (int64_t j = 0; j < k; ++j) ls += ar[j] * br[j];
          partial[i] = static_cast<double>(ls);
        }
      });
      double total = 0;
      for (double v : partial) total += v;
      out.fill_(total);
    });
    return out;
  }

  // out = Σ c_i T_i + diag·I over 64×64 tiles (T_i and out of any strides, e.g. transposed views).
  static void lincomb(at::Tensor out, const std::vector<matrix_info::Term>& terms, double diag) {
    const int64_t rows = out.size(0), cols = out.size(1);
    const int64_t tiles_i = (rows + kTile - 1) / kTile, tiles_j = (cols + kTile - 1) / kTile;
    const int64_t grain = std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, cols * kTile));
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "matrix_ssl lincomb", [&] {
      scalar_t* op = out.data_ptr<scalar_t>();
      const int64_t os0 = out.stride(0), os1 = out.stride(1);
      bool rows_contiguous = os1 == 1;
      for (const auto& term : terms) rows_contiguous = rows_contiguous && term.t.stride(1) == 1;
      if (rows_contiguous) {  // every operand row-major: plain SIMD sweeps over the rows
        const int64_t row_grain = std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, cols));
        at::parallel_for(0, rows, row_grain, [&](int64_t r0, int64_t r1) {
          for (int64_t i = r0; i < r1; ++i) {
            scalar_t* orow = op + i * os0;
            size_t first = 0;
            if (terms.empty()) {
              for (int64_t j = 0; j < cols; ++j) orow[j] = scalar_t(0);
            } else {  // the first term assigns: no zeroing pass
              const scalar_t* trow = terms[0].t.data_ptr<scalar_t>() + i * terms[0].t.stride(0);
              const scalar_t c = static_cast<scalar_t>(terms[0].c);
_Pragma("omp simd")
              for (int64_t j = 0; j < cols; ++j) orow[j] = c * trow[j];
              first = 1;
            }
            if (i < cols) orow[i] += static_cast<scalar_t>(diag);
            for (size_t t = first; t < terms.size(); ++t) {
              const scalar_t* trow = terms[t].t.data_ptr<scalar_t>() + i * terms[t].t.stride(0);
              const scalar_t c = static_cast<scalar_t>(terms[t].c);
_Pragma("omp simd")
              for (int64_t j = 0; j < cols; ++j) orow[j] += c * trow[j];
            }
          }
        });
        return;
      }
      // mixed layouts (some operand transposed): 64×64 tiles accumulated in a local buffer;
      // row-major operands are read along rows, column-major ones along columns.
      at::parallel_for(0, tiles_i, grain, [&](int64_t t0, int64_t t1) {
        std::vector<scalar_t> tile(kTile * kTile);
        for (int64_t ti = t0; ti < t1; ++ti)
          for (int64_t tj = 0; tj < tiles_j; ++tj) {
            const int64_t i0 = ti * kTile, ih = std::min(rows, i0 + kTile) - i0;
            const int64_t j0 = tj * kTile, jw = std::min(cols, j0 + kTile) - j0;
            std::fill(tile.begin(), tile.end(), scalar_t(0));
            for (int64_t d = std::max(i0, j0); d < std::min(i0 + ih, j0 + jw); ++d) tile[(d - i0) * kTile + (d - j0)] = static_cast<scalar_t>(diag);
            for (const auto& term : terms) {
              const scalar_t* tp = term.t.data_ptr<scalar_t>();
              const int64_t s0 = term.t.stride(0), s1 = term.t.stride(1);
              const scalar_t c = static_cast<scalar_t>(term.c);
              if (s1 == 1) {
                for (int64_t i = 0; i < ih; ++i) {
                  const scalar_t* trow = tp + (i0 + i) * s0 + j0;
                  scalar_t* lrow = tile.data() + i * kTile;
_Pragma("omp simd")
                  for (int64_t j = 0; j < jw; ++j) lrow[j] += c * trow[j];
                }
              } else {
                for (int64_t j = 0; j < jw; ++j) {
                  const scalar_t* tcol = tp + (j0 + j) * s1 + i0 * s0;
                  for (int64_t i = 0; i < ih; ++i) tile[i * kTile + j] += c * tcol[i * s0];
                }
              }
            }
            for (int64_t i = 0; i < ih; ++i) {
              scalar_t* orow = op + (i0 + i) * os0 + j0 * os1;
              const scalar_t* lrow = tile.data() + i * kTile;
              for (int64_t j = 0; j < jw; ++j) orow[j * os1] = lrow[j];
            }
          }
      });
    });
  }

  // dx = g·(G_row - x̂ (x̂·G_row)) / ‖x‖ (g·G_row / 1e-12 below the clamp), G read at
  // columns [col0, col0+K) of the row-major acc-dtype buffer `gw`.
  static at::Tensor rows_backward(const at::Tensor& x_in, const at::Tensor& gw, int64_t col0, const at::Tensor& gscale) {
    const at::Tensor x = x_in.contiguous();
    const int64_t n = x.size(0), k = x.size(1), ld = gw.stride(0);
    TORCH_CHECK(gw.stride(1) == 1, "rows_backward: G must be row-major");
    at::Tensor dx = at::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "matrix_ssl rows_backward", [&] {
      using acc = acc_t<scalar_t>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const acc* gp = gw.data_ptr<acc>() + col0;
      const acc g = gscale.data_ptr<acc>()[0];
      scalar_t* dp = dx.data_ptr<scalar_t>();
      at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* row = xp + r * k;
          const acc* grow = gp + r * ld;
          scalar_t* drow = dp + r * k;
          acc ss = 0, dot = 0;
_Pragma("omp simd reduction(+ : ss, dot)")
          for (int64_t c = 0; c < k; ++c) {
            const acc v = static_cast<acc>(row[c]);
            ss += v * v;
            dot += v * grow[c];
          }
          const acc nrm = std::sqrt(ss);
          if (nrm > acc(kNormEps)) {
            const acc inv = acc(1) / nrm;
            const acc proj = dot * inv * inv;  // (x̂·G)/‖x‖
            const acc gi = g * inv;
            for (int64_t c = 0; c < k; ++c) drow[c] = static_cast<scalar_t>((grow[c] - static_cast<acc>(row[c]) * proj) * gi);
          } else {
            const acc gi = g / acc(kNormEps);
            for (int64_t c = 0; c < k; ++c) drow[c] = static_cast<scalar_t>(grow[c] * gi);
          }
        }
      });
    });
    return dx;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ssl_fwd_cpu(const at::Tensor& p, const at::Tensor& z,
                                                                                     double lambd, double mu, double gamma,
                                                                                     int64_t order) {
  return matrix_info::ssl_forward<CpuDev>(p, z, lambd, mu, gamma, order);
}

std::tuple<at::Tensor, at::Tensor> ssl_bwd_cpu(const at::Tensor& grad, const at::Tensor& p, const at::Tensor& z,
                                               const at::Tensor& xu, const at::Tensor& pa, const at::Tensor& xa,
                                               const at::Tensor& saved, double lambd, double mu, double gamma, int64_t order,
                                               bool need_p, bool need_z) {
  return matrix_info::ssl_backward<CpuDev>(grad, p, z, xu, pa, xa, saved, lambd, mu, gamma, order, need_p, need_z);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mce_fwd_cpu(const at::Tensor& p, const at::Tensor& q, int64_t order) {
  return matrix_info::mce_forward<CpuDev>(p, q, order);
}

std::tuple<at::Tensor, at::Tensor> mce_bwd_cpu(const at::Tensor& grad, const at::Tensor& p, const at::Tensor& x,
                                               const at::Tensor& saved, int64_t order, bool need_p, bool need_q) {
  return matrix_info::mce_backward<CpuDev>(grad, p, x, saved, order, need_p, need_q);
}

}  // namespace
}  // namespace sslops

TORCH_LIBRARY_IMPL(sslops, CPU, m) {
  m.impl("matrix_ssl_fwd_cxx", &sslops::ssl_fwd_cpu);
  m.impl("matrix_ssl_bwd_cxx", &sslops::ssl_bwd_cpu);
  m.impl("matrix_mce_fwd_cxx", &sslops::mce_fwd_cpu);
  m.impl("matrix_mce_bwd_cxx", &sslops::mce_bwd_cpu);
}
