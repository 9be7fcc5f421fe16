"""Ahead-of-time compilation of the Triton kernels for a GPU this machine does not have.

``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline (TTIR -> TTGIR ->
LLVM IR -> PTX -> cubin through the ptxas bundled with triton) without a driver or a GPU.
The cubin's resource usage (registers, local memory = spills, stack) is read back with the
``cuobjdump`` bundled beside that ptxas; shared memory comes from triton's own metadata.

Every kernel module lists its compile cases as ``aot_cases() -> list[AotCase]``: one case per
(kernel, dtype, tuning configuration), so a test can compile all of them for sm_80 and sm_90
and assert that none spills.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List

ARCHS = (80, 90)

# Triton 3.9 warns once when this is unset; fusion on is the documented current default and
# what the kernels are written for (fp32 accumulation via fma).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


@dataclass
class AotCase:
    """One compile of one kernel: its ``signature`` (arg name -> triton type, ``constexpr``
    for meta-parameters), the ``constexprs`` values and launch options."""

    name: str
    fn: Any  # a @triton.jit function
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    options: Dict[str, Any] = field(default_factory=dict)


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


def compile_case(case: AotCase, arch: int) -> AotResult:
    """Compile ``case`` for ``sm_<arch>`` and report the cubin's resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs)
    options = {"num_warps": case.num_warps, "num_stages": case.num_stages, **case.options}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    usage = _resource_usage(kernel.asm["cubin"])
    return AotResult(
        name=case.name,
        arch=arch,
        registers=usage.get("REG", -1),
        spill_bytes=usage.get("LOCAL", 0),
        stack_bytes=usage.get("STACK", 0),
        shared_bytes=int(kernel.metadata.shared),
        kernel=getattr(case.fn, "__name__", case.name),
        num_warps=case.num_warps,
    )


def all_cases() -> List[AotCase]:
    """Every compile case of every kernel module."""
    from slimops.kernels import kernel_modules

    cases: List[AotCase] = []
    for module in kernel_modules():
        cases.extend(module.aot_cases())
    return cases


def compile_all(archs=ARCHS) -> List[AotResult]:
    """Compile every case of every kernel module for each arch."""
    return [compile_case(case, arch) for case in all_cases() for arch in archs]


def format_table(results: List[AotResult]) -> str:
    """A markdown table: one row per case, registers / spills / shared bytes per arch."""
    by_name: Dict[str, Dict[int, AotResult]] = {}
    for r in results:
        by_name.setdefault(r.name, {})[r.arch] = r
    archs = sorted({r.arch for r in results})
    head = "| kernel case | " + " | ".join(
        f"sm_{a} regs | sm_{a} spill B | sm_{a} smem B" for a in archs) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(archs))]
    for name, per_arch in by_name.items():
        cells = []
        for a in archs:
            r = per_arch.get(a)
            cells += ([str(r.registers), str(r.spill_bytes + r.stack_bytes), str(r.shared_bytes)]
                      if r else ["-", "-", "-"])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_summary(results: List[AotResult]) -> str:
    """A markdown table per @triton.jit kernel: compile cases (dtypes x configurations x
    flags), register range and largest shared memory per arch, spills."""
    groups: Dict[str, List[AotResult]] = {}
    for r in results:
        groups.setdefault(r.kernel, []).append(r)
    archs = sorted({r.arch for r in results})
    head = "| kernel | cases | " + " | ".join(
        f"sm_{a} registers | sm_{a} max smem B" for a in archs) + " | spills / stack B |"
    lines = [head, "|" + "---|" * (3 + 2 * len(archs))]
    for kernel, rs in groups.items():
        cells = []
        for a in archs:
            ra = [r for r in rs if r.arch == a]
            regs = sorted(r.registers for r in ra)
            cells += [f"{regs[0]}-{regs[-1]}" if regs[0] != regs[-1] else str(regs[0]),
                      str(max(r.shared_bytes for r in ra))]
        spill = max(r.spill_bytes + r.stack_bytes for r in rs)
        lines.append(f"| `{kernel}` | {len(rs) // len(archs)} | " + " | ".join(cells)
                     + f" | {spill} |")
    return "\n".join(lines)


def results_in_subprocesses(archs=ARCHS, timeout: float = 1800) -> List[AotResult]:
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
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    results = compile_all(tuple(args.arch or ARCHS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f)
    else:
        print(format_table(results) if args.cases else format_summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
