// y[M, N] = x[M, K] @ W[N, K]^T for up to a few hundred rows M, streaming each weight row once.
//
// BLAS packs W before a GEMM, which for small M costs as much as the GEMM itself: per expert slot it
// measured 2-4x slower than this kernel at 4-16 rows and still ~1.2x at 128 (benchmarks/RESULTS.md).
// Both cores stream disjoint weight rows: 1-2 rows of x take one weight row at a time, more rows a
// register tile that reuses each weight vector across x rows (skinny_gemm.cpp says which, and why).
// AVX2+FMA (checked at run time; callers fall back to at::mm without it); AVX-512 and AVX512_BF16 code
// where the CPU has them (skinny_gemm_avx512.cpp, skinny_gemm_bf16.cpp).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <vector>

namespace moe_resilient {

// One product of a group: y [M, N] = x [M, K] @ W [N, K]^T, in the element types the call names.
struct SkinnyProduct {
  const void* x;
  int64_t M;
  const void* W;
  float* y;
};

bool skinny_gemm_available();

// Whether the AVX-512 code runs (the CPU has it and it is allowed); allow_avx512 returns the previous
// setting, so tests can run the AVX2 code on a CPU that has AVX-512 too.
bool skinny_gemm_avx512_enabled();
bool skinny_gemm_allow_avx512(bool allowed);

// Whether skinny_gemm_bf16 can run: a CPU with AVX512_BF16, and AVX-512 allowed.
bool skinny_gemm_bf16_available();

// Products that share K and N (one per expert slot), in one parallel region: every thread takes the
// same share of each product's weight rows, in order, so the threads meet once, not once per product,
// and each thread's rows form one stream that its prefetch follows from one product into the next.
// x and W bfloat16, y float (bf16 products summed in fp32, as BLAS does): twice the multiplies per
// instruction of widening to fp32.
void skinny_gemm_bf16(const std::vector<SkinnyProduct>& group, int64_t K, int64_t N);
// x float, W float or (bf16_weights) bfloat16, y float.
void skinny_gemm_nt(const std::vector<SkinnyProduct>& group, int64_t K, int64_t N, bool bf16_weights);

// One product: x [M, K] float, W [N, K] row-major (float or bfloat16), y [M, N] float.
void skinny_gemm_nt(const float* x, int64_t M, int64_t K, const float* W, int64_t N, float* y);
void skinny_gemm_nt(const float* x, int64_t M, int64_t K, const c10::BFloat16* W, int64_t N, float* y);

}  // namespace moe_resilient
