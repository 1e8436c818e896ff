// y[M, N] = x[M, K] @ W[N, K]^T for few rows M (decode batches), streaming each weight row once.
//
// BLAS packs W before a GEMM, which for M <= 16 costs as much as the GEMM itself and halves the
// bandwidth a decode step gets. Here both cores stream disjoint weight rows and the M rows of x
// stay in L1. AVX2+FMA only (checked at run time); callers fall back to at::mm when it returns false.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace moe_resilient {

bool skinny_gemm_available();

// x [M, K] float, W [N, K] row-major (float or bfloat16), y [M, N] float. Parallel over N.
void skinny_gemm_nt(const float* x, int64_t M, int64_t K, const float* W, int64_t N, float* y);
void skinny_gemm_nt(const float* x, int64_t M, int64_t K, const c10::BFloat16* W, int64_t N, float* y);

}  // namespace moe_resilient
