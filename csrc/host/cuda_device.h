// The device side of CUDA for the host build of csrc/cuda/*.cu (the cuda_host backend): the very same
// kernel sources, compiled by the host C++ compiler, run here so that CPU-only CI tests them and the
// sanitizers watch them. Each host translation unit includes this header and then one .cu file, as
// nvcc includes cuda_runtime.h first; csrc/host/include/ stands in for the CUDA headers they include.
//
// How a launch runs (vqfast::cuda::launch, which csrc/cuda/common.cuh defines as <<<>>> under nvcc):
// - the blocks one after another (x fastest, then y, z); a block's threads as real host threads, drawn
//   from a pool that lives as long as the process, each with its own threadIdx/blockIdx/blockDim/gridDim;
// - __syncthreads is a barrier of the block's threads, __syncwarp and the warp primitives (full mask)
//   one of the warp's; a thread that leaves the kernel drops out of both, as an exited GPU thread does;
// - __shared__ variables are function statics: one copy, which the blocks use in turn (launches are
//   serialised); dynamic shared memory (dynamic_shared<T>()) is a heap buffer of exactly the launch's
//   size, so AddressSanitizer sees overruns, refilled with 0xff bytes (NaN) before each block, so a read
//   before any write shows;
// - a failed VQFAST_KERNEL_ASSERT stops the thread and the launch (the blocks not yet run are skipped)
//   with cudaErrorAssert, which the launcher's cudaGetLastError then reports, and poisons later
//   launches until then, as the device-side assert does on a GPU;
// - launch limits are a GPU's: at most 1024 threads and 48 KiB of dynamic shared memory per block,
//   grid.y and grid.z at most 65535.
// What it cannot show: warp-synchronous code that relies on lockstep without __syncwarp, the GPU's
// memory model and timing; static __shared__ memory keeps the previous block's values.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <math.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define VQFAST_ASSERT_FAIL ::vqfast::host::assert_fail

// ---------------------------------------------------------------------------------- the emulator

namespace vqfast {
namespace host {

// A barrier of a group of emulated threads (a block, a warp). A thread that leaves the kernel drops
// out, and the others no longer wait for it.
class Barrier {
 public:
  void reset(unsigned threads) {
    expected_ = threads;
    arrived_ = 0;
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (++arrived_ == expected_) return release();
    const uint64_t phase = phase_;
    cv_.wait(lock, [&] { return phase_ != phase; });
  }
  void drop() {
    std::lock_guard<std::mutex> lock(mutex_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++phase_;
    cv_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  unsigned expected_ = 0, arrived_ = 0;
  uint64_t phase_ = 0;
};

constexpr unsigned kWarpSize = 32;

struct Warp {
  Barrier barrier;
  unsigned size = 0;  // threads of the block in this warp
  // Each lane's value during an exchange, in two banks that exchanges use in turn: a lane writes a bank
  // again only two exchanges later, once every lane has passed the barrier between (so has read it),
  // which lets an exchange cost one barrier.
  alignas(16) unsigned char lanes[2][kWarpSize][16];
};

// The block being run: its barriers and dynamic shared memory.
struct Block {
  Barrier barrier;
  Warp warps[kMaxThreadsPerBlock / kWarpSize];
  unsigned char* dynamic_shared = nullptr;
};

// What an emulated thread knows of its place (beside threadIdx and friends).
struct ThreadContext {
  Block* block = nullptr;
  Warp* warp = nullptr;
  unsigned lane = 0;
  unsigned exchanges = 0;  // the warp's exchanges so far (the same in every lane: full masks only)
};
inline thread_local ThreadContext context;

// Thrown by a failed VQFAST_KERNEL_ASSERT: ends the thread's kernel.
struct DeviceAssert {
  const char *condition, *file, *function;
  unsigned line;
};

[[noreturn]] inline void assert_fail(const char* condition, const char* file, unsigned line, const char* function) {
  throw DeviceAssert{condition, file, function, line};
}

// Runs the blocks of a launch on a pool of host threads, one launch at a time.
class Device {
 public:
  // Never destroyed: its threads wait for work until the process ends.
  static Device& get() {
    static Device* device = new Device;
    return *device;
  }

  cudaError_t run(dim3 grid, dim3 block, size_t smem, const std::function<void()>& kernel) {
    std::lock_guard<std::mutex> one_launch(launch_mutex_);
    const unsigned threads = block.x * block.y * block.z;
    grow(threads);
    std::unique_ptr<unsigned char[]> dynamic(new unsigned char[smem]);
    error_ = cudaSuccess;
    for (unsigned z = 0; z < grid.z && error_ == cudaSuccess; ++z) {
      for (unsigned y = 0; y < grid.y && error_ == cudaSuccess; ++y) {
        for (unsigned x = 0; x < grid.x && error_ == cudaSuccess; ++x) {
          std::memset(dynamic.get(), 0xff, smem);
          block_.dynamic_shared = dynamic.get();
          block_.barrier.reset(threads);
          for (unsigned w = 0; w * kWarpSize < threads; ++w) {
            block_.warps[w].size = std::min(kWarpSize, threads - w * kWarpSize);
            block_.warps[w].barrier.reset(block_.warps[w].size);
          }
          run_block(Job{&kernel, grid, block, uint3{x, y, z}, threads});
        }
      }
    }
    return error_;
  }

 private:
  struct Job {
    const std::function<void()>* kernel;
    dim3 grid, block;
    uint3 index;
    unsigned threads;
  };

  // Each pool thread waits on its own flag, so that a block wakes only its own threads.
  struct Worker {
    std::mutex mutex;
    std::condition_variable wake;
    bool go = false;
  };

  void grow(unsigned threads) {
    while (pool_.size() < threads) {
      pool_.push_back(std::make_unique<Worker>());
      std::thread([this, worker = pool_.back().get(), id = static_cast<unsigned>(pool_.size() - 1)] {
        work(*worker, id);
      }).detach();
    }
  }

  void run_block(const Job& job) {
    job_ = job;
    running_.store(job.threads);
    for (unsigned id = 0; id < job.threads; ++id) {
      Worker& worker = *pool_[id];
      {
        std::lock_guard<std::mutex> lock(worker.mutex);
        worker.go = true;
      }
      worker.wake.notify_one();
    }
    std::unique_lock<std::mutex> lock(done_mutex_);
    done_.wait(lock, [&] { return running_.load() == 0; });
  }

  void work(Worker& worker, unsigned id) {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(worker.mutex);
        worker.wake.wait(lock, [&] { return worker.go; });
        worker.go = false;
      }
      run_thread(job_, id);
      if (running_.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(done_mutex_);
        done_.notify_one();
      }
    }
  }

  void run_thread(const Job& job, unsigned id);
  void fail(cudaError_t error, const Job& job, const DeviceAssert* assertion);

  std::mutex launch_mutex_;  // held through a launch: the pool, job_ and block_ are its
  std::vector<std::unique_ptr<Worker>> pool_;
  Job job_{};
  std::atomic<unsigned> running_{0};  // threads of the block still running
  std::mutex done_mutex_;
  std::condition_variable done_;
  Block block_;
  std::mutex error_mutex_;
  cudaError_t error_ = cudaSuccess;
};

}  // namespace host
}  // namespace vqfast

// --------------------------------------------------------------------- CUDA's built-in variables

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

inline void vqfast::host::Device::run_thread(const Job& job, unsigned id) {
  threadIdx = uint3{id % job.block.x, id / job.block.x % job.block.y, id / (job.block.x * job.block.y)};
  blockIdx = job.index;
  blockDim = job.block;
  gridDim = job.grid;
  context = ThreadContext{&block_, &block_.warps[id / kWarpSize], id % kWarpSize, 0};
  try {
    (*job.kernel)();
  } catch (const DeviceAssert& assertion) {
    fail(cudaErrorAssert, job, &assertion);
  } catch (...) {
    fail(cudaErrorLaunchFailure, job, nullptr);
  }
  context.warp->barrier.drop();
  block_.barrier.drop();
}

// The first failure of a launch is kept and, for an assertion, printed as the device prints it.
inline void vqfast::host::Device::fail(cudaError_t error, const Job& job, const DeviceAssert* assertion) {
  std::lock_guard<std::mutex> lock(error_mutex_);
  if (error_ != cudaSuccess) return;
  error_ = error;
  if (assertion != nullptr) {
    std::fprintf(stderr, "%s:%u: %s: block: [%u,%u,%u], thread: [%u,%u,%u] Assertion `%s` failed.\n", assertion->file,
                 assertion->line, assertion->function, job.index.x, job.index.y, job.index.z, threadIdx.x, threadIdx.y,
                 threadIdx.z, assertion->condition);
  }
}

// -------------------------------------------------------------------- launches, shared memory

namespace vqfast {
namespace cuda {

// kernel<<<grid, block, smem, stream>>>(args...) on the emulated device; errors as cudaGetLastError's.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  cudaError_t& error = host::last_error();
  if (error == cudaErrorAssert) return;  // sticky, as on a GPU
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > host::kMaxThreadsPerBlock || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    error = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem > host::kMaxSharedPerBlock) {
    error = cudaErrorInvalidValue;
    return;
  }
  const cudaError_t result = host::Device::get().run(grid, block, smem, [&] { kernel(args...); });
  if (result != cudaSuccess) error = result;
}

template <typename T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(host::context.block->dynamic_shared);
}

}  // namespace cuda
}  // namespace vqfast

// -------------------------------------------------------------------- synchronisation, warps

inline void __syncthreads() { vqfast::host::context.block->barrier.wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { vqfast::host::context.warp->barrier.wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

namespace vqfast {
namespace host {

// Every lane of the warp publishes v; returns lane `source`'s (this lane's own when `source` is not a
// thread of the warp).
template <typename T>
T exchange(T v, unsigned source) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "warp exchange of a small value");
  Warp& warp = *context.warp;
  auto& lanes = warp.lanes[context.exchanges++ % 2];
  std::memcpy(lanes[context.lane], &v, sizeof(T));
  warp.barrier.wait();
  T out;
  std::memcpy(&out, lanes[source < warp.size ? source : context.lane], sizeof(T));
  return out;
}

// The predicates of the warp's lanes as a ballot.
inline unsigned ballot(bool predicate) {
  Warp& warp = *context.warp;
  auto& lanes = warp.lanes[context.exchanges++ % 2];
  lanes[context.lane][0] = predicate;
  warp.barrier.wait();
  unsigned bits = 0;
  for (unsigned lane = 0; lane < warp.size; ++lane) bits |= static_cast<unsigned>(lanes[lane][0] != 0) << lane;
  return bits;
}

inline unsigned segment(int width) { return context.lane & ~static_cast<unsigned>(width - 1); }

}  // namespace host
}  // namespace vqfast

template <typename T>
T __shfl_sync(unsigned, T v, int source, int width = 32) {
  return vqfast::host::exchange(v, vqfast::host::segment(width) + (static_cast<unsigned>(source) & (width - 1)));
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  const unsigned lane = vqfast::host::context.lane, source = lane ^ static_cast<unsigned>(mask);
  return vqfast::host::exchange(v, (source & ~static_cast<unsigned>(width - 1)) == vqfast::host::segment(width)
                                       ? source
                                       : lane);
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  const unsigned lane = vqfast::host::context.lane;
  return vqfast::host::exchange(v, (lane & (width - 1)) + delta < static_cast<unsigned>(width) ? lane + delta : lane);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  const unsigned lane = vqfast::host::context.lane;
  return vqfast::host::exchange(v, (lane & (width - 1)) >= delta ? lane - delta : lane);
}
inline unsigned __ballot_sync(unsigned, int predicate) { return vqfast::host::ballot(predicate != 0); }
inline int __any_sync(unsigned, int predicate) { return vqfast::host::ballot(predicate != 0) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  const unsigned active = vqfast::host::context.warp->size == 32 ? 0xffffffffu
                                                                  : (1u << vqfast::host::context.warp->size) - 1;
  return (vqfast::host::ballot(predicate != 0) & mask & active) == (mask & active);
}

// -------------------------------------------------------------------------- atomics, arithmetic

template <typename T>
T atomicAdd(T* address, T value) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomicAdd on 4- and 8-byte types");
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
  } else {
    T old, sum;
    __atomic_load(address, &old, __ATOMIC_RELAXED);
    do {
      sum = old + value;
    } while (!__atomic_compare_exchange(address, &old, &sum, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
  }
}

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// The _rn intrinsics: one IEEE operation, rounded to nearest, never contracted (the host build compiles
// with -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float rsqrtf(float v) { return 1.f / sqrtf(v); }

inline unsigned __float_as_uint(float v) {
  unsigned u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned u) {
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
