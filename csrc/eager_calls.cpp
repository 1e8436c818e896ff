// Direct Python entry points for eager serving, beside the torch.ops ones (which torch.compile and
// every other caller use). Right after a step has streamed its experts through the caches, the
// dispatcher's way from Python into an op costs ~45 us, this file's ~18 (route_to_slots, measured
// after a 128 MiB sweep on a Zen 4): on a 1-token step of ~800 us that is worth a door of its own.
// Same kernels, same checks; no autograd, CPU tensors only (moe_resilient/ops/wrappers.py decides).
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <tuple>

namespace moe_resilient {
std::tuple<at::Tensor, at::Tensor> moe_forward(const at::Tensor& x, const at::Tensor& gate_weight, int64_t k,
                                               bool normalize, const std::optional<at::Tensor>& log2phy,
                                               const std::optional<at::Tensor>& logcnt, int64_t num_slots, bool strict,
                                               const at::Tensor& w13, const at::Tensor& w2, double scaling,
                                               const std::optional<at::Tensor>& load);
}  // namespace moe_resilient

namespace {

const at::Tensor& tensor_arg(PyObject* arg, const char* name) {
  if (!THPVariable_Check(arg)) throw torch::TypeError(std::string("moe_forward: ") + name + " must be a tensor");
  return THPVariable_Unpack(arg);
}

std::optional<at::Tensor> optional_tensor_arg(PyObject* arg, const char* name) {
  if (arg == Py_None) return std::nullopt;
  return tensor_arg(arg, name);
}

int64_t int_arg(PyObject* arg, const char* name) {
  const long long v = PyLong_AsLongLong(arg);
  if (v == -1 && PyErr_Occurred()) throw torch::TypeError(std::string("moe_forward: ") + name + " must be an int");
  return v;
}

bool bool_arg(PyObject* arg, const char* name) {
  if (!PyBool_Check(arg)) throw torch::TypeError(std::string("moe_forward: ") + name + " must be a bool");
  return arg == Py_True;
}

// moe_forward(x, gate_weight, k, normalize, log2phy, logcnt, num_slots, strict, w13, w2, scaling, load)
// -> (out, router_logits): torch.ops.moe_resilient.moe_forward's arguments, all positional.
PyObject* eager_moe_forward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 12) throw torch::TypeError("moe_forward takes 12 positional arguments, got " + std::to_string(nargs));
  const auto& x = tensor_arg(args[0], "x");
  const auto& gate_weight = tensor_arg(args[1], "gate_weight");
  const int64_t k = int_arg(args[2], "k");
  const bool normalize = bool_arg(args[3], "normalize");
  const auto log2phy = optional_tensor_arg(args[4], "log2phy");
  const auto logcnt = optional_tensor_arg(args[5], "logcnt");
  const int64_t num_slots = int_arg(args[6], "num_slots");
  const bool strict = bool_arg(args[7], "strict");
  const auto& w13 = tensor_arg(args[8], "w13");
  const auto& w2 = tensor_arg(args[9], "w2");
  const double scaling = PyFloat_AsDouble(args[10]);
  if (scaling == -1.0 && PyErr_Occurred()) throw torch::TypeError("moe_forward: scaling must be a float");
  const auto load = optional_tensor_arg(args[11], "load");
  const auto check_cpu = [](const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.is_cpu(), "moe_forward: the direct call takes CPU tensors only, got one on ", t.device());
  };
  for (const auto* t : {&x, &gate_weight, &w13, &w2}) check_cpu(*t);
  for (const auto* t : {&log2phy, &logcnt, &load})
    if (t->has_value()) check_cpu(**t);
  std::tuple<at::Tensor, at::Tensor> result;
  {
    pybind11::gil_scoped_release no_gil;  // as the dispatcher's door does: other Python threads run meanwhile
    result = moe_resilient::moe_forward(x, gate_weight, k, normalize, log2phy, logcnt, num_slots, strict, w13, w2,
                                        scaling, load);
  }
  PyObject* out = THPVariable_Wrap(std::get<0>(result));
  PyObject* logits = out ? THPVariable_Wrap(std::get<1>(result)) : nullptr;
  if (!logits) {
    Py_XDECREF(out);
    return nullptr;
  }
  PyObject* pair = PyTuple_Pack(2, out, logits);
  Py_DECREF(out);
  Py_DECREF(logits);
  return pair;
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef eager_methods[] = {
    {"moe_forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(eager_moe_forward)), METH_FASTCALL,
     "moe_forward(x, gate_weight, k, normalize, log2phy, logcnt, num_slots, strict, w13, w2, scaling, load) -> "
     "(out, router_logits): torch.ops.moe_resilient.moe_forward without the dispatcher (eager, CPU, no autograd)."},
    {nullptr, nullptr, 0, nullptr}};
