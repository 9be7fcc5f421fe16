// Which vector instruction set the CPU kernels' hot loops run with, chosen at run time.
//
// The extension is compiled for the baseline x86-64 target (it must load on any x86-64 CPU),
// which limits auto-vectorised loops to 4-wide SSE2. Loops that matter therefore live in
// `.inc` files that a kernel file compiles once more per instruction set through
// isa_variants.h (namespaces isa_avx512 / isa_avx2 / isa_base, each under its
// `#pragma GCC target` region), and SLIMOPS_RETURN_FOR_CPU_ISA below picks one at run time:
// AVX-512 where the CPU has it, else AVX2 + FMA, else the baseline.
// SLIMOPS_CPU_ISA=avx512|avx2|base caps the choice (read once; tests run every path with it).
//
// Only raw loops go inside the target regions (raw pointers, nothing but inline helpers): a
// std or ATen inline instantiated there could be merged by the linker into the baseline
// callers and fault on a CPU without AVX-512.
#pragma once

#include <cstdlib>
#include <cstring>

namespace slimops {
namespace cpu {

enum class Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa detect_isa() {
  Isa best = Isa::kBase;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq"))
    best = Isa::kAvx512;
#endif
  const char* cap = std::getenv("SLIMOPS_CPU_ISA");
  if (cap == nullptr) return best;
  Isa wanted = best;
  if (std::strcmp(cap, "base") == 0) wanted = Isa::kBase;
  else if (std::strcmp(cap, "avx2") == 0) wanted = Isa::kAvx2;
  else if (std::strcmp(cap, "avx512") == 0) wanted = Isa::kAvx512;
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
}

inline Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "base";
  }
}

}  // namespace cpu
}  // namespace slimops

// `return` EXPR for the instruction set the kernels run with, `isa::` in EXPR naming its
// namespace: isa_avx512, isa_avx2 or isa_base (isa_variants.h defines them). Used in the body
// of a function, e.g.
//   Lanes lanes() { SLIMOPS_RETURN_FOR_CPU_ISA(&isa::forward_lanes<KH, KW, SW, scalar_t>); }
//   Ops ops() { SLIMOPS_RETURN_FOR_CPU_ISA(Ops{&isa::sum<T>, &isa::scale<T>}); }
#define SLIMOPS_RETURN_FOR_CPU_ISA(...)          \
  switch (::slimops::cpu::cpu_isa()) {           \
    case ::slimops::cpu::Isa::kAvx512: {         \
      namespace isa = isa_avx512;                \
      return __VA_ARGS__;                        \
    }                                            \
    case ::slimops::cpu::Isa::kAvx2: {           \
      namespace isa = isa_avx2;                  \
      return __VA_ARGS__;                        \
    }                                            \
    default: {                                   \
      namespace isa = isa_base;                  \
      return __VA_ARGS__;                        \
    }                                            \
  }
