// Liveness board: one robust, process-shared pthread mutex per rank in a shared file mapping.
//
// Each rank holds its own mutex for as long as it lives. When a thread dies, the kernel walks its
// robust-futex list at the very start of its exit (mm_release, before the address space is torn
// down) and clears the owner's thread id from any mutex it held. Peers on the same host thus see a
// SIGKILLed rank gone within a millisecond however large it is (liveness_dead reads that id), whereas
// its sockets close only once its memory has been freed: 41 ms at +100 MiB, 326 ms at +3 GiB over
// `import torch` on this host.
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <map>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "board_deaths.h"

namespace {

struct Board {
  pthread_mutex_t* slots;
  Py_ssize_t size;
};

std::map<std::string, Board> g_boards;  // mapped once per process and kept: holders need it to the end

PyObject* os_error(const char* what, const char* path, int err) {
  return PyErr_Format(PyExc_OSError, "liveness board %s: %s (%s)", path, what, strerror(err));
}

// The board at ``path``, mapped on first use; nullptr with a Python error set on failure.
Board* board(const char* path) {
  auto it = g_boards.find(path);
  if (it != g_boards.end()) return &it->second;
  int fd = open(path, O_RDWR);
  if (fd < 0) return (os_error("cannot open", path, errno), nullptr);
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_size <= 0 || st.st_size % sizeof(pthread_mutex_t) != 0) {
    close(fd);
    PyErr_Format(PyExc_ValueError, "liveness board %s: not a board (size %lld)", path, (long long)st.st_size);
    return nullptr;
  }
  void* mem = mmap(nullptr, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (mem == MAP_FAILED) return (os_error("cannot map", path, errno), nullptr);
  Board b{static_cast<pthread_mutex_t*>(mem), static_cast<Py_ssize_t>(st.st_size / sizeof(pthread_mutex_t))};
  return &(g_boards[path] = b);
}

pthread_mutex_t* slot(Board* b, const char* path, Py_ssize_t rank) {
  if (rank < 0 || rank >= b->size) {
    PyErr_Format(PyExc_ValueError, "liveness board %s has %zd slots; rank %zd is out of range", path, b->size, rank);
    return nullptr;
  }
  return &b->slots[rank];
}

PyObject* liveness_create(PyObject*, PyObject* args) {
  const char* path;
  Py_ssize_t n;
  if (!PyArg_ParseTuple(args, "sn", &path, &n)) return nullptr;
  if (n < 1) return PyErr_Format(PyExc_ValueError, "liveness board needs at least one slot, got %zd", n);
  int fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) return os_error("cannot create", path, errno);
  size_t bytes = n * sizeof(pthread_mutex_t);
  void* mem = ftruncate(fd, bytes) == 0 ? mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
  int err = errno;
  close(fd);
  if (mem == MAP_FAILED) return (unlink(path), os_error("cannot size or map", path, err));
  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);  // a second hold() by the owner is EDEADLK
  for (Py_ssize_t i = 0; i < n; ++i) pthread_mutex_init(&static_cast<pthread_mutex_t*>(mem)[i], &attr);
  pthread_mutexattr_destroy(&attr);
  munmap(mem, bytes);
  Py_RETURN_NONE;
}

// Lock ``rank``'s mutex for the calling thread's lifetime (a dead predecessor's one is taken over).
PyObject* liveness_hold(PyObject*, PyObject* args) {
  const char* path;
  Py_ssize_t rank;
  if (!PyArg_ParseTuple(args, "sn", &path, &rank)) return nullptr;
  Board* b = board(path);
  pthread_mutex_t* m = b ? slot(b, path, rank) : nullptr;
  if (!m) return nullptr;
  int rc;
  Py_BEGIN_ALLOW_THREADS;  // a prober may hold it for a moment
  rc = pthread_mutex_lock(m);
  if (rc == EOWNERDEAD) rc = pthread_mutex_consistent(m);
  Py_END_ALLOW_THREADS;
  if (rc != 0 && rc != EDEADLK) return os_error("cannot hold a slot", path, rc);
  Py_RETURN_NONE;
}

// The slots of (path, ranks) call arguments, with each rank's Python object. Returns the ranks as a
// sequence that holds those objects (the caller releases it), or nullptr with a Python error set on a
// bad path or rank.
PyObject* slots_of(PyObject* args, std::vector<std::pair<PyObject*, pthread_mutex_t*>>& out) {
  const char* path;
  PyObject* ranks;
  if (!PyArg_ParseTuple(args, "sO", &path, &ranks)) return nullptr;
  Board* b = board(path);
  if (!b) return nullptr;
  PyObject* seq = PySequence_Fast(ranks, "ranks must be a sequence of ints");
  for (Py_ssize_t i = 0; seq && i < PySequence_Fast_GET_SIZE(seq); ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(seq, i);
    Py_ssize_t rank = PyNumber_AsSsize_t(item, PyExc_OverflowError);
    pthread_mutex_t* m = (rank == -1 && PyErr_Occurred()) ? nullptr : slot(b, path, rank);
    if (m) {
      out.emplace_back(item, m);
    } else {
      Py_CLEAR(seq);
    }
  }
  return seq;
}

// A robust mutex keeps its owner's thread id in its futex word (the kernel clears it, setting
// FUTEX_OWNER_DIED, when the owner dies); 0: nobody holds it.
unsigned owner_tid(pthread_mutex_t* m) {
  return __atomic_load_n(reinterpret_cast<unsigned*>(&m->__data.__lock), __ATOMIC_ACQUIRE) & FUTEX_TID_MASK;
}

// Ranks (of those given) whose mutex nobody holds: exited, or never started. Reads the futex word
// instead of trying the lock: a read cannot be mistaken for an owner by another prober, as a trylock
// preempted before its unlock would be.
PyObject* liveness_dead(PyObject*, PyObject* args) {
  std::vector<std::pair<PyObject*, pthread_mutex_t*>> slots;
  PyObject* seq = slots_of(args, slots);
  if (!seq) return nullptr;
  PyObject* dead = PyList_New(0);
  for (auto& [item, m] : slots) {
    if (dead && owner_tid(m) == 0 && PyList_Append(dead, item) != 0) Py_CLEAR(dead);
  }
  Py_DECREF(seq);
  return dead;
}

// Watch one slot for as long as the process lives: block in the lock while its owner holds it (the
// kernel wakes a waiter the moment the owner dies); any acquisition means the owner is gone (ranks hold
// their slot for life), so release it at once, count the death and wake an exchange sleeping on the
// count; then wait for the slot's next holder (a replacement).
void watch(pthread_mutex_t* m) {
  for (;;) {
    while (owner_tid(m) == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    int rc = pthread_mutex_lock(m);
    if (rc == EOWNERDEAD) pthread_mutex_consistent(m);
    if (rc != 0 && rc != EOWNERDEAD) return;
    pthread_mutex_unlock(m);
    moe_resilient::board_deaths().fetch_add(1, std::memory_order_release);
    syscall(SYS_futex, &moe_resilient::board_deaths(), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
  }
}

// Start a watcher thread for each of ``ranks`` (once per slot and process).
PyObject* liveness_watch(PyObject*, PyObject* args) {
  static std::map<pthread_mutex_t*, bool> watched;
  std::vector<std::pair<PyObject*, pthread_mutex_t*>> slots;
  PyObject* seq = slots_of(args, slots);
  if (!seq) return nullptr;
  for (auto& [item, m] : slots) {
    if (!watched[m]) {
      watched[m] = true;
      std::thread(watch, m).detach();
    }
  }
  Py_DECREF(seq);
  Py_RETURN_NONE;
}

PyObject* liveness_deaths(PyObject*, PyObject*) {
  return PyLong_FromUnsignedLong(moe_resilient::board_deaths().load(std::memory_order_acquire));
}

}  // namespace

std::atomic<uint32_t>& moe_resilient::board_deaths() {
  static std::atomic<uint32_t> deaths{0};
  return deaths;
}

PyMethodDef liveness_methods[] = {
    {"liveness_create", liveness_create, METH_VARARGS, "liveness_create(path, n): a new board of n free slots."},
    {"liveness_hold", liveness_hold, METH_VARARGS, "liveness_hold(path, rank): hold a slot until this thread ends."},
    {"liveness_dead", liveness_dead, METH_VARARGS, "liveness_dead(path, ranks) -> ranks whose slot nobody holds."},
    {"liveness_watch", liveness_watch, METH_VARARGS, "liveness_watch(path, ranks): count their deaths at once."},
    {"liveness_deaths", liveness_deaths, METH_NOARGS, "liveness_deaths() -> deaths the watchers have seen."},
    {nullptr, nullptr, 0, nullptr}};
