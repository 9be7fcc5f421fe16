"""C++ users: a slimmable model exported from Python as TorchScript runs at two widths in a
libtorch program (csrc/tools/run_widths.cpp, built by CMake: `make cmake`) and reproduces
Python's outputs.

The program links libslimops.so (the same CPU kernels as slimops._C) and no Python. It
runs in its own process: libslimops and slimops._C both register the `slimops::` ops, so
they never share one.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import List

import pytest
import torch
from torch import Tensor, nn

import slimops
from slimops.ops import _backend
from slimops.export import torchscript_widths
from slimops.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = ROOT / os.environ.get("CMAKE_BUILD_DIR", "build-cmake") / "slimops_run_widths"

pytestmark = [
    pytest.mark.skipif(not _backend.HAS_C, reason="needs the compiled extension"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # TorchScript, deprecated
]


def _program() -> Path:
    if not PROGRAM.exists():
        if os.environ.get("CI"):  # CI builds it first (.ci/run: make cmake, then make test)
            pytest.fail(f"{PROGRAM} is missing: CI runs `make cmake` before the tests")
        pytest.skip(f"{PROGRAM} not built: run `make cmake`")
    return PROGRAM


class _Check(nn.Module):
    """What the C++ program compares against: the input, the widths, Python's outputs."""

    def __init__(self, x: Tensor, widths: List[float], expected: List[Tensor]) -> None:
        super().__init__()
        self.input = x
        self.widths = widths
        self.expected = expected

    def forward(self) -> Tensor:
        return self.input


def _export(tmp_path: Path, name: str, widths: List[float], size: int):
    from conftest import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(MODELS[name]()).eval()
    x = torch.randn(2, 3, size, size)
    expected = []
    for w in widths:
        with torch.no_grad(), slimops.width(model, w):
            expected.append(model(x))
    scripted = torchscript_widths(model, x, widths)
    model_path, check_path = tmp_path / "model.pt", tmp_path / "check.pt"
    scripted.save(str(model_path))
    torch.jit.script(_Check(x, widths, expected)).save(str(check_path))
    return model_path, check_path


@pytest.mark.parametrize("name,size", [("s_mobilenet_v2", 64), ("slim_cnn", 32)])
def test_cpp_program_reproduces_python_at_two_widths(tmp_path, name, size):
    program = _program()
    widths = [slimops.model_widths(MODELS[name]())[i] for i in (0, -1)]
    model_path, check_path = _export(tmp_path, name, widths, size)
    run = subprocess.run([str(program), str(model_path), str(check_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    for w in widths:
        assert any(line.startswith(f"width {w:g}:") and line.endswith("ok") for line in lines), \
            run.stdout
    assert "width 12.5: rejected" in run.stdout


def test_cpp_program_reports_a_mismatch(tmp_path):
    """The comparison can fail: wrong expected outputs give exit code 1."""
    program = _program()
    model_path, check_path = _export(tmp_path, "slim_cnn", [0.25, 1.0], 32)
    wrong = torch.jit.load(str(check_path))
    bad = _Check(wrong.input, list(wrong.widths), [t + 1.0 for t in wrong.expected])
    torch.jit.script(bad).save(str(check_path))
    run = subprocess.run([str(program), str(model_path), str(check_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "MISMATCH" in run.stdout


def test_cpp_program_usage_error():
    run = subprocess.run([str(_program())], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "usage" in run.stderr


def test_torchscript_widths_in_python(tmp_path):
    """The exported module itself: one file, weights stored once, every width matches."""
    model = MODELS["slim_cnn"]().eval()
    x = torch.randn(1, 3, 32, 32)
    scripted = torchscript_widths(model, x)
    assert scripted.widths == list(slimops.model_widths(model))
    path = tmp_path / "m.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    for w in slimops.model_widths(model):
        with torch.no_grad(), slimops.width(model, w):
            torch.testing.assert_close(loaded(x, w), model(x), rtol=0, atol=0)
    inlined = str(next(loaded.branches.children()).inlined_graph)
    assert "slimops::conv2d" in inlined and "slimops::linear" in inlined
    with pytest.raises(Exception, match="unknown width"):
        loaded(x, 0.3)


def test_torchscript_widths_stores_the_weights_once(tmp_path):
    model = MODELS["s_mobilenet_v2"]().eval()
    x = torch.randn(1, 3, 32, 32)
    sizes = []
    for widths in ([0.35], [0.35, 1.0]):
        path = tmp_path / f"{len(widths)}.pt"
        torchscript_widths(model, x, widths).save(str(path))
        sizes.append(path.stat().st_size)
    params = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    assert sizes[0] > params  # the full shared weights, not the 0.35x prefix
    assert sizes[1] - sizes[0] < 0.1 * params  # a second width adds code, not weights
