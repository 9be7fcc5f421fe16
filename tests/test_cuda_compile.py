"""Every CUDA kernel file compiles with nvcc for sm_80 and sm_90, without register spills, and
the torch registration (csrc/cuda/bindings.cpp) compiles against this torch's headers and
calls exactly the launch wrappers the kernel objects define.

No GPU needed: nvcc only compiles. Skipped without nvcc (or, for the bindings, without g++ /
the CUDA runtime headers). The kernel files include no torch header, so nvcc compiles them
alone, with the half-precision switches torch's CUDAExtension passes.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
KERNEL_FILES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
# What torch.utils.cpp_extension passes to nvcc: the kernels must not rely on implicit
# __half / __nv_bfloat16 conversions.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def _nvcc():
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _cuda_include():
    """The toolkit's include folder: from CUDA_HOME, else next to nvcc (which may be a wrapper
    script elsewhere on PATH), else /usr/local/cuda."""
    cands = [os.path.join(os.environ[k], "include") for k in ("CUDA_HOME", "CUDA_PATH")
             if os.environ.get(k)]
    cands += [os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "include"),
              "/usr/local/cuda/include"]
    for d in cands:
        if os.path.isfile(os.path.join(d, "cuda_runtime_api.h")):
            return d
    return cands[0]


def _compile_kernels(src, obj):
    cmd = [NVCC, "-std=c++20", "-O3", "-c", "-I", CSRC, *TORCH_NVCC_DEFINES, *ARCHS,
           "-Xptxas=-v,-warn-spills", src, "-o", obj]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_kernel_files_exist():
    names = {os.path.basename(f) for f in KERNEL_FILES}
    assert {"depthwise_conv2d.cu", "epilogue.cu", "batch_norm_act.cu"} <= names


@needs_nvcc
@pytest.mark.parametrize("src", KERNEL_FILES, ids=os.path.basename)
def test_nvcc_compiles_for_sm80_and_sm90_without_spills(src, tmp_path):
    log = _compile_kernels(src, str(tmp_path / "k.o"))
    # ptxas reports per kernel and per arch: "Compiling entry function '...' for 'sm_80'",
    # then "N bytes spill stores, M bytes spill loads" and "Used R registers".
    archs = set(re.findall(r"for '(sm_\d+)'", log))
    assert {"sm_80", "sm_90"} <= archs, log
    spills = [(int(s), int(l)) for s, l in
              re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    assert spills, log
    assert all(s == 0 and l == 0 for s, l in spills), f"register spills:\n{log}"
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    # 256-thread blocks (kThreads, __launch_bounds__): at most 255 registers each.
    assert regs and max(regs) <= 255, log


def _torch_include_dirs():
    from torch.utils.cpp_extension import include_paths

    return include_paths()


@needs_nvcc
def test_bindings_compile_and_match_the_launch_wrappers(tmp_path):
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"{cxx} not found")
    cuda_inc = _cuda_include()
    if not os.path.isfile(os.path.join(cuda_inc, "cuda_runtime_api.h")):
        pytest.skip(f"no cuda_runtime_api.h in {cuda_inc}")
    import torch

    incs = _torch_include_dirs()
    if not any(os.path.isfile(os.path.join(d, "c10", "cuda", "CUDAStream.h")) for d in incs):
        pytest.skip("this torch ships no c10/cuda headers")
    # A CPU build of torch ships the c10/cuda headers but not the CMake-generated
    # c10/cuda/impl/cuda_cmake_macros.h they include; stand in for it (shared-library build).
    stub = tmp_path / "stub"
    if not any(os.path.isfile(os.path.join(d, "c10", "cuda", "impl", "cuda_cmake_macros.h"))
               for d in incs):
        (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
        (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    abi = int(torch.compiled_with_cxx11_abi())
    obj = tmp_path / "bindings.o"
    cmd = [cxx, "-std=c++20", "-c", "-fPIC", "-O0", "-Wall", "-Werror", "-DUSE_CUDA",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-I", CSRC, "-I", str(stub)]
    for d in incs + [cuda_inc]:
        cmd += ["-isystem", d]
    cmd += [os.path.join(CSRC, "cuda", "bindings.cpp"), "-o", str(obj)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"

    if shutil.which("nm") is None:
        return
    # Every slimops::cuda launch wrapper the bindings call is defined by a kernel object with
    # the same signature (the link of the CUDA extension would fail otherwise).
    def symbols(path, kind):
        out = subprocess.run(["nm", "-C", path], capture_output=True, text=True,
                             check=True).stdout
        return {line.split(f" {kind} ", 1)[1] for line in out.splitlines()
                if f" {kind} slimops::cuda::" in line}

    defined = set()
    for src in KERNEL_FILES:
        kobj = str(tmp_path / (os.path.basename(src) + ".o"))
        subprocess.run([NVCC, "-std=c++20", "-c", "-I", CSRC, *TORCH_NVCC_DEFINES,
                        "-arch=sm_80", src, "-o", kobj], check=True, capture_output=True,
                       timeout=300)
        defined |= symbols(kobj, "T")
    needed = symbols(str(obj), "U")
    assert needed, "bindings.cpp calls no slimops::cuda launch wrapper"
    assert needed <= defined, f"undefined launch wrappers: {sorted(needed - defined)}"


def test_registered_cuda_ops_have_schemas():
    """Every op csrc/cuda/bindings.cpp registers for CUDA is defined in csrc/ops.cpp (a typo
    would only fail at load time of a CUDA build, which no machine here has)."""
    with open(os.path.join(CSRC, "ops.cpp")) as f:
        defined = set(re.findall(r'm\.def\(\s*"(\w+)\(', f.read()))
    with open(os.path.join(CSRC, "cuda", "bindings.cpp")) as f:
        registered = re.findall(r'm\.impl\("(\w+)"', f.read())
    assert registered and set(registered) <= defined, sorted(set(registered) - defined)
    assert len(registered) == len(set(registered))
