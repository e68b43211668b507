// Autocast off inside a kernel (csrc/cpu and csrc/cuda alike).
//
// The kernels call at:: ops (at::mm, at::addmm_out, at::sum, ...) on operands they made in
// the accumulation dtype. Under torch.autocast those calls would go through the autocast
// dispatch keys and come back in fp16/bf16: a lower-precision product, or a crash where the
// result lands in an fp32 buffer (addmm_out, mm_out). A kernel entry point declares
//     NoAutocast no_autocast;
// first: the autocast keys of every device are excluded until it returns, so the kernel
// computes the same numbers inside and outside an autocast block. The Python side does the
// same for the custom ops (sslops/_autocast.py); this guard covers direct callers of the
// *_cxx ops.
#pragma once
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace sslops {

struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace sslops
