// The Python extension module cabattn._C. It holds no Python functions: importing it loads
// the shared library, whose static initialisers register the operators with the dispatcher
// (TORCH_LIBRARY_FRAGMENT in each csrc/<op>.cpp, TORCH_LIBRARY_IMPL in csrc/cuda/<op>.cu).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
