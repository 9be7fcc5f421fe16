"""Ahead-of-time compilation of the Triton kernels for a GPU this machine does not have.

``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline (TTIR -> TTGIR ->
LLVM IR -> PTX -> cubin through the ptxas bundled with triton) without a driver or a GPU.
The cubin's resource usage (registers, local memory = spills, stack) is read back with the
``cuobjdump`` bundled beside that ptxas; shared memory comes from triton's own metadata.

Every kernel module lists its compile cases as ``aot_cases() -> list[AotCase]``: one case per
(kernel, dtype, tuning configuration), so a test can compile all of them for sm_80 and sm_90
and assert that none spills.

What runs is what the JIT specialises for the launch's arguments, not a generic binary: triton's
JIT turns every integer argument equal to 1 into a constant, marks integers that are multiples
of 16 (and pointers 16-byte aligned) with a divisibility hint, and types integers >= 2^31 as
i64. Vectorisation, ``cp.async`` pipelining and register use all depend on those hints, so a
case built with ``AotCase.from_launch`` (or ``jit_specialization``) from real launch
arguments compiles exactly the binary a GPU run with those arguments would
(tests/kernels/test_aot.py compares it with the JIT's own binder). ``inspect_compiled`` reads
that binary: registers, spills, the widths of its global loads and stores, ``cp.async`` /
TMA / tensor-core instruction counts, SASS counts, and ``occupancy`` (resident blocks per SM).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

ARCHS = (80, 90)

# Triton 3.9 warns once when this is unset; fusion on is the documented current default and
# what the kernels are written for (fp32 accumulation via fma).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


class LaunchTensor:
    """Stands for a tensor argument of a launch when only its specialisation matters: triton's
    JIT reads a tensor argument's ``dtype`` (the pointer type) and ``data_ptr()`` (16-byte
    alignment gives a divisibility hint). ``ptr`` defaults to an aligned address, as every
    allocation of torch's CUDA caching allocator is (512-byte granularity)."""

    def __init__(self, dtype: Any, ptr: int = 0) -> None:
        self.dtype = dtype
        self._ptr = ptr

    def data_ptr(self) -> int:
        return self._ptr


def _cuda_backend(arch: int) -> Any:
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    return CUDABackend(GPUTarget("cuda", arch, 32))


def jit_specialization(
    fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any], arch: int = 90
) -> Tuple[Dict[str, str], Dict[str, Any], Dict[str, List[List[Any]]]]:
    """``(signature, constexprs, attrs)`` of ``fn`` launched with ``fn[grid](*args, **kwargs)``,
    built the way triton 3.9's JIT builds them (``create_function_from_signature``'s binder and
    ``JITFunction._pack_args``), keyed by argument name.

    Per non-constexpr parameter, ``native_specialize_impl`` (the JIT's own C++ routine) gives
    its type and specialisation: an int equal to 1 becomes ``constexpr`` 1, an int that is a
    multiple of 16 (a 16-byte aligned pointer) gets ``tt.divisibility = 16``, bools are
    ``u1``, floats ``fp32``, None a ``constexpr`` None. ``do_not_specialize`` and type
    annotations are honoured as the binder honours them. Launch options (``num_warps`` ...)
    in ``kwargs`` are ignored here (they go to ``AotCase``)."""
    from triton._C.libtriton import native_specialize_impl

    backend = _cuda_backend(arch)
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    signature: Dict[str, str] = {}
    constexprs: Dict[str, Any] = {}
    attrs: Dict[str, List[List[Any]]] = {}
    for p in fn.params:
        if p.name in bound:
            value = bound[p.name]
        elif p.has_default:
            value = p.default
        else:
            raise TypeError(f"{fn.__name__}: no value for argument {p.name!r}")
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
            continue
        specialize = not p.do_not_specialize
        ann = p.annotation_type
        if isinstance(ann, str) and ann and (ann == "u1" or ann[:2] in ("fp", "bf")):
            specialize = False
        ty, spec = native_specialize_impl(backend, value, p.is_const, specialize,
                                          not p.do_not_specialize_on_alignment)
        if ann:
            if not specialize:
                ty, spec = ann, None
            else:
                ty = ann
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = spec
        elif isinstance(spec, str):
            parsed = backend.parse_attr(spec)
            if parsed:
                attrs[p.name] = parsed
    return signature, constexprs, attrs


@dataclass
class CapturedLaunch:
    """One launch as triton's JIT saw it: the arguments, and the specialisation (by argument
    name) and launch options it would have compiled for them."""

    kernel: str
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    attrs: Dict[str, List[List[Any]]]
    num_warps: int
    num_stages: int


class _CaptureDriver:
    """A stand-in for triton's active driver: enough of it for ``JITFunction.run`` to bind
    and specialise a launch (device 0, a null stream, ``sm_<arch>``) without a GPU."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target


class capture_launches:
    """Context manager: while active, the ``@triton.jit`` kernels named ``names`` of
    ``module`` are their compilable ``JITFunction`` twins (``epilogue.compiled``) and their
    launches go through triton's real ``JITFunction.run`` (binder, specialisation,
    ``_pack_args``) up to the compile, which a ``jit_cache_hook`` records and skips: nothing
    runs, no GPU is needed, and the list it yields holds one ``CapturedLaunch`` per launch,
    i.e. exactly what the JIT would have compiled. The launchers' outputs are left
    uninitialised. ``also``: further ``(module, names)`` pairs captured in the same list (a
    launcher that calls another module's launcher: the batch norm's normalise pass is the
    epilogue kernel)."""

    def __init__(self, module: Any, *names: str, arch: int = 90,
                 also: Sequence[Tuple[Any, Sequence[str]]] = ()) -> None:
        self.targets = [(module, tuple(names))] + [(m, tuple(n)) for m, n in also]
        self.arch = arch
        self.launches: List[CapturedLaunch] = []

    def __enter__(self) -> List[CapturedLaunch]:
        from triton import knobs
        from triton.runtime import driver

        from slimops.kernels.epilogue import compiled

        self._saved = [(m, n, getattr(m, n)) for m, names in self.targets for n in names]
        self._driver = driver._active
        self._hook = knobs.runtime.jit_cache_hook
        pending: List[Tuple[Tuple[Any, ...], Dict[str, Any]]] = []

        def pre_run(*args: Any, **kwargs: Any) -> None:
            pending.append((args, dict(kwargs)))

        def cache_hook(*, key: Any, repr: Any, fn: Any, compile: Dict[str, Any],
                       is_manual_warmup: bool, already_compiled: bool) -> bool:
            args, kwargs = pending.pop()
            jf = fn.jit_function
            names = jf.arg_names
            consts = {names[k[0]]: v for k, v in compile["constants"].items()}
            attrs = {names[k[0]]: v for k, v in compile["configs"][0].items() if v}
            self.launches.append(CapturedLaunch(
                jf.fn.__name__, args, kwargs, dict(compile["signature"]), consts, attrs,
                compile["num_warps"], compile["num_stages"]))
            return True  # skip the compile (and with it the launch)

        self._twins = []
        for m, n, kernel in self._saved:
            twin = compiled(kernel)
            # A fresh binder per capture: it is built for the driver's target.
            twin.device_caches.clear()
            twin.pre_run_hooks.append(pre_run)
            self._twins.append((twin, pre_run))
            setattr(m, n, twin)
        driver.set_active(_CaptureDriver(self.arch))
        knobs.runtime.jit_cache_hook = cache_hook
        return self.launches

    def __exit__(self, *exc: Any) -> None:
        from triton import knobs
        from triton.runtime import driver

        knobs.runtime.jit_cache_hook = self._hook
        driver._active = self._driver
        for twin, hook in self._twins:
            twin.pre_run_hooks.remove(hook)
            twin.device_caches.clear()
        for m, n, v in self._saved:
            setattr(m, n, v)


@dataclass
class AotCase:
    """One compile of one kernel: its ``signature`` (arg name -> triton type, ``constexpr``
    for meta-parameters and JIT-specialised integers), the ``constexprs`` values, the
    ``attrs`` (arg name -> ``[["tt.divisibility", 16]]``) and launch options.

    ``min_occupancy``: the smallest number of resident blocks per SM the check accepts for
    this binary (``occupancy``); ``meta``: free-form labels a test can select cases by
    (shape, operand layout ...)."""

    name: str
    fn: Any  # a @triton.jit function
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    options: Dict[str, Any] = field(default_factory=dict)
    attrs: Dict[str, List[List[Any]]] = field(default_factory=dict)
    min_occupancy: int = 1
    meta: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_launch(
        cls, name: str, fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any],
        num_warps: int = 4, num_stages: int = 3, arch: int = 90, **fields: Any,
    ) -> "AotCase":
        """The case the JIT compiles for ``fn[grid](*args, **kwargs, num_warps=...,
        num_stages=...)``: tensors may be ``LaunchTensor``s (or real tensors), integers the
        launch's values (``jit_specialization``). The specialisation does not depend on the
        arch (sm_80 and sm_90 take the same hints), so one case serves both."""
        signature, constexprs, attrs = jit_specialization(fn, args, kwargs, arch)
        return cls(name, fn, signature, constexprs, num_warps, num_stages, attrs=attrs,
                   **fields)


@dataclass
class AotResult:
    name: str
    arch: int
    registers: int
    spill_bytes: int  # LOCAL memory per thread: > 0 means ptxas spilled registers
    stack_bytes: int
    shared_bytes: int  # triton's shared-memory allocation (static + pipelining buffers)
    kernel: str = ""  # the @triton.jit function's name
    num_warps: int = 0
    occupancy: int = 0  # resident blocks per SM (``occupancy``)
    # Global accesses in the PTX, by access width in bits ("16", "32", "64", "128"): the
    # count of ld.global / st.global instructions of that width (vector x element size).
    loads: Dict[str, int] = field(default_factory=dict)
    stores: Dict[str, int] = field(default_factory=dict)
    cp_async: int = 0  # cp.async.ca/cg (Ampere asynchronous global -> shared copies)
    cp_async_16: int = 0  # ... of which 16-byte copies
    tma: int = 0  # cp.async.bulk.tensor (Hopper TMA)
    mma: int = 0  # mma.sync (PTX)
    wgmma: int = 0  # wgmma.mma_async (PTX)
    sass_instructions: int = 0
    sass_ldg: int = 0
    sass_stg: int = 0
    sass_ldgsts: int = 0  # SASS of cp.async
    # The 2-D global accesses of the TTGIR, one entry per distinct access (``tile_accesses``):
    # which value (its Python name), op, tile shape, element type, and the blocked layout's
    # fastest dimension, elements per thread along it and lanes along it.
    tiles: List[Dict[str, Any]] = field(default_factory=list)


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found next to triton's ptxas ({path})")
    return path


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", f.name],
            check=True, capture_output=True, text=True,
        ).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text.split("Function", 1)[-1]))
    return {k: int(v) for k, v in usage.items()}


# Per-SM limits of the targets (CUDA C Programming Guide, "Compute capabilities" table):
# registers, shared memory per SM, the largest shared allocation of one block (opt-in), the
# shared memory the driver reserves per resident block, threads and blocks per SM.
SM_LIMITS: Dict[int, Dict[str, int]] = {
    80: dict(registers=65536, shared=164 * 1024, shared_per_block=163 * 1024,
             reserved_shared=1024, threads=2048, blocks=32),
    90: dict(registers=65536, shared=228 * 1024, shared_per_block=227 * 1024,
             reserved_shared=1024, threads=2048, blocks=32),
}
# Registers are allocated per warp in units of 256 (8 per thread); at most 255 per thread.
REGISTER_ALLOCATION_UNIT = 256


def occupancy(arch: int, registers: int, num_warps: int, shared_bytes: int) -> int:
    """Resident blocks per SM of a kernel using ``registers`` per thread, ``num_warps`` warps
    per block and ``shared_bytes`` of shared memory per block on ``sm_<arch>`` (0 when one
    block does not fit), as the CUDA occupancy calculator computes it: the smallest of the
    register limit (warps whose rounded-up allocation fits the register file, in whole
    blocks), the shared-memory limit (each block also takes the 1 KiB the driver reserves),
    the thread limit and the block limit."""
    lim = SM_LIMITS[arch]
    threads = 32 * num_warps
    if registers > 255 or threads > 1024 or shared_bytes > lim["shared_per_block"]:
        return 0
    per_warp = -(-max(registers, 1) * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    by_registers = (lim["registers"] // per_warp) // num_warps
    by_shared = lim["shared"] // (shared_bytes + lim["reserved_shared"])
    by_threads = lim["threads"] // threads
    return max(0, min(by_registers, by_shared, by_threads, lim["blocks"]))


_PTX_TYPE_BITS = {"8": 8, "16": 16, "32": 32, "64": 64, "128": 128}


def _access_bits(suffixes: str) -> int:
    """Width in bits of a PTX ld/st from its dotted suffixes (``.v4.b32`` -> 128)."""
    vec, elem = 1, 0
    for part in suffixes.split("."):
        if part in ("v2", "v4", "v8"):
            vec = int(part[1:])
        else:
            m = re.fullmatch(r"[bsuf](8|16|32|64|128)", part)
            if m:
                elem = _PTX_TYPE_BITS[m.group(1)]
    return vec * elem


def ptx_accesses(ptx: str, op: str) -> Dict[str, int]:
    """Count of ``<op>.global`` instructions (``op`` = ``ld`` or ``st``) by width in bits."""
    counts: Counter = Counter()
    for m in re.finditer(rf"\b{op}\.global((?:\.[A-Za-z0-9_:]+)*)", ptx):
        counts[str(_access_bits(m.group(1)))] += 1
    return dict(counts)


def inspect_code(ptx: str, sass: str) -> Dict[str, Any]:
    """What a compiled kernel does with memory and tensor cores, read from its PTX and SASS:
    global loads/stores by width, cp.async (total, 16-byte), TMA copies, mma/wgmma, and the
    SASS instruction, LDG, STG and LDGSTS counts."""
    return dict(
        loads=ptx_accesses(ptx, "ld"),
        stores=ptx_accesses(ptx, "st"),
        cp_async=len(re.findall(r"\bcp\.async\.c[ag]\.", ptx)),
        cp_async_16=len(re.findall(r"\bcp\.async\.c[ag]\.shared\.global[^;]*,\s*(?:16|0x10)\s*[,;]",
                                  ptx)),
        tma=len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
        mma=len(re.findall(r"\bmma\.sync", ptx)),
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        sass_instructions=len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M)),
        sass_ldg=len(re.findall(r"\bLDG\b", sass)),
        sass_stg=len(re.findall(r"\bSTG\b", sass)),
        sass_ldgsts=len(re.findall(r"\bLDGSTS\b", sass)),
    )


_BLOCKED = re.compile(
    r"^#(\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], threadsPerWarp = \[([\d, ]+)\], "
    r"warpsPerCTA = \[([\d, ]+)\], order = \[([\d, ]+)\]", re.M)
_TILE_ACCESS = re.compile(
    r"^\s*(?:%([A-Za-z_][A-Za-z0-9_]*?)(?:_\d+)? = )?"
    r"(ttg\.async_copy_global_to_local|tt\.load|tt\.store)\b[^\n]*?"
    r": tensor<(\d+)x(\d+)x!tt\.ptr<(\w+)>, #(\w+)>", re.M)
_ELEMENT_BITS = {"f16": 16, "bf16": 16, "f32": 32, "i32": 32, "f64": 64, "i64": 64, "i8": 8,
                 "i1": 8, "f8E4M3FN": 8, "f8E5M2": 8}


def tile_accesses(ttgir: str) -> List[Dict[str, Any]]:
    """The 2-D global loads, ``cp.async`` copies (``ttg.async_copy_global_to_local``) and
    stores of a kernel's TTGIR, each with the blocked layout the compiler chose for it:
    ``name`` (the Python variable a load's result is named after, e.g. ``a``/``b`` for the
    GEMM operands; ``""`` for stores), ``op`` (``async_copy``, ``load``, ``store``),
    ``shape``, ``elem`` (element type), ``fast_dim`` (the layout's fastest dimension: the
    tile dimension consecutive lanes and vector elements walk), ``vec`` (contiguous elements
    per thread along it: ``vec * bits`` is the vector width the lowering aims for),
    ``bits`` (element bits) and ``lanes`` (lanes of a warp along it). The layout is what the
    coalescing pass derived from the compiler's contiguity/alignment analysis, so it says per
    operand what the PTX counts say per kernel. Repeated accesses (a pipeline's prologue
    copies) appear once."""
    layouts = {}
    for m in _BLOCKED.finditer(ttgir):
        spt, tpw, _, order = ([int(v) for v in g.split(",")] for g in m.groups()[1:])
        layouts[m.group(1)] = (spt, tpw, order)
    seen = set()
    out: List[Dict[str, Any]] = []
    for m in _TILE_ACCESS.finditer(ttgir):
        name, op, d0, d1, elem, layout = m.groups()
        if layout not in layouts:
            continue
        spt, tpw, order = layouts[layout]
        fast = order[0]
        entry = dict(name=name or "", op=op.split(".")[-1].replace("async_copy_global_to_local",
                                                                     "async_copy"),
                     shape=[int(d0), int(d1)], elem=elem, fast_dim=fast, vec=spt[fast],
                     bits=_ELEMENT_BITS.get(elem, 0), lanes=tpw[fast])
        key = tuple(sorted((k, str(v)) for k, v in entry.items()))
        if key not in seen:
            seen.add(key)
            out.append(entry)
    return out


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), "-sass", f.name],
                              check=True, capture_output=True, text=True).stdout


def compile_kernel(case: AotCase, arch: int) -> Any:
    """``triton.compile`` of ``case`` for ``sm_<arch>`` (the ``CompiledKernel``: ``asm`` holds
    ttgir, ptx, cubin ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    index = {name: i for i, name in enumerate(case.fn.arg_names)}
    attrs = {(index[k],): v for k, v in case.attrs.items()}
    src = ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs, attrs=attrs)
    options = {"num_warps": case.num_warps, "num_stages": case.num_stages, **case.options}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def inspect_compiled(case: AotCase, kernel: Any, arch: int) -> AotResult:
    """The resources, memory accesses and occupancy of ``kernel`` (``compile_kernel(case,
    arch)``)."""
    usage = _resource_usage(kernel.asm["cubin"])
    registers = usage.get("REG", -1)
    shared = int(kernel.metadata.shared)
    return AotResult(
        name=case.name,
        arch=arch,
        registers=registers,
        spill_bytes=usage.get("LOCAL", 0),
        stack_bytes=usage.get("STACK", 0),
        shared_bytes=shared,
        kernel=getattr(case.fn, "__name__", case.name),
        num_warps=case.num_warps,
        occupancy=occupancy(arch, registers, case.num_warps, shared) if registers > 0 else 0,
        tiles=tile_accesses(kernel.asm["ttgir"]),
        **inspect_code(kernel.asm["ptx"], _sass(kernel.asm["cubin"])),
    )


def compile_case(case: AotCase, arch: int) -> AotResult:
    """Compile ``case`` for ``sm_<arch>`` and report the cubin's resource usage, memory
    accesses and occupancy."""
    return inspect_compiled(case, compile_kernel(case, arch), arch)


def all_cases(families: Optional[Sequence[str]] = None) -> List[AotCase]:
    """Every compile case of every kernel module (or of the named op families)."""
    import importlib

    from slimops.kernels import KERNEL_MODULE_NAMES

    cases: List[AotCase] = []
    for family in families or KERNEL_MODULE_NAMES:
        cases.extend(importlib.import_module(f"slimops.kernels.{family}").aot_cases())
    return cases


def compile_all(archs=ARCHS, families: Optional[Sequence[str]] = None) -> List[AotResult]:
    """Compile every case of every kernel module (or of ``families``) for each arch."""
    return [compile_case(case, arch) for case in all_cases(families) for arch in archs]


def _widths(counts: Dict[str, int]) -> str:
    """``{"128": 4, "16": 2}`` -> ``"128b x4, 16b x2"`` (widest first)."""
    items = sorted(counts.items(), key=lambda kv: -int(kv[0]))
    return ", ".join(f"{w}b x{n}" for w, n in items) or "-"


def format_table(results: List[AotResult]) -> str:
    """A markdown table: one row per case and arch: registers, spills + stack, shared
    memory, occupancy (blocks per SM x warps), global loads and stores by width, cp.async
    (16-byte ones) and TMA copies."""
    head = ("| kernel case | arch | regs | spill+stack B | smem B | blocks/SM (warps) | "
            "ld.global by width | st.global by width | cp.async (16 B) | TMA |")
    lines = [head, "|" + "---|" * 10]
    for r in sorted(results, key=lambda r: (r.name, r.arch)):
        lines.append(
            f"| {r.name} | sm_{r.arch} | {r.registers} | {r.spill_bytes + r.stack_bytes} | "
            f"{r.shared_bytes} | {r.occupancy} ({r.occupancy * r.num_warps}) | "
            f"{_widths(r.loads)} | {_widths(r.stores)} | {r.cp_async} ({r.cp_async_16}) | "
            f"{r.tma} |")
    return "\n".join(lines)


def format_summary(results: List[AotResult]) -> str:
    """A markdown table per @triton.jit kernel: compile cases (dtypes x configurations x
    flags), register range, largest shared memory and occupancy range per arch, spills."""
    groups: Dict[str, List[AotResult]] = {}
    for r in results:
        groups.setdefault(r.kernel, []).append(r)
    archs = sorted({r.arch for r in results})
    head = "| kernel | cases | " + " | ".join(
        f"sm_{a} registers | sm_{a} max smem B | sm_{a} blocks/SM" for a in archs
    ) + " | spills / stack B |"
    lines = [head, "|" + "---|" * (3 + 3 * len(archs))]
    for kernel, rs in groups.items():
        cells = []
        for a in archs:
            ra = [r for r in rs if r.arch == a]
            regs = sorted(r.registers for r in ra)
            occ = sorted(r.occupancy for r in ra)
            cells += [f"{regs[0]}-{regs[-1]}" if regs[0] != regs[-1] else str(regs[0]),
                      str(max(r.shared_bytes for r in ra)),
                      f"{occ[0]}-{occ[-1]}" if occ[0] != occ[-1] else str(occ[0])]
        spill = max(r.spill_bytes + r.stack_bytes for r in rs)
        lines.append(f"| `{kernel}` | {len(rs) // len(archs)} | " + " | ".join(cells)
                     + f" | {spill} |")
    return "\n".join(lines)


_RESULTS: Dict[Tuple[Tuple[int, ...], Tuple[str, ...]], List[AotResult]] = {}


def cached_results(archs=ARCHS, families: Optional[Sequence[str]] = None) -> List[AotResult]:
    """``results_in_subprocesses``, computed once per process (several test modules read the
    same compiles)."""
    key = (tuple(archs), tuple(families or ()))
    if key not in _RESULTS:
        _RESULTS[key] = results_in_subprocesses(archs, families=families)
    return _RESULTS[key]


def results_in_subprocesses(archs=ARCHS, timeout: float = 1800,
                            families: Optional[Sequence[str]] = None) -> List[AotResult]:
    """``compile_all`` for each arch in its own process (in parallel), without
    ``TRITON_INTERPRET``: under the interpreter ``@triton.jit`` yields interpreter objects
    that ``triton.compile`` cannot take, and the test suite runs with it set (no GPU)."""
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for arch in archs:
            out = os.path.join(tmp, f"sm_{arch}.json")
            cmd = [sys.executable, "-m", "slimops.kernels._aot", "--arch", str(arch), "--json", out]
            for family in families or ():
                cmd += ["--family", family]
            procs.append((out, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True)))
        results: List[AotResult] = []
        for out, proc in procs:
            log, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"AOT compile failed ({' '.join(proc.args)}):\n{log[-4000:]}")
            with open(out) as f:
                results += [AotResult(**r) for r in json.load(f)]
    return results


def main(argv=None) -> int:
    """``python -m slimops.kernels._aot [--arch 80 ...] [--json PATH]``: compile every case,
    print the markdown table (docs/GPU_KERNELS.md), optionally write the results as JSON."""
    import argparse
    import dataclasses
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--arch", type=int, action="append", help="default: 80 and 90")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--cases", action="store_true", help="one row per compile case")
    parser.add_argument("--family", action="append", help="only this op family's kernels")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    results = compile_all(tuple(args.arch or ARCHS), args.family)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f)
    else:
        print(format_table(results) if args.cases else format_summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
