// The Python extension module cabattn._C. It holds no Python functions: importing it loads
// the shared library, whose static initialisers register the operators with the dispatcher
// (TORCH_LIBRARY_FRAGMENT in each csrc/<op>.cpp, TORCH_LIBRARY_IMPL in csrc/cuda/<op>.cu), and
// it exports the operators' integer modes and MAX_L2's tolerances (modes.h) as module constants
// for cabattn.reference.
#include <Python.h>

#include "modes.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  for (const cabattn::ModeName& mode : cabattn::kModeNames) {
    if (PyModule_AddIntConstant(module, mode.python_name, mode.value) < 0) {
      Py_DECREF(module);
      return nullptr;
    }
  }
  for (const cabattn::ToleranceName& tolerance : cabattn::kToleranceNames) {
    PyObject* value = PyFloat_FromDouble(tolerance.value);
    if (value == nullptr || PyModule_AddObject(module, tolerance.python_name, value) < 0) {
      Py_XDECREF(value);
      Py_DECREF(module);
      return nullptr;
    }
  }
  return module;
}
}
