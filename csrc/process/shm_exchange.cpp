// Shared-memory exchange between the ranks of one host: the data path of moe_resilient/shm.py.
//
// A segment holds one slot per ordered pair (src, dst): a 64-byte header (seq, ack, bytes) and
// `capacity` bytes of payload. The n-th message of a pair is posted once the receiver has
// acknowledged message n - 1: the sender copies the payload, then stores `bytes` and, last, `seq = n`
// with release ordering. The receiver reads `seq` with acquire ordering, copies the payload out, then
// stores `ack = n`. A sender killed mid-copy never publishes its `seq`, so no receiver reads torn
// rows. Both calls return at once; the caller waits between its polls with shm_sleep.
//
// Doorbells: the segment starts with one 32-bit word per rank, each on its own cache line. Posting a
// message rings the receiver's bell, acknowledging one rings the sender's (it may have more to post),
// and a waiting rank sleeps on its own bell in the kernel (a futex on the shared mapping) until a
// peer rings it or its slice of the deadline runs out. With more ranks than cores, sleeping instead of
// spinning gives the cores to the peers that have work to do.
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <torch/library.h>

#include <ATen/ATen.h>

#include <atomic>
#include <climits>
#include <cstring>
#include <ctime>

namespace {

struct Header {
  uint64_t seq;
  uint64_t ack;
  uint64_t bytes;
};

Header* header(const at::Tensor& segment, int64_t slot_offset) {
  TORCH_CHECK(segment.dtype() == at::kByte && segment.dim() == 1 && segment.is_contiguous(),
              "shm segment must be a contiguous uint8 tensor");
  TORCH_CHECK(slot_offset >= 0 && slot_offset % 64 == 0 && slot_offset + 64 <= segment.numel(),
              "shm slot offset ", slot_offset, " outside the segment");
  return reinterpret_cast<Header*>(segment.data_ptr<uint8_t>() + slot_offset);
}

uint32_t* bell(const at::Tensor& segment, int64_t offset) {
  TORCH_CHECK(offset >= 0 && offset % 64 == 0 && offset + 4 <= segment.numel(), "shm bell offset ", offset,
              " outside the segment");
  return reinterpret_cast<uint32_t*>(segment.data_ptr<uint8_t>() + offset);
}

void ring(uint32_t* word) {
  std::atomic_ref<uint32_t>(*word).fetch_add(1, std::memory_order_release);
  syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

// Post `payload` (uint8, at most the slot's capacity) as message `seq` of the slot at `slot_offset`:
// false (nothing written) while the receiver has not yet acknowledged message seq - 1.
bool shm_post(const at::Tensor& segment, int64_t slot_offset, int64_t capacity, const at::Tensor& payload,
              int64_t seq, int64_t bell_offset) {
  Header* h = header(segment, slot_offset);
  TORCH_CHECK(payload.dtype() == at::kByte && payload.is_contiguous(), "shm payload must be contiguous uint8");
  TORCH_CHECK(payload.numel() <= capacity && slot_offset + 64 + capacity <= segment.numel(),
              "shm payload of ", payload.numel(), " bytes exceeds the slot's capacity ", capacity);
  if (std::atomic_ref<uint64_t>(h->ack).load(std::memory_order_acquire) != static_cast<uint64_t>(seq - 1)) {
    return false;
  }
  std::memcpy(reinterpret_cast<uint8_t*>(h) + 64, payload.data_ptr<uint8_t>(), payload.numel());
  std::atomic_ref<uint64_t>(h->bytes).store(payload.numel(), std::memory_order_relaxed);
  std::atomic_ref<uint64_t>(h->seq).store(seq, std::memory_order_release);
  ring(bell(segment, bell_offset));
  return true;
}

// Take message `seq` of the slot into `out` (uint8, exactly the bytes expected): false while it has
// not been posted. A message of another length is an error: both sides derive lengths from the same
// counts.
bool shm_take(const at::Tensor& segment, int64_t slot_offset, const at::Tensor& out, int64_t seq,
              int64_t bell_offset) {
  Header* h = header(segment, slot_offset);
  TORCH_CHECK(out.dtype() == at::kByte && out.is_contiguous(), "shm output must be contiguous uint8");
  if (std::atomic_ref<uint64_t>(h->seq).load(std::memory_order_acquire) != static_cast<uint64_t>(seq)) {
    return false;
  }
  uint64_t bytes = std::atomic_ref<uint64_t>(h->bytes).load(std::memory_order_relaxed);
  TORCH_CHECK(bytes == static_cast<uint64_t>(out.numel()), "shm message ", seq, " has ", bytes,
              " bytes, expected ", out.numel());
  std::memcpy(out.data_ptr<uint8_t>(), reinterpret_cast<uint8_t*>(h) + 64, bytes);
  std::atomic_ref<uint64_t>(h->ack).store(seq, std::memory_order_release);
  ring(bell(segment, bell_offset));
  return true;
}

// The bell at `bell_offset` (read it before polling, then pass it to shm_sleep).
int64_t shm_bell(const at::Tensor& segment, int64_t bell_offset) {
  return std::atomic_ref<uint32_t>(*bell(segment, bell_offset)).load(std::memory_order_acquire);
}

// Sleep until the bell no longer reads `seen` or `timeout_us` passes; returns its value then.
int64_t shm_sleep(const at::Tensor& segment, int64_t bell_offset, int64_t seen, int64_t timeout_us) {
  uint32_t* word = bell(segment, bell_offset);
  if (timeout_us > 0) {
    timespec ts{static_cast<time_t>(timeout_us / 1000000), static_cast<long>(timeout_us % 1000000) * 1000};
    syscall(SYS_futex, word, FUTEX_WAIT, static_cast<uint32_t>(seen), &ts, nullptr, 0);  // EAGAIN: rung already
  }
  return std::atomic_ref<uint32_t>(*word).load(std::memory_order_acquire);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_resilient, m) {
  m.def("shm_post(Tensor segment, int slot_offset, int capacity, Tensor payload, int seq, int bell_offset) -> bool");
  m.def("shm_take(Tensor segment, int slot_offset, Tensor(a!) out, int seq, int bell_offset) -> bool");
  m.def("shm_bell(Tensor segment, int bell_offset) -> int");
  m.def("shm_sleep(Tensor segment, int bell_offset, int seen, int timeout_us) -> int");
}

TORCH_LIBRARY_IMPL(moe_resilient, CPU, m) {
  m.impl("shm_post", &shm_post);
  m.impl("shm_take", &shm_take);
  m.impl("shm_bell", &shm_bell);
  m.impl("shm_sleep", &shm_sleep);
}
