"""Every Triton kernel, in every configuration of its tuning list and every dtype, compiles
ahead of time for sm_80 (A100) and sm_90 (H100) with no register spills and at least its
case's occupancy floor; the AOT tools (JIT-exact specialisation, occupancy, PTX/SASS counts)
are checked against triton's JIT and hand-computed numbers.

No GPU is needed: ``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline
down to a cubin with the ptxas bundled with triton, and the cubin's resource usage is read
back with the bundled cuobjdump (``slimops.kernels._aot``). The compiles run in two
subprocesses (one per arch, in parallel) without ``TRITON_INTERPRET``, which this test
session sets for the interpreter tests.
"""

import pytest

pytest.importorskip("triton")

from slimops import kernels  # noqa: E402
from slimops.kernels import _aot  # noqa: E402
from helpers import aot_results  # noqa: E402  (tests/)

# Per-SM limits: 64K 32-bit registers; shared memory per block (opt-in maximum).
REGISTERS_PER_SM = 65536
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="module")
def results():
    by_key = {}
    for r in aot_results():
        by_key[(r.name, r.arch)] = r
    return by_key


@pytest.fixture(scope="module")
def cases():
    import importlib

    return {family: importlib.import_module(f"slimops.kernels.{family}").aot_cases()
            for family in kernels.KERNEL_MODULE_NAMES}


@pytest.mark.parametrize("arch", _aot.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("family", kernels.KERNEL_MODULE_NAMES)
def test_every_case_compiles_without_spills(family, arch, results, cases):
    assert cases[family], f"{family}: no AOT cases"
    problems = []
    for case in cases[family]:
        r = results[(case.name, arch)]
        assert r.registers > 0, f"{case.name}: no register count read from the cubin"
        if r.spill_bytes or r.stack_bytes:
            problems.append(f"{case.name}: {r.spill_bytes} B local (spills), "
                            f"{r.stack_bytes} B stack, {r.registers} registers")
        assert r.registers * 32 * case.num_warps <= REGISTERS_PER_SM, case.name
        assert r.shared_bytes <= MAX_SHARED[arch], case.name
        if r.occupancy < case.min_occupancy:
            problems.append(f"{case.name}: {r.occupancy} blocks/SM < floor {case.min_occupancy} "
                            f"({r.registers} registers, {case.num_warps} warps, "
                            f"{r.shared_bytes} B shared)")
    assert not problems, "\n".join(problems)


def test_cases_have_distinct_names(cases):
    names = [c.name for family_cases in cases.values() for c in family_cases]
    assert len(names) == len(set(names))


def test_depthwise_input_gradient_cases_cover_the_strided_kernel(cases):
    """The depthwise input gradient compiles a binary per W-direction stride, vector width
    and alignment (compile-time constants): its cases hold stride 1 and stride 2, grad_z rows
    aligned (vector loads) and not, 3x3 and 5x5, each at the 8 blocks/SM floor."""
    dw = [c for c in cases["depthwise_conv2d"] if c.fn.fn.__name__ == "_dw_backward_input_kernel"]
    seen = {(c.constexprs["SW"], c.constexprs["ALIGNED"], c.constexprs["KW"]) for c in dw}
    assert seen == {(s, a, k) for s in (1, 2) for a in (True, False) for k in (3, 5)}, seen
    assert {c.min_occupancy for c in dw} == {8}


def test_resource_usage_reader_sees_a_spill_free_kernel(results):
    """The reader parses real cuobjdump output: registers are read, and a trivially small
    kernel (the epilogue apply) uses few of them."""
    regs = [r.registers for (name, _), r in results.items() if name.startswith("epilogue")]
    assert regs and 8 <= min(regs) <= 64


# ----------------------------------------------------------------------------- the AOT tools


def test_occupancy_against_hand_computed_numbers():
    """Blocks per SM from registers, warps and shared memory (the CUDA occupancy calculator's
    rules), each limit exercised once."""
    # 176 regs x 32 = 5632 per warp (a multiple of 256): 65536 // 5632 = 11 warps -> 1 block
    # of 8 warps; shared 16 KiB + 1 KiB reserved would allow 9.
    assert _aot.occupancy(90, 176, 8, 16384) == 1
    # 94 regs -> 3008 per warp, rounded up to 3072: 21 warps -> 5 blocks of 4 warps; shared
    # 32 KiB + 1 KiB: 164 KiB // 33 KiB = 4 on sm_80, 228 KiB // 33 KiB = 6 on sm_90.
    assert _aot.occupancy(80, 94, 4, 32768) == 4
    assert _aot.occupancy(90, 94, 4, 32768) == 5
    # 32 regs, 4 warps, no shared: 64 warps by registers = 16 blocks; threads 2048 // 128 = 16.
    assert _aot.occupancy(90, 32, 4, 0) == 16
    # 1 warp of 16 registers: the 32-block limit binds (registers would allow 128).
    assert _aot.occupancy(80, 16, 1, 0) == 32
    # 255 registers x 8 warps: 8160 -> 8192 per warp, 8 warps -> 1 block.
    assert _aot.occupancy(80, 255, 8, 0) == 1
    # more than a block may have: 0.
    assert _aot.occupancy(80, 64, 4, 164 * 1024) == 0
    assert _aot.occupancy(90, 256, 4, 0) == 0


def test_ptx_and_sass_counts_from_a_snippet():
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.b16 %rs1, [ %rd2 + 0 ];
    @%p2 ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd3 + 0 ];
    ld.global.nc.f32 %f1, [%rd4];
    @%p3 st.global.v4.b32 [ %rd5 + 0 ], { %r1, %r2, %r3, %r4 };
    st.global.b16 [ %rd6 + 0 ], { %rs1 };
    cp.async.cg.shared.global [ %r7 + 0 ], [ %rd7 + 0 ], 0x10, %r8;
    cp.async.cg.shared.global [ %r7 + 0 ], [ %rd7 + 0 ], 16, %r8;
    cp.async.ca.shared.global [ %r7 + 0 ], [ %rd7 + 0 ], 4, %r8;
    cp.async.commit_group;
    cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r9], [%rd8, {%r1, %r2}], [%r10];
    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {...};
    wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {...};
    """
    sass = """
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   STG.E.U16 desc[UR4][R6.64], R9 ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0030*/                   EXIT ;
    """
    got = _aot.inspect_code(ptx, sass)
    assert got["loads"] == {"128": 1, "16": 1, "64": 1, "32": 1}
    assert got["stores"] == {"128": 1, "16": 1}
    # the copy size in decimal or hex (as LLVM writes it); the commit is not a copy.
    assert got["cp_async"] == 3 and got["cp_async_16"] == 2
    assert got["tma"] == 1 and got["mma"] == 1 and got["wgmma"] == 1
    assert (got["sass_instructions"], got["sass_ldg"], got["sass_stg"], got["sass_ldgsts"]) == (4, 1, 1, 1)


def test_jit_specialization_equals_the_jits_for_a_real_conv_launch():
    """``jit_specialization`` (what the AOT cases compile) against what triton's own
    ``JITFunction.run`` builds for the launcher's real call (``capture_launches``: the JIT's
    binder and ``_pack_args`` on CPU tensors, the compile skipped): integers equal to 1 as
    constants, multiples of 16 with a divisibility hint, aligned pointers."""
    import torch

    from slimops.kernels import conv2d as conv

    x = torch.randn(2, 24, 16, 12)
    w = torch.randn(48, 24, 3, 3)
    scale, shift = torch.randn(32), torch.randn(32)
    with _aot.capture_launches(conv, "_conv_forward_kernel") as launches:
        conv.conv2d(x, w, None, 32, (1, 1), (1, 1), (1, 1), 1, scale, shift, None, 2)
    assert len(launches) == 1
    got = launches[0]
    fn = conv._conv_forward_kernel  # restored on exit: the interpreter's object
    from slimops.kernels.epilogue import compiled

    sig, consts, attrs = _aot.jit_specialization(compiled(fn), got.args, got.kwargs)
    assert sig == got.signature
    assert consts == got.constexprs
    assert attrs == got.attrs
    # The specialisation is not trivial: some integer became a constant and some got a hint.
    assert any(v == "constexpr" for k, v in sig.items() if k not in got.kwargs)
    assert attrs
    # and a case built from the launch carries it
    case = _aot.AotCase.from_launch("probe", compiled(fn), got.args, got.kwargs,
                                    got.num_warps, got.num_stages)
    assert (case.signature, case.constexprs, case.attrs) == (got.signature, got.constexprs,
                                                             got.attrs)


def test_tile_accesses_from_a_ttgir_snippet():
    """Per operand: op, shape, the blocked layout's fastest dimension, vector and lanes; the
    pipeline's repeated copies once; 1-D and non-blocked accesses left out."""
    ttgir = """
#blocked = #ttg.blocked<{sizePerThread = [8, 1], threadsPerWarp = [16, 2], warpsPerCTA = [1, 8], order = [0, 1]}>
#blocked1 = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [32, 1], warpsPerCTA = [1, 8], order = [0, 1]}>
#blocked2 = #ttg.blocked<{sizePerThread = [1, 4], threadsPerWarp = [4, 8], warpsPerCTA = [8, 1], order = [1, 0]}>
    %a_67 = ttg.async_copy_global_to_local %a_63, %a_64 mask %m other %c {contiguity = 8 : i32} : tensor<128x32x!tt.ptr<f16>, #blocked> -> <128x32xf16, #shared, #smem, mutable> loc(#loc1)
    %a_81 = ttg.async_copy_global_to_local %a_77, %a_78 mask %m other %c {contiguity = 8 : i32} : tensor<128x32x!tt.ptr<f16>, #blocked> -> <128x32xf16, #shared, #smem, mutable> loc(#loc1)
      %b_138 = tt.load %b_137, %b_134, %cst_1 : tensor<32x64x!tt.ptr<f16>, #blocked1> loc(#loc2)
    %acc_94 = tt.load %acc_93, %nmask_35, %cst : tensor<64x!tt.ptr<f16>, #ttg.slice<{dim = 0, parent = #mma}>> loc(#loc3)
    tt.store %5, %7, %mask_91 : tensor<128x64x!tt.ptr<f32>, #blocked2> loc(#loc4)
"""
    got = _aot.tile_accesses(ttgir)
    assert got == [
        dict(name="a", op="async_copy", shape=[128, 32], elem="f16", fast_dim=0, vec=8, bits=16,
             lanes=16),
        dict(name="b", op="load", shape=[32, 64], elem="f16", fast_dim=0, vec=1, bits=16,
             lanes=32),
        dict(name="", op="store", shape=[128, 64], elem="f32", fast_dim=1, vec=4, bits=32,
             lanes=8),
    ]


# ----------------------------------------------------------------------------- JIT-exact cases
# Every family's AOT cases are built from its launchers' own argument lists at real shapes
# (the launch builders, on meta tensors). Each case carries ``meta["call"]``: the public
# launcher at the case's shape, on CPU tensors. Run through triton's JIT with the compile
# skipped (``capture_launches``), that call must launch the case's kernel with exactly the
# case's specialisation: same signature (constants for the ints equal to 1), constants,
# divisibility hints, warps and stages. A generic signature (every int an i32, no hints)
# fails this. conv2d's own check is tests/kernels/test_kernels_compiled.py.

# family -> the modules and kernel names its launchers start
_FAMILY_KERNELS = {
    "epilogue": [("epilogue", ("_epilogue_kernel", "_epilogue_backward_kernel"))],
    "linear": [("linear", ("_gemm_kernel",))],
    "depthwise_conv2d": [("depthwise_conv2d", ("_dw_forward_kernel", "_dw_backward_input_kernel",
                                               "_dw_weight_partials_kernel",
                                               "_dw_weight_reduce_kernel"))],
    "batch_norm_act": [("batch_norm_act", ("_bn_merge_kernel", "_bn_stats_kernel",
                                           "_bn_finalize_kernel", "_bn_backward_stats_kernel",
                                           "_bn_backward_finalize_kernel",
                                           "_bn_backward_apply_kernel",
                                           "_running_stats_kernel")),
                       ("epilogue", ("_epilogue_kernel",))],
}


def test_every_family_is_checked_against_the_jit():
    assert set(_FAMILY_KERNELS) | {"conv2d"} == set(kernels.KERNEL_MODULE_NAMES)


def _gpu_choices(monkeypatch):
    """The launchers' GPU picks (under the interpreter they pick small tiles and splits;
    split_tiles aims at an H100's programs, as the AOT cases do)."""
    from slimops.kernels import batch_norm_act, epilogue, linear

    monkeypatch.setattr(linear, "_pick", linear._pick_gpu)
    monkeypatch.setattr(batch_norm_act, "_reduce_config", batch_norm_act._reduce_config_gpu)
    monkeypatch.setattr(epilogue, "_target_programs", lambda device: epilogue.AOT_TARGET_PROGRAMS)
    monkeypatch.setattr(batch_norm_act, "_device_sms", lambda device: batch_norm_act.AOT_SMS)


@pytest.mark.parametrize("family", sorted(_FAMILY_KERNELS))
def test_aot_cases_are_what_the_jit_builds_for_the_launchers(family, cases, monkeypatch):
    import importlib

    import torch

    _gpu_choices(monkeypatch)
    targets = [(importlib.import_module(f"slimops.kernels.{m}"), names)
               for m, names in _FAMILY_KERNELS[family]]
    assert cases[family]
    checked = specialised = 0
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    for case in cases[family]:
        assert "call" in case.meta, f"{case.name}: no launcher call to check it against"
        # linear's fp32 dot precision follows torch's switch (conv2d's has its own test)
        torch.backends.cuda.matmul.allow_tf32 = bool(case.constexprs.get("ALLOW_TF32", False))
        (module, names), *also = targets
        try:
            with _aot.capture_launches(module, *names, also=also) as launches:
                case.meta["call"]()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved_tf32
        mine = [got for got in launches if got.kernel == case.fn.fn.__name__
                and got.signature == case.signature and got.constexprs == case.constexprs]
        assert mine, (f"{case.name}: the launcher's {case.fn.fn.__name__} launches were\n"
                      + "\n".join(f"  {g.signature} {g.constexprs}" for g in launches
                                  if g.kernel == case.fn.fn.__name__)
                      + f"\nthe case: {case.signature} {case.constexprs}")
        got = mine[0]
        assert got.attrs == case.attrs, case.name
        assert (got.num_warps, got.num_stages) == (case.num_warps, case.num_stages), case.name
        checked += 1
        # Not the generic signature: some integer argument is specialised (a constant or a
        # divisibility hint).
        ints = [k for k, v in case.signature.items() if v in ("i32", "i64")]
        if any(k in case.attrs for k in ints) or any(
                k not in _constexpr_params(case.fn) for k in case.constexprs):
            specialised += 1
    assert checked == len(cases[family])
    assert specialised == checked, f"{family}: {checked - specialised} cases not specialised"


def _constexpr_params(fn):
    return {p.name for p in fn.params if p.is_constexpr}


def test_batch_norm_cases_reach_the_one_tile_specialisation(cases):
    """With more channels than the resident programs of the SMs (MobileNet v2's
    1280-channel last conv on an H100 at BLOCK 128: 16 x 132) a reduction has one tile per
    channel: ``num_tiles`` = 1, which the JIT passes as a constant, and so is the finalize's
    ``num_rows``. The kernels did not compile that way
    (``.to()`` on a Python int) until the cases were JIT-exact; these cases keep it
    compiled (test_every_case_compiles_without_spills)."""
    bn = cases["batch_norm_act"]
    assert any(c.fn.fn.__name__ == "_bn_stats_kernel" and c.constexprs.get("num_tiles") == 1
               for c in bn)
    assert any(c.fn.fn.__name__ == "_bn_finalize_kernel" and c.constexprs.get("num_rows") == 1
               for c in bn)


def test_batch_norm_reduction_blocks_per_sm_are_the_compiled_ones(results, cases):
    """The blocks per SM the launcher sizes the reduction grids by
    (``batch_norm_act.REDUCE_BLOCKS_PER_SM``) are what every compiled case of the two
    reductions keeps on sm_80 and sm_90 (more registers would lower them, and the grid
    would then ask for more programs than fit at once)."""
    from slimops.kernels import batch_norm_act as K

    seen = set()
    for case in cases["batch_norm_act"]:
        if case.fn.fn.__name__ in ("_bn_stats_kernel", "_bn_backward_stats_kernel"):
            key = (case.constexprs["BLOCK"], case.num_warps)
            seen.add(key)
            for arch in _aot.ARCHS:
                assert results[(case.name, arch)].occupancy == K.REDUCE_BLOCKS_PER_SM[key], (
                    case.name, arch)
    assert seen == {(c["BLOCK"], c["num_warps"]) for c in K.CONFIGS}


@pytest.mark.parametrize("arch, sms", [(90, 132), (80, 108)], ids=["H100", "A100"])
def test_batch_norm_grids_fill_the_gpu_at_the_batch_256_stem(arch, sms, results, monkeypatch):
    """Issue 17: the training statistics and the backward's sums of S-MobileNet v2's stem
    at batch 256 (N=256, C=32, 112x112, fp16), as the public launchers launch them on a GPU
    of ``sms`` SMs (captured, nothing compiled or run): each reduction's grid is one full
    wave of the blocks the compiled binary keeps resident per SM (within one tile row of
    channels), and no program of the merge tree or of either finalize reads more than 64
    rows of partials. Before: 4 x SMs programs whatever the binary's occupancy (half the
    resident slots of the 8-warp entry)."""
    import torch

    from slimops.kernels import batch_norm_act as K
    from slimops.kernels import epilogue

    _gpu_choices(monkeypatch)
    monkeypatch.setattr(K, "_device_sms", lambda device: sms)
    n, c, h, w = 256, 32, 112, 112
    x = torch.empty((n, c, h, w), dtype=torch.float16)
    stats = torch.empty(c, dtype=torch.float32)
    names = ("_bn_stats_kernel", "_bn_merge_kernel", "_bn_finalize_kernel",
             "_bn_backward_stats_kernel", "_bn_backward_finalize_kernel",
             "_bn_backward_apply_kernel")
    with _aot.capture_launches(K, *names, also=[(epilogue, ("_epilogue_kernel",))]) as got:
        K.batch_norm_act(x, None, None, None, None, True, 1e-5, None, 0)
        K.batch_norm_act_backward(x, x, x, None, stats, stats, 1e-5, True, 0)
    by_kernel = {}
    for launch in got:
        by_kernel.setdefault(launch.kernel, []).append(launch)
    # the argument holding per_tile, the values of a channel one program reduces
    for kernel, per_tile_arg in (("_bn_stats_kernel", 5), ("_bn_backward_stats_kernel", 9)):
        (launch,) = by_kernel[kernel]
        block = launch.constexprs["BLOCK"]
        tag = f"float16_b{block}_w{launch.num_warps}"
        case = (f"bn_stats_{tag}" if kernel == "_bn_stats_kernel"
                else f"bn_backward_stats_{tag}_plain_f32stats")
        resident = sms * results[(case, arch)].occupancy
        per_tile = launch.args[per_tile_arg]
        tiles = -(-n * h * w // per_tile)
        assert resident - c < tiles * c <= resident, (kernel, tiles, resident)
        assert tiles <= 64, kernel
    assert "_bn_merge_kernel" not in by_kernel  # the finalize merges the tiles in one load
    (fin,) = by_kernel["_bn_finalize_kernel"]
    assert fin.args[10] <= 64  # num_rows
    (bfin,) = by_kernel["_bn_backward_finalize_kernel"]
    assert bfin.args[10] <= 64  # num_tiles
