// Python module so `import moe_resilient._C` loads the shared library, whose static TORCH_LIBRARY
// initialisers register the ops (the torchao pattern: no pybind11 module needed).
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

extern PyMethodDef liveness_methods[];  // csrc/process/liveness.cpp
extern PyMethodDef eager_methods[];     // csrc/eager_calls.cpp

namespace moe_resilient {  // csrc/cpu/skinny_gemm.h
bool skinny_gemm_avx512_enabled();
bool skinny_gemm_allow_avx512(bool allowed);
}  // namespace moe_resilient

// The streaming kernel's AVX-512 code (fp32 tiles, bf16 dot products) runs only on CPUs that have it;
// tests switch it off to run the AVX2 code on such CPUs too.
static PyObject* skinny_avx512_enabled(PyObject*, PyObject*) {
  return PyBool_FromLong(moe_resilient::skinny_gemm_avx512_enabled());
}

static PyObject* allow_skinny_avx512(PyObject*, PyObject* arg) {
  const int allowed = PyObject_IsTrue(arg);
  if (allowed < 0) return nullptr;
  return PyBool_FromLong(moe_resilient::skinny_gemm_allow_avx512(allowed != 0));
}

static PyMethodDef methods[] = {
    {"built_with_openmp", built_with_openmp, METH_NOARGS, "Whether the kernels were compiled with OpenMP."},
    {"skinny_avx512_enabled", skinny_avx512_enabled, METH_NOARGS,
     "Whether the streaming kernel uses its AVX-512 code (the CPU has AVX-512 and it is allowed)."},
    {"allow_skinny_avx512", allow_skinny_avx512, METH_O,
     "allow_skinny_avx512(allowed) -> the previous setting. Off: AVX2 code even where AVX-512 exists."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module && (PyModule_AddFunctions(module, liveness_methods) != 0 ||
                 PyModule_AddFunctions(module, eager_methods) != 0))
    Py_CLEAR(module);
  return module;
}
