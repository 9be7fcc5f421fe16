"""Build slimops: the Python package plus the compiled CPU kernels (slimops._C).

`models/` and `kernels/` are top-level folders (so the architecture shows at a glance) and
are installed as `slimops.models` and `slimops.kernels`.

Build with `pip install --no-build-isolation -e .` so the build compiles against the torch
already installed (requirements.txt pins it). SLIMOPS_NO_EXTENSION=1 skips the C++ build
(the package then runs on the pure-PyTorch reference path). With a CUDA build of torch and a
visible GPU (or FORCE_CUDA=1), the CUDA kernels of csrc/cuda are compiled in as well.

`pip wheel .` and `pip install .` write nothing into the source tree: their build/ and
slimops.egg-info go to a temporary folder (see out_of_tree_options).
"""

import glob
import os
import shutil
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def with_cuda():
    """Build csrc/cuda too: when a GPU is visible, or FORCE_CUDA=1 (building on a machine
    without one); either way only if this torch was built with CUDA. Otherwise the
    extension is CPU-only and csrc/cuda is not compiled at all."""
    import torch

    if torch.version.cuda is None:
        return False
    return os.environ.get("FORCE_CUDA") == "1" or torch.cuda.is_available()


def extensions():
    if os.environ.get("SLIMOPS_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/ops.cpp", "csrc/python_module.cpp"] + sorted(
        glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/autograd/*.cpp"))
    debug = os.environ.get("SLIMOPS_DEBUG") == "1"
    # No -std: torch's BuildExtension adds the standard the installed torch's headers need
    # (C++20 for torch 2.13; forcing C++17 gave 12 warnings per build about its headers).
    cxx = ["-fopenmp", "-O0" if debug else "-O3", "-g" if debug else "-DNDEBUG"]
    compile_args = {"cxx": cxx}
    extension = CppExtension
    if with_cuda():
        # The CUDA kernels (nvcc) and their registration (host compiler). Not
        # csrc/cuda/host_harness.cpp: that is the CPU test harness of the kernels' math.
        sources += ["csrc/cuda/bindings.cpp"] + sorted(glob.glob("csrc/cuda/*.cu"))
        compile_args["nvcc"] = ["-O0" if debug else "-O3", "-lineinfo"]
        extension = CUDAExtension
    ext = extension(
        "slimops._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"],
        # Only the stable part of the CPython ABI is used (the PyInit stub).
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def out_of_tree_options():
    """setup()'s ``options`` and the temporary folder to remove afterwards (or None).

    Under a PEP 517 frontend (pip, python -m build: setuptools.build_meta runs this file)
    building a wheel, setuptools would leave build/ (build_base) and slimops.egg-info
    (egg_info's egg_base) in the source tree; both go to a temporary folder instead, removed
    when setup() returns (the wheel or metadata is written to the folder the frontend asked
    for). An sdist keeps its egg-info in the tree: setuptools archives it from there (the
    sdist's slimops.egg-info/SOURCES.txt). Editable installs (``pip install -e .``, the
    Makefile's build: its object files under build/ make ninja's rebuilds incremental) and
    direct ``python setup.py ...`` runs (``build_ext --inplace``) keep setuptools' defaults."""
    commands = sys.argv[1:]
    if "setuptools.build_meta" not in sys.modules or "editable_wheel" in commands:
        return {}, None
    tmp = tempfile.mkdtemp(prefix="slimops-build-")
    options = {"build": {"build_base": os.path.join(tmp, "build")}}
    if "sdist" not in commands:
        options["egg_info"] = {"egg_base": tmp}
    return options, tmp


ext_modules, cmdclass = extensions()
options, build_tmp = out_of_tree_options()

try:
    setup(
        packages=[
            "slimops",
            "slimops.ops",
            "slimops.nn",
            "slimops.train",
            "slimops.apps",
            "slimops.models",
            "slimops.kernels",
        ],
        package_dir={
            "slimops": "slimops",
            "slimops.models": "models",
            "slimops.kernels": "kernels",
        },
        # py.typed: the package's annotations are for type checkers (PEP 561).
        package_data={"slimops": ["py.typed"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        options=options,
    )
finally:
    if build_tmp is not None:
        shutil.rmtree(build_tmp, ignore_errors=True)
