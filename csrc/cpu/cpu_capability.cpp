// Run-time choice of the CPU kernels' vector ISA level (csrc/cpu/cpu_capability.h).
#include "cpu_capability.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace sslops {

CpuCapability supported_cpu_capability() {
#if SSLOPS_X86_ISA_DISPATCH
  // libgcc's CPUID probe also checks that the OS saves the AVX / AVX-512 registers (XGETBV).
  static const CpuCapability best = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    return avx512 ? CpuCapability::kAvx512 : avx2 ? CpuCapability::kAvx2 : CpuCapability::kDefault;
  }();
  return best;
#else
  return CpuCapability::kDefault;
#endif
}

const char* cpu_capability_name(CpuCapability c) {
  switch (c) {
    case CpuCapability::kAvx512:
      return "avx512";
    case CpuCapability::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

bool parse_cpu_capability(const char* name, CpuCapability* out) {
  for (CpuCapability c : {CpuCapability::kDefault, CpuCapability::kAvx2, CpuCapability::kAvx512}) {
    if (std::strcmp(name, cpu_capability_name(c)) == 0) {
      *out = c;
      return true;
    }
  }
  return false;
}

CpuCapability cpu_capability() {
  const CpuCapability best = supported_cpu_capability();
  const char* env = std::getenv("SSLOPS_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return best;
  CpuCapability cap;
  TORCH_CHECK(parse_cpu_capability(env, &cap), "SSLOPS_CPU_CAPABILITY=", env,
              " is not a CPU capability: use default, avx2 or avx512 (or unset it for the best this CPU supports)");
  return static_cast<CpuCapability>(std::min(static_cast<int>(cap), static_cast<int>(best)));
}

}  // namespace sslops
