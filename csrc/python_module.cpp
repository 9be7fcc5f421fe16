// Makes the shared library importable as `slimops._C` (importing it runs the static
// TORCH_LIBRARY registrations). Kept apart from ops.cpp so the CMake (libtorch, no
// Python) build compiles the same kernel sources without Python headers.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "slimops compiled CPU kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
