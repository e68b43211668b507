// The contrastive pass's per-row loops (csrc/cpu/infonce_rows_impl.h) compiled once per vector
// ISA level, chosen per call (csrc/cpu/cpu_capability.h). On a 2-core Sapphire Rapids VM the
// avx2 loops run CLIP at N = 16384, K = 64 (fp32, forward + backward) in 2.9 s and the avx512
// loops in 2.2 s, against 4.5 s for the SSE2 baseline.
//
// Each level is the same source under `#pragma GCC target` (push/pop), in its own namespace.
// The standard headers are included first, outside the pragmas, so that no inline function
// they define is compiled for AVX: a baseline caller linked to such a copy would fault on a
// CPU without AVX. The tables are built outside the pragmas for the same reason.
//
// The loops' selects only if-convert (and so vectorise) when GCC may assume that float
// arithmetic does not trap; torch itself is built with -fno-trapping-math.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "infonce_rows.h"

#define SSLOPS_ROWS_NS rows_default
#include "infonce_rows_impl.h"
#undef SSLOPS_ROWS_NS

#if SSLOPS_X86_ISA_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SSLOPS_ROWS_NS rows_avx2
#include "infonce_rows_impl.h"
#undef SSLOPS_ROWS_NS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")
#define SSLOPS_ROWS_NS rows_avx512
#include "infonce_rows_impl.h"
#undef SSLOPS_ROWS_NS
#pragma GCC pop_options
#endif

// The table of one namespace's loops (taking their addresses runs no code of that level).
#define SSLOPS_ROWS_TABLE(NS)                                                                                         \
  ContrastiveRows<acc> {                                                                                             \
    &NS::masked_logits<acc>, &NS::span_max<acc>, &NS::span_exp_sums<acc>, &NS::span_logits_positives<acc, false>,   \
        &NS::span_logits_positives<acc, true>, &NS::span_logits<acc>, &NS::span_sigmoid<acc>,                       \
        &NS::coef_row_softmax<acc, false>, &NS::coef_row_softmax<acc, true>, &NS::coef_row_sigmoid<acc>              \
  }

namespace sslops {

template <typename acc>
const ContrastiveRows<acc>& contrastive_rows(CpuCapability level) {
#if SSLOPS_X86_ISA_DISPATCH
  static const ContrastiveRows<acc> avx512 = SSLOPS_ROWS_TABLE(rows_avx512);
  static const ContrastiveRows<acc> avx2 = SSLOPS_ROWS_TABLE(rows_avx2);
  if (level == CpuCapability::kAvx512) return avx512;
  if (level == CpuCapability::kAvx2) return avx2;
#endif
  static const ContrastiveRows<acc> baseline = SSLOPS_ROWS_TABLE(rows_default);
  (void)level;
  return baseline;
}

template const ContrastiveRows<float>& contrastive_rows<float>(CpuCapability);
template const ContrastiveRows<double>& contrastive_rows<double>(CpuCapability);

}  // namespace sslops
