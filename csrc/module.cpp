// kernels._C: importing it runs the static TORCH_LIBRARY_IMPL registrations of csrc/. The op
// schemas are defined in Python (kernels/_ops.py); this module has no Python functions.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
