"""The conv kernels' compiled code, read at real S-MobileNet v2 shapes without a GPU.

``slimops.kernels.conv2d.aot_cases()`` builds each case from the launchers' own argument lists
at the shapes of ``AOT_SHAPES`` (meta tensors), specialised as triton's JIT specialises a launch.
The first test checks that claim against the JIT itself: the launchers run on CPU tensors of
the same shapes through ``JITFunction.run`` (``_aot.capture_launches``, the compile skipped)
and must produce the same signature, constants, divisibility hints and launch options. The
other tests read the binaries of those cases, compiled for sm_80 and sm_90 with triton's
bundled ptxas (``helpers.aot_results``, shared with tests/kernels/test_aot.py):

* no spills, at most ``MAX_REGISTERS`` registers (fp16, bf16, fp32 with TF32; fp32 with
  IEEE products, off by default, computes its dot with FMAs and is only held to no spills),
  occupancy (blocks per SM) at least the case's floor (``conv2d.MIN_OCCUPANCY``);
* on the 1x1 GEMM path at 56x56 and 28x28 (planes a multiple of 16 pixels, NCHW): every
  activation operand goes global -> shared through 16-byte ``cp.async`` copies, vectorised
  along the pixels (TF32 on sm_90: 4-byte copies, wgmma's 32-bit operands being K-major),
  and the output is written with 128-bit stores along the pixels;
* at 14x14 and 7x7 (planes not a multiple of 8: no alignment to vectorise on): the activation
  accesses are still coalesced along the pixels;
* NHWC (channels_last): the activation accesses and the output walk the channels;
* the general (gathering) path writes its output along the pixels, vectorised.

What a layout means is read from the TTGIR (``_aot.tile_accesses``: per operand, the layout
the coalescing pass chose from the compiler's contiguity and alignment analysis) and the PTX
(``cp.async`` sizes, store widths). Nothing here says how fast a kernel runs.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from slimops.kernels import _aot  # noqa: E402
from slimops.kernels import conv2d as K  # noqa: E402
from slimops.kernels._common import ACT_NONE, ACT_RELU6  # noqa: E402
from helpers import aot_results  # noqa: E402  (tests/)

MAX_REGISTERS = 128
# The tile dimension that walks the pixels, per kernel and operand: forward and input
# gradient: a = [pixels, channels] (dim 0), the output tile [pixels, channels] (dim 0); weight
# gradient: a = grad_z [channels, pixels] (dim 1), b = input [pixels, channels] (dim 0).
ACTIVATIONS = {"forward": {"a": 0}, "backward_input": {"a": 0},
               "backward_weight": {"a": 1, "b": 0}}


@pytest.fixture(scope="module")
def cases() -> Dict[str, _aot.AotCase]:
    return {c.name: c for c in K.aot_cases()}


@pytest.fixture(scope="module")
def results(cases) -> Dict[Any, _aot.AotResult]:
    by_key = {(r.name, r.arch): r for r in aot_results() if r.name in cases}
    assert len(by_key) == len(cases) * len(_aot.ARCHS)
    return by_key


def _select(cases, results, **meta) -> List[Any]:
    """(case, result) pairs of every arch whose case's meta matches ``meta`` (a value may be
    a tuple of accepted values)."""
    picked = []
    for case in cases.values():
        if all(case.meta[k] in (v if isinstance(v, tuple) else (v,)) for k, v in meta.items()):
            picked += [(case, results[(case.name, arch)]) for arch in _aot.ARCHS]
    assert picked, meta
    return picked


def _accesses(r: _aot.AotResult, name: str) -> List[Dict[str, Any]]:
    found = [t for t in r.tiles if t["name"] == name and t["op"] != "store"]
    assert found, f"{r.name} sm_{r.arch}: no 2-D load of {name!r} in the TTGIR ({r.tiles})"
    return found


def _stores(r: _aot.AotResult) -> List[Dict[str, Any]]:
    found = [t for t in r.tiles if t["op"] == "store"]
    assert found, f"{r.name} sm_{r.arch}: no 2-D store in the TTGIR"
    return found


def _coalesced(t: Dict[str, Any], dim: int) -> bool:
    """Consecutive lanes (and each thread's vector) walk ``dim``, a warp covering at least
    one 32-byte sector along it."""
    return t["fast_dim"] == dim and t["vec"] * t["lanes"] * t["bits"] >= 32 * 8


# ----------------------------------------------------------------------------- JIT-exact cases


def _launch(case: _aot.AotCase) -> None:
    """Call the launcher ``case`` was built from, on CPU tensors of its shape."""
    n, cin, cout, h, k, s, p, nhwc = K.AOT_SHAPES[case.meta["shape"]]
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16,
             "float32_tf32": torch.float32}[case.meta["prec"]]
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    ho = (h + 2 * p - k) // s + 1
    x = torch.empty(n, cin, h, h, dtype=dtype, memory_format=fmt)
    w = torch.empty(cout, cin, k, k, dtype=dtype)
    gz = torch.empty(n, cout, ho, ho, dtype=dtype, memory_format=fmt)
    vec = torch.empty(cout, dtype=dtype)
    geo = ((s, s), (p, p), (1, 1))
    kind, mode = case.meta["kind"], case.meta["mode"]
    if kind == "forward" and mode == "stats":
        K.conv2d_with_stats(x, w, vec, cout, *geo, 1)
    elif kind == "forward":
        K.conv2d(x, w, None, cout, *geo, 1, vec, vec, gz if mode == "res" else None,
                 ACT_RELU6 if mode == "eval" else ACT_NONE)
    elif kind == "backward_input":
        K.conv2d_backward_input(gz, w, list(x.shape), *geo, 1)
    else:
        K.conv2d_backward_weight(gz, x, w, *geo, 1)


def test_aot_cases_are_what_the_jit_builds_for_the_launchers(cases, monkeypatch):
    """Every default-precision AOT case (fp16, bf16, fp32 with TF32) equals the specialisation
    triton's JIT builds when the launcher runs at that shape: same signature (constants for
    the ints equal to 1), constants, divisibility hints, warps and stages. The launchers pick
    the GPU's tiles and split-K here (under the interpreter they pick the smallest)."""
    monkeypatch.setattr(K, "_pick", K._pick_gpu)
    monkeypatch.setattr(K, "_split_k_target", lambda device: K.AOT_SPLIT_TARGET)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    checked = 0
    for case in cases.values():
        if case.meta["prec"] == "float32":
            continue  # IEEE fp32 is launched only with TF32 switched off; same code path
        with _aot.capture_launches(K, "_conv_forward_kernel", "_conv_backward_input_kernel",
                                   "_conv_backward_weight_kernel") as launches:
            _launch(case)
        assert len(launches) == 1, case.name
        got = launches[0]
        assert got.kernel == case.fn.fn.__name__, case.name
        assert got.signature == case.signature, case.name
        assert got.constexprs == case.constexprs, case.name
        assert got.attrs == case.attrs, case.name
        assert (got.num_warps, got.num_stages) == (case.num_warps, case.num_stages), case.name
        checked += 1
    assert checked >= 60


# ----------------------------------------------------------------------------- resources


def test_no_spills_registers_and_occupancy(cases, results):
    problems = []
    for case, r in _select(cases, results):
        if r.spill_bytes or r.stack_bytes:
            problems.append(f"{r.name} sm_{r.arch}: {r.spill_bytes} B spilled, "
                            f"{r.stack_bytes} B stack")
        cap = 255 if case.meta["prec"] == "float32" else MAX_REGISTERS
        if not 0 < r.registers <= cap:
            problems.append(f"{r.name} sm_{r.arch}: {r.registers} registers")
        expected = _aot.occupancy(r.arch, r.registers, case.num_warps, r.shared_bytes)
        assert r.occupancy == expected, r.name
        if r.occupancy < case.min_occupancy:
            problems.append(f"{r.name} sm_{r.arch}: {r.occupancy} blocks/SM < "
                            f"{case.min_occupancy} ({r.registers} regs, {case.num_warps} warps, "
                            f"{r.shared_bytes} B shared)")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- layouts


def test_1x1_at_56_and_28_vectorised_and_pipelined(cases, results):
    """Planes of 3136 and 784 pixels (multiples of 16, the JIT's hint on HW): each activation
    operand is copied global -> shared with 16-byte cp.async along the pixels, and the
    forward and input gradient store 128-bit vectors along the pixels.

    Exception: TF32 on sm_90. wgmma takes 32-bit operands only K-major from shared memory, so
    a pixel-major (NCHW) activation tile is copied with 4-byte cp.async (still coalesced along
    the pixels) into the transposed shared layout."""
    for case, r in _select(cases, results, path="1x1", layout="nchw", hw=(56, 28)):
        where = f"{r.name} sm_{r.arch}"
        tf32_wgmma = r.arch == 90 and case.meta["prec"] == "float32_tf32"
        assert (r.cp_async if tf32_wgmma else r.cp_async_16 + r.tma) > 0, where
        for name, dim in ACTIVATIONS[case.meta["kind"]].items():
            for t in _accesses(r, name):
                assert t["op"] == "async_copy", (where, t)
                assert _coalesced(t, dim), (where, t)
                if not tf32_wgmma:
                    assert t["fast_dim"] == dim and t["vec"] * t["bits"] == 128, (where, t)
        if case.meta["kind"] != "backward_weight":
            for t in _stores(r):
                assert t["fast_dim"] == 0 and t["vec"] * t["bits"] == 128, (where, t)
            assert r.stores.get("128", 0) > 0, (where, r.stores)


def test_1x1_at_14_and_7_coalesced(cases, results):
    """Planes of 196 and 49 pixels give no alignment to vectorise on; the activation loads
    and the output stores still walk the pixels with consecutive lanes."""
    for case, r in _select(cases, results, path="1x1", layout="nchw", hw=(14, 7)):
        where = f"{r.name} sm_{r.arch}"
        for name, dim in ACTIVATIONS[case.meta["kind"]].items():
            for t in _accesses(r, name):
                assert _coalesced(t, dim), (where, t)
        if case.meta["kind"] != "backward_weight":
            for t in _stores(r):
                assert _coalesced(t, 0), (where, t)


def test_channels_last_walks_the_channels(cases, results):
    """NHWC: the activation operands and the forward's output are read and written along the
    channels (the unit stride); 144 output channels (a multiple of 16) give 128-bit stores."""
    channel_dim = {"forward": {"a": 1}, "backward_input": {"a": 1},
                   "backward_weight": {"a": 0, "b": 1}}
    for case, r in _select(cases, results, layout="nhwc"):
        where = f"{r.name} sm_{r.arch}"
        for name, dim in channel_dim[case.meta["kind"]].items():
            for t in _accesses(r, name):
                assert t["fast_dim"] == dim, (where, t)
        if case.meta["kind"] == "forward":
            for t in _stores(r):
                assert t["fast_dim"] == 1 and t["vec"] * t["bits"] == 128, (where, t)


def test_general_path_stores_along_the_pixels(cases, results):
    """The gathering path (3x3 stem at 224 -> 112, dense 3x3 at 56): M tiles inside one image
    make its output tile contiguous along the pixels, 128-bit stores."""
    for case, r in _select(cases, results, path="general", layout="nchw",
                           kind=("forward", "backward_input")):
        for t in _stores(r):
            assert t["fast_dim"] == 0 and t["vec"] * t["bits"] == 128, (r.name, r.arch, t)
        assert r.stores.get("128", 0) > 0, (r.name, r.arch, r.stores)
