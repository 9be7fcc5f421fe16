"""bench/gpu_check.py without a GPU: the clear exit when there is none, and its logic run on
the CPU (``--device cpu``, a dry run): the per-op comparison against the float64 CPU result,
the op coverage, the model timings and the JSON / Markdown it writes. The figures of a CPU
dry run are not GPU results and nothing here asserts a timing's value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from slimops.op_families import FAMILY_OF, IN_PLACE_OPS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.py")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("SLIMOPS_CONV_ROUTE", "fixed")
    return env


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (it puts bench/ on sys.path for its helpers)."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        import gpu_check as module
    finally:
        sys.path.remove(os.path.join(REPO, "bench"))
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_no_gpu_exits_3_with_a_clear_message_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "gpu_check: no CUDA GPU is visible" in proc.stderr
    assert "--device cpu" in proc.stderr  # says what can be run instead
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One CLI dry run on the CPU: quick, one width, one timed round."""
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--device", "cpu", "--quick", "--dtype", "fp32",
         "--image-size", "32", "--rounds", "2", "--warmup", "0", "--widths", "0.35", "1.0",
         "--out", str(out)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    return proc, out


def test_dry_run_passes_and_writes_json_and_markdown(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert report["passed"] is True
    assert report["settings"]["device"] == "cpu" and report["settings"]["quick"] is True
    assert "Dry run on the CPU: these are not GPU results." in md
    assert "| op | case | dtype |" in md and "| batch | width |" in md
    assert report["environment"]["torch"] == torch.__version__
    assert "PASSED" in proc.stdout


def test_dry_run_checks_every_op_in_every_dtype(dry_run):
    _, out = dry_run
    report = json.loads((out / "gpu_check.json").read_text())
    # every op ran, the backward ops through autograd, the running statistics' update in
    # batch_norm_act's training case (its state is compared) and the fused training ops too
    assert set(report["ops_run"]) == set(FAMILY_OF) | {
        "conv2d_bn_act_train", "depthwise_conv2d_bn_act_train"}
    assert report["ops_not_run"] == []
    checks = report["checks"]
    assert {c["op"] for c in checks} == {
        op for op in FAMILY_OF if "backward" not in op and op not in IN_PLACE_OPS} | {
        "conv2d_bn_act_train", "depthwise_conv2d_bn_act_train"}
    assert {c["dtype"] for c in checks} == {"fp32", "fp16", "bf16", "autocast-bf16"}
    for c in checks:
        assert c["ok"], c
        if c["dtype"] == "fp32":
            assert c["error"] <= 1e-4, c
        if c["dtype"] == "autocast-bf16":
            # slimops' ops are not cast on the CPU (its kernels are float32/float64)
            assert c["out_dtype"] == "float32", c
        elif c["dtype"] != "fp32":
            assert c["out_dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[c["dtype"]], c
            assert c["baseline_error"] is not None, c  # held to plain PyTorch's accuracy


def test_dry_run_times_every_variant_and_compares_outputs(dry_run):
    _, out = dry_run
    report = json.loads((out / "gpu_check.json").read_text())
    rows = report["timings"]
    assert {(r["width"], r["variant"]) for r in rows} == {
        (w, v) for w in (0.35, 1.0) for v in ("slimops", "slimops-autocast", "reference",
                                              "dense")}
    for r in rows:
        assert not r["skipped"], r
        assert r["rounds"] == 2 and 0 < r["median_ms"] <= r["p90_ms"], r
        if r["variant"].startswith("slimops"):
            assert r["max_rel_diff_vs_dense"] < 1e-4, r  # same network, float32
        else:
            assert r["max_rel_diff_vs_dense"] is None


def test_a_wrong_result_fails_the_check(gpu_check, monkeypatch):
    """A case whose op is off by a little on the device under test (here: any run but the
    float64 CPU one it is compared with) fails in float32 and is named; a wrong output dtype
    fails too."""
    import slimops

    good = next(c for c in gpu_check._cases() if c.op == "linear")

    def off(t):
        out = good.call(t)
        return out if t["x"].dtype == torch.float64 else out * (1 + 1e-3)

    wrong = gpu_check.Case(good.op, "off by 1e-3", good.make, off, good.grad)
    cast = gpu_check.Case(good.op, "float64 out", good.make,
                          lambda t: good.call(t).double(), good.grad)
    monkeypatch.setattr(gpu_check, "_cases", lambda: [good, wrong, cast])
    rows, seen = gpu_check.run_op_checks("cpu", quick=True, kernels="cpu")
    by = {(r.case, r.dtype): r for r in rows}
    assert by[(good.name, "fp32")].ok
    assert not by[("off by 1e-3", "fp32")].ok and by[("off by 1e-3", "fp32")].error > 1e-4
    assert not by[("float64 out", "fp16")].ok
    assert "output dtype torch.float64" in by[("float64 out", "fp16")].note
    assert {"linear", "linear_backward_input", "linear_backward_weight"} <= seen
    report = gpu_check.Report({"device": "cpu", "quick": True, "dtype": "fp32"},
                              {"torch": torch.__version__, "slimops": slimops.__version__},
                              rows, sorted(seen))
    assert not report.passed
    assert "**NO**" in gpu_check.markdown(report) and "**FAILED**" in gpu_check.markdown(report)


def test_compare_low_precision_is_held_to_the_baseline(gpu_check):
    expected = torch.linspace(-1, 1, 1000, dtype=torch.float64)
    got = expected.float() + 0.03  # 3% of the largest magnitude everywhere
    ok = gpu_check._compare(got, expected, torch.bfloat16, baseline=got)
    assert ok["ok"] and ok["bound"] == pytest.approx(0.06, rel=1e-3)
    worse = gpu_check._compare(got + 0.07, expected, torch.bfloat16, baseline=got)
    assert not worse["ok"]
    # a few flipped elements (activation masks) pass, many do not
    flipped = expected.clone()
    flipped[:4] += 1.0
    assert gpu_check._compare(flipped, expected, torch.float16, baseline=None)["ok"]
    flipped[:50] += 1.0
    assert not gpu_check._compare(flipped, expected, torch.float16, baseline=None)["ok"]
    # float32 allows no outliers; non-finite values never pass
    assert not gpu_check._compare(expected.float() + 1e-3, expected, torch.float32, None)["ok"]
    nan = expected.float().clone()
    nan[0] = float("nan")
    assert not gpu_check._compare(nan, expected, torch.bfloat16, baseline=nan)["ok"]


def test_checks_past_the_time_budget_are_not_run_and_fail(gpu_check, monkeypatch):
    case = next(c for c in gpu_check._cases() if c.op == "linear")
    monkeypatch.setattr(gpu_check, "_cases", lambda: [case])
    rows, seen = gpu_check.run_op_checks("cpu", quick=True, kernels="cpu",
                                         deadline=time.monotonic() - 1)
    assert rows and not seen
    assert all(not r.ok and r.note == "not run: time budget" for r in rows)


def test_cells_past_the_time_budget_are_skipped(gpu_check):
    rows = gpu_check.time_model("cpu", torch.float32, (0.35,), [1], rounds=1, warmup=0,
                                image_size=32, deadline=time.monotonic() - 1)
    assert [r.variant for r in rows] == list(gpu_check.VARIANTS)
    assert all(r.skipped == "time budget" and r.median_ms is None for r in rows)
    md = gpu_check.markdown(gpu_check.Report(
        {"device": "cpu", "quick": True, "dtype": "fp32"},
        {"torch": torch.__version__, "slimops": "x"}, timings=rows))
    assert "skipped: time budget" in md


def test_the_script_imports_only_public_slimops_modules():
    import ast

    tree = ast.parse(open(SCRIPT).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update(f"{node.module}.{a.name}" for a in node.names)
    def private(dotted):
        return any(p.startswith("_") and not p.endswith("__") for p in dotted.split("."))

    mine = {n for n in names if n.split(".")[0] == "slimops"}
    assert mine and not [n for n in mine if private(n)], mine
    attributes = {ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    used = [a for a in attributes if a.startswith("slimops.") and private(a)]
    assert not used, used
