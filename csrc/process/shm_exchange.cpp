// Shared-memory exchange between the ranks of one host: the data path of moe_resilient/shm.py.
//
// A segment holds one slot per ordered pair (src, dst): a 64-byte header (seq, ack, bytes) and
// `capacity` bytes of payload. The n-th message of a pair is posted once the receiver has
// acknowledged message n - 1: the sender copies the payload, then stores `bytes` and, last, `seq = n`
// with release ordering. The receiver reads `seq` with acquire ordering, copies the payload out, then
// stores `ack = n`. A sender killed mid-copy never publishes its `seq`, so no receiver reads torn
// rows. A rank that gives up on an exchange withdraws its latest message to each peer if it was not
// taken (seq = kWithdrawn), so a rank that wakes after the others moved on cannot complete it.
// shm_post and shm_take move one message and return at once; shm_exchange runs a whole all-to-all
// until done or its time slice ends, keeping its progress in a state tensor, so the caller can look
// for dead peers between slices and call it again.
//
// Doorbells: the segment starts with one line per rank: the word peers ring, and whether its owner
// sleeps. Posting a message rings the receiver's bell, acknowledging one rings the sender's (it may
// have more to post). A waiting rank yields its core for up to `spin_us` (a peer's answer usually
// comes within that), then sleeps on its own bell in the kernel (a futex on the shared mapping) until
// a peer rings it or its slice of the deadline runs out; a ringer makes the wake-up system call only
// when the owner sleeps. With more ranks than cores, yielding and sleeping instead of spinning gives
// the cores to the peers that have work to do. It sleeps on the count of deaths seen by
// the liveness-board watchers too (futex_waitv), so a peer's SIGKILL wakes it at once, and it returns
// as if its slice had run out: the caller then finds the dead peer on the board.
#include <Python.h>
#include <errno.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <torch/library.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstring>
#include <ctime>
#include <vector>

#include "board_deaths.h"

namespace {

constexpr int64_t kHeader = 64, kBell = 64;  // as moe_resilient/shm.py: HEADER, BELL
constexpr uint64_t kWithdrawn = ~0ULL;

struct Header {
  uint64_t seq;
  uint64_t ack;
  uint64_t bytes;
};

struct Bell {
  uint32_t rung;
  uint32_t sleeping;
};

uint8_t* base(const at::Tensor& segment) {
  TORCH_CHECK(segment.dtype() == at::kByte && segment.dim() == 1 && segment.is_contiguous(),
              "shm segment must be a contiguous uint8 tensor");
  return segment.data_ptr<uint8_t>();
}

void check_range(const at::Tensor& segment, int64_t offset, int64_t bytes, const char* what) {
  TORCH_CHECK(offset >= 0 && offset % 64 == 0 && offset + bytes <= segment.numel(), "shm ", what, " at ", offset,
              " outside the segment");
}

// Checks that `segment` holds the bells and slots of `world_size` ranks.
void check_layout(const at::Tensor& segment, int64_t world_size, int64_t capacity) {
  check_range(segment, 0, world_size * kBell + world_size * world_size * (kHeader + capacity), "segment layout");
}

// The header of the slot (from, to) of the segment at `b` (as shm.py's ShmExchange.slot).
Header* slot_of(uint8_t* b, int64_t world_size, int64_t capacity, int64_t from, int64_t to) {
  return reinterpret_cast<Header*>(b + world_size * kBell + (from * world_size + to) * (kHeader + capacity));
}

// Ring and sleep pair up as in Dekker's algorithm (both sequentially consistent): either the ringer
// sees `sleeping` set and wakes the owner, or the owner sees the new `rung` and does not sleep.
void ring(uint8_t* line) {
  auto* bell = reinterpret_cast<Bell*>(line);
  std::atomic_ref<uint32_t>(bell->rung).fetch_add(1, std::memory_order_seq_cst);
  if (std::atomic_ref<uint32_t>(bell->sleeping).load(std::memory_order_seq_cst)) {
    syscall(SYS_futex, &bell->rung, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
  }
}

// Post `bytes` from `src` as message `seq` of the slot `h`, ringing `bell`: false (nothing written)
// while the receiver has not yet acknowledged message seq - 1.
bool post(Header* h, const uint8_t* src, int64_t bytes, int64_t seq, uint8_t* bell) {
  if (std::atomic_ref<uint64_t>(h->ack).load(std::memory_order_acquire) != static_cast<uint64_t>(seq - 1)) {
    return false;
  }
  std::memcpy(reinterpret_cast<uint8_t*>(h) + kHeader, src, bytes);
  std::atomic_ref<uint64_t>(h->bytes).store(bytes, std::memory_order_relaxed);
  std::atomic_ref<uint64_t>(h->seq).store(seq, std::memory_order_release);
  ring(bell);
  return true;
}

// Take message `seq` of the slot `h` into `dst` (exactly `bytes` expected: both sides derive lengths
// from the same counts), ringing `bell`: false while it has not been posted.
bool take(Header* h, uint8_t* dst, int64_t bytes, int64_t seq, uint8_t* bell) {
  if (std::atomic_ref<uint64_t>(h->seq).load(std::memory_order_acquire) != static_cast<uint64_t>(seq)) {
    return false;
  }
  uint64_t got = std::atomic_ref<uint64_t>(h->bytes).load(std::memory_order_relaxed);
  TORCH_CHECK(got == static_cast<uint64_t>(bytes), "shm message ", seq, " has ", got, " bytes, expected ", bytes);
  std::memcpy(dst, reinterpret_cast<uint8_t*>(h) + kHeader, bytes);
  std::atomic_ref<uint64_t>(h->ack).store(seq, std::memory_order_release);
  ring(bell);
  return true;
}

// Lets other Python threads run while an exchange copies and sleeps (if the caller holds the GIL).
struct ReleaseGil {
  PyThreadState* saved = PyGILState_Check() ? PyEval_SaveThread() : nullptr;
  ~ReleaseGil() {
    if (saved) PyEval_RestoreThread(saved);
  }
};

// Sleep in the kernel until `bell` no longer reads `rung`, `deaths` no longer reads `deaths_seen`,
// or `deadline`: false once the deadline has passed. Without futex_waitv (Linux < 5.16), sleeps on the
// bell alone, in slices of at most 1 ms, so a death is still seen within one.
bool sleep_until(uint32_t* bell, uint32_t rung, std::atomic<uint32_t>* deaths, uint32_t deaths_seen,
                 std::chrono::steady_clock::time_point deadline) {
  static bool have_waitv = true;
  const auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - std::chrono::steady_clock::now());
  if (left.count() <= 0) return false;
  if (have_waitv) {
    futex_waitv waiters[2] = {};
    waiters[0].val = rung;
    waiters[0].uaddr = reinterpret_cast<uintptr_t>(bell);
    waiters[0].flags = FUTEX_32;  // shared: the peers ring it
    waiters[1].val = deaths_seen;
    waiters[1].uaddr = reinterpret_cast<uintptr_t>(deaths);
    waiters[1].flags = FUTEX_32 | FUTEX_PRIVATE_FLAG;
    timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    const int64_t until = now.tv_sec * 1000000000LL + now.tv_nsec + left.count();
    timespec abs{static_cast<time_t>(until / 1000000000LL), static_cast<long>(until % 1000000000LL)};
    if (syscall(SYS_futex_waitv, waiters, 2, 0, &abs, CLOCK_MONOTONIC) >= 0 || errno != ENOSYS) return true;
    have_waitv = false;
  }
  const int64_t us = std::min<int64_t>(left.count() / 1000 + 1, 1000);
  timespec ts{0, static_cast<long>(us * 1000)};
  syscall(SYS_futex, bell, FUTEX_WAIT, rung, &ts, nullptr, 0);  // EAGAIN: rung since read
  return true;
}

// Wait for the same, yielding the core for up to `spin_us` first, and saying so in the bell line while
// asleep: false once the deadline has passed.
bool wait_on(Bell* bell, uint32_t rung, std::atomic<uint32_t>* deaths, uint32_t deaths_seen,
             std::chrono::steady_clock::time_point deadline, int64_t spin_us) {
  auto moved = [&] {
    return std::atomic_ref<uint32_t>(bell->rung).load(std::memory_order_seq_cst) != rung ||
           deaths->load(std::memory_order_acquire) != deaths_seen;
  };
  const auto spin_until = std::min(deadline, std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us));
  while (std::chrono::steady_clock::now() < spin_until) {
    if (moved()) return true;
    sched_yield();
  }
  std::atomic_ref<uint32_t> sleeping(bell->sleeping);
  sleeping.store(1, std::memory_order_seq_cst);
  const bool in_time = moved() || sleep_until(&bell->rung, rung, deaths, deaths_seen, deadline);
  sleeping.store(0, std::memory_order_relaxed);
  return in_time;
}

bool shm_post(const at::Tensor& segment, int64_t slot_offset, int64_t capacity, const at::Tensor& payload,
              int64_t seq, int64_t bell_offset) {
  TORCH_CHECK(payload.dtype() == at::kByte && payload.is_contiguous(), "shm payload must be contiguous uint8");
  TORCH_CHECK(payload.numel() <= capacity, "shm payload of ", payload.numel(), " bytes exceeds the slot's capacity ",
              capacity);
  check_range(segment, slot_offset, kHeader + capacity, "slot");
  check_range(segment, bell_offset, kBell, "bell");
  uint8_t* b = base(segment);
  return post(reinterpret_cast<Header*>(b + slot_offset), payload.data_ptr<uint8_t>(), payload.numel(), seq,
              b + bell_offset);
}

bool shm_take(const at::Tensor& segment, int64_t slot_offset, const at::Tensor& out, int64_t seq,
              int64_t bell_offset) {
  TORCH_CHECK(out.dtype() == at::kByte && out.is_contiguous(), "shm output must be contiguous uint8");
  check_range(segment, slot_offset, kHeader, "slot");
  check_range(segment, bell_offset, kBell, "bell");
  uint8_t* b = base(segment);
  return take(reinterpret_cast<Header*>(b + slot_offset), out.data_ptr<uint8_t>(), out.numel(), seq,
              b + bell_offset);
}

// One all-to-all among `peers` (global ranks, this one excluded) of a segment of `world_size` ranks:
// send[send_offsets[i] : + send_bytes[i]] goes to peers[i] as messages post_seqs[i], post_seqs[i] + 1,
// ... of at most `capacity` bytes; recv[recv_offsets[i] : + recv_bytes[i]] comes from peers[i] as
// messages take_seqs[i], .... state [2 * P] int64, updated in place: messages posted to and taken
// from each peer so far. Runs until every message is posted and taken (true) or `timeout_us` passes
// (false), waiting on this rank's doorbell whenever nothing can move.
bool shm_exchange(const at::Tensor& segment, int64_t rank, int64_t world_size, int64_t capacity,
                  at::IntArrayRef peers, const at::Tensor& send, at::IntArrayRef send_offsets,
                  at::IntArrayRef send_bytes, at::IntArrayRef post_seqs, const at::Tensor& recv,
                  at::IntArrayRef recv_offsets, at::IntArrayRef recv_bytes, at::IntArrayRef take_seqs,
                  const at::Tensor& state, int64_t timeout_us, int64_t spin_us) {
  const int64_t n = static_cast<int64_t>(peers.size());
  TORCH_CHECK(send_offsets.size() == peers.size() && send_bytes.size() == peers.size() &&
                  post_seqs.size() == peers.size() && recv_offsets.size() == peers.size() &&
                  recv_bytes.size() == peers.size() && take_seqs.size() == peers.size(),
              "shm_exchange: one offset, length and sequence number per peer");
  TORCH_CHECK(send.dtype() == at::kByte && send.is_contiguous() && recv.dtype() == at::kByte && recv.is_contiguous(),
              "shm_exchange: send and recv must be contiguous uint8");
  TORCH_CHECK(state.dtype() == at::kLong && state.is_contiguous() && state.numel() == 2 * n,
              "shm_exchange: state must be int64 [2 * peers]");
  TORCH_CHECK(capacity > 0 && rank >= 0 && rank < world_size, "shm_exchange: bad rank or capacity");
  check_layout(segment, world_size, capacity);
  std::vector<int64_t> posts(n), takes(n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(peers[i] >= 0 && peers[i] < world_size && peers[i] != rank, "shm_exchange: bad peer ", peers[i]);
    TORCH_CHECK(send_offsets[i] >= 0 && send_offsets[i] + send_bytes[i] <= send.numel() && recv_offsets[i] >= 0 &&
                    recv_offsets[i] + recv_bytes[i] <= recv.numel(),
                "shm_exchange: a peer's bytes lie outside send or recv");
    posts[i] = std::max<int64_t>(1, (send_bytes[i] + capacity - 1) / capacity);
    takes[i] = std::max<int64_t>(1, (recv_bytes[i] + capacity - 1) / capacity);
  }
  uint8_t* b = base(segment);
  const uint8_t* src = send.data_ptr<uint8_t>();
  uint8_t* dst = recv.data_ptr<uint8_t>();
  int64_t* done = state.data_ptr<int64_t>();
  auto* my_bell = reinterpret_cast<Bell*>(b + rank * kBell);
  auto slot = [&](int64_t from, int64_t to) { return slot_of(b, world_size, capacity, from, to); };
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(timeout_us);
  auto& deaths = moe_resilient::board_deaths();
  const uint32_t deaths_seen = deaths.load(std::memory_order_acquire);
  ReleaseGil unlocked;
  for (;;) {
    uint32_t rung = std::atomic_ref<uint32_t>(my_bell->rung).load(std::memory_order_seq_cst);
    bool finished = true;
    for (int64_t i = 0; i < n; ++i) {  // posts first: every peer gets something to take at once
      const int64_t peer = peers[i];
      while (done[i] < posts[i]) {
        const int64_t at = done[i] * capacity, bytes = std::min(capacity, send_bytes[i] - at);
        if (!post(slot(rank, peer), src + send_offsets[i] + at, bytes, post_seqs[i] + done[i], b + peer * kBell)) break;
        ++done[i];
      }
      finished = finished && done[i] == posts[i];
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t peer = peers[i];
      while (done[n + i] < takes[i]) {
        const int64_t at = done[n + i] * capacity, bytes = std::min(capacity, recv_bytes[i] - at);
        if (!take(slot(peer, rank), dst + recv_offsets[i] + at, bytes, take_seqs[i] + done[n + i], b + peer * kBell)) {
          break;
        }
        ++done[n + i];
      }
      finished = finished && done[n + i] == takes[i];
    }
    if (finished) return true;
    if (deaths.load(std::memory_order_acquire) != deaths_seen) return false;  // a peer died: look now
    if (!wait_on(my_bell, rung, &deaths, deaths_seen, deadline, spin_us)) return false;
  }
}

// After giving up on an exchange: withdraw the latest message posted to each of `peers` (state[i] of
// them so far) if it was not taken; earlier ones all were (each is posted once the one before was).
void shm_withdraw(const at::Tensor& segment, int64_t rank, int64_t world_size, int64_t capacity,
                  at::IntArrayRef peers, at::IntArrayRef post_seqs, const at::Tensor& state) {
  TORCH_CHECK(state.dtype() == at::kLong && state.is_contiguous() &&
                  state.numel() == 2 * static_cast<int64_t>(peers.size()) && post_seqs.size() == peers.size(),
              "shm_withdraw: one sequence number and state per peer");
  check_layout(segment, world_size, capacity);
  uint8_t* b = base(segment);
  const int64_t* done = state.data_ptr<int64_t>();
  for (size_t i = 0; i < peers.size(); ++i) {
    if (done[i] == 0) continue;
    Header* h = slot_of(b, world_size, capacity, rank, peers[i]);
    uint64_t latest = post_seqs[i] + done[i] - 1;
    if (std::atomic_ref<uint64_t>(h->ack).load(std::memory_order_acquire) != latest) {
      std::atomic_ref<uint64_t>(h->seq).compare_exchange_strong(latest, kWithdrawn);
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_resilient, m) {
  m.def("shm_post(Tensor segment, int slot_offset, int capacity, Tensor payload, int seq, int bell_offset) -> bool");
  m.def("shm_take(Tensor segment, int slot_offset, Tensor(a!) out, int seq, int bell_offset) -> bool");
  m.def("shm_exchange(Tensor segment, int rank, int world_size, int capacity, int[] peers, Tensor send, "
        "int[] send_offsets, int[] send_bytes, int[] post_seqs, Tensor(a!) recv, int[] recv_offsets, "
        "int[] recv_bytes, int[] take_seqs, Tensor(b!) state, int timeout_us, int spin_us) -> bool");
  m.def("shm_withdraw(Tensor(a!) segment, int rank, int world_size, int capacity, int[] peers, int[] post_seqs, "
        "Tensor state) -> ()");
}

TORCH_LIBRARY_IMPL(moe_resilient, CPU, m) {
  m.impl("shm_post", &shm_post);
  m.impl("shm_take", &shm_take);
  m.impl("shm_exchange", &shm_exchange);
  m.impl("shm_withdraw", &shm_withdraw);
}
