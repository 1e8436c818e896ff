// Shadow-store checksums: a weighted sum of the bytes read as little-endian 64-bit words,
//   h = sum_i w_i * (2i + 1)  (mod 2^64), the last word zero-padded,
// which any single changed word alters (odd factors are invertible mod 2^64). copy_checksum computes it
// while copying, so a restore reads the shadow bytes once. Each thread sums its own contiguous words;
// the total is the plain sum of the parts.
#include "ops.h"

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kGrainWords = 1 << 16;  // 512 KiB a task: big enough to stream, small enough to split

uint64_t sum_words(const uint8_t* src, uint8_t* dst, int64_t begin, int64_t end) {
  uint64_t h = 0;
  for (int64_t i = begin; i < end; ++i) {
    uint64_t w;
    std::memcpy(&w, src + 8 * i, 8);
    if (dst) std::memcpy(dst + 8 * i, &w, 8);
    h += w * (2 * static_cast<uint64_t>(i) + 1);
  }
  return h;
}

int64_t checksum_into(const at::Tensor& src, uint8_t* dst) {
  TORCH_CHECK(src.device().is_cpu() && src.is_contiguous(), "checksum: src must be a contiguous CPU tensor");
  const auto* s = static_cast<const uint8_t*>(src.data_ptr());
  const int64_t bytes = src.numel() * src.element_size();
  const int64_t words = bytes / 8;
  std::vector<uint64_t> parts(at::divup(words, kGrainWords) + 1, 0);
  at::parallel_for(0, words, kGrainWords, [&](int64_t begin, int64_t end) {
    parts[begin / kGrainWords] = sum_words(s, dst, begin, end);
  });
  uint64_t h = 0;
  for (uint64_t p : parts) h += p;
  if (const int64_t tail = bytes - 8 * words) {
    uint64_t w = 0;
    std::memcpy(&w, s + 8 * words, tail);
    if (dst) std::memcpy(dst + 8 * words, s + 8 * words, tail);
    h += w * (2 * static_cast<uint64_t>(words) + 1);
  }
  return static_cast<int64_t>(h);
}

}  // namespace

namespace moe_resilient {

int64_t checksum(const at::Tensor& src) { return checksum_into(src, nullptr); }

int64_t copy_checksum(const at::Tensor& src, const at::Tensor& dst) {
  TORCH_CHECK(dst.device().is_cpu() && dst.is_contiguous(), "copy_checksum: dst must be a contiguous CPU tensor");
  TORCH_CHECK(src.numel() * src.element_size() == dst.numel() * dst.element_size(),
              "copy_checksum: src has ", src.numel() * src.element_size(), " bytes, dst ",
              dst.numel() * dst.element_size());
  return checksum_into(src, static_cast<uint8_t*>(dst.data_ptr()));
}

}  // namespace moe_resilient
