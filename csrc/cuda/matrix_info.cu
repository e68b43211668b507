// Matrix-SSL on the GPU: fused row passes and trace reductions around cuBLAS products.
//
// The orchestration (math, gradient, what is saved) is shared with the CPU kernels:
// csrc/cpu/matrix_info_impl.h. The K×K and N×K products are at::mm (cuBLAS, TF32 when
// torch.backends.cuda.matmul.allow_tf32 is set); the kernels here are the rest:
//   normalize_rows_kernel      one block per row: ‖x_n‖ by a block reduction, then x̂ written
//                              in the accumulation dtype (column means subtracted by ATen;
//                              the small K×K linear combinations are ATen ops too)
//   trace_dot_kernel           32×32 tiles of Σ A_ij B_ji (B's tile staged through shared
//                              memory so both reads coalesce), one fp64 partial per tile,
//                              summed by at::sum in a fixed order: deterministic
//   normalize_backward_kernel  one block per row: dx = g·(G - x̂(x̂·G)) / ‖x‖, g read on the device
// Matrix cross-entropy (mce_forward/mce_backward of the same header) uses trace_dot_kernel for
// tr(A_{k-1}·X) and ATen for the rest: order 4 is 3 K×K products forward, 5 backward.
// Matrix-SSL per call, order 4: forward 5NK² + 8K³ flops (6NK² for K < 128), backward 8NK² + 6K³; traffic beyond the
// GEMMs ~ 3 passes over N×K and 2K² per trace. Not yet run on a GPU (cuda_verified=False).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>

#include "../cpu/matrix_info_impl.h"
#include "stream.h"

namespace sslops {
namespace {

constexpr int kRowThreads = 256;
constexpr int kTile = 32;

template <typename T>
__device__ T block_sum(T v, T* shared) {
  const int tid = threadIdx.x;
  shared[tid] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) shared[tid] += shared[tid + s];
    __syncthreads();
  }
  const T out = shared[0];
  __syncthreads();
  return out;
}

template <typename scalar_t, typename acc_t>
__global__ void normalize_rows_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ w, int64_t k, int64_t ld_w,
                                      int64_t col0) {
  __shared__ acc_t shared[kRowThreads];
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * k;
  acc_t* wr = w + row * ld_w + col0;
  acc_t ss = 0;
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) {
    const acc_t v = static_cast<acc_t>(xr[c]);
    ss += v * v;
  }
  const acc_t nrm = sqrt(block_sum(ss, shared));
  const acc_t inv = acc_t(1) / (nrm > acc_t(1e-12) ? nrm : acc_t(1e-12));
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) wr[c] = static_cast<acc_t>(xr[c]) * inv;
}

template <typename scalar_t, typename acc_t>
__global__ void normalize_backward_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ g, scalar_t* __restrict__ dx,
                                          int64_t k, int64_t ld_g, int64_t col0, const acc_t* __restrict__ gscale) {
  __shared__ acc_t shared[kRowThreads];
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * k;
  const acc_t* gr = g + row * ld_g + col0;
  scalar_t* dr = dx + row * k;
  acc_t ss = 0, dot = 0;
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) {
    const acc_t v = static_cast<acc_t>(xr[c]);
    ss += v * v;
    dot += v * gr[c];
  }
  const acc_t nrm = sqrt(block_sum(ss, shared));
  dot = block_sum(dot, shared);
  const bool big = nrm > acc_t(1e-12);
  const acc_t inv = big ? acc_t(1) / nrm : acc_t(1e12);
  const acc_t proj = big ? dot * inv * inv : acc_t(0);
  const acc_t gi = gscale[0] * inv;  // the incoming gradient, read on the device (no host sync)
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x)
    dr[c] = static_cast<scalar_t>((gr[c] - static_cast<acc_t>(xr[c]) * proj) * gi);
}

template <typename acc_t>
__global__ void trace_dot_kernel(const acc_t* __restrict__ a, const acc_t* __restrict__ b, double* __restrict__ part, int64_t k) {
  __shared__ acc_t bt[kTile][kTile + 1];
  __shared__ double red[kTile * 8];
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile, j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;  // 32 × 8
  // stage B[j0.., i0..] (rows j, columns i) so that bt[jj][ii] = B[j0+jj][i0+ii]
  for (int r = ty; r < kTile; r += 8) {
    const int64_t j = j0 + r, i = i0 + tx;
    bt[r][tx] = (j < k && i < k) ? b[j * k + i] : acc_t(0);
  }
  __syncthreads();
  double s = 0;
  for (int r = ty; r < kTile; r += 8) {
    const int64_t i = i0 + r, j = j0 + tx;
    if (i < k && j < k) s += static_cast<double>(a[i * k + j] * bt[tx][r]);
  }
  red[ty * kTile + tx] = s;
  __syncthreads();
  if (ty == 0 && tx == 0) {
    double t = 0;
    for (int q = 0; q < kTile * 8; ++q) t += red[q];
    part[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = t;
  }
}

struct CudaDev {
  static void normalize_centre(const at::Tensor& x_in, at::Tensor& w, int64_t col0) {
    const at::Tensor x = x_in.contiguous();
    const int64_t n = x.size(0), k = x.size(1);
    cudaStream_t stream = current_cuda_stream(x.device().index());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "matrix_ssl normalize_rows", [&] {
      using acc = at::opmath_type<scalar_t>;
      normalize_rows_kernel<scalar_t, acc><<<static_cast<unsigned>(n), kRowThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), w.data_ptr<acc>(), k, w.stride(0), col0);
    });
    SSLOPS_CUDA_CHECK_LAUNCH();
  }

  // W = [p̂ - mean | ẑ - mean]: the row kernels, then one column-mean subtraction over both halves.
  static void rows_forward(const at::Tensor& p, const at::Tensor& z, at::Tensor& w) {
    normalize_centre(p, w, 0);
    normalize_centre(z, w, p.size(1));
    w.sub_(w.mean(0, /*keepdim=*/true));
  }

  static void gemm(const at::Tensor& out_in, const at::Tensor& a, const at::Tensor& b, double beta) {
    at::Tensor out = out_in;
    at::addmm_out(out, out, a, b, beta, 1.0);  // out = beta·out + a·b (cuBLAS)
  }

  static void gemm_sym(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) { gemm(out, a, b, beta); }

  static at::Tensor trace(const at::Tensor& a) { return a.diagonal().sum(); }

  static at::Tensor trace_dot_sym(const at::Tensor& a, const at::Tensor& b) { return trace_dot(a, b); }

  static void lincomb(at::Tensor out, const std::vector<matrix_info::Term>& terms, double diag) {
    matrix_info::lincomb_aten(out, terms, diag);
  }

  static at::Tensor trace_dot(const at::Tensor& a_in, const at::Tensor& b_in) {
    const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
    const int64_t k = a.size(0);
    const unsigned tiles = static_cast<unsigned>((k + kTile - 1) / kTile);
    at::Tensor part = at::empty({static_cast<int64_t>(tiles) * tiles}, a.options().dtype(at::kDouble));
    cudaStream_t stream = current_cuda_stream(a.device().index());
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "matrix_ssl trace_dot", [&] {
      trace_dot_kernel<scalar_t><<<dim3(tiles, tiles), dim3(kTile, 8), 0, stream>>>(a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                                                                                  part.data_ptr<double>(), k);
    });
    SSLOPS_CUDA_CHECK_LAUNCH();
    return part.sum().to(a.scalar_type());
  }

  static at::Tensor rows_backward(const at::Tensor& x_in, const at::Tensor& gw, int64_t col0, const at::Tensor& gscale) {
    const at::Tensor x = x_in.contiguous();
    const int64_t n = x.size(0), k = x.size(1);
    TORCH_CHECK(gw.stride(1) == 1, "rows_backward: G must be row-major");
    at::Tensor dx = at::empty_like(x);
    cudaStream_t stream = current_cuda_stream(x.device().index());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "matrix_ssl rows_backward", [&] {
      using acc = at::opmath_type<scalar_t>;
      normalize_backward_kernel<scalar_t, acc><<<static_cast<unsigned>(n), kRowThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), gw.data_ptr<acc>(), dx.data_ptr<scalar_t>(), k, gw.stride(0), col0, gscale.data_ptr<acc>());
    });
    SSLOPS_CUDA_CHECK_LAUNCH();
    return dx;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ssl_fwd_cuda(const at::Tensor& p, const at::Tensor& z,
                                                                                      double lambd, double mu, double gamma,
                                                                                      int64_t order) {
  c10::DeviceGuard guard(p.device());
  return matrix_info::ssl_forward<CudaDev>(p, z, lambd, mu, gamma, order);
}

std::tuple<at::Tensor, at::Tensor> ssl_bwd_cuda(const at::Tensor& grad, const at::Tensor& p, const at::Tensor& z,
                                                const at::Tensor& xu, const at::Tensor& pa, const at::Tensor& xa,
                                                const at::Tensor& saved, double lambd, double mu, double gamma, int64_t order,
                                                bool need_p, bool need_z) {
  c10::DeviceGuard guard(p.device());
  return matrix_info::ssl_backward<CudaDev>(grad, p, z, xu, pa, xa, saved, lambd, mu, gamma, order, need_p, need_z);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mce_fwd_cuda(const at::Tensor& p, const at::Tensor& q, int64_t order) {
  c10::DeviceGuard guard(p.device());
  return matrix_info::mce_forward<CudaDev>(p, q, order);
}

std::tuple<at::Tensor, at::Tensor> mce_bwd_cuda(const at::Tensor& grad, const at::Tensor& p, const at::Tensor& x,
                                                const at::Tensor& saved, int64_t order, bool need_p, bool need_q) {
  c10::DeviceGuard guard(p.device());
  return matrix_info::mce_backward<CudaDev>(grad, p, x, saved, order, need_p, need_q);
}

}  // namespace
}  // namespace sslops

TORCH_LIBRARY_IMPL(sslops, CUDA, m) {
  m.impl("matrix_ssl_fwd_cxx", &sslops::ssl_fwd_cuda);
  m.impl("matrix_ssl_bwd_cxx", &sslops::ssl_bwd_cuda);
  m.impl("matrix_mce_fwd_cxx", &sslops::mce_fwd_cuda);
  m.impl("matrix_mce_bwd_cxx", &sslops::mce_bwd_cuda);
}
