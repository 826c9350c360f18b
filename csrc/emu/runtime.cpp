// The runtime of the CUDA emulation layer (cuda_emu.h): launch checks, and the scheduler that
// runs a block's threads as fibers on one OS thread.
//
// A block runs in rounds. Each round resumes the runnable threads in a fresh random order
// (seeded per launch and block, so a run is reproducible but the order changes between
// barriers); a thread runs until it reaches __syncthreads, a warp collective or its end. After
// the round, every warp collective whose mask has fully arrived completes (the result of each
// lane computed from the values the lanes brought, as PTX's shfl.sync defines); when no thread
// can run and every live thread waits at __syncthreads, the barrier opens. Anything else is a
// deadlock on the GPU and an error here.
#include "emu/cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <ATen/Parallel.h>

#include <exception>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cabattn {
namespace emu {

namespace {

constexpr size_t kStackBytes = 64 * 1024;  // per CUDA thread; the kernels keep small frames
constexpr int kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridX = 2147483647u, kMaxGridYZ = 65535u;

enum class State { kReady, kBarrier, kWarp, kExited };

}  // namespace

struct Fiber {
  uint3 index;
  int linear;
  State state;
  // At a barrier: -1 for __syncthreads, else the kind of __syncthreads_{count,and,or}.
  int barrier_kind;
  int predicate;
  int barrier_result;
  // At a warp collective.
  WarpOp op;
  unsigned mask;
  uint64_t value;
  int b, c;
  uint64_t result;
  // Saved context.
#if defined(__x86_64__)
  void* sp;
#else
  ucontext_t context;
#endif
};

thread_local uint3 current_thread{0, 0, 0};
thread_local uint3 current_block{0, 0, 0};
thread_local dim3 current_block_dim;
thread_local dim3 current_grid_dim;

namespace {

thread_local Fiber* current_fiber = nullptr;

#if defined(__x86_64__)
// switch_context(&save, load): saves the callee-saved registers and the SSE/x87 control words
// on the current stack, stores the stack pointer in *save, and resumes the context whose stack
// pointer is `load`. A new context's stack is laid out by prepare_stack below.
extern "C" void cabattn_emu_switch_context(void** save, void* load);
asm(R"(
  .text
  .globl cabattn_emu_switch_context
  .hidden cabattn_emu_switch_context
  .type cabattn_emu_switch_context, @function
cabattn_emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cabattn_emu_switch_context, .-cabattn_emu_switch_context
)");
#endif

struct Worker {
  std::vector<Fiber> fibers;
  char* stacks = nullptr;  // fibers.size() stacks, each below a guard page
  size_t stack_slots = 0;
  const KernelBody* body = nullptr;
  std::exception_ptr error;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif

  static size_t slot_bytes() { return kStackBytes + size_t(sysconf(_SC_PAGESIZE)); }

  void reserve_stacks(size_t count) {
    if (count <= stack_slots) return;
    release_stacks();
    void* memory = mmap(nullptr, count * slot_bytes(), PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(memory != MAP_FAILED, "CUDA emulation: cannot map the stacks of ", count,
                " threads");
    stacks = static_cast<char*>(memory);
    stack_slots = count;
    // A guard page below each stack turns an overflow into a crash instead of corruption.
    for (size_t i = 0; i < count; ++i)
      mprotect(stacks + i * slot_bytes(), size_t(sysconf(_SC_PAGESIZE)), PROT_NONE);
  }
  void release_stacks() {
    if (stacks != nullptr) munmap(stacks, stack_slots * slot_bytes());
    stacks = nullptr;
    stack_slots = 0;
  }
  ~Worker() { release_stacks(); }
};

thread_local Worker worker;

[[noreturn]] void fiber_main();

void prepare_stack(Fiber& fiber, char* stack_low) {
#if defined(__x86_64__)
  auto* top = reinterpret_cast<uint64_t*>(
      (reinterpret_cast<uintptr_t>(stack_low + kStackBytes)) & ~uintptr_t(15));
  uint32_t control[2];
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(control[1]));
  // From the top: a null return address (fiber_main never returns; the ABI wants rsp = 8 mod
  // 16 at entry), the entry point for `ret`, six callee-saved registers, the control words.
  top[-1] = 0;
  top[-2] = reinterpret_cast<uint64_t>(&fiber_main);
  for (int r = 3; r <= 8; ++r) top[-r] = 0;
  std::memcpy(&top[-9], control, 8);
  fiber.sp = &top[-9];
#else
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = stack_low;
  fiber.context.uc_stack.ss_size = kStackBytes;
  fiber.context.uc_link = nullptr;
  makecontext(&fiber.context, reinterpret_cast<void (*)()>(&fiber_main), 0);
#endif
}

void switch_to(Fiber& fiber) {
  current_fiber = &fiber;
  current_thread = fiber.index;
#if defined(__x86_64__)
  cabattn_emu_switch_context(&worker.scheduler_sp, fiber.sp);
#else
  swapcontext(&worker.scheduler, &fiber.context);
#endif
  current_fiber = nullptr;
}

void yield_to_scheduler() {
  Fiber* self = current_fiber;
#if defined(__x86_64__)
  cabattn_emu_switch_context(&self->sp, worker.scheduler_sp);
#else
  swapcontext(&self->context, &worker.scheduler);
#endif
}

void fiber_main() {
  try {
    worker.body->run(worker.body->closure);
  } catch (...) {
    if (!worker.error) worker.error = std::current_exception();
  }
  current_fiber->state = State::kExited;
  yield_to_scheduler();
  __builtin_unreachable();
}

Fiber& self_fiber(const char* what) {
  TORCH_CHECK(current_fiber != nullptr, what, " called outside an emulated kernel");
  return *current_fiber;
}

std::string describe(const uint3& v) {
  std::ostringstream s;
  s << "(" << v.x << ", " << v.y << ", " << v.z << ")";
  return s.str();
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync: return "__syncwarp";
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflBfly: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
  }
  return "?";
}

// The source lane of `lane` in shfl.sync (PTX ISA): -1 for "own value".
int shuffle_source(WarpOp op, int lane, int b, int c) {
  const int bval = b & 0x1f, cval = c & 0x1f, segmask = (c >> 8) & 0x1f;
  const int max_lane = (lane & segmask) | (cval & ~segmask);
  const int min_lane = lane & segmask;
  int j = lane;
  bool valid = false;
  switch (op) {
    case WarpOp::kShflUp: j = lane - bval; valid = j >= max_lane; break;
    case WarpOp::kShflDown: j = lane + bval; valid = j <= max_lane; break;
    case WarpOp::kShflBfly: j = lane ^ bval; valid = j <= max_lane; break;
    case WarpOp::kShflIdx: j = min_lane | (bval & ~segmask); valid = j <= max_lane; break;
    default: break;
  }
  return valid ? j : lane;
}

class BlockScheduler {
 public:
  BlockScheduler(std::vector<Fiber>& fibers, uint64_t seed) : fibers_(fibers), rng_(seed) {}

  void run() {
    std::vector<int> ready(fibers_.size());
    for (size_t t = 0; t < fibers_.size(); ++t) ready[t] = int(t);
    while (true) {
      std::shuffle(ready.begin(), ready.end(), rng_);
      for (const int t : ready) {
        switch_to(fibers_[t]);
        if (worker.error) std::rethrow_exception(worker.error);
      }
      ready.clear();
      for (size_t warp = 0; warp * 32 < fibers_.size(); ++warp) complete_warp(warp, ready);
      if (!ready.empty()) continue;
      if (!open_barrier(ready)) return;  // every thread has exited
    }
  }

 private:
  // Completes the collectives of `warp` whose members have all arrived.
  void complete_warp(size_t warp, std::vector<int>& ready) {
    const int first = int(warp * 32);
    const int lanes = std::min<int>(32, int(fibers_.size()) - first);
    for (int lane = 0; lane < lanes; ++lane) {
      const Fiber& waiter = fibers_[first + lane];
      if (waiter.state != State::kWarp) continue;
      const unsigned mask = waiter.mask;
      bool arrived = true;
      for (int m = 0; m < 32; ++m) {
        if (!(mask >> m & 1u)) continue;
        if (m >= lanes || fibers_[first + m].state == State::kExited) {
          fail_warp(waiter, "lane " + std::to_string(m) + " of its mask has exited or does not "
                    "exist (on a GPU: undefined behaviour or a hang)");
        }
        if (fibers_[first + m].state != State::kWarp) arrived = false;
      }
      if (!arrived) continue;
      for (int m = 0; m < 32; ++m) {
        if (!(mask >> m & 1u)) continue;
        const Fiber& other = fibers_[first + m];
        if (other.op != waiter.op || other.mask != mask)
          fail_warp(waiter, "lane " + std::to_string(m) + " waits in " + op_name(other.op) +
                    " with mask " + std::to_string(other.mask) + " instead");
      }
      uint64_t ballot = 0;
      for (int m = 0; m < 32; ++m)
        if ((mask >> m & 1u) && fibers_[first + m].value != 0) ballot |= uint64_t(1) << m;
      for (int m = 0; m < 32; ++m) {
        if (!(mask >> m & 1u)) continue;
        Fiber& member = fibers_[first + m];
        if (waiter.op == WarpOp::kBallot) {
          member.result = ballot;
        } else if (waiter.op != WarpOp::kSync) {
          const int source = shuffle_source(member.op, m, member.b, member.c);
          if (!(mask >> source & 1u))
            fail_warp(member, "it reads lane " + std::to_string(source) + ", which is not in "
                      "the mask (undefined on a GPU)");
          member.result = fibers_[first + source].value;
        }
        member.state = State::kReady;
        ready.push_back(first + m);
      }
    }
  }

  [[noreturn]] void fail_warp(const Fiber& fiber, const std::string& why) {
    std::ostringstream s;
    s << "thread " << describe(fiber.index) << " of block " << describe(current_block)
      << " waits in " << op_name(fiber.op) << " with mask 0x" << std::hex << fiber.mask
      << std::dec << " but " << why;
    throw std::runtime_error(s.str());
  }

  // Opens __syncthreads when every live thread waits there; false when all have exited.
  bool open_barrier(std::vector<int>& ready) {
    int live = 0, kind = -2, count = 0, all = 1, any = 0;
    for (const Fiber& f : fibers_) {
      if (f.state == State::kExited) continue;
      ++live;
      if (f.state != State::kBarrier) {
        std::ostringstream s;
        s << "deadlock: thread " << describe(f.index) << " of block " << describe(current_block)
          << " waits in " << op_name(f.op) << " (mask 0x" << std::hex << f.mask << std::dec
          << ") while other threads wait at __syncthreads or have exited";
        throw std::runtime_error(s.str());
      }
      if (kind == -2) kind = f.barrier_kind;
      if (f.barrier_kind != kind)
        throw std::runtime_error("threads of block " + describe(current_block) + " wait at "
                                 "different kinds of __syncthreads (plain/count/and/or)");
      count += f.predicate != 0;
      all &= f.predicate != 0;
      any |= f.predicate != 0;
    }
    if (live == 0) return false;
    const int result = kind == 0 ? count : kind == 1 ? all : any;
    for (Fiber& f : fibers_) {
      if (f.state != State::kBarrier) continue;
      f.barrier_result = result;
      f.state = State::kReady;
      ready.push_back(f.linear);
    }
    return true;
  }

  std::vector<Fiber>& fibers_;
  std::mt19937_64 rng_;
};

std::mutex attribute_mutex;
std::unordered_map<const void*, int> max_dynamic_shared_of;  // cudaFuncSetAttribute
std::atomic<uint64_t> launches{0};

void run_block(const KernelBody& body, dim3 grid, dim3 block, size_t dynamic_shared,
               int64_t linear, uint64_t launch_seed) {
  Worker& w = worker;
  const int threads = int(block.x * block.y * block.z);
  w.reserve_stacks(size_t(threads));
  w.fibers.resize(size_t(threads));
  w.body = &body;
  w.error = nullptr;
  current_block = uint3{unsigned(linear % grid.x), unsigned(linear / grid.x % grid.y),
                        unsigned(linear / grid.x / grid.y)};
  current_block_dim = block;
  current_grid_dim = grid;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = w.fibers[size_t(t)];
    f.index = uint3{unsigned(t) % block.x, unsigned(t) / block.x % block.y,
                    unsigned(t) / (block.x * block.y)};
    f.linear = t;
    f.state = State::kReady;
    prepare_stack(f, w.stacks + size_t(t) * Worker::slot_bytes() + size_t(sysconf(_SC_PAGESIZE)));
  }
  // Shared memory starts as garbage on a GPU; 0xff bytes are NaN as floats, -1 as integers.
  std::memset(body.dynamic_shared(), 0xff, dynamic_shared);
  std::seed_seq seed{launch_seed, uint64_t(linear)};
  std::mt19937_64 seeded(seed);
  BlockScheduler(w.fibers, seeded()).run();
}

}  // namespace

void syncthreads() {
  Fiber& f = self_fiber("__syncthreads");
  f.state = State::kBarrier;
  f.barrier_kind = -1;
  f.predicate = 0;
  yield_to_scheduler();
}

int syncthreads_reduce(int kind, int predicate) {
  Fiber& f = self_fiber("__syncthreads_count/and/or");
  f.state = State::kBarrier;
  f.barrier_kind = kind;
  f.predicate = predicate;
  yield_to_scheduler();
  return f.barrier_result;
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int b, int c) {
  Fiber& f = self_fiber(op_name(op));
  const unsigned lane = unsigned(f.linear) % 32;
  if (!(mask >> lane & 1u)) {
    std::ostringstream s;
    s << "thread " << describe(f.index) << " calls " << op_name(op) << " with mask 0x"
      << std::hex << mask << std::dec << ", which does not include its own lane " << lane;
    throw std::runtime_error(s.str());
  }
  f.state = State::kWarp;
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.b = b;
  f.c = c;
  yield_to_scheduler();
  return f.result;
}

void kernel_assert_failed(const char* condition, const char* file, int line) {
  std::ostringstream s;
  s << "device-side assertion `" << condition << "` failed at " << file << ":" << line
    << " in thread " << describe(current_fiber ? current_fiber->index : uint3{0, 0, 0})
    << " of block " << describe(current_block)
    << " (on a GPU this error is sticky: every later CUDA call of the process fails)";
  throw std::runtime_error(s.str());
}

const char* error_string(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid argument";
}

cudaError_t set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > kMaxDynamicSharedOptin) return cudaErrorInvalidValue;
  const std::lock_guard<std::mutex> lock(attribute_mutex);
  max_dynamic_shared_of[kernel] = bytes;
  return cudaSuccess;
}

int max_dynamic_shared(const void* kernel) {
  const std::lock_guard<std::mutex> lock(attribute_mutex);
  const auto it = max_dynamic_shared_of.find(kernel);
  return it == max_dynamic_shared_of.end() ? kMaxDynamicSharedDefault : it->second;
}

void launch(const char* op, const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared,
            KernelBody body) {
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  TORCH_CHECK(block.x >= 1 && block.y >= 1 && block.z >= 1 && block.x <= 1024 &&
                  block.y <= 1024 && block.z <= 64 && threads <= kMaxThreadsPerBlock,
              op, ": CUDA error: invalid configuration argument (a block of ", block.x, " x ",
              block.y, " x ", block.z, " = ", threads, " threads; the GPU allows at most ",
              kMaxThreadsPerBlock, " threads per block and 1024 x 1024 x 64 per dimension)");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= kMaxGridX &&
                  grid.y <= kMaxGridYZ && grid.z <= kMaxGridYZ,
              op, ": CUDA error: invalid configuration argument (a grid of ", grid.x, " x ",
              grid.y, " x ", grid.z, " blocks; the GPU allows 1 to ", kMaxGridX, " in x and 1 "
              "to ", kMaxGridYZ, " in y and z)");
  const int allowed = max_dynamic_shared(kernel);
  TORCH_CHECK(dynamic_shared <= size_t(allowed), op, ": CUDA error: invalid argument (the "
              "launch asks for ", dynamic_shared, " bytes of dynamic shared memory; the kernel "
              "may use ", allowed, allowed == kMaxDynamicSharedDefault
                  ? " without cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize)"
                  : " as set by cudaFuncSetAttribute", ", and an H100/H200 block at most ",
              kMaxDynamicSharedOptin, ")");

  const uint64_t launch_seed = launches.fetch_add(1);
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  std::atomic<bool> failed{false};
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end && !failed.load(std::memory_order_relaxed); ++b) {
      try {
        run_block(body, grid, block, dynamic_shared, b, launch_seed);
      } catch (const std::exception& e) {
        failed = true;
        TORCH_CHECK(false, op, " (emulated CUDA kernel): ", e.what());
      }
    }
  });
}

}  // namespace emu
}  // namespace cabattn
