// Empty Python module so `import moe_resilient._C` loads the shared library, whose static
// TORCH_LIBRARY initialisers register the ops (the torchao pattern: no pybind11 needed).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
