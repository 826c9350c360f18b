// Chooses the CPU kernels' ISA path once per process (cpu_kernels.h, docs/cpu_kernels.md) and
// reports it to Python: cabattn.ops.cpu_isa() and supported_cpu_isas().
#include "cpu_kernels.h"

#include <torch/library.h>

#include <cstdlib>

namespace cabattn {
namespace {

struct IsaPath {
  const char* name;
  const CpuKernels* kernels;
  bool (*supported)();
};

// Best first. __builtin_cpu_supports also checks that the OS saves the vector registers.
constexpr IsaPath kPaths[] = {
#if CABATTN_X86_ISA_PATHS
    {"avx512", &kAvx512Kernels, [] { return __builtin_cpu_supports("x86-64-v4") > 0; }},
    {"avx2", &kAvx2Kernels, [] { return __builtin_cpu_supports("x86-64-v3") > 0; }},
#endif
    {"baseline", &kBaselineKernels, [] { return true; }},
};

std::string joined(const std::vector<std::string>& names) {
  std::string text;
  for (const std::string& name : names) text += (text.empty() ? "" : ", ") + name;
  return text;
}

const IsaPath& choose_path() {
  const char* variable = std::getenv("CABATTN_CPU_ISA");
  const std::string request = variable == nullptr ? "" : variable;
  for (const IsaPath& path : kPaths) {
    if (request.empty() || request == "auto") {
      if (path.supported()) return path;
    } else if (request == path.name) {
      TORCH_CHECK(path.supported(), "CABATTN_CPU_ISA=", request,
                  ": this CPU does not support it; valid here: auto, ",
                  joined(supported_cpu_isas()));
      return path;
    }
  }
  std::vector<std::string> built;
  for (const IsaPath& path : kPaths) built.push_back(path.name);
  TORCH_CHECK(false, "CABATTN_CPU_ISA=", request, " is not a CPU ISA path of this build; valid: "
              "auto, ", joined(built), " (this CPU supports ", joined(supported_cpu_isas()), ")");
}

const IsaPath& active_path() {
  // A failed choice throws and is retried (and fails again) at the next call.
  static const IsaPath& path = choose_path();
  return path;
}

}  // namespace

const CpuKernels& cpu_kernels() { return *active_path().kernels; }

const std::string& cpu_isa_name() {
  static const std::string name = active_path().name;
  return name;
}

std::vector<std::string> supported_cpu_isas() {
  std::vector<std::string> names;
  for (const IsaPath& path : kPaths)
    if (path.supported()) names.push_back(path.name);
  return names;
}

TORCH_LIBRARY_FRAGMENT(cabattn, m) {
  m.def("cpu_isa() -> str", [] { return cpu_isa_name(); });
  m.def("supported_cpu_isas() -> str[]", [] { return supported_cpu_isas(); });
}

}  // namespace cabattn
