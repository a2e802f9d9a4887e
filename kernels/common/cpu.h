// What the CPU can run: shared by the CPU kernels' choices of form.
#pragma once

namespace sdrt {

// Whether this CPU has AVX2 and FMA (the products of the AVX2 kernels). GCC and Clang on x86-64
// ask the CPU; elsewhere false.
inline bool cpu_has_avx2_fma() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace sdrt
