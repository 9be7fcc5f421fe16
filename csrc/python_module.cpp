// Makes the shared library importable as `slimops._C` (importing it runs the static
// TORCH_LIBRARY registrations) and gives the hot ops a direct Python entry. Kept apart from
// ops.cpp so the CMake (libtorch, no Python) build compiles the same kernel sources without
// Python headers.
//
// Why direct entries: a call through torch.ops.slimops.<op> converts every argument to an
// IValue against the schema and calls the op boxed. On a 3 -> 64 3x3 conv over a 4x4 image
// (2-core AMD EPYC Zen 3, 1 thread, no grad) that path cost 17 us where F.conv2d, whose
// binding parses its arguments directly, cost 7 us; the same aten op through torch.ops cost
// 15 us. The modules call an op 2-3 times per layer and step, so on small images this was a
// tenth of a training step. Each entry here parses the plain argument forms (tensors, None,
// ints, two-int sequences, floats) itself and calls the op's typed dispatcher handle: the
// same dispatcher call, so autograd, the profiler, tracing and Python dispatch modes see the
// op exactly as before. Anything else (a tensor subclass or an active __torch_function__
// mode, which torch.ops would hand to __torch_function__; another argument type) returns
// NotImplemented, and the caller (slimops.ops._backend.call) then calls torch.ops.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

namespace {

using OptTensor = std::optional<at::Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// torch.nn.Parameter (a subclass whose __torch_function__ is torch's disabled one, so it
// runs as a plain tensor); looked up on first use.
PyTypeObject* parameter_type() {
  static PyTypeObject* type = [] {
    PyObject* module = PyImport_ImportModule("torch.nn.parameter");
    PyObject* cls = module ? PyObject_GetAttrString(module, "Parameter") : nullptr;
    Py_XDECREF(module);
    if (cls == nullptr) PyErr_Clear();
    return reinterpret_cast<PyTypeObject*>(cls);  // kept for the process's life
  }();
  return type;
}

// The argument readers return false when `o` is not of the plain form; the entry then
// returns NotImplemented (nothing raised).
bool read(PyObject* o, at::Tensor& t) {
  if (!THPVariable_CheckExact(o) && Py_TYPE(o) != parameter_type()) return false;
  t = THPVariable_Unpack(o);
  return true;
}

bool read(PyObject* o, OptTensor& t) {
  if (o == Py_None) {
    t = std::nullopt;
    return true;
  }
  at::Tensor v;
  if (!read(o, v)) return false;
  t = std::move(v);
  return true;
}

bool read(PyObject* o, int64_t& v) {
  if (!PyLong_CheckExact(o)) return false;
  int overflow = 0;
  v = PyLong_AsLongLongAndOverflow(o, &overflow);
  return overflow == 0 && !(v == -1 && PyErr_Occurred());
}

bool read(PyObject* o, bool& v) {
  if (!PyBool_Check(o)) return false;
  v = o == Py_True;
  return true;
}

bool read(PyObject* o, double& v) {
  if (!PyFloat_CheckExact(o)) return false;
  v = PyFloat_AS_DOUBLE(o);
  return true;
}

bool read(PyObject* o, std::array<int64_t, 2>& v) {
  if (!(PyList_CheckExact(o) || PyTuple_CheckExact(o)) || PySequence_Fast_GET_SIZE(o) != 2)
    return false;
  PyObject** items = PySequence_Fast_ITEMS(o);
  return read(items[0], v[0]) && read(items[1], v[1]);
}

// Reads args[i] into the i-th destination; false on a count mismatch or a non-plain form.
template <typename... T>
bool read_all(PyObject* const* args, Py_ssize_t n, T&... out) {
  if (n != static_cast<Py_ssize_t>(sizeof...(T))) return false;
  Py_ssize_t i = 0;
  return (read(args[i++], out) && ...);
}

// An active __torch_function__ mode is to see the call (torch.ops hands it over): leave the
// call to torch.ops.
bool torch_function_mode_active() { return at::impl::torch_function_mode_enabled(); }

PyObject* not_implemented() { Py_RETURN_NOTIMPLEMENTED; }

using Pair = std::array<int64_t, 2>;

PyObject* conv2d(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  at::Tensor input, weight;
  OptTensor bias, scale, shift, residual;
  int64_t out_channels = 0, groups = 0, activation = 0;
  Pair stride{}, padding{}, dilation{};
  if (torch_function_mode_active() ||
      !read_all(args, n, input, weight, bias, out_channels, stride, padding, dilation, groups,
                scale, shift, residual, activation))
    return not_implemented();
  static const auto op = op_handle<at::Tensor(
      const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t, c10::IntArrayRef,
      c10::IntArrayRef, c10::IntArrayRef, int64_t, const OptTensor&, const OptTensor&,
      const OptTensor&, int64_t)>("slimops::conv2d");
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(input, weight, bias, out_channels, stride, padding, dilation, groups, scale,
                  shift, residual, activation);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* depthwise_conv2d(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  at::Tensor input, weight;
  OptTensor bias, scale, shift, residual;
  int64_t activation = 0;
  Pair stride{}, padding{}, dilation{};
  if (torch_function_mode_active() ||
      !read_all(args, n, input, weight, bias, stride, padding, dilation, scale, shift, residual,
                activation))
    return not_implemented();
  static const auto op = op_handle<at::Tensor(
      const at::Tensor&, const at::Tensor&, const OptTensor&, c10::IntArrayRef,
      c10::IntArrayRef, c10::IntArrayRef, const OptTensor&, const OptTensor&, const OptTensor&,
      int64_t)>("slimops::depthwise_conv2d");
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(input, weight, bias, stride, padding, dilation, scale, shift, residual,
                  activation);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* linear(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  at::Tensor input, weight;
  OptTensor bias;
  int64_t out_features = 0;
  if (torch_function_mode_active() || !read_all(args, n, input, weight, bias, out_features))
    return not_implemented();
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t)>(
          "slimops::linear");
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(input, weight, bias, out_features);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* batch_norm_act(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  at::Tensor input;
  OptTensor weight, bias, running_mean, running_var, residual;
  bool training = false;
  double eps = 0.0;
  int64_t activation = 0;
  if (torch_function_mode_active() ||
      !read_all(args, n, input, weight, bias, running_mean, running_var, training, eps,
                residual, activation))
    return not_implemented();
  using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
  static const auto op =
      op_handle<Stats(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                      const OptTensor&, bool, double, const OptTensor&, int64_t)>(
          "slimops::batch_norm_act");
  Stats out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(input, weight, bias, running_mean, running_var, training, eps, residual,
                  activation);
  }
  PyObject* result = PyTuple_New(3);
  if (result == nullptr) return nullptr;
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(std::move(std::get<0>(out))));
  PyTuple_SET_ITEM(result, 1, THPVariable_Wrap(std::move(std::get<1>(out))));
  PyTuple_SET_ITEM(result, 2, THPVariable_Wrap(std::move(std::get<2>(out))));
  return result;
  END_HANDLE_TH_ERRORS
}

PyObject* update_running_stats(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  at::Tensor running_mean, running_var, mean, var;
  int64_t count = 0;
  double momentum = 0.0;
  if (torch_function_mode_active() ||
      !read_all(args, n, running_mean, running_var, mean, var, count, momentum))
    return not_implemented();
  static const auto op = op_handle<void(at::Tensor&, at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, int64_t, double)>(
      "slimops::update_running_stats");
  {
    pybind11::gil_scoped_release no_gil;
    op.call(running_mean, running_var, mean, var, count, momentum);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

#define SLIMOPS_ENTRY(name, doc) \
  {#name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(name)), METH_FASTCALL, doc}

PyMethodDef methods[] = {
    SLIMOPS_ENTRY(conv2d, "slimops::conv2d, positional schema arguments"),
    SLIMOPS_ENTRY(depthwise_conv2d, "slimops::depthwise_conv2d, positional schema arguments"),
    SLIMOPS_ENTRY(linear, "slimops::linear, positional schema arguments"),
    SLIMOPS_ENTRY(batch_norm_act, "slimops::batch_norm_act, positional schema arguments"),
    SLIMOPS_ENTRY(update_running_stats,
                  "slimops::update_running_stats, positional schema arguments"),
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "slimops compiled CPU kernels and direct op entries", -1,
      methods};
  return PyModule_Create(&module_def);
}
}
