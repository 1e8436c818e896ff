// The count of deaths this process's liveness-board watchers have seen (liveness.cpp), a private
// futex word: a shared-memory exchange (shm_exchange.cpp) sleeps on it beside its doorbell, so a
// peer's SIGKILL ends the exchange's wait at once instead of at the end of its slice.
#pragma once

#include <atomic>
#include <cstdint>

namespace moe_resilient {
std::atomic<uint32_t>& board_deaths();
}
