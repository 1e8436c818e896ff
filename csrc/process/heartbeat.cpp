// A rank's heartbeat on a native thread, with its own TCPStore connection.
//
// A Python thread beats only when it gets the GIL, and a main thread inside one long C call that holds
// the GIL (building a model, a big-integer or regex computation, some extensions) stops it for as
// long: 117-248 ms gaps were measured while building two small HF models, past the 120 ms timeout,
// so live ranks were evicted. This thread needs no GIL: it stops only when the whole process does
// (SIGSTOP, a hung host) or dies. Each beat also reads the join counter that members agree on in-band.
#include <torch/custom_class.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

namespace {

class Heartbeat : public torch::CustomClassHolder {
 public:
  // Beats `key` (str(n), n = 1, 2, ...) every `interval_s` on the store at host:port (full key names,
  // any PrefixStore prefix included) and reads `joins_key` after each beat.
  Heartbeat(std::string host, int64_t port, std::string key, std::string joins_key, double interval_s)
      : host_(std::move(host)), port_(port), key_(std::move(key)), joins_key_(std::move(joins_key)),
        interval_(std::chrono::duration<double>(interval_s)) {
    TORCH_CHECK(port > 0 && port < 65536, "heartbeat: port ", port, " out of range");
    TORCH_CHECK(interval_s > 0, "heartbeat: interval ", interval_s, " s must be positive");
  }

  ~Heartbeat() override { stop(); }

  void start() {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(!thread_.joinable(), "heartbeat: already started");
    thread_ = std::thread([this] { run(); });
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
  }

  int64_t joins() const { return joins_.load(std::memory_order_relaxed); }
  int64_t beats() const { return beats_.load(std::memory_order_relaxed); }
  // False once the store went away (nothing left to report to) or after stop().
  bool running() const { return running_.load(std::memory_order_relaxed); }

 private:
  void run() {
    running_ = true;
    try {
      c10d::TCPStoreOptions opts;
      opts.port = static_cast<std::uint16_t>(port_);
      opts.isServer = false;
      opts.waitWorkers = false;
      opts.timeout = std::chrono::seconds(30);
      c10d::TCPStore store(host_, opts);
      for (int64_t n = 1;; ++n) {
        std::string beat = std::to_string(n);
        store.set(key_, std::vector<uint8_t>(beat.begin(), beat.end()));
        joins_.store(store.add(joins_key_, 0), std::memory_order_relaxed);
        beats_.store(n, std::memory_order_relaxed);
        std::unique_lock<std::mutex> lock(mutex_);
        if (wake_.wait_for(lock, interval_, [this] { return stopping_; })) break;
      }
    } catch (const std::exception&) {  // the store went away: nothing left to report to
    }
    running_ = false;
  }

  const std::string host_;
  const int64_t port_;
  const std::string key_, joins_key_;
  const std::chrono::duration<double> interval_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::thread thread_;
  std::atomic<int64_t> joins_{0}, beats_{0};
  std::atomic<bool> running_{false};
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_resilient, m) {
  m.class_<Heartbeat>("Heartbeat")
      .def(torch::init<std::string, int64_t, std::string, std::string, double>())
      .def("start", &Heartbeat::start)
      .def("stop", &Heartbeat::stop)
      .def("joins", &Heartbeat::joins)
      .def("beats", &Heartbeat::beats)
      .def("running", &Heartbeat::running);
}
