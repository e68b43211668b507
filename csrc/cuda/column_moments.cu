// Column mean and centred sum of squares of z (N, K) on the GPU (see csrc/cpu/column_moments.cpp).
//
// Grid (32-column slices) × (row chunks), column_chunk_kernel in column_reduce.cuh; with several
// chunks their (mean, m2) are merged by column_merge_kernel in chunk order (deterministic, no
// atomics). 3NK flops, 2NK reads (+ 4·chunks·K bytes of partials when split).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>

#include "column_reduce.cuh"
#include "stream.h"

namespace sslops {
namespace {

std::tuple<at::Tensor, at::Tensor> column_moments_cuda(const at::Tensor& z_in) {
  TORCH_CHECK(z_in.dim() == 2, "column_moments_cxx: z must be 2-D, got ", z_in.dim(), "-D");
  TORCH_CHECK(z_in.size(0) >= 1, "column_moments_cxx: z needs at least one row");
  c10::DeviceGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous();
  const int64_t n = z.size(0), k = z.size(1);
  const auto acc_dtype = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({k}, z.options().dtype(acc_dtype));
  at::Tensor m2 = at::empty({k}, z.options().dtype(acc_dtype));
  if (k == 0) return {mean, m2};
  const int64_t col_blocks = (k + kColumnSlice - 1) / kColumnSlice;
  const std::pair<int64_t, int64_t> split = row_chunks(n, col_blocks, z.device().index());
  const int64_t chunk = split.first, chunks = split.second;
  const dim3 block(kColumnSlice, kRowStride);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks));
  cudaStream_t stream = current_cuda_stream(z.device().index());
  // one chunk: the chunk kernel writes the results; several: (chunks, K) partials, then the merge
  at::Tensor pmean = chunks == 1 ? mean : at::empty({chunks, k}, mean.options().dtype(at::kDouble));
  at::Tensor pm2 = chunks == 1 ? m2 : at::empty({chunks, k}, m2.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "column_moments_cxx", [&] {
    using acc = at::opmath_type<scalar_t>;
    column_chunk_kernel<scalar_t, acc><<<grid, block, 0, stream>>>(
        z.data_ptr<scalar_t>(), nullptr, n, k, chunk, chunks == 1 ? mean.data_ptr<acc>() : nullptr,
        chunks == 1 ? nullptr : pmean.data_ptr<double>(), pm2.data_ptr<acc>(), nullptr);
    if (chunks > 1) {
      SSLOPS_CUDA_CHECK_LAUNCH();
      const unsigned merge_blocks = static_cast<unsigned>((k + kMergeThreads - 1) / kMergeThreads);
      column_merge_kernel<acc><<<merge_blocks, kMergeThreads, 0, stream>>>(pmean.data_ptr<double>(), pm2.data_ptr<acc>(), nullptr, n, k,
                                                                          chunk, chunks, mean.data_ptr<acc>(), m2.data_ptr<acc>(),
                                                                          nullptr, nullptr, acc(0));
    }
  });
  SSLOPS_CUDA_CHECK_LAUNCH();
  return {mean, m2};
}

}  // namespace
}  // namespace sslops

TORCH_LIBRARY_IMPL(sslops, CUDA, m) { m.impl("column_moments_cxx", &sslops::column_moments_cuda); }
