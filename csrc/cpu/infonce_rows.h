// The per-row loops of the blockwise contrastive pass as a table of function pointers, one
// table per vector ISA level (csrc/cpu/cpu_capability.h); the loops themselves are in
// csrc/cpu/infonce_rows_impl.h, their use in csrc/cpu/infonce.cpp.
#pragma once
#include <cstdint>

#include "cpu_capability.h"

namespace sslops {

template <typename acc>
struct ContrastiveRows {
  // xr_j = t·s_j on the in-batch columns [0, ib) when keep_neg (−inf otherwise), t·s_j on [ib, bc)
  void (*masked_logits)(const acc* s, acc* xr, acc t, bool keep_neg, int64_t ib, int64_t bc);
  acc (*span_max)(const acc* x, int64_t n);
  // Σ exp(xr − mx) below the maximum, the count at it, Σ exp(xr − mx)·s, added to the outputs
  void (*span_exp_sums)(const acc* xr, const acc* s, acc mx, int64_t n, acc& sum, acc& top, acc& ms);
  // labelled in-batch columns: logits, positives' sums and the max in one pass (unweighted, DCLW)
  acc (*span_logits_positives)(const acc* s, acc* xr, const int32_t* lab, int32_t li, bool keep_pos, bool keep_neg,
                               acc t, acc inv_sigma, int64_t j0, int64_t j1, acc* pos4);
  acc (*span_logits_positives_weighted)(const acc* s, acc* xr, const int32_t* lab, int32_t li, bool keep_pos,
                                        bool keep_neg, acc t, acc inv_sigma, int64_t j0, int64_t j1, acc* pos4);
  acc (*span_logits)(const acc* s, acc* xr, acc t, int64_t j0, int64_t j1);
  void (*span_sigmoid)(const acc* s, const int32_t* lab, int32_t li, acc t, acc b, int64_t n, acc* out4);
  // the backward's coefficients of one tile row, in place (unweighted, DCLW)
  void (*coef_row_softmax)(acc* s, const int32_t* lab, int32_t li, bool keep_pos, bool keep_neg, acc t, acc inv_sigma,
                           acc ar, acc lr, acc lor, acc gpr, acc gqr, const acc* ac, const acc* lc, const acc* loc,
                           const acc* gpc, const acc* gqc, int64_t ib, int64_t bc, const acc* keep_buf, bool rows_extra);
  void (*coef_row_softmax_weighted)(acc* s, const int32_t* lab, int32_t li, bool keep_pos, bool keep_neg, acc t,
                                    acc inv_sigma, acc ar, acc lr, acc lor, acc gpr, acc gqr, const acc* ac,
                                    const acc* lc, const acc* loc, const acc* gpc, const acc* gqc, int64_t ib, int64_t bc,
                                    const acc* keep_buf, bool rows_extra);
  void (*coef_row_sigmoid)(acc* s, const int32_t* lab, int32_t li, acc t, acc b, acc ar, const acc* ac, int64_t n);
};

// The loops compiled for `level` (defined for float and double).
template <typename acc>
const ContrastiveRows<acc>& contrastive_rows(CpuCapability level);

}  // namespace sslops
