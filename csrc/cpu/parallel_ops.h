// at::parallel_for for bodies that call ATen ops (a BLAS product per block of rows, say).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <cstdint>

namespace sslops {

// The worker threads run with the caller's thread-local state (dispatch keys excluded below
// autograd, grad mode, autocast), as the calling thread does inside an op. Without it a
// worker dispatches like a fresh thread: through autograd, where an out= product whose input
// requires grad fails, and through autocast when it is on. A BLAS call inside the region runs
// on its own thread only (nested parallelism is off): one fork/join for the whole body.
template <typename F>
inline void parallel_for_ops(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b0, int64_t b1) {
    at::ThreadLocalStateGuard guard(state);
    f(b0, b1);
  });
}

}  // namespace sslops
