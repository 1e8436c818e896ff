// Python module so `import moe_resilient._C` loads the shared library, whose static TORCH_LIBRARY
// initialisers register the ops (the torchao pattern: no pybind11 needed).
#include <Python.h>

// at::parallel_for runs serially in code built without OpenMP, halving the kernels on two cores;
// exposed so a test catches a build that lost -fopenmp.
static PyObject* built_with_openmp(PyObject*, PyObject*) {
#ifdef _OPENMP
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

extern PyMethodDef liveness_methods[];  // csrc/cpu/liveness.cpp

static PyMethodDef methods[] = {
    {"built_with_openmp", built_with_openmp, METH_NOARGS, "Whether the kernels were compiled with OpenMP."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module && PyModule_AddFunctions(module, liveness_methods) != 0) Py_CLEAR(module);
  return module;
}
