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
#include <ATen/record_function.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "cpu/max_pool.h"
#include "cpu/parallel.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <unordered_set>
#include <vector>

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

// What an argument of the op's C++ type is read into: a two-int list for an int[2].
template <typename T>
struct Stored {
  using type = std::decay_t<T>;
};
template <>
struct Stored<c10::IntArrayRef> {
  using type = std::array<int64_t, 2>;
};

PyObject* wrap(at::Tensor t) { return THPVariable_Wrap(std::move(t)); }

PyObject* wrap(std::tuple<at::Tensor, at::Tensor, at::Tensor> t) {
  PyObject* result = PyTuple_New(3);
  if (result == nullptr) return nullptr;
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(std::move(std::get<0>(t))));
  PyTuple_SET_ITEM(result, 1, THPVariable_Wrap(std::move(std::get<1>(t))));
  PyTuple_SET_ITEM(result, 2, THPVariable_Wrap(std::move(std::get<2>(t))));
  return result;
}

// Reads the op's arguments, calls it with the GIL released, returns its result (None for an
// op returning nothing); NotImplemented when an argument is not of its plain form.
template <typename Ret, typename... Args>
PyObject* call_op(const c10::TypedOperatorHandle<Ret(Args...)>& op, PyObject* const* args,
                  Py_ssize_t n) {
  std::tuple<typename Stored<Args>::type...> values;
  const bool plain =
      std::apply([&](auto&... v) { return read_all(args, n, v...); }, values);
  if (torch_function_mode_active() || !plain) return not_implemented();
  const auto call = [&] { return std::apply([&](auto&... v) { return op.call(v...); }, values); };
  if constexpr (std::is_void_v<Ret>) {
    {
      pybind11::gil_scoped_release no_gil;
      call();
    }
    Py_RETURN_NONE;
  } else {
    Ret out;
    {
      pybind11::gil_scoped_release no_gil;
      out = call();
    }
    return wrap(std::move(out));
  }
}

using OptRef = const OptTensor&;
using TensorRef = const at::Tensor&;
using Pairs = c10::IntArrayRef;

// The entry of slimops::<name>, whose typed signature is the rest of the arguments.
#define SLIMOPS_DIRECT_ENTRY(name, ...)                                             \
  PyObject* name(PyObject*, PyObject* const* args, Py_ssize_t n) {                \
    HANDLE_TH_ERRORS                                                              \
    static const auto op = op_handle<__VA_ARGS__>("slimops::" #name);             \
    return call_op(op, args, n);                                                  \
    END_HANDLE_TH_ERRORS                                                          \
  }

SLIMOPS_DIRECT_ENTRY(conv2d, at::Tensor(TensorRef, TensorRef, OptRef, int64_t, Pairs, Pairs,
                                        Pairs, int64_t, OptRef, OptRef, OptRef, int64_t))
SLIMOPS_DIRECT_ENTRY(depthwise_conv2d, at::Tensor(TensorRef, TensorRef, OptRef, Pairs, Pairs,
                                                  Pairs, OptRef, OptRef, OptRef, int64_t))
SLIMOPS_DIRECT_ENTRY(linear, at::Tensor(TensorRef, TensorRef, OptRef, int64_t))
SLIMOPS_DIRECT_ENTRY(batch_norm_act,
                     std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                         TensorRef, OptRef, OptRef, OptRef, OptRef, bool, double, OptRef,
                         int64_t))
SLIMOPS_DIRECT_ENTRY(update_running_stats,
                     void(at::Tensor&, at::Tensor&, TensorRef, TensorRef, int64_t, double))

#undef SLIMOPS_DIRECT_ENTRY

// The words naming what each of `items` (tensors or None) holds now: its TensorImpl
// (identity), storage, offset, version counter, dtype, device, sizes and strides. False when
// a tensor cannot say whether it was written since (an inference tensor: no version counter)
// or is not a plain tensor / Parameter (a subclass may keep its data elsewhere).
bool stamp_words(PyObject* const* items, Py_ssize_t n, std::vector<int64_t>& words) {
  words.reserve(static_cast<size_t>(n) * 16);
  const auto put = [&](auto v) { words.push_back(static_cast<int64_t>(v)); };
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* o = items[i];
    if (o == Py_None) {
      put(0);
      continue;
    }
    at::Tensor t;
    if (!read(o, t)) return false;  // a subclass, or not a tensor
    c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    if (impl->is_inference() || !impl->has_storage() || impl->layout() != c10::kStrided ||
        impl->has_symbolic_sizes_strides())
      return false;
    put(reinterpret_cast<intptr_t>(impl));
    put(reinterpret_cast<intptr_t>(impl->storage().data()));
    put(impl->storage_offset());
    put(impl->version_counter().current_version());
    put(static_cast<int>(impl->dtype().toScalarType()));
    put(static_cast<int>(impl->device_type()));
    put(impl->device().index());
    put(impl->dim());
    for (const int64_t s : impl->sizes()) put(s);
    for (const int64_t s : impl->strides()) put(s);
  }
  return true;
}

// state_stamp(*tensors): bytes of stamp_words, or None where a tensor cannot be stamped.
//
// Why: SlimConvBNAct's inference fast path checks on every call that the BN tensors its
// cached scale/shift came from are unchanged. In Python that check (a tuple of data_ptr,
// _version, dtype, shape, device per tensor, four tensors) was 6.5 us per layer, 0.7 ms of
// S-MobileNet v2's 52-layer batch-1 forward (2-core AMD EPYC Zen 3). Equal stamps mean the
// same tensor objects' impls over the same bytes at the same version; the caller keeps the
// stamped tensors alive, so an impl address cannot be reused by another tensor meanwhile.
PyObject* state_stamp(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  std::vector<int64_t> words;
  if (!stamp_words(args, n, words)) Py_RETURN_NONE;
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(words.data()),
                                   static_cast<Py_ssize_t>(words.size() * sizeof(int64_t)));
  END_HANDLE_TH_ERRORS
}

// ---- Eval plans (slimops.ops.eval_plan) ------------------------------------------------------
//
// A plan is a tuple (lookups, sources, stamp, in_channels, depthwise, *op_args) made by
// slimops.ops.eval_plan for one SlimConvBNAct layer at one width:
//   lookups    a flat tuple of (dict, key, value) triples: each dict[key] must still be
//              that very object (the layer's submodules, the conv's weight and geometry
//              attributes, the active BN modules, their tensors and eps, as the Python path
//              reads them from the modules' dicts);
//   sources    the BN tensors the scale/shift came from, whose state_stamp must still be
//              `stamp` (written in place, given new data, re-viewed: stale);
//   op_args    slimops::conv2d's (or, depthwise, slimops::depthwise_conv2d's) arguments
//              after the input, up to the residual, then the activation code.
// A layer's input must be a CPU tensor of 4 dims with `in_channels` channels and the weight's
// dtype (float32 or float64), the weight contiguous (what use_native sends to the kernels).
//
// Why: the Python form of these checks (module dict reads, the width's BN modules, the
// stamp, the input's checks, the op wrapper's backend choice) cost 5-8% of S-MobileNet
// v1/v2's and S-ResNet-50's batch-1 eval forward at 224 (2-core Intel Xeon): most of it is
// interpreter work between cache misses on module state after each layer's kernel.

enum class PlanState { kCurrent, kStale, kNotPlain, kError };

// Whether every lookup and the stamp of `plan` still hold (kError: a Python error is set).
PlanState plan_state(PyObject* plan) {
  if (!PyTuple_CheckExact(plan) || PyTuple_GET_SIZE(plan) < 6) return PlanState::kNotPlain;
  PyObject* lookups = PyTuple_GET_ITEM(plan, 0);
  PyObject* sources = PyTuple_GET_ITEM(plan, 1);
  PyObject* stamp = PyTuple_GET_ITEM(plan, 2);
  if (!PyTuple_CheckExact(lookups) || PyTuple_GET_SIZE(lookups) % 3 != 0 ||
      !PyTuple_CheckExact(sources) || !PyBytes_CheckExact(stamp))
    return PlanState::kNotPlain;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(lookups); i += 3) {
    PyObject* dict = PyTuple_GET_ITEM(lookups, i);
    if (!PyDict_Check(dict)) return PlanState::kNotPlain;
    PyObject* found = PyDict_GetItemWithError(dict, PyTuple_GET_ITEM(lookups, i + 1));
    if (found == nullptr && PyErr_Occurred()) return PlanState::kError;
    if (found != PyTuple_GET_ITEM(lookups, i + 2)) return PlanState::kStale;
  }
  std::vector<int64_t> words;
  const Py_ssize_t stamp_bytes = PyBytes_GET_SIZE(stamp);
  if (!stamp_words(&PyTuple_GET_ITEM(sources, 0), PyTuple_GET_SIZE(sources), words) ||
      static_cast<Py_ssize_t>(words.size() * sizeof(int64_t)) != stamp_bytes ||
      std::memcmp(words.data(), PyBytes_AS_STRING(stamp), stamp_bytes) != 0)
    return PlanState::kStale;
  return PlanState::kCurrent;
}

// A plan's conv call, its arguments read from the tuple (with the GIL) to run later.
struct PlanCall {
  int64_t in_channels = 0;
  bool depthwise = false;
  at::Tensor weight;
  OptTensor bias, scale, shift;
  int64_t out_channels = 0, groups = 1, activation = 0;
  std::array<int64_t, 2> stride{}, padding{}, dilation{};

  // False where the plan's arguments are not of their plain form.
  bool read_from(PyObject* plan) {
    PyObject* const* a = &PyTuple_GET_ITEM(plan, 0);
    const Py_ssize_t size = PyTuple_GET_SIZE(plan);
    if (size < 5 || !read(a[3], in_channels) || !read(a[4], depthwise)) return false;
    if (depthwise)  // weight, bias, stride, padding, dilation, scale, shift, activation
      return read_all(a + 5, size - 5, weight, bias, stride, padding, dilation, scale, shift,
                      activation);
    return read_all(a + 5, size - 5, weight, bias, out_channels, stride, padding, dilation,
                    groups, scale, shift, activation);
  }

  // Whether `input` is the plain case the plan's kernel takes (see above).
  bool takes(const at::Tensor& input) const {
    return input.dim() == 4 && input.size(1) == in_channels && input.is_cpu() &&
           weight.is_cpu() && input.scalar_type() == weight.scalar_type() &&
           (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble) &&
           weight.is_contiguous();
  }

  // The op through its typed dispatcher handle (as the direct entries call it).
  at::Tensor run(const at::Tensor& input, const OptTensor& residual) const {
    if (depthwise) {
      static const auto op =
          op_handle<at::Tensor(TensorRef, TensorRef, OptRef, Pairs, Pairs, Pairs, OptRef, OptRef,
                               OptRef, int64_t)>("slimops::depthwise_conv2d");
      return op.call(input, weight, bias, stride, padding, dilation, scale, shift, residual,
                     activation);
    }
    static const auto op =
        op_handle<at::Tensor(TensorRef, TensorRef, OptRef, int64_t, Pairs, Pairs, Pairs, int64_t,
                             OptRef, OptRef, OptRef, int64_t)>("slimops::conv2d");
    return op.call(input, weight, bias, out_channels, stride, padding, dilation, groups, scale,
                   shift, residual, activation);
  }
};

// eval_conv(plan, input, residual): one inference call of a SlimConvBNAct layer from its
// cached plan (slimops.nn.fused); None where the plan is stale, NotImplemented where the
// call is not the plain case. The layer's Python path then runs (it rebuilds the plan, or
// names what is wrong with the input). A kernel's rejection of an argument is raised.
PyObject* eval_conv(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  if (n != 3 || torch_function_mode_active()) return not_implemented();
  switch (plan_state(args[0])) {
    case PlanState::kError: return nullptr;
    case PlanState::kStale: Py_RETURN_NONE;
    case PlanState::kNotPlain: return not_implemented();
    case PlanState::kCurrent: break;
  }
  PlanCall call;
  at::Tensor input;
  OptTensor residual;
  if (!call.read_from(args[0]) || !read(args[1], input) || !read(args[2], residual) ||
      !call.takes(input))
    return not_implemented();
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = call.run(input, residual);
  }
  return wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// eval_chain(plans, links, input): several SlimConvBNAct layers' inference calls in one C
// call: a block's, or a model's blocks one after another (slimops.nn.EvalChain,
// run_eval_chains). Step k runs plans[k] on the value in slot
// links[2k] with the residual in slot links[2k + 1] (-1: none); slot 0 holds `input`, slot
// k + 1 step k's output, and the last step's output is returned. None where a plan is stale,
// NotImplemented where the call is not the plain case at some step or a kernel rejects an
// argument: the block's modules then run, which rebuild the plans or name what is wrong. Every
// plan is checked before anything runs.
//
// Why: a batch-1 eval forward of S-ResNet-50 at 224 paid 1.4-2.3 ms of Python over its own
// frozen TorchScript (2-core Intel Xeon; docs/BENCHMARKS.md's twenty-seventh round): 0.6 ms
// in module calls, most of the rest in the Python between one layer's C call and the next on
// caches the kernels had just streamed. Chained, the model pays it once per forward.
PyObject* eval_chain(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  if (n != 3 || !PyTuple_CheckExact(args[0]) || !PyTuple_CheckExact(args[1]) ||
      torch_function_mode_active())
    return not_implemented();
  PyObject* plans = args[0];
  const Py_ssize_t steps = PyTuple_GET_SIZE(plans);
  if (steps == 0 || PyTuple_GET_SIZE(args[1]) != 2 * steps) return not_implemented();
  for (Py_ssize_t k = 0; k < steps; ++k) {
    switch (plan_state(PyTuple_GET_ITEM(plans, k))) {
      case PlanState::kError: return nullptr;
      case PlanState::kStale: Py_RETURN_NONE;
      case PlanState::kNotPlain: return not_implemented();
      case PlanState::kCurrent: break;
    }
  }
  std::vector<PlanCall> calls(static_cast<size_t>(steps));
  std::vector<std::array<int64_t, 2>> links(static_cast<size_t>(steps));
  for (Py_ssize_t k = 0; k < steps; ++k) {
    std::array<int64_t, 2>& link = links[static_cast<size_t>(k)];
    if (!calls[static_cast<size_t>(k)].read_from(PyTuple_GET_ITEM(plans, k)) ||
        !read(PyTuple_GET_ITEM(args[1], 2 * k), link[0]) ||
        !read(PyTuple_GET_ITEM(args[1], 2 * k + 1), link[1]) ||
        link[0] < 0 || link[0] > k || link[1] < -1 || link[1] > k)  // slots 0..k exist
      return not_implemented();
  }
  std::vector<at::Tensor> slots(static_cast<size_t>(steps) + 1);
  if (!read(args[2], slots[0])) return not_implemented();
  // The last step reading each slot: a value is released right after it, as the modules'
  // calls would drop it, so that the allocator hands its memory to the next outputs (holding
  // every layer's output to the end made S-ResNet-50's chained forward 5-8% slower).
  std::vector<size_t> last_read(slots.size(), 0);
  for (size_t k = 0; k < links.size(); ++k)
    for (const int64_t slot : links[k])
      if (slot >= 0) last_read[static_cast<size_t>(slot)] = k;
  bool plain = true;
  {
    pybind11::gil_scoped_release no_gil;
    for (size_t k = 0; plain && k < calls.size(); ++k) {
      const at::Tensor& source = slots[static_cast<size_t>(links[k][0])];
      const OptTensor residual = links[k][1] < 0
          ? OptTensor() : OptTensor(slots[static_cast<size_t>(links[k][1])]);
      plain = calls[k].takes(source);
      if (!plain) break;
      try {
        slots[k + 1] = calls[k].run(source, residual);
      } catch (const c10::Error&) {  // the modules' checked path names it
        plain = false;
      }
      for (const int64_t slot : links[k])
        if (slot >= 0 && last_read[static_cast<size_t>(slot)] == k)
          slots[static_cast<size_t>(slot)].reset();
    }
  }
  if (!plain) return not_implemented();
  return wrap(std::move(slots.back()));
  END_HANDLE_TH_ERRORS
}

// serial_enter(): the start of a slimops.serial_while_contended block
// (slimops/ops/load_watch.py): parallel.h's serial_threads for the calling thread; returns
// (omp, mkl) for serial_exit when it took the thread to one, else None.
PyObject* serial_enter(PyObject*, PyObject* const*, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  if (n != 0) {
    PyErr_SetString(PyExc_TypeError, "serial_enter() takes no arguments");
    return nullptr;
  }
  const slimops::cpu::SavedThreads saved = slimops::cpu::serial_threads();
  if (saved.omp == 0) Py_RETURN_NONE;
  return Py_BuildValue("(ii)", saved.omp, saved.mkl);
  END_HANDLE_TH_ERRORS
}

// serial_exit(omp, mkl): puts back what serial_enter returned.
PyObject* serial_exit(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  long omp = 0, mkl = 0;
  if (n != 2 || (omp = PyLong_AsLong(args[0])) <= 0 || (mkl = PyLong_AsLong(args[1])) < 0) {
    if (!PyErr_Occurred())
      PyErr_SetString(PyExc_ValueError, "serial_exit(omp, mkl): what serial_enter returned");
    return nullptr;
  }
  slimops::cpu::restore_threads({static_cast<int>(omp), static_cast<int>(mkl)});
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// max_pool2d(input, kh, kw, sh, sw, ph, pw, dh, dw, ceil_mode): max_pool.h's kernel for
// slimops.nn.MaxPool2d's inference path (slimops/ops/max_pool.py). Not an op: no schema, no
// autograd, invisible to tracing (its caller skips it while tracing or compiling). Runs on the
// calling thread while the machine is contended, as the ops' kernels do (parallel.h's rule 5).
// NotImplemented for anything but a plain tensor and ints.
PyObject* max_pool2d(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  at::Tensor input;
  std::array<int64_t, 8> g{};
  bool ceil_mode = false;
  if (n != 10 || !read(args[0], input) || !read(args[9], ceil_mode)) return not_implemented();
  for (size_t i = 0; i < g.size(); ++i)
    if (!read(args[i + 1], g[i])) return not_implemented();
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    RECORD_FUNCTION("slimops::max_pool2d_inference", std::vector<c10::IValue>());
    const slimops::cpu::LoadScope scope;
    out = slimops::cpu::max_pool2d_nchw(input, g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7],
                                        ceil_mode);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// getattr(obj, name) (a new reference, or null with the error set), read straight from the
// instance's __dict__ where the type defines no attribute of that name (so that generic lookup
// would find it there first). Why: nn.Module has a Python __getattr__, which routes every
// attribute read through slot_tp_getattr_hook's lookups of __getattribute__ and __getattr__:
// half of the compiled walk's time.
PyObject* instance_attribute(PyObject* obj, PyObject* name) {
  if (_PyType_Lookup(Py_TYPE(obj), name) == nullptr) {
    PyObject** dict = _PyObject_GetDictPtr(obj);
    if (dict != nullptr && *dict != nullptr && PyDict_CheckExact(*dict)) {
      PyObject* found = PyDict_GetItemWithError(*dict, name);
      if (found != nullptr) return Py_NewRef(found);
      if (PyErr_Occurred()) return nullptr;
    }
  }
  return PyObject_GetAttr(obj, name);
}

// slimmable_walk(model, slimmable_type): slimops.width.slimmable_layers(model) (see there):
// every module reachable through the `_modules` dicts from `model`, itself included, that is
// an instance of `slimmable_type`, in pre-order, each once, not looking inside one whose
// `walk_submodules` is false. NotImplemented where a module's `_modules` is not a dict (the
// Python walk then runs).
//
// Why: every `slimops.width(model, w)` block and width switch walks the model. In Python that
// walk took 54 us on S-ResNet-50 and 53 on S-MobileNet v2, in C 16 (2-core Intel Xeon, warm);
// a whole `width` block around a batch-1 forward cost 0.2-0.5 ms of it before (10% of
// S-MobileNet v2's at width 0.25), more than warm, the kernels having just streamed the caches.
PyObject* slimmable_walk(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  if (n != 2) {
    PyErr_SetString(PyExc_TypeError, "slimmable_walk(model, slimmable_type)");
    return nullptr;
  }
  static PyObject* const modules_name = PyUnicode_InternFromString("_modules");
  static PyObject* const walk_name = PyUnicode_InternFromString("walk_submodules");
  if (modules_name == nullptr || walk_name == nullptr) return nullptr;
  PyObject* found = PyList_New(0);
  // Visited modules by address, as the Python walk's set of ids: every module stays alive
  // meanwhile (the tree holds it; the stack holds what is still to visit).
  std::unordered_set<PyObject*> seen;
  // The stack holds new references; each popped one is released at the end of its turn.
  std::vector<PyObject*> stack{Py_NewRef(args[0])};
  PyObject* result = found;
  const auto fail = [&](PyObject* value) {
    result = value;
    return false;
  };
  const auto visit = [&](PyObject* module) -> bool {
    if (module == Py_None || !seen.insert(module).second) return true;
    const int slimmable = PyObject_IsInstance(module, args[1]);
    if (slimmable < 0) return fail(nullptr);
    if (slimmable) {
      if (PyList_Append(found, module) < 0) return fail(nullptr);
      PyObject* walk = PyObject_GetAttr(module, walk_name);
      const int inside = walk ? PyObject_IsTrue(walk) : -1;
      Py_XDECREF(walk);
      if (inside <= 0) return inside == 0 || fail(nullptr);
    }
    PyObject* children = instance_attribute(module, modules_name);
    if (children == nullptr) return fail(nullptr);
    if (!PyDict_CheckExact(children)) {
      Py_DECREF(children);
      return fail(Py_NewRef(Py_NotImplemented));
    }
    // Reversed on the stack, so that children are popped in insertion order.
    const size_t first = stack.size();
    Py_ssize_t pos = 0;
    PyObject *name, *child;
    while (PyDict_Next(children, &pos, &name, &child)) stack.push_back(Py_NewRef(child));
    Py_DECREF(children);
    std::reverse(stack.begin() + static_cast<std::ptrdiff_t>(first), stack.end());
    return true;
  };
  bool ok = found != nullptr;
  while (ok && !stack.empty()) {
    PyObject* module = stack.back();
    stack.pop_back();
    ok = visit(module);
    Py_DECREF(module);
  }
  for (PyObject* left : stack) Py_DECREF(left);
  if (result != found) Py_XDECREF(found);
  return result;
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
    SLIMOPS_ENTRY(state_stamp, "bytes naming the state of each tensor argument (or None)"),
    SLIMOPS_ENTRY(eval_conv, "a SlimConvBNAct inference call from its cached plan"),
    SLIMOPS_ENTRY(eval_chain, "a block's SlimConvBNAct inference calls from their plans"),
    SLIMOPS_ENTRY(serial_enter, "the calling thread to one thread while the machine is busy"),
    SLIMOPS_ENTRY(serial_exit, "puts back what serial_enter changed"),
    SLIMOPS_ENTRY(max_pool2d, "F.max_pool2d of a contiguous NCHW CPU batch, no indices"),
    SLIMOPS_ENTRY(slimmable_walk, "slimops.width.slimmable_layers(model), walked in C"),
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
