// Compiles the hot loops of one kernel file once per instruction set (see isa.h). No include
// guard: a kernel file includes it once per .inc file, inside its own namespace, as
//
//   #define SLIMOPS_ISA_INC "cpu/batch_norm_rows.inc"
//   #include "cpu/isa_variants.h"
//
// which defines the .inc file's contents in namespaces isa_avx512 and isa_avx2 (each under
// its `#pragma GCC target` region) and isa_base (the baseline target);
// SLIMOPS_RETURN_FOR_CPU_ISA (isa.h) then picks one at run time. Inside each copy,
// SLIMOPS_VEC_BYTES is the vector width in bytes (64, 32, 16). Define SLIMOPS_ISA_NO_BASE as
// well to leave isa_base out (loops with no baseline version: the caller has its own fallback).
// Both macros are undefined at the end.
//
// The rule of isa.h holds for every .inc file: only raw loops (raw pointers, nothing but
// inline helpers) go inside the target regions. A std or ATen inline instantiated there could
// be merged by the linker into the baseline callers and fault on a CPU without AVX-512.
#ifndef SLIMOPS_ISA_INC
#error "define SLIMOPS_ISA_INC (the .inc file of loops) before including cpu/isa_variants.h"
#endif

namespace isa_avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#define SLIMOPS_VEC_BYTES 64
#include SLIMOPS_ISA_INC
#undef SLIMOPS_VEC_BYTES
#pragma GCC pop_options
}  // namespace isa_avx512

namespace isa_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SLIMOPS_VEC_BYTES 32
#include SLIMOPS_ISA_INC
#undef SLIMOPS_VEC_BYTES
#pragma GCC pop_options
}  // namespace isa_avx2

#ifndef SLIMOPS_ISA_NO_BASE
namespace isa_base {
#define SLIMOPS_VEC_BYTES 16
#include SLIMOPS_ISA_INC
#undef SLIMOPS_VEC_BYTES
}  // namespace isa_base
#endif

#undef SLIMOPS_ISA_INC
#undef SLIMOPS_ISA_NO_BASE
