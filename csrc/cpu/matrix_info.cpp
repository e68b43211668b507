// Matrix-SSL and matrix cross-entropy on the CPU: the row stages, trace reductions and
// linear combinations around single-thread BLAS products.
//
// Math, gradient and what is saved: see matrix_info_impl.h (and sslops/ops/matrix_info.py).
// Parallelism: a few coarse parallel regions, each thread running whole single-thread BLAS
// calls (BLAS inside a parallel region runs serially), never the BLAS library's own threads,
// which spin and synchronise inside every call and collapse on a machine whose cores are
// shared (see CpuDev::gemm). Kernels here:
//   row_stats           one read of p and z: inverse row norms, column means of the
//                       normalised rows (double sums per thread, merged in thread order)
//   centred_rows        rows of W = [p̂ - mean | ẑ - mean] from the statistics
//   ssl_fwd_cpu         W once (N×2K), then Sp, C, Sz by row-panel GEMMs dealt to the threads
//                       longest first (on and above the block diagonal only: 4.5NK² flops at
//                       K = 512, see column_blocks), written into P, Xu, Xa; W freed before
//                       the K×K stage (kk_forward)
//   ssl_bwd_cpu         the K×K gradients (kk_backward), scaled, then blocks of rows, one
//                       thread each: centred rows rebuilt, GEMMs of inner dimension 2K into a
//                       block buffer, normalisation backward into dp/dz
//   trace_dot(A, B)     Σ_ij A_ij B_ji over 64×64 tiles (B's tile transposed into a local
//                       buffer, SIMD dots), fp64 across rows: 2K² flops, 2K² reads, no product;
//                       trace_dot_sym for symmetric B reads both row-major
//   lincomb             Σ c_i T_i + d·I in one pass (strided operands by 64×64 tiles)
// Matrix-SSL per call (order n = 4, fp32, N rows, K = 512 features): forward 4.5NK² + 3.75·2K³
// flops, backward 8NK² + 2.75·2K³ (online branch z alone: 4NK² + 2·2K³). Memory beyond the inputs:
// forward the N×2K centred rows (freed before the K×K stage) and 3 + (h-1) + (n-1) = 7 saved
// K×K matrices; backward 2-4 K×K gradient matrices (R freed once R + Rᵀ is formed), per
// thread a block of ≤ 256 rows × 3K (≤ 2 MB), and dp, dz.
// Matrix cross-entropy (mce_forward/mce_backward in matrix_info_impl.h) reuses gemm,
// trace_dot, trace and lincomb: forward (n-1)·2K³ flops + n trace_dots (2K² each), backward
// (h-1 + PS products)·2K³ for p and (n-1)·2K³ for q plus ~n²/2 K² lincomb reads; saved
// X and A_1..A_{n-1} (n K×K matrices).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "matrix_info_impl.h"
#include "parallel.h"
#include "parallel_ops.h"

namespace sslops {
namespace {

constexpr double kNormEps = 1e-12;  // F.normalize's eps
constexpr int64_t kTile = 64;
// Passes over fewer elements than this run on one thread (a parallel region costs more
// than it saves there); K×K passes from K = 256 up use every thread.
constexpr int64_t kSerialElements = int64_t(1) << 16;

struct CpuDev {
  // out = beta·out + a·b. Rows of out split evenly over the threads, one single-thread BLAS
  // call each (BLAS called inside a parallel region runs serially): one fork/join per
  // product instead of the BLAS library's own threading, which spins and synchronises
  // inside every call and collapses when the cores are shared (measured 2026-11-23 on the
  // loaded 2-core machine, 8 products 128×1024×512: 316 ms with BLAS threads, 72 ms so).
  static void gemm(const at::Tensor& out_in, const at::Tensor& a, const at::Tensor& b, double beta) {
    at::Tensor out = out_in;
    const int64_t m = out.size(0), threads = at::get_num_threads();
    if (threads <= 1 || at::in_parallel_region() || m < 64) {
      at::addmm_out(out, out, a, b, beta, 1.0);
      return;
    }
    const int64_t chunk = (m + threads - 1) / threads;
    parallel_for_ops(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * chunk, rows = std::min(chunk, m - r0);
        if (rows <= 0) continue;
        at::Tensor o = out.narrow(0, r0, rows);
        at::addmm_out(o, o, a.narrow(0, r0, rows), b, beta, 1.0);
      }
    });
  }

  // out = beta·out + a·b when the result (and out, for beta ≠ 0) is symmetric: from K = 128 the
  // rows [0, K/2) and the block [K/2, K)² only (3/4 of the flops), as six equal tasks (row
  // halves of the three blocks: one fork/join on two threads), then the lower-left block copied
  // from the transposed upper-right one.
  static void gemm_sym(const at::Tensor& out_in, const at::Tensor& a, const at::Tensor& b, double beta) {
    at::Tensor out = out_in;
    const int64_t k = out.size(0);
    if (k < 128 || out.size(1) != k) {
      gemm(out, a, b, beta);
      return;
    }
    const int64_t k1 = k / 2, k2 = k - k1;
    const int64_t parts[6][4] = {{0, k1 / 2, 0, k1},  {k1 / 2, k1 - k1 / 2, 0, k1},  {0, k1 / 2, k1, k2},
                                 {k1 / 2, k1 - k1 / 2, k1, k2}, {k1, k2 / 2, k1, k2}, {k1 + k2 / 2, k2 - k2 / 2, k1, k2}};
    auto run = [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t* q = parts[t];
        at::Tensor o = out.narrow(0, q[0], q[1]).narrow(1, q[2], q[3]);
        at::addmm_out(o, o, a.narrow(0, q[0], q[1]), b.narrow(1, q[2], q[3]), beta, 1.0);
      }
    };
    if (at::get_num_threads() > 1 && !at::in_parallel_region()) {
      parallel_for_ops(0, 6, 1, run);
    } else {
      run(0, 6);
    }
    lincomb(out.narrow(0, k1, k2).narrow(1, 0, k1), {{1.0, out.narrow(0, 0, k1).narrow(1, k1, k2).t()}}, 0.0);
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

};

// ----------------------------------------------------------------------------- Matrix-SSL rows

// Per-row inverse norms 1/max(‖x_r‖, 1e-12) of p and z and the column means of the
// normalised rows: one pass over both inputs; column sums over spans of 64 rows in the acc
// dtype, added per thread in double, merged in thread order (the same partition, hence the
// same means, in the forward and the backward).
template <typename acc>
struct RowStats {
  std::vector<acc> inv;   // [p's N rows | z's N rows]
  std::vector<acc> mean;  // [p̂'s K columns | ẑ's K columns]
};

template <typename scalar_t, typename acc>
RowStats<acc> row_stats(const scalar_t* pp, const scalar_t* zp, int64_t n, int64_t k) {
  RowStats<acc> st;
  st.inv.resize(static_cast<size_t>(2 * n));
  st.mean.assign(static_cast<size_t>(2 * k), acc(0));
  const int64_t slots = at::get_num_threads();
  std::vector<double> sums(static_cast<size_t>(slots * 2 * k), 0.0);
  constexpr int64_t kSpan = 64;  // rows summed in acc (SIMD) before each add into double: error independent of N
  at::parallel_for(0, n, kSpan, [&](int64_t r0, int64_t r1) {
    double* s = sums.data() + std::min<int64_t>(at::get_thread_num(), slots - 1) * 2 * k;
    std::vector<acc> part(static_cast<size_t>(2 * k));
    for (int64_t s0 = r0; s0 < r1; s0 += kSpan) {
      std::fill(part.begin(), part.end(), acc(0));
      for (int64_t r = s0; r < std::min(r1, s0 + kSpan); ++r)
        for (int64_t half = 0; half < 2; ++half) {
          const scalar_t* row = (half ? zp : pp) + r * k;
          acc ss = 0;
_Pragma("omp simd reduction(+ : ss)")
          for (int64_t c = 0; c < k; ++c) ss += static_cast<acc>(row[c]) * static_cast<acc>(row[c]);
          const acc nrm = std::sqrt(ss);
          const acc inv = acc(1) / (nrm > acc(kNormEps) ? nrm : acc(kNormEps));
          st.inv[half * n + r] = inv;
          acc* ph = part.data() + half * k;
_Pragma("omp simd")
          for (int64_t c = 0; c < k; ++c) ph[c] += static_cast<acc>(row[c]) * inv;
        }
      for (int64_t c = 0; c < 2 * k; ++c) s[c] += static_cast<double>(part[c]);
    }
  });
  std::vector<double> total(static_cast<size_t>(2 * k), 0.0);
  for (int64_t t = 0; t < slots; ++t)
    for (int64_t c = 0; c < 2 * k; ++c) total[c] += sums[t * 2 * k + c];
  for (int64_t c = 0; c < 2 * k; ++c) st.mean[c] = static_cast<acc>(total[c] / static_cast<double>(n));
  return st;
}

// Rows r0..r0+m of W = [p̂ - mean p̂ | ẑ - mean ẑ] into `w` (row stride 2K).
template <typename scalar_t, typename acc>
void centred_rows(const scalar_t* pp, const scalar_t* zp, int64_t n, int64_t k, const RowStats<acc>& st, int64_t r0, int64_t m,
                  acc* w) {
  for (int64_t r = r0; r < r0 + m; ++r)
    for (int64_t half = 0; half < 2; ++half) {
      const scalar_t* row = (half ? zp : pp) + r * k;
      const acc inv = st.inv[half * n + r];
      const acc* mean = st.mean.data() + half * k;
      acc* out = w + (r - r0) * 2 * k + half * k;
_Pragma("omp simd")
      for (int64_t c = 0; c < k; ++c) out[c] = static_cast<acc>(row[c]) * inv - mean[c];
    }
}

// Row-wise normalisation backward for rows r0..r0+m: dx = (G - x̂ (x̂·G)) / ‖x‖, or G / 1e-12
// below the clamp (F.normalize's gradient), G read from `g` (row stride ldg, acc dtype).
template <typename scalar_t, typename acc>
void normalize_backward_rows(const scalar_t* xp, const acc* g, int64_t ldg, scalar_t* dx, int64_t k, int64_t r0, int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    const scalar_t* row = xp + (r0 + i) * k;
    const acc* grow = g + i * ldg;
    scalar_t* drow = dx + (r0 + i) * k;
    acc ss = 0, dot = 0;
_Pragma("omp simd reduction(+ : ss, dot)")
    for (int64_t c = 0; c < k; ++c) {
      const acc v = static_cast<acc>(row[c]);
      ss += v * v;
      dot += v * grow[c];
    }
    const acc nrm = std::sqrt(ss);
    if (nrm > acc(kNormEps)) {
      const acc inv = acc(1) / nrm, proj = dot * inv * inv;  // (x̂·G)/‖x‖
_Pragma("omp simd")
      for (int64_t c = 0; c < k; ++c) drow[c] = static_cast<scalar_t>((grow[c] - static_cast<acc>(row[c]) * proj) * inv);
    } else {
      const acc inv = acc(1) / acc(kNormEps);
_Pragma("omp simd")
      for (int64_t c = 0; c < k; ++c) drow[c] = static_cast<scalar_t>(grow[c] * inv);
    }
  }
}

// Column panels of the covariance GEMMs: the Gram matrix of W = [pc | zc] is wanted on and
// above the block diagonal only (Sp and Sz are symmetric; C is the whole upper-right block),
// so each panel of `width` columns multiplies only from its own diagonal block rightwards:
// 4NK²·(B+1)/B flops for B panels per half instead of 6NK² for the three full products
// (K = 512, 128-wide panels: 4.5NK²). Panels narrower than 128 columns run BLAS well below
// its peak, so K < 256 takes halves (5NK²) and K < 128 one panel (6NK²).
std::vector<int64_t> column_blocks(int64_t k) {
  const int64_t width = k >= 256 ? 128 : (k >= 128 ? (k + 1) / 2 : k);
  std::vector<int64_t> bounds;
  for (int64_t c = 0; c < k; c += width) bounds.push_back(c);
  bounds.push_back(k);
  return bounds;
}

// m ← its symmetric completion: blocks below the block diagonal copied from the transposed
// blocks above it, diagonal blocks replaced by (B + Bᵀ)/2 (exactly symmetric), then
// diag added on the diagonal. Pairs of 64×64 tiles on or below the diagonal, split evenly
// over the threads (each upper element is written by the one tile pair that owns it).
void symmetric_completion(at::Tensor& m, const std::vector<int64_t>& blocks, double diag) {
  const int64_t k = m.size(0);
  const int64_t tiles = (k + kTile - 1) / kTile;
  std::vector<int64_t> block_of(static_cast<size_t>(k));
  for (size_t b = 0; b + 1 < blocks.size(); ++b)
    for (int64_t i = blocks[b]; i < blocks[b + 1]; ++i) block_of[i] = static_cast<int64_t>(b);
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t ti = 0; ti < tiles; ++ti)
    for (int64_t tj = 0; tj <= ti; ++tj) pairs.emplace_back(ti, tj);
  const int64_t grain = std::max<int64_t>(1, kSerialElements / (kTile * kTile));
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "matrix_ssl symmetric_completion", [&] {
    scalar_t* mp = m.data_ptr<scalar_t>();
    const scalar_t d = static_cast<scalar_t>(diag);
    at::parallel_for(0, static_cast<int64_t>(pairs.size()), grain, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t ti = pairs[q].first, tj = pairs[q].second;
        for (int64_t i = ti * kTile; i < std::min(k, (ti + 1) * kTile); ++i) {
          for (int64_t j = tj * kTile; j < std::min({k, (tj + 1) * kTile, i}); ++j) {
            scalar_t& lower = mp[i * k + j];
            scalar_t& upper = mp[j * k + i];
            if (block_of[i] != block_of[j]) {
              lower = upper;
            } else {
              const scalar_t v = (lower + upper) / scalar_t(2);
              lower = upper = v;
            }
          }
          if (ti == tj) mp[i * k + i] += d;
        }
      }
    });
  });
}

// Forward, CPU: the row statistics, W = [pc | zc] once (N × 2K), then the three covariances
// (on and above the block diagonal of the symmetric Sp and Sz only, see column_blocks) written
// straight into P, Xu, Xa; W is freed before the K×K stage.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ssl_fwd_cpu(const at::Tensor& p_in, const at::Tensor& z_in,
                                                                                     double lambd, double mu, double gamma,
                                                                                     int64_t order) {
  NoAutocast no_autocast;  // the at:: products below stay in the accumulation dtype (csrc/no_autocast.h)
  TORCH_CHECK(p_in.dim() == 2 && p_in.sizes() == z_in.sizes(), "matrix_ssl_fwd_cxx: p and z must be (N, K) of one shape");
  TORCH_CHECK(p_in.scalar_type() == z_in.scalar_type(), "matrix_ssl_fwd_cxx: p and z must have one dtype");
  TORCH_CHECK(order >= 1, "matrix_ssl_fwd_cxx: order must be >= 1");
  const at::Tensor p = p_in.contiguous(), z = z_in.contiguous();
  const int64_t n = p.size(0), k = p.size(1);
  const auto opt = p.options().dtype(p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor w = at::empty({n, 2 * k}, opt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "matrix_ssl rows_forward", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t *pp = p.data_ptr<scalar_t>(), *zp = z.data_ptr<scalar_t>();
    const RowStats<acc> st = row_stats<scalar_t, acc>(pp, zp, n, k);
    acc* wp = w.data_ptr<acc>();
    at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) { centred_rows<scalar_t, acc>(pp, zp, n, k, st, r0, r1 - r0, wp + r0 * 2 * k); });
  });
  at::Tensor xu = at::empty({k, k}, opt), pa = at::empty({k, k}, opt), xa = at::empty({k, k}, opt);
  {
    // Per column panel [c0, c1) of the K features: P rows c0..c1 from column c0 on (pc panelᵀ·pc),
    // Xu rows c0..c1 whole (pc panelᵀ·zc), Xa rows c0..c1 from column c0 on (zc panelᵀ·zc): GEMMs
    // of inner dimension N with long rows, which BLAS runs near its peak. With T ≥ 2 threads and
    // at least 2T tasks, the tasks are dealt to T lines by longest-first (one fork/join, each
    // line on one thread, single-thread BLAS); otherwise they run in turn on BLAS's own threads.
    const std::vector<int64_t> bl = column_blocks(k);
    struct Task {
      at::Tensor dst, a, b;
      int64_t work;
    };
    const at::Tensor pc = w.narrow(1, 0, k), zc = w.narrow(1, k, k);
    std::vector<Task> tasks;
    for (size_t i = 0; i + 1 < bl.size(); ++i) {
      const int64_t c0 = bl[i], width = bl[i + 1] - c0, rest = k - c0;
      tasks.push_back({pa.narrow(0, c0, width).narrow(1, c0, rest), pc.narrow(1, c0, width), pc.narrow(1, c0, rest), width * rest});
      tasks.push_back({xu.narrow(0, c0, width), pc.narrow(1, c0, width), zc, width * k});
      tasks.push_back({xa.narrow(0, c0, width).narrow(1, c0, rest), zc.narrow(1, c0, width), zc.narrow(1, c0, rest), width * rest});
    }
    const double inv_n = 1.0 / static_cast<double>(n);
    auto run = [&](const Task& t) {
      at::Tensor dst = t.dst;
      at::addmm_out(dst, dst, t.a.t(), t.b, /*beta=*/0, /*alpha=*/inv_n);
    };
    const int64_t ntasks = static_cast<int64_t>(tasks.size()), threads = at::get_num_threads();
    if (threads >= 2 && ntasks >= 2 * threads && !at::in_parallel_region()) {
      std::vector<std::vector<int64_t>> lines(static_cast<size_t>(threads));
      std::vector<int64_t> load(static_cast<size_t>(threads), 0), order(static_cast<size_t>(ntasks));
      for (int64_t t = 0; t < ntasks; ++t) order[t] = t;
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return tasks[a].work > tasks[b].work; });
      for (int64_t t : order) {
        const auto least = std::min_element(load.begin(), load.end()) - load.begin();
        lines[least].push_back(t);
        load[least] += tasks[t].work;
      }
      parallel_for_ops(0, threads, 1, [&](int64_t l0, int64_t l1) {
        for (int64_t l = l0; l < l1; ++l)
          for (int64_t t : lines[l]) run(tasks[t]);
      });
    } else {
      for (const Task& t : tasks) run(t);
    }
    tasks.clear();
    w.reset();
    symmetric_completion(pa, bl, mu);
    symmetric_completion(xa, bl, mu - 1.0);
    xu.diagonal().add_(mu - 1.0);
  }
  at::Tensor saved = at::empty({matrix_info::saved_count(order), k, k}, opt);
  at::Tensor loss = matrix_info::kk_forward<CpuDev>(xu, pa, xa, saved, lambd, gamma, order);
  return {loss, xu, pa, xa, saved};
}

// Backward, CPU. The K×K gradients (matrix_info::kk_backward), scaled (su = -λg/N, sa = -2γg/N):
//   dpc = [pc | zc] · [sa·f; su·q],   dzc = pc · (su·q)ᵀ + zc · sa·(R + Rᵀ)
// then one parallel pass over blocks of rows, each block on one thread: its centred rows
// rebuilt from the row statistics (recomputed: one read of p and z), single-thread GEMMs
// into a block buffer (inner dimension 2K per input), and the normalisation backward written
// straight into dp, dz. No N×2K buffer and no synchronisation between the blocks.
std::tuple<at::Tensor, at::Tensor> ssl_bwd_cpu(const at::Tensor& grad, const at::Tensor& p_in, const at::Tensor& z_in,
                                               const at::Tensor& xu, const at::Tensor& pa, const at::Tensor& xa,
                                               const at::Tensor& saved, double lambd, double mu, double gamma, int64_t order,
                                               bool need_p, bool need_z) {
  NoAutocast no_autocast;  // csrc/no_autocast.h
  const at::Tensor p = p_in.contiguous(), z = z_in.contiguous();
  const int64_t n = p.size(0), k = p.size(1);
  const auto out_opt = p.options().memory_format(at::MemoryFormat::Contiguous);
  // a gradient nobody asked for is an empty (0,) tensor, not N×K zeros (the op's contract)
  at::Tensor dp = at::empty(need_p ? p.sizes() : at::IntArrayRef{0}, out_opt);
  at::Tensor dz = at::empty(need_z ? z.sizes() : at::IntArrayRef{0}, out_opt);
  if (!need_p && !need_z) return {dp, dz};
  const double g = grad.to(at::kDouble).item<double>();  // a CPU scalar: no device sync
  const auto opt = xu.options();
  // q and f are written by their last Horner step straight into their places, scaled:
  //   left = [sa·f; su·q] (2K × K) when p needs a gradient, else su·q alone (K × K);
  //   sym = sa·(R + Rᵀ) when z does. BLAS reads qᵀ as a transposed operand: no transpose pass.
  const double su = -lambd * g / static_cast<double>(n), sa = -2.0 * gamma * g / static_cast<double>(n);
  at::Tensor left = at::empty({need_p ? 2 * k : k, k}, opt), sym;
  const at::Tensor qs = need_p ? left.narrow(0, k, k) : left;  // su·q
  {
    matrix_info::KKTargets to;
    to.s_q = su;
    to.s_f = sa;
    to.q = qs;
    if (need_p) to.f = left.narrow(0, 0, k);
    const matrix_info::KKGrads kk = matrix_info::kk_backward<CpuDev>(xu, pa, xa, saved, order, need_p, need_z, to);
    if (need_z) {
      sym = at::empty({k, k}, opt);
      CpuDev::lincomb(sym, {{sa, kk.r}, {sa, kk.r.t()}}, 0.0);
    }
  }  // R freed: left and sym hold all the backward needs
  // rows per block: up to 256 (BLAS re-packs its operands for every block: from 256 rows that
  // costs little; at 64 rows the GEMM ran 40% slower, measured), at most N/(2·threads) so every
  // thread gets blocks, buffers (rows × 3K fp32) within 2 MB per thread; at least 16
  const int64_t rows =
      std::max<int64_t>(16, std::min<int64_t>({256, n / (2 * at::get_num_threads()), (int64_t(1) << 19) / std::max<int64_t>(1, 3 * k)}));
  const int64_t blocks = (n + rows - 1) / rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "matrix_ssl rows_backward", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t *pp = p.data_ptr<scalar_t>(), *zp = z.data_ptr<scalar_t>();
    const RowStats<acc> st = row_stats<scalar_t, acc>(pp, zp, n, k);
    parallel_for_ops(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      at::Tensor wb = at::empty({rows, 2 * k}, opt), gb = at::empty({rows, k}, opt);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * rows, m = std::min(rows, n - r0);
        at::Tensor w = wb.narrow(0, 0, m), gv = gb.narrow(0, 0, m);
        centred_rows<scalar_t, acc>(pp, zp, n, k, st, r0, m, wb.data_ptr<acc>());
        if (need_p) {  // dpc = [pc | zc]·[sa·f; su·q]
          at::mm_out(gv, w, left);
          normalize_backward_rows<scalar_t, acc>(pp, gb.data_ptr<acc>(), k, dp.data_ptr<scalar_t>(), k, r0, m);
        }
        if (need_z) {  // dzc = pc·(su·q)ᵀ + zc·sa·(R + Rᵀ)
          at::mm_out(gv, w.narrow(1, 0, k), qs.t());
          at::addmm_out(gv, gv, w.narrow(1, k, k), sym, /*beta=*/1, /*alpha=*/1);
          normalize_backward_rows<scalar_t, acc>(zp, gb.data_ptr<acc>(), k, dz.data_ptr<scalar_t>(), k, r0, m);
        }
      }
    });
  });
  return {dp, dz};
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
