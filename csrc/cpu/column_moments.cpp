// Column mean and centred sum of squares of z (N, K), two passes over the rows.
//
//   mean_k = Σ_n z_nk / N          m2_k = Σ_n (z_nk - mean_k)²
//
// The two-pass form keeps the centred sum accurate when |mean| >> std (a one-pass
// Σz² - N·mean² would cancel). Work is 3NK flops, traffic 2NK reads. Threads split the
// columns; each walks all rows over its column slice, so reads stay within a row.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "column_reduce.h"
#include "parallel.h"

namespace sslops {
namespace {

template <typename scalar_t>
void column_moments_kernel(const scalar_t* z, int64_t n, int64_t k, acc_t<scalar_t>* mean, acc_t<scalar_t>* m2) {
  using acc = acc_t<scalar_t>;
  parallel_for(k, 64, [&](int64_t c0, int64_t c1) {
    const int64_t width = c1 - c0;
    std::vector<acc> s(width, acc(0)), q(width, acc(0));
    column_slice_moments(z, n, k, c0, width, s.data(), q.data());
    for (int64_t c = 0; c < width; ++c) {
      mean[c0 + c] = s[c];
      m2[c0 + c] = q[c];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> column_moments_cpu(const at::Tensor& z_in) {
  TORCH_CHECK(z_in.dim() == 2, "column_moments_cxx: z must be 2-D, got ", z_in.dim(), "-D");
  TORCH_CHECK(z_in.size(0) >= 1, "column_moments_cxx: z needs at least one row");
  const at::Tensor z = z_in.contiguous();
  const auto acc_dtype = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({z.size(1)}, z.options().dtype(acc_dtype));
  at::Tensor m2 = at::empty({z.size(1)}, z.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "column_moments_cxx", [&] {
    column_moments_kernel<scalar_t>(z.data_ptr<scalar_t>(), z.size(0), z.size(1), mean.data_ptr<acc_t<scalar_t>>(),
                                    m2.data_ptr<acc_t<scalar_t>>());
  });
  return {mean, m2};
}

}  // namespace
}  // namespace sslops

TORCH_LIBRARY_IMPL(sslops, CPU, m) { m.impl("column_moments_cxx", &sslops::column_moments_cpu); }
