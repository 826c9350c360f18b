// The Python extension module cabattn._emu: the CUDA kernel sources built for the CPU against
// the emulation layer (cuda_emu.h). Loading it registers their implementations of
// torch.ops.cabattn_emu.<op> (cabattn/emu.py defines those operators with the cabattn schemas)
// and the test-only kernels of test_kernels.cpp.
#include <Python.h>

extern "C" {
PyObject* PyInit__emu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_emu", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
