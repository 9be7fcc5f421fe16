"""bench/gpu_model.py, the analytical H100 model of S-MobileNet v2 (nothing is timed): its
FLOPs against slimops' own MAC counter, its launch plan against the launches the Triton
launchers really make in a training step (run under the interpreter), its bytes' growth
with width and batch, and the wave-quantisation factor. No GPU; no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import gpu_model  # noqa: E402

from slimops.ops import _backend  # noqa: E402


@pytest.fixture(scope="module")
def model():
    from slimops.models import s_mobilenet_v2

    return s_mobilenet_v2().eval()


@pytest.mark.parametrize("width", [1.0, 0.35])
def test_flops_are_twice_the_profilers_macs_per_layer(model, width):
    """Per conv/linear layer, the model's forward FLOPs equal 2 x batch x the MACs per sample
    that ``slimops.profile`` counts for that layer at that width (its own hooks and
    ``_conv_counts``), and their sum 2 x the profiler's total less the pooling's."""
    from slimops import profile
    from slimops.nn import SlimConvBNAct, SlimmableLinear

    batch = 3
    counted = {}

    def hook(name):
        def fn(module, args, out):
            if isinstance(module, SlimmableLinear):
                fin, fout = module.active_features()
                counted[name] = fin * fout
            else:
                cin, cout = module.conv.active_channels()
                counted[name] = profile._conv_counts(module.conv, cin, cout, out)[1]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (SlimConvBNAct, SlimmableLinear))]
    import slimops

    with torch.no_grad(), slimops.width(model, width):
        model(torch.randn(1, 3, 224, 224))
    for h in handles:
        h.remove()
    layers = gpu_model.model_layers(model, width, torch.randn(batch, 3, 224, 224))
    assert [L.name for L in layers] == list(counted)
    for L in layers:
        assert L.flops() == 2 * batch * counted[L.name], L.name
    total = profile.profile(model, widths=[width])[0].macs
    pooled = layers[-1].cin * 7 * 7  # the global average pool: one accumulate per element
    assert sum(L.flops() for L in layers) == 2 * batch * (total - pooled)


def test_bytes_grow_with_width_and_batch():
    """Every layer's bytes (both plans, eval and training) grow with the batch, and the
    network's total grows with the width."""
    for training in (False, True):
        totals = {}
        for width in (0.35, 1.0):
            small = gpu_model.layers(width, 1)
            large = [gpu_model.dataclasses.replace(L, n=8) for L in small]
            for a, b in zip(small, large):
                for plan in (lambda L: gpu_model.slimops_plan(L, training),
                             lambda L: gpu_model.reference_plan(L, training)):
                    assert (sum(x.bytes for x in plan(a)) < sum(x.bytes for x in plan(b))), a.name
            totals[width] = sum(x.bytes for L in large
                                for x in gpu_model.slimops_plan(L, training))
        assert totals[0.35] < totals[1.0]


@pytest.mark.parametrize("tiles,blocks", [(1, 1), (131, 1), (132, 1), (133, 1), (1000, 3),
                                          (396, 3), (5, 16)])
def test_efficiency_factor_is_the_busy_share_of_the_waves(tiles, blocks):
    eff = gpu_model.efficiency(tiles, blocks)
    slots = 132 * blocks
    waves = -(-tiles // slots)
    assert 0 < eff <= 1
    assert eff == pytest.approx(tiles / (waves * slots))
    # a full last wave is fully efficient; one program more starts a nearly idle wave
    assert gpu_model.efficiency(waves * slots, blocks) == 1.0
    assert gpu_model.efficiency(waves * slots + 1, blocks) < 1.0


def test_efficiency_divides_the_roof_and_unknown_occupancy_is_neutral():
    x = gpu_model.Launch("k", 10, 3.35e6, blocks_per_sm=1)
    assert x.roof() == pytest.approx(1e-6)
    assert x.time() == pytest.approx(1e-6 * 132 / 10 + gpu_model.LAUNCH_S)
    assert gpu_model.Launch("k", 0, 3.35e6).efficiency() == 1.0


@pytest.fixture(scope="module")
def table():
    return gpu_model.occupancy_table()


@pytest.fixture(scope="module")
def cases():
    return {gpu_model.case_key(c): c for c in gpu_model.table_cases()}


def test_occupancy_table_holds_todays_binaries(table, cases):
    """The checked-in table holds exactly one entry per binary the model reads today: the
    JIT's own specialisation of every Triton launch of the eight scenarios
    (``table_cases``), each with the kernel source digest of today's code. A launcher that
    specialises differently (a new constexpr, another divisibility hint) or an edited kernel
    makes the table stale: ``python bench/gpu_model.py --write-table``."""
    have = {e["key"]: e for e in table}
    assert len(have) == len(table)
    missing = sorted(c.name for k, c in cases.items() if k not in have)
    extra = sorted(e["name"] for k, e in have.items() if k not in cases)
    assert not missing and not extra, f"stale table: missing {missing[:8]}, extra {extra[:8]}"
    edited = sorted(e["name"] for e in table
                    if e["source"] != gpu_model._source(cases[e["key"]]))
    assert not edited, f"stale table (kernel edited): {edited[:8]}"
    for e in table:
        c = cases[e["key"]]
        assert (e["kernel"], e["num_warps"], e["num_stages"]) == (
            c.fn.__name__, c.num_warps, c.num_stages), e["name"]


def test_occupancy_table_agrees_with_fresh_compiles(table):
    """Every kernel the model launches has entries in the table (each launch's own binary),
    and no other kernel does; one entry per kernel, compiled afresh for sm_90
    (``compile_table``: the cases rebuilt from today's code, ``kernels._aot.compile_case``),
    equals the table's: registers, spills, stack, shared memory, occupancy. (All of them:
    ``python bench/gpu_model.py --check``, several CPU minutes.)"""
    used = {x.kernel for training, width, batch in gpu_model.SCENARIOS
            for L in gpu_model.layers(width, 2) for x in gpu_model.slimops_plan(L, training)
            if not x.kernel.startswith("torch:")}
    sample = {}
    for e in table:
        sample.setdefault(e["kernel"], e)
    assert used == set(sample)
    fresh = {e["key"]: e for e in gpu_model.compile_table([e["key"] for e in sample.values()])}
    for e in sample.values():
        assert fresh[e["key"]] == e, e["name"]


def test_every_triton_launch_takes_its_occupancy_from_the_table(table):
    """In the eight scenarios every Triton launch gets a blocks-per-SM figure from the
    table, that of its own binary (not a neighbour's, not an AOT case at another shape)."""
    occ = gpu_model.Occupancy(table)
    keys = {e["key"]: e for e in table}
    for training, width, batch in gpu_model.SCENARIOS:
        for L in gpu_model.layers(width, batch):
            for x in gpu_model.slimops_plan(L, training):
                occ(x)
                if x.kernel.startswith("torch:"):
                    continue
                assert x.blocks_per_sm > 0, (L.name, x.kernel)
                assert x.exact is not None, (L.name, x.kernel)
                assert x.case == keys[x.spec]["name"], (L.name, x.kernel)
                assert x.blocks_per_sm == keys[x.spec]["occupancy"]


def test_occupancy_reads_the_launchs_own_binary_only():
    table = [dict(name="a", key="k1", occupancy=9), dict(name="b", key="k2", occupancy=3)]
    occ = gpu_model.Occupancy(table)
    got = occ(gpu_model.Launch("k", 1, 0, spec="k2"))
    assert (got.blocks_per_sm, got.case) == (3, "b")
    # no binary of its own (a torch launch, or one missing from the table): unknown
    assert occ(gpu_model.Launch("k", 1, 0, spec="k3")).blocks_per_sm == 0
    assert occ(gpu_model.Launch("torch:zeros", 1, 0)).blocks_per_sm == 0


# One training step of small layers of each kind (dense stem 3x3 stride 2, depthwise,
# 1x1 projection with a residual, 1x1 expansion, a shared-BN 1x1, the classifier, and a
# batch with more rows of moments than one merge program reads) through
# the real Triton launchers (registered for the CPU key as for CUDA, as
# tests/kernels/test_kernels_model.py does), counting every kernel launch per layer.
SCRIPT = textwrap.dedent(r"""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, sys.argv[1])
    import torch
    from torch import nn
    import slimops
    from slimops.nn import SlimConvBNAct, SlimmableLinear
    from slimops.ops import conv2d_bn_act as fused
    from slimops.kernels import (batch_norm_act, conv2d, depthwise_conv2d, epilogue, linear)
    import gpu_model

    sys.path.insert(0, sys.argv[2])  # tests/: helpers
    from helpers import register_triton_launchers_on_cpu

    lib = torch.library.Library("slimops", "IMPL")
    register_triton_launchers_on_cpu(lib)
    torch.library.register_kernel("slimops::conv2d_bn_act_train", "cpu", fused._triton)
    torch.library.register_kernel("slimops::depthwise_conv2d_bn_act_train", "cpu",
                                  fused._dw_triton)
    fused.fused_train_available = lambda x, w=None: True

    launched = []

    class Counted:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.fn[grid]

    class TorchCountingZeros:
        # the kernel modules' `torch`: zero fills (a launch on a GPU) are recorded in order
        def __getattr__(self, name):
            return getattr(torch, name)

        def zeros(self, *args, **kwargs):
            launched.append("torch:zeros")
            return torch.zeros(*args, **kwargs)

    for module in (batch_norm_act, conv2d, depthwise_conv2d, epilogue, linear):
        for name, value in list(vars(module).items()):
            if type(value).__name__ in ("InterpretedFunction", "JITFunction") and \
                    name.endswith("_kernel"):
                setattr(module, name, Counted(name, value))
        module.torch = TorchCountingZeros()

    def planned(L):
        return [k.kernel for k in gpu_model.slimops_plan(L, True, gpu=False)
                if not k.kernel.startswith("torch:") or k.kernel == "torch:zeros"]

    W = (0.5, 1.0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = SlimConvBNAct([3, 3], [4, 8], 3, 2, activation="relu6", widths=W)
            self.depthwise = SlimConvBNAct([4, 8], [4, 8], 3, 1, groups=8,
                                           activation="relu6", widths=W)
            self.project = SlimConvBNAct([4, 8], [4, 8], 1, activation=None, widths=W)
            self.expand = SlimConvBNAct([4, 8], [8, 16], 1, activation="relu6", widths=W)
            self.last = SlimConvBNAct([8, 16], [12, 12], 1, activation="relu6", widths=W,
                                      shared_bn=True)
            self.classifier = SlimmableLinear([12, 12], [5, 5], widths=W)

        def forward(self, x):
            x = self.stem(x)
            x = self.project(self.depthwise(x), x)
            x = self.last(self.expand(x))
            return self.classifier(x.mean((2, 3)))

    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(2, 3, 12, 10)
    report = {}
    for w in W:
        # the layers as the model sees them, then one training step per layer alone, its
        # input and output gradient of the shapes the network gives it
        layers = gpu_model.model_layers(model.eval(), w, x)
        mods = dict(model.named_modules())
        model.train()
        with slimops.width(model, w):
            for L in layers:
                m = mods[L.name]
                shape = (L.n, L.cin) + ((L.hw_in) if L.kind != "linear" else ())
                inp = torch.randn(shape, requires_grad=not L.first)
                args = [inp]
                if L.residual:
                    out_shape = (L.n, L.cout) + L.hw_out
                    args.append(torch.randn(out_shape, requires_grad=True))
                del launched[:]
                out = m(*args)
                out.backward(torch.randn_like(out))
                report[f"{w} {L.name}"] = dict(
                    launched=list(launched),
                    planned=planned(L))
    # 65 images of one pixel: 65 rows of moments, more than one merge-tree program reads
    # (MERGE_ROWS = 64), so the tree takes a launch before the finalize.
    block = SlimConvBNAct([4, 8], [4, 8], 1, activation="relu", widths=W)
    xb = torch.randn(65, 8, 1, 1)
    (L,) = gpu_model.model_layers(block.eval(), 1.0, xb)
    block.train()
    del launched[:]
    with slimops.width(block, 1.0):
        # the only layer model_layers saw, so "first": its input takes no gradient
        out = block(xb.requires_grad_(not L.first))
        out.backward(torch.randn_like(out))
    report["merge"] = dict(launched=list(launched), planned=planned(L))
    print(json.dumps(report))
""")


@pytest.mark.skipif(not _backend.HAS_C, reason="needs the compiled extension (the ops)")
def test_launch_plan_equals_the_launchers_launches_in_a_training_step():
    """The model's Triton launches and zero fills per layer (with the interpreter's launcher
    rules) are, in order, the ones the real launchers make in one training step of that
    layer (forward with batch statistics, backward), for every kind of layer in S-MobileNet
    v2 and two widths. (The other torch launches of the plan, the statistics casts, the
    running-statistics update and the split weight gradient's sum and copy, are not
    counted here.)"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", SCRIPT, os.path.join(REPO, "bench"),
                          os.path.join(REPO, "tests")],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(report) == 13
    kinds = set()
    for name, r in report.items():
        assert r["launched"], name
        assert r["launched"] == r["planned"], name
        kinds.update(r["launched"])
    # the step exercised every family's training kernels
    for k in ("_conv_forward_kernel", "_conv_backward_input_kernel",
              "_conv_backward_weight_kernel", "_dw_forward_kernel", "_dw_backward_input_kernel",
              "_dw_weight_partials_kernel", "_dw_weight_reduce_kernel", "_bn_stats_kernel",
              "_bn_finalize_kernel", "_epilogue_kernel", "_bn_backward_stats_kernel",
              "_bn_backward_finalize_kernel", "_bn_backward_apply_kernel", "_gemm_kernel",
              "_bn_merge_kernel", "torch:zeros"):
        assert k in kinds, k


def test_reference_plan_copies_exactly_the_non_contiguous_weight_prefixes():
    """The reference plan pays a weight-prefix copy per call where ``W[:cout, :cin]`` is not
    contiguous (a dense conv below its full input width), nowhere else; its training step
    has the separate BN, activation and slice-backward launches slimops fuses or avoids."""
    full = gpu_model.layers(1.0, 2)
    narrow = gpu_model.layers(0.35, 2)

    def copies(L):
        return sum(x.kernel == "torch:copy_weight_prefix"
                   for x in gpu_model.reference_plan(L, False))

    assert all(copies(L) == 0 for L in full)
    for L in narrow:
        want = L.kind == "conv2d" and L.cin < L.full_weight[1]
        assert copies(L) == int(want), L.name
    copied = [L for L in narrow if copies(L)]
    assert copied and copied[0].kind == "conv2d"
    L = copied[0]
    (x,) = [x for x in gpu_model.reference_plan(L, False) if x.kernel == "torch:copy_weight_prefix"]
    assert x.bytes == 2 * 2 * L.cout * L.cin * L.k * L.k  # read + write, fp16
    expand = next(L for L in full if L.name.endswith("expand"))
    train = [x.kernel for x in gpu_model.reference_plan(expand, True)]
    for k in ("cudnn:conv_fwd", "torch:bn_stats", "torch:bn_normalize", "torch:activation",
              "torch:activation_backward", "cudnn:conv_bwd_data", "cudnn:conv_bwd_filter"):
        assert k in train, k
    assert len(train) > len(gpu_model.reference_plan(expand, False))
