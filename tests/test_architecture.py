"""The layering of docs/ARCHITECTURE.md, checked from the source: data flows down, nothing
flows up.

Each module of ``slimops`` (``models/`` and ``kernels/`` installed as ``slimops.models`` and
``slimops.kernels``) has a layer; an import of a module in a higher layer is an upward edge
and fails here, as does importing a name from the ``slimops`` package itself (its
``__init__`` imports every layer) and, in ``slimops.nn``, any use of the op layer's
internals (``_backend``, ``torch.ops``): the op layer alone decides which backend runs.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module imports from its own layer or below.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("base", ("slimops._version", "slimops._files", "slimops._extension", "slimops.op_families",
              "slimops.reference", "slimops.width", "slimops.kernels", "slimops._C",
              "slimops.timing", "slimops._table")),
    ("ops", ("slimops.ops",)),
    ("nn", ("slimops.nn",)),
    ("library", ("slimops.models", "slimops.export", "slimops.profile", "slimops.deploy",
                 "slimops.baselines", "slimops.train")),
    ("package", ("slimops",)),
    ("apps", ("slimops.apps", "slimops.__main__")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("models", "kernels"):
        parts = ["slimops"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for top in ("slimops", "models", "kernels")
            for p in (ROOT / top).rglob("*.py")}


MODULES = _modules()


def layer_of(module: str) -> int:
    """The index in LAYERS of the most specific prefix that names ``module``."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} has no layer in tests/test_architecture.py LAYERS"
    return best


def imports_of(module: str) -> Set[str]:
    """The slimops modules ``module`` imports (anywhere in the file, lazy imports too);
    ``from slimops import name`` of a non-module name is recorded as ``slimops``."""
    found: Set[str] = set()
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "slimops")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "slimops":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES or full == "slimops._C" else node.module)
    return found


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_import_slimops_loads_the_library_only():
    # The applications (CLI, demo, benchmark report, image folders) and the trainer load
    # when used, never with the library.
    import subprocess
    import sys

    code = ("import sys, slimops; print(' '.join(sorted(m for m in sys.modules "
            "if m.startswith('slimops'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    assert not [m for m in loaded if m.startswith(("slimops.apps", "slimops.train",
                                                   "slimops.__main__", "slimops.deploy",
                                                   "slimops.profile", "slimops.baselines"))]
    assert {"slimops.ops", "slimops.nn", "slimops.width", "slimops.models"} <= set(loaded)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    mine = layer_of(module)
    upward = sorted(dep for dep in imports_of(module)
                    if dep != module and layer_of(dep) > mine)
    assert not upward, (f"{module} (layer {LAYERS[mine][0]}) imports from above: " + ", ".join(
        f"{dep} ({LAYERS[layer_of(dep)][0]})" for dep in upward))


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "slimops"))
def test_nothing_imports_the_package_namespace(module):
    # `import slimops` / `from slimops import set_width` run slimops/__init__.py, which
    # imports every layer: from anywhere inside the package that is an upward edge.
    assert "slimops" not in imports_of(module), (
        f"{module} imports from slimops/__init__.py; import the defining module instead")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("slimops.nn")))
def test_layers_reach_kernels_only_through_op_entry_points(module):
    source = MODULES[module].read_text()
    tree = ast.parse(source)
    attributes = {ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not any(a == "torch.ops" or a.startswith("torch.ops.") for a in attributes), (
        f"{module} calls torch.ops directly; call a slimops.ops entry point")
    assert not any(dep.startswith("slimops.ops._backend") for dep in imports_of(module)), (
        f"{module} imports the backend state; the op layer decides which backend runs")
    assert "_backend" not in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def test_backend_state_changes_only_through_its_functions():
    # cuda_registration records its kernels with _backend.set_cuda_kernels; no module
    # assigns _backend's globals from outside.
    for module, path in MODULES.items():
        if module == "slimops.ops._backend":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign))
                       else [])
            for target in targets:
                text = ast.unparse(target)
                assert not text.startswith("_backend."), f"{module} assigns {text}"


CPU_SOURCES = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))


@pytest.mark.parametrize("path", CPU_SOURCES, ids=lambda p: p.name)
def test_cpu_kernels_run_under_the_load_watch(path):
    """Every CPU kernel registers through SLIMOPS_CPU_IMPL (common.h: its LoadScope takes the
    op to one thread while the machine is contended), and every region the kernels open is
    one whose join the watch times (run_tasks / watched_parallel_for in parallel.h), never a
    bare at::parallel_for: a region the watch cannot see would let a busy machine go
    unnoticed (csrc/cpu/parallel.h, rule 5)."""
    text = path.read_text()
    assert "m.impl(" not in text, f"{path.name} registers a kernel without SLIMOPS_CPU_IMPL"
    assert "at::parallel_for(" not in text, f"{path.name} opens a region the watch cannot time"
