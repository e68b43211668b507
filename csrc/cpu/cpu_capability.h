// Which x86 vector instruction set the CPU kernels' hand-written loops run at.
//
// The loops of csrc/cpu/infonce_rows_impl.h are compiled three times (csrc/cpu/infonce_rows.cpp):
// for the build's baseline ISA (SSE2 on x86-64, whatever the compiler targets elsewhere), for
// AVX2 + FMA and for AVX-512 (F, BW, DQ, VL). The op picks one per call: the best this CPU
// supports, capped by the environment variable SSLOPS_CPU_CAPABILITY ("default", "avx2" or
// "avx512", ATen's names for ATEN_CPU_CAPABILITY), read at every call so that a user or a test
// can switch it without a restart. Only GCC on x86-64 builds the AVX variants; elsewhere every
// level is the baseline.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SSLOPS_X86_ISA_DISPATCH 1
#else
#define SSLOPS_X86_ISA_DISPATCH 0
#endif

namespace sslops {

enum class CpuCapability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The highest level this CPU and build support (CPUID and the OS's saved register state).
CpuCapability supported_cpu_capability();

// The level to run at: supported_cpu_capability() capped by SSLOPS_CPU_CAPABILITY; raises
// (c10::Error, a RuntimeError in Python) naming the variable when its value is not one of the three.
CpuCapability cpu_capability();

// "default", "avx2" or "avx512".
const char* cpu_capability_name(CpuCapability c);

// Parses a level's name; false (and *out untouched) for anything else.
bool parse_cpu_capability(const char* name, CpuCapability* out);

}  // namespace sslops
