// All-to-all among processes that share GPUs over CUDA IPC: the protocol of csrc/process/shm_exchange.cpp
// with device receive areas (moe_resilient/cuda_ipc.py drives it through ctypes).
//
// Each rank owns one receive area, exported with cudaIpcGetMemHandle and opened by every peer:
//   flags[W] (uint64: the exchange number of the message src last published here),
//   acks[W]  (uint64: the exchange number of this rank's message that dst last consumed),
//   bytes[W] (int64: the length of src's message), padded to 256 bytes, then payload[W][capacity].
// Exchange e (counted on the device, so a replayed CUDA graph numbers its exchanges itself):
//   post:    for each live dst, wait until dst acknowledged exchange e - 1 (acks[dst] in this rank's
//            area), copy the rows into dst's payload[rank], fence, publish flags[rank] = e last;
//   consume: for each live src, wait until flags[src] = e in this rank's area, copy payload[src] out,
//            then acknowledge e in src's area (acks[rank]).
// Every wait spins on clock64() against a deadline. A peer past it is cleared in the live-rank mask
// (device memory, read at run time, so graph replays see the current mask) and counts no rows; a
// sender that died mid-copy never published its flag, so no torn rows are read. Fixed capacity
// (shapes do not depend on the counts) keeps the exchange graph-safe.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

struct Area {
  uint64_t* flags;
  uint64_t* acks;
  int64_t* bytes;
  uint8_t* payload;
};

__host__ __device__ int64_t header_bytes(int64_t world) { return (24 * world + 255) / 256 * 256; }

__device__ Area area(uint8_t* base, int64_t world) {
  Area a;
  a.flags = reinterpret_cast<uint64_t*>(base);
  a.acks = a.flags + world;
  a.bytes = reinterpret_cast<int64_t*>(a.acks + world);
  a.payload = base + header_bytes(world);
  return a;
}

__device__ uint64_t load_volatile(const uint64_t* p) { return *reinterpret_cast<const volatile uint64_t*>(p); }

__device__ void store_volatile(uint64_t* p, uint64_t v) { *reinterpret_cast<volatile uint64_t*>(p) = v; }

// Spin until *word >= want or `timeout_cycles` pass: false on timeout. One thread per block spins.
__device__ bool wait_for(const uint64_t* word, uint64_t want, int64_t timeout_cycles) {
  const long long start = clock64();
  while (load_volatile(word) < want) {
    if (clock64() - start > timeout_cycles) return false;
  }
  return true;
}

__device__ void copy_bytes(uint8_t* dst, const uint8_t* src, int64_t n) {
  // 16-byte vectors where both ends allow it, bytes otherwise
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 16 == 0) {
    const int64_t vectors = n / 16;
    auto* d = reinterpret_cast<int4*>(dst);
    auto* s = reinterpret_cast<const int4*>(src);
    for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) d[i] = s[i];
    for (int64_t i = vectors * 16 + threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
  }
}

// Block d posts this rank's rows for destination d.
__global__ void post_kernel(const uint8_t* send, const int64_t* send_bytes, uint8_t* const* areas, int64_t rank,
                            int64_t world, int64_t capacity, const uint64_t* epoch, uint8_t* live,
                            int64_t timeout_cycles) {
  const int64_t d = blockIdx.x;
  if (d == rank || !live[d]) return;
  const uint64_t e = *epoch + 1;
  Area mine = area(areas[rank], world), theirs = area(areas[d], world);
  __shared__ bool ok;
  if (threadIdx.x == 0) ok = wait_for(&mine.acks[d], e - 1, timeout_cycles);
  __syncthreads();
  if (!ok) {
    if (threadIdx.x == 0) live[d] = 0;
    return;
  }
  const int64_t n = send_bytes[d] < capacity ? send_bytes[d] : capacity;
  copy_bytes(theirs.payload + rank * capacity, send + d * capacity, n);
  __syncthreads();
  if (threadIdx.x == 0) {
    theirs.bytes[rank] = n;
    __threadfence_system();  // rows and length visible before the flag
    store_volatile(&theirs.flags[rank], e);
  }
}

// Block s consumes source s's rows into recv[s]; recv_bytes[s] gets their length (0 for a dead source).
__global__ void consume_kernel(const uint8_t* send, const int64_t* send_bytes, uint8_t* recv, int64_t* recv_bytes,
                               uint8_t* const* areas, int64_t rank, int64_t world, int64_t capacity,
                               const uint64_t* epoch, uint8_t* live, int64_t timeout_cycles) {
  const int64_t s = blockIdx.x;
  const uint64_t e = *epoch + 1;
  if (s == rank) {  // this rank's own rows
    const int64_t n = send_bytes[s] < capacity ? send_bytes[s] : capacity;
    copy_bytes(recv + s * capacity, send + s * capacity, n);
    if (threadIdx.x == 0) recv_bytes[s] = n;
    return;
  }
  Area mine = area(areas[rank], world), theirs = area(areas[s], world);
  __shared__ bool ok;
  if (threadIdx.x == 0) ok = live[s] && wait_for(&mine.flags[s], e, timeout_cycles);
  __syncthreads();
  if (!ok) {
    if (threadIdx.x == 0) {
      live[s] = 0;
      recv_bytes[s] = 0;
    }
    return;
  }
  __threadfence_system();
  const int64_t n = mine.bytes[s];
  copy_bytes(recv + s * capacity, mine.payload + s * capacity, n);
  __syncthreads();
  if (threadIdx.x == 0) {
    recv_bytes[s] = n;
    __threadfence_system();  // copied out before the sender may overwrite
    store_volatile(&theirs.acks[rank], e);
  }
}

__global__ void advance_kernel(uint64_t* epoch) { *epoch += 1; }

}  // namespace

extern "C" {

// Bytes of one receive area for `world` ranks of `capacity` bytes each.
int64_t mr_ipc_area_bytes(int64_t world, int64_t capacity) { return header_bytes(world) + world * capacity; }

// Allocate this rank's receive area (zeroed) and its IPC handle (64 bytes into `handle`).
int mr_ipc_create(int64_t world, int64_t capacity, void** base, void* handle) {
  cudaError_t err = cudaMalloc(base, mr_ipc_area_bytes(world, capacity));
  if (err == cudaSuccess) err = cudaMemset(*base, 0, mr_ipc_area_bytes(world, capacity));
  if (err == cudaSuccess) err = cudaIpcGetMemHandle(static_cast<cudaIpcMemHandle_t*>(handle), *base);
  return static_cast<int>(err);
}

int mr_ipc_open(const void* handle, void** base) {
  cudaIpcMemHandle_t h;
  for (unsigned i = 0; i < sizeof(h); ++i) reinterpret_cast<char*>(&h)[i] = static_cast<const char*>(handle)[i];
  return static_cast<int>(cudaIpcOpenMemHandle(base, h, cudaIpcMemLazyEnablePeerAccess));
}

int mr_ipc_close(void* base, int own) {
  return static_cast<int>(own ? cudaFree(base) : cudaIpcCloseMemHandle(base));
}

// One exchange on `stream` (capturable): send [world][capacity] bytes, send_bytes [world], recv
// [world][capacity], recv_bytes [world], areas [world] device pointers, epoch [1], live [world]; all
// device memory.
int mr_ipc_exchange(const void* send, const int64_t* send_bytes, void* recv, int64_t* recv_bytes, void* const* areas,
                    int64_t rank, int64_t world, int64_t capacity, uint64_t* epoch, uint8_t* live,
                    int64_t timeout_cycles, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  auto a = reinterpret_cast<uint8_t* const*>(areas);
  post_kernel<<<world, 256, 0, s>>>(static_cast<const uint8_t*>(send), send_bytes, a, rank, world, capacity, epoch,
                                    live, timeout_cycles);
  consume_kernel<<<world, 256, 0, s>>>(static_cast<const uint8_t*>(send), send_bytes, static_cast<uint8_t*>(recv),
                                       recv_bytes, a, rank, world, capacity, epoch, live, timeout_cycles);
  advance_kernel<<<1, 1, 0, s>>>(epoch);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
