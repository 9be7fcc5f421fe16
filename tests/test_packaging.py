"""The wheel as a user gets it (issue 16): built from a copy of the working tree's source
files, installed into a fresh venv, its `slimops` command run from there.

The wheel is pure Python (SLIMOPS_NO_EXTENSION=1: no compile; the installed package runs on
its reference path). The fresh venv sees this interpreter's torch and numpy through a .pth
file (a path line only: the .pth files of that site-packages, e.g. an editable install of
the source tree, are not processed), so nothing is downloaded or installed but the wheel.
About 25 s on 2 busy cores (5 s the wheel, the rest four processes importing torch).
"""

import email.parser
import json
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import image_folder

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it is installed as (setup.py's package_dir).
PACKAGE_DIRS = {"slimops": "slimops", "models": "slimops.models", "kernels": "slimops.kernels"}
EXTRAS = {"train", "demo", "onnx", "bench", "test", "all"}
TIMEOUT = 300


def _clean_env(**extra):
    """This environment without what would let the source tree leak into a subprocess."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH")
           and not k.startswith("PIP_")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", **extra)
    return env


def _run(cmd, **kwargs):
    kwargs.setdefault("env", _clean_env())
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def _tree(folder: Path):
    """Every file and folder under ``folder``, relative."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _source_files():
    if shutil.which("git") is None:
        pytest.skip("git is not available: the source files are git ls-files' list")
    r = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                       capture_output=True, text=True, timeout=TIMEOUT)
    if r.returncode != 0:
        pytest.skip(f"not a git checkout: {r.stderr.strip()}")
    return [f for f in r.stdout.split("\0") if f and (ROOT / f).is_file()]


def _pip_has_python_option():
    try:
        version = importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(x) for x in re.findall(r"\d+", version)[:2]) >= (22, 3)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Copy the source files, build the wheel from the copy, install it into a fresh venv:
    the wheel, the copy (src), its tree before and after the build, the venv, the version
    that the copy's slimops/_version.py writes."""
    if importlib.util.find_spec("venv") is None:
        pytest.skip("the venv module is not available")
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not available to this interpreter")
    import numpy
    import torch

    base = tmp_path_factory.mktemp("packaging")
    src, dist, venv = base / "src", base / "dist", base / "venv"
    for name in _source_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    before = _tree(src)

    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", str(dist), str(src)],
         env=_clean_env(SLIMOPS_NO_EXTENSION="1"), cwd=base)
    after = _tree(src)
    (wheel,) = dist.glob("slimops-*.whl")

    # pip --python (pip >= 22.3) installs into a venv without pip of its own (0.2 s instead
    # of ensurepip's ~10 s); older pips: the venv gets pip from ensurepip (bundled, offline).
    own_pip = not _pip_has_python_option()
    if own_pip and importlib.util.find_spec("ensurepip") is None:
        pytest.skip("pip < 22.3 and no ensurepip: no pip to install into a fresh venv")
    r = subprocess.run([sys.executable, "-m", "venv", *([] if own_pip else ["--without-pip"]),
                        str(venv)], capture_output=True, text=True, timeout=TIMEOUT,
                       env=_clean_env())
    if r.returncode != 0:
        pytest.skip(f"python -m venv failed here: {r.stderr.strip()[-300:]}")
    py = venv / "bin" / "python"
    purelib = Path(_run([str(py), "-c", "import sysconfig; "
                         "print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # torch and numpy (and the optional packages beside them) from this interpreter.
    shared = dict.fromkeys(str(Path(m.__file__).resolve().parents[1]) for m in (torch, numpy))
    (purelib / "_slimops_test_shared.pth").write_text("\n".join(shared) + "\n")
    pip = [str(py), "-m", "pip"] if own_pip else [sys.executable, "-m", "pip", "--python",
                                                   str(py)]
    _run(pip + ["install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=base)
    version = re.search(r'^__version__ = "([^"]+)"$',
                        (src / "slimops" / "_version.py").read_text(), re.M).group(1)
    return SimpleNamespace(wheel=wheel, src=src, before=before, after=after, venv=venv,
                           version=version)


def _slimops(venv, *args):
    """``slimops ARGS`` of the fresh venv, from a folder outside the source tree."""
    return subprocess.Popen([str(venv / "bin" / "slimops"), *args], cwd=venv,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_clean_env(PYTHONWARNINGS="ignore"))


def _finish(process):
    """(exit code, stdout, stderr) of a Popen'ed process."""
    out, err = process.communicate(timeout=TIMEOUT)
    return process.returncode, out, err


def test_building_the_wheel_writes_nothing_into_the_source_tree(installed):
    """pip wheel left build/ and slimops.egg-info in the tree (setup.py's
    out_of_tree_options)."""
    assert not [p for p in installed.after if p == "build" or p.endswith(".egg-info")]
    assert installed.after == installed.before


def test_the_wheel_holds_every_package_py_typed_the_license_and_the_metadata(installed):
    wheel, src, version = installed.wheel, installed.src, installed.version
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = []
    for folder, package in PACKAGE_DIRS.items():
        for init in sorted((src / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(src / folder)
            packages.append(".".join([package, *rel.parts]))
            # every module of the package, under its installed name
            for module in init.parent.glob("*.py"):
                path = "/".join([*package.split("."), *rel.parts, module.name])
                assert path in names, f"{folder}/{rel}/{module.name} is not in the wheel"
    assert {"slimops", "slimops.models", "slimops.kernels", "slimops.apps"} <= set(packages)
    assert "slimops/py.typed" in names

    dist_info = f"slimops-{version}.dist-info"
    assert wheel.name.startswith(f"slimops-{version}-")
    assert {f"{dist_info}/licenses/LICENSE", f"{dist_info}/LICENSE"} & names, sorted(names)
    metadata = email.parser.Parser().parsestr(
        zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode())
    assert metadata["Name"] == "slimops" and metadata["Version"] == version
    assert set(metadata.get_all("Provides-Extra")) == EXTRAS


# Run by the fresh venv's python: where slimops comes from, and `slimops COMMAND --help` for
# every command of the installed parser, through the installed console-script entry point
# (what bin/slimops calls), in one process: each process imports torch, seconds on 2 cores.
DRIVER = r"""
import contextlib, importlib.metadata, io, json, sys
import slimops
from slimops.apps.cli import command_names

(script,) = importlib.metadata.entry_points(group="console_scripts", name="slimops")
main = script.load()
helps = {}
for command in command_names():
    out = io.StringIO()
    sys.argv = ["slimops", command, "--help"]
    with contextlib.redirect_stdout(out):
        try:
            code = main()
        except SystemExit as e:
            code = e.code
    helps[command] = [code, out.getvalue()]
print(json.dumps({"file": slimops.__file__, "entry_point": script.value, "helps": helps}))
"""


def test_the_installed_command_line_answers(installed):
    """bin/slimops --version and --help exit 0; `slimops COMMAND --help` exits 0 for every
    command (the list from the installed parser, equal to the source tree's); `slimops bench`
    exits 2 with one line (the installed package has no bench/); `import slimops` is the
    venv's copy, not the source tree. Concurrent processes: each imports torch."""
    from slimops.apps.cli import command_names

    venv = installed.venv
    runs = {argv: _slimops(venv, *argv) for argv in [("--version",), ("--help",), ("bench",)]}
    driver = subprocess.Popen([str(venv / "bin" / "python"), "-c", DRIVER], cwd=venv,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_clean_env(PYTHONWARNINGS="ignore"))
    results = {argv: _finish(p) for argv, p in runs.items()}
    code, out, err = _finish(driver)
    assert code == 0, err
    report = json.loads(out)

    for argv in [("--version",), ("--help",)]:
        code, out, err = results[argv]
        assert code == 0, f"slimops {' '.join(argv)} exited {code}:\n{err}"
    assert results[("--version",)][1].startswith(f"slimops {installed.version} ")

    commands = list(report["helps"])
    assert commands == command_names()
    assert {"demo", "train", "profile", "info", "bench", "pick-width"} <= set(commands)
    assert report["entry_point"] == "slimops.apps.cli:main"
    usage = results[("--help",)][1]
    for command, (code, text) in report["helps"].items():
        assert code == 0, f"slimops {command} --help exited {code}"
        assert text.startswith(f"usage: slimops {command}"), text
        assert command in usage

    code, out, err = results[("bench",)]
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("slimops bench: no benchmark suite at ")

    path = Path(report["file"]).resolve()
    assert path.is_relative_to(venv.resolve()), path
    assert not path.is_relative_to(ROOT), path
    assert not path.is_relative_to(installed.src.resolve()), path


def test_the_installed_package_trains_evaluates_exports_and_picks_a_width(installed, tmp_path):
    """The installed workflow end to end, in the fresh venv (the wheel has no compiled
    extension: the reference path): train 1 epoch on a generated image folder -> eval the
    checkpoint -> export one width as ONNX -> pick a width for a latency budget."""
    pytest.importorskip("PIL")
    pytest.importorskip("onnx")
    venv, data, out = installed.venv, image_folder(tmp_path / "data", ("red", "green", "blue"), per_class=6), tmp_path / "run"
    steps = [
        ("train", "--model", "slim_cnn", "--data", str(data), "--out", str(out), "--epochs",
         "1", "--batch-size", "6", "--image-size", "16", "--workers", "0", "--no-progress",
         "--threads", "1", "--latency-repeats", "1"),
        ("eval", str(out / "latest.pt"), "--data", str(data), "--workers", "0"),
        ("export", str(out / "latest.pt"), "--width", "0.5", "--format", "onnx", "-o",
         str(tmp_path / "half.onnx")),
        ("pick-width", "slim_cnn", "--budget-ms", "10000", "--repeats", "2", "--input-size",
         "1", "3", "16", "16"),
    ]
    for argv in steps:
        code, stdout, stderr = _finish(_slimops(venv, *argv))
        assert code == 0, f"slimops {' '.join(argv)} exited {code}:\n{stdout}\n{stderr}"
    assert (out / "latest.pt").is_file() and (out / "metrics.csv").is_file()
    assert (tmp_path / "half.onnx").stat().st_size > 0


def test_the_source_distribution_can_compile_the_extension(installed, tmp_path):
    """An sdist carries every file the extension's build reads: the C++/CUDA sources, their
    headers and .inc loop files (MANIFEST.in), beside setup.py and pyproject.toml."""
    import tarfile

    # From a copy of its own: an sdist keeps its egg-info in the source tree (setuptools
    # packs it from there).
    src, dist = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(installed.src, src)
    env = _clean_env(SLIMOPS_NO_EXTENSION="1")
    _run([sys.executable, "-c", "import setuptools.build_meta as b, sys; "
          "print(b.build_sdist(sys.argv[1]))", str(dist)], cwd=src, env=env)
    (sdist,) = dist.glob("slimops-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
              if p.is_file() and p.suffix in {".cpp", ".cu", ".h", ".cuh", ".inc"}}
    assert needed and not needed - names, sorted(needed - names)
    assert {"setup.py", "pyproject.toml", "LICENSE", "requirements.txt"} <= names
