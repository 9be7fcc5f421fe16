"""The benchmark tooling, without timing anything: the report and plot of a synthetic
pytest-benchmark JSON, the CLI around them, the peak-memory method, and the baselines of
bench/baselines.py computing what slimops computes (so the suite compares equal work)."""

import json
import sys
from pathlib import Path

import pytest
import torch

import slimops
from slimops.apps import benchmark_report as br
from slimops.apps.cli import main
from slimops.models import slim_cnn

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import baselines  # noqa: E402  (bench/ is not a package)
import benchutil  # noqa: E402


def _bench(suite, subject, batch, width, variant, median_s, **extra):
    return {"group": f"{suite} {subject}", "name": f"test[{subject}-{width}-{variant}]",
            "extra_info": dict(suite=suite, subject=subject, batch=batch, width=width,
                               variant=variant, **extra),
            "stats": {"median": median_s, "rounds": 5, "min": median_s, "max": median_s}}


@pytest.fixture
def synthetic(tmp_path):
    benches = []
    for w, scale in ((0.25, 1.0), (1.0, 4.0)):
        for variant, ms in (("slimops", 2.0), ("reference", 4.0), ("dense-eager", 2.5),
                            ("dense-jit", 1.0)):
            benches.append(_bench("model", "s_mobilenet_v1", 8, w, variant, ms * scale / 1e3,
                                  cpu_wait=0.5 if (w, variant) == (1.0, "dense-jit") else 0.02))
        benches.append(_bench("layer", "linear", 1, w, "slimops", 0.05e-3))
        benches.append(_bench("layer", "linear", 1, w, "reference", 0.1e-3))
    benches.append(_bench("train", "s_mobilenet_v2", 8, 0.0, "slimops", 0.9, peak_mib=400.0,
                          widths="1+0.35", input=224))
    benches.append(_bench("train", "s_mobilenet_v2", 8, 0.0, "reference", 1.2, peak_mib=600.0,
                          widths="1+0.35", input=224))
    benches.append({"group": None, "name": "untagged", "extra_info": {},
                    "stats": {"median": 1.0, "rounds": 1}})
    data = {"machine_info": {"slimops": {
        "cpu": "Test CPU", "cores": 2, "torch": "2.x", "torch_threads": 2,
        "allocator": "glibc 2.36 malloc, defaults", "backend": {"cpu": "C++"},
        "loadavg_start": [0.1, 0.2, 0.3], "loadavg_end": [1.0, 0.5, 0.3], "suite_wall_s": 12.0,
        "quick": False}}, "benchmarks": benches}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return path


def test_report_tables(synthetic):
    text = br.report(br.load(synthetic))
    assert "allocator: glibc 2.36 malloc, defaults" in text and "threads 2" in text
    lines = text.splitlines()
    i = lines.index("model s_mobilenet_v1, batch 8 (median ms; ratio < 1: slimops faster)")
    assert lines[i + 1].split() == ["width", "slimops", "ms", "reference", "ms", "dense-eager",
                                    "ms", "dense-jit", "ms", "slimops/ref", "slimops/eager",
                                    "slimops/jit", "wait"]
    assert lines[i + 3].split() == ["0.25x", "2.000", "4.000", "2.500", "1.000", "0.50", "0.80",
                                    "2.00", "2%"]
    # A row timed while its threads waited for a CPU half of the time is flagged.
    assert lines[i + 4].split() == ["1x", "8.000", "16.0", "10.0", "4.000", "0.50", "0.80",
                                    "2.00", "50%!"]
    assert "'!' above 5%" in text
    # A group with only two variants gets only the ratio it can compute.
    j = lines.index("layer linear, batch 1 (median ms; ratio < 1: slimops faster)")
    assert lines[j + 1].split()[-2:] == ["slimops/ref", "wait"]
    assert lines[j + 3].split()[-2:] == ["0.50", "-"]
    assert "slimops/reference: time 0.75, peak memory 0.67" in text
    assert "untagged" not in text


def test_plot_writes_a_png(synthetic, tmp_path):
    out = br.plot(br.load(synthetic), tmp_path / "sub" / "plot.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert br.plot({"benchmarks": []}, tmp_path / "empty.png") is None


def test_cli_reports_a_saved_run(synthetic, tmp_path, capsys):
    png = tmp_path / "p.png"
    assert main(["bench", "--report", str(synthetic), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "model s_mobilenet_v1, batch 8" in out and f"plot: {png}" in out
    assert png.is_file()


def test_cli_without_a_checkout(monkeypatch, tmp_path, capsys):
    assert br.bench_dir() == BENCH
    monkeypatch.setattr(br, "__file__", str(tmp_path / "site-packages" / "slimops" / "apps" / "x.py"))
    with pytest.raises(FileNotFoundError, match="source checkout"):
        br.bench_dir()
    assert main(["bench", "--quick"]) == 2
    assert "no benchmark suite at" in capsys.readouterr().err


def test_cpu_wait():
    # 3 ms on a CPU, 1 ms waiting for one: a quarter of the time waiting.
    assert benchutil.cpu_wait((10, 5), (3_000_010, 1_000_005)) == pytest.approx(0.25)
    assert benchutil.cpu_wait(None, (1, 1)) is None
    snap = benchutil._sched_snapshot()
    assert snap is None or (len(snap) == 2 and snap[0] > 0)


def test_peak_step_bytes():
    mib = 2 ** 18  # float32 elements in 1 MiB

    def step():
        a = torch.ones(mib)
        b = torch.ones(2 * mib)
        del a
        c = torch.ones(mib)
        return b, c

    assert benchutil.peak_step_bytes(step) == 3 * 2 ** 20


@pytest.mark.parametrize("shared_bn", [False, True])
def test_baselines_compute_what_slimops_computes(shared_bn, tol, randomize_bn, one_thread):
    model = randomize_bn(slim_cnn(shared_bn=shared_bn)).eval()
    reference = baselines.reference_style(model)
    # The reference style shares the model's Parameters and buffers, never copies them.
    assert [id(p) for p in reference.parameters()] == [id(p) for p in model.parameters()]
    assert [id(b) for b in reference.buffers()] == [id(b) for b in model.buffers()]
    x = torch.randn(2, 3, 16, 16)
    for w in slimops.model_widths(model):
        with torch.no_grad(), slimops.width(model, w):
            expected = model(x)
        for variant in baselines.VARIANTS:
            got = baselines.runner(variant, model, w, x, reference)(x)
            torch.testing.assert_close(got, expected, **tol(torch.float32, expected),
                                       msg=lambda m: f"{variant} at {w}: {m}")


def test_reference_style_trains_like_slimops(tol, one_thread):
    """Algorithm 1's forward + backward in training mode: same loss, same gradients, same
    running-stat updates (what the training benchmark compares)."""
    torch.manual_seed(0)
    a = slim_cnn().train()
    b = slim_cnn().train()
    b.load_state_dict(a.state_dict())
    ref = baselines.reference_style(b)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for w in reversed(slimops.model_widths(a)):
        for net in (a, ref):
            with slimops.width(net, w):
                torch.nn.functional.cross_entropy(net(x), y).backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **tol(torch.float32, p.grad),
                                   msg=lambda m: f"{name}: {m}")
    for (name, s), t in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(t, s, **tol(torch.float32, s) if s.is_floating_point()
                                   else dict(rtol=0, atol=0), msg=lambda m: f"{name}: {m}")


def test_merge_keeps_the_least_contended_measurement(synthetic, tmp_path, capsys):
    first = br.load(synthetic)
    second = json.loads(json.dumps(first))
    for b in second["benchmarks"]:
        info = b["extra_info"]
        if info.get("width") == 1.0 and info.get("variant") == "dense-jit":
            b["stats"]["median"] = 3.0e-3  # re-measured without contention
            info["cpu_wait"] = 0.0
        elif "cpu_wait" in info:
            info["cpu_wait"] = 0.3  # contended this time: the first run's value stays
            b["stats"]["median"] *= 10
    again = tmp_path / "again.json"
    again.write_text(json.dumps(second))
    assert main(["bench", "--report", str(synthetic), str(again)]) == 0
    out = capsys.readouterr().out
    assert "merged from 2 runs" in out
    row = next(line for line in out.splitlines() if line.startswith("   1x") and "8.000" in line)
    assert row.split() == ["1x", "8.000", "16.0", "10.0", "3.000", "0.50", "0.80", "2.67", "2%"]

    second["machine_info"]["slimops"]["code"] = {"commit": "other"}
    again.write_text(json.dumps(second))
    assert main(["bench", "--report", str(synthetic), str(again)]) == 2
    assert "different code" in capsys.readouterr().err
