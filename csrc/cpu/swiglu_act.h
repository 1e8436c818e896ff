// The SwiGLU activation of a block of rows in one pass: act[r, i] = silu(h[r, i]) * h[r, I + i], with
// h [rows, 2I] (gate then up; fp32, or bf16 bits) and act [rows, I] (fp32, or bf16 bits rounded to
// nearest even). Computed in fp32 and rounded once.
//
// It replaces at::silu, a mul_ and a cast to bf16, three passes over the rows: with it the bf16 layer
// went from 43-49 to 36-39.5 ms at 512 tokens and from 7.0-8.5 to 5.3-6.7 ms at 64 (alternating builds).
// Beside it, the bf16 roundings around the products, vectorised alike (the ops themselves are compiled
// for the baseline x86-64 and rounds one element at a time): at 64 tokens bf16 the two loops they
// replace took ~65 us of a ~4.7 ms step.
// AVX2+FMA (the caller checks skinny_gemm_available()); single-threaded: the caller splits the rows
// across threads.
#pragma once

#include <cstdint>

namespace moe_resilient {

void swiglu_act(const float* h, int64_t rows, int64_t I, float* act);
void swiglu_act(const float* h, int64_t rows, int64_t I, uint16_t* act);
void swiglu_act(const uint16_t* h, int64_t rows, int64_t I, uint16_t* act);

// dst[i] = src[i] rounded to bf16 bits (nearest even), i < n.
void round_to_bf16(const float* src, int64_t n, uint16_t* dst);
// acc[i] += w * y[i], y bf16 bits, i < n.
void add_scaled_bf16(float* acc, float w, const uint16_t* y, int64_t n);

}  // namespace moe_resilient
