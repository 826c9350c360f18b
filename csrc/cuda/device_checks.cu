// Deferred device checks: the operators cabattn::deferred_checks and
// cabattn::raise_deferred_checks (cabattn.ops.deferred_checks() is their Python face).
//
// By default each CUDA operator that validates index inputs on the device (select_blocks'
// counts, block_sparse_attention's layout, kv_compact_'s keep) reads its flag back after its
// launch: one host synchronisation per call, 3 x layers per forward, and no CUDA graph can be
// captured. With deferred checks on, the kernels flag into one persistent int per operator and
// device, and the host reads those words once, in raise_deferred_checks: once per forward.
// The price: a bad input is reported at that point, by operator, without the CPU's message that
// names the value (calling the operator outside deferred checks gives it).
#include <array>
#include <atomic>
#include <mutex>
#include <unordered_map>

#include "cuda_common.cuh"

namespace cabattn {
namespace cuda {
namespace {

std::atomic<bool> deferred{false};
// The name (kOp) of each word's operator, recorded by the operator when it takes its word: a
// word is set only by a kernel of an operator that took it, so a set word always has its name.
std::array<std::atomic<const char*>, kCheckedOps> name_of_word{};
std::mutex status_mutex;
// device index -> int32 [kCheckedOps] on that device, allocated once, zeroed when the mode is
// entered; its address is fixed, so a captured graph keeps flagging into it.
std::unordered_map<int, at::Tensor> status_of_device;

at::Tensor status_tensor(const at::Tensor& like) {
  const std::lock_guard<std::mutex> lock(status_mutex);
  const int index = like.device().index();
  auto found = status_of_device.find(index);
  if (found == status_of_device.end()) {
    found = status_of_device
                .emplace(index, at::zeros({kCheckedOps}, like.options().dtype(at::kInt)))
                .first;
  }
  return found->second;
}

// Sets the mode and returns the previous one; entering it clears flags a failed forward left.
bool set_deferred_checks(bool enable) {
  const bool previous = deferred.exchange(enable);
  if (enable && !previous) {
    const std::lock_guard<std::mutex> lock(status_mutex);
    for (auto& [index, status] : status_of_device) status.zero_();
  }
  return previous;
}

// One read-back per device that ran a checked kernel under deferred checks; raises for the first
// operator whose word is set, after clearing the words.
void raise_deferred_checks() {
  std::vector<at::Tensor> statuses;
  {
    const std::lock_guard<std::mutex> lock(status_mutex);
    for (auto& [index, status] : status_of_device) statuses.push_back(status);
  }
  for (at::Tensor& status : statuses) {
    const at::Tensor host = status.cpu();
    const int* words = host.data_ptr<int>();
    for (int op = 0; op < kCheckedOps; ++op) {
      if (words[op] == 0) continue;
      status.zero_();
      TORCH_CHECK(false, name_of_word[op].load(), ": the CUDA kernel flagged a bad input "
                  "during deferred checks (cabattn.ops.deferred_checks()); the same call "
                  "outside deferred checks raises the error that names the bad value");
    }
  }
}

}  // namespace

bool deferred_checks_enabled() { return deferred.load(); }

at::Tensor deferred_status_word(const at::Tensor& like, CheckedOp op, const char* name) {
  name_of_word[static_cast<int>(op)].store(name);
  return status_tensor(like).narrow(0, static_cast<int>(op), 1);
}

}  // namespace cuda
}  // namespace cabattn

TORCH_LIBRARY_FRAGMENT(CABATTN_CUDA_LIBRARY, m) {
  m.def("deferred_checks(bool enable) -> bool", &cabattn::cuda::set_deferred_checks);
  m.def("raise_deferred_checks() -> ()", &cabattn::cuda::raise_deferred_checks);
}
