"""Analytical per-layer GPU model of S-MobileNet v2 on an H100: slimops' kernels vs the
reference (cuDNN) plan, forward (eval) and training step, fp16, batch 1 and 256.

    python bench/gpu_model.py               # markdown tables (docs/GPU_KERNELS.md embeds them)
    python bench/gpu_model.py --layers      # a row per layer too
    python bench/gpu_model.py --write-table # recompile the occupancy table (~330 compiles)
    python bench/gpu_model.py --check       # exit 1 if the checked-in table is stale

**An analytical model: nothing was timed on a GPU** (no machine of this project has one).
What it is made of:

* **Shapes**: every conv and linear layer of S-MobileNet v2 at a width, from a forward pass
  with hooks (``layers``).
* **Launches**: per layer, the kernel launches slimops makes (``slimops_plan``): the Triton
  launches of ``kernels/*.py`` in the order the ops make them (eval: one conv with BN folded
  into its epilogue; training: conv with the STATS epilogue, the moments' merge tree, the
  finalize, the normalise pass; backward: BN backward's three kernels, input gradient,
  weight gradient with its zero fill and, when split, the partial sums' reduction and copy)
  plus the small torch launches the op layer adds (statistics casts, running-statistics
  update). The tile configuration and grid of each launch come from the launchers' own
  helpers at that shape (``_pick_gpu``, ``_forward_launch``, ``_forward_tiling``,
  ``split_tiles``, ``merge_plan`` ...) with an H100's 132 SMs. tests/test_bench_gpu_model.py
  runs one training step of small layers through the real launchers under the interpreter
  and checks the launch sequence equals the plan's.
* **The reference plan** (``reference_plan``): the same layer run as ``slimops.reference``
  runs it on a GPU: a copy of the weight prefix where it is not contiguous
  (``W[:cout, :cin]`` with ``cin`` below the full width), ``F.conv2d`` (cuDNN: one launch per
  convolution, forward, data and filter gradient), a separate BN kernel (training: a
  statistics pass and a normalise pass; backward: a reduce and an elementwise pass, as
  PyTorch's native BN), separate residual-add and activation kernels, and the slice's
  backward (zero fill of the full weight gradient + copy of the prefix).
* **Bytes**: per launch, every operand it touches once (the weight *prefix*, not the full
  tensor; moments and partials in fp32), i.e. the minimum that launch must move. L2 reuse
  across launches is not credited (an H100's 50 MB L2 would hold many of the batch-1
  activations: the batch-1 memory time is an upper bound).
* **Time per launch**: the roof ``max(FLOPs / peak, bytes / HBM bandwidth)`` divided by an
  efficiency factor for wave quantisation, plus a fixed launch cost ``LAUNCH_S``. The factor
  is ``tiles / (waves * SMS * blocks_per_sm)`` with ``tiles`` the launch's grid size,
  ``blocks_per_sm`` resident blocks per SM of the launch's sm_90 compile, read from the
  checked-in table ``bench/gpu_model_occupancy.json`` (``occupancy_table``): for every Triton
  launch the binary the JIT compiles for that very launch (the launchers' own builders on meta
  tensors of the layer's shapes, ``kernels.epilogue.launch_case``). ``--write-table``
  recompiles the table, ``--check`` says whether it is current,
  and the tests check it against today's kernels and fresh compiles of a sample,
  and ``waves = ceil(tiles / (SMS * blocks_per_sm))``. cuDNN's and PyTorch's kernels have no
  such data here: factor 1 (generous to the reference).

H100 SXM5 (80 GB) datasheet figures: dense fp16 tensor-core peak 989 TFLOP/s, fp32 FMA
67 TFLOP/s (depthwise convs: one input channel per output channel does not map to tensor
cores; the kernels accumulate in fp32), HBM3 3.35 TB/s, 132 SMs, 50 MB L2. ``LAUNCH_S`` =
3 us: launch latency plus the ramp-up and tail of a small kernel on
an idle stream; the per-kernel cost commonly reported for back-to-back small kernels on
recent NVIDIA GPUs without CUDA graphs is a few microseconds (about 2 to 5). An assumption,
not a figure measured here. Not modelled: the network's pooling, loss and optimizer, autograd's
gradient accumulation, host overhead beyond the launch, and cuDNN's own multi-kernel
algorithms (one launch per cuDNN call is assumed, which favours the reference).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

# H100 SXM5 (80 GB) datasheet figures (see the module docstring).
PEAK_TENSOR_FP16 = 989e12
PEAK_FMA_FP32 = 67e12
HBM_BYTES_PER_S = 3.35e12
LAUNCH_S = 3e-6  # an assumption (see the module docstring), not a measured figure
SMS = 132  # H100 SXM5
ELEM = 2  # fp16
F32 = 4


# ----------------------------------------------------------------------------- launches


@dataclass
class Launch:
    """One kernel launch of a plan: its kernel, grid size (programs; 0 when unknown, as for
    cuDNN), the bytes it moves at least, its FLOPs and compute roof; ``blocks_per_sm`` and
    ``case`` (the compile the occupancy came from) are filled by ``Occupancy``."""

    kernel: str
    programs: int
    bytes: float
    flops: float = 0.0
    peak: float = PEAK_FMA_FP32
    blocks_per_sm: int = 0
    case: str = ""
    # The binary the JIT compiles for this very launch (every Triton launch: the plan calls
    # the launchers' own builders on meta tensors): an ``AotCase`` built from the builder's
    # arguments, and its ``spec_key``; None / "" for torch's launches.
    exact: Optional[object] = field(default=None, repr=False, compare=False)
    spec: str = ""

    def roof(self) -> float:
        """``max(FLOPs / peak, bytes / bandwidth)`` in seconds."""
        return max(self.flops / self.peak, self.bytes / HBM_BYTES_PER_S)

    def efficiency(self) -> float:
        """Wave / tile quantisation: ``tiles / (waves * SMS * blocks_per_sm)``, in (0, 1];
        1 when the grid or the occupancy is unknown."""
        return efficiency(self.programs, self.blocks_per_sm)

    def time(self) -> float:
        """Modelled seconds: the roof over the efficiency, plus ``LAUNCH_S``."""
        return self.roof() / self.efficiency() + LAUNCH_S


def efficiency(tiles: int, blocks_per_sm: int, sms: int = SMS) -> float:
    """``tiles / (waves * sms * blocks_per_sm)`` with ``waves = ceil(tiles / (sms *
    blocks_per_sm))``: the share of the machine's resident-block slots a launch of ``tiles``
    programs keeps busy, averaged over its waves. 1 when either figure is unknown (<= 0)."""
    if tiles <= 0 or blocks_per_sm <= 0:
        return 1.0
    slots = sms * blocks_per_sm
    return tiles / (math.ceil(tiles / slots) * slots)


# ----------------------------------------------------------------------------- layers


@dataclass
class Layer:
    """One conv or linear layer of the network at a width and batch."""

    name: str
    kind: str  # "conv2d" | "depthwise_conv2d" | "linear"
    n: int
    cin: int
    cout: int
    hw_in: Tuple[int, int]
    hw_out: Tuple[int, int]
    k: int
    stride: int
    residual: bool
    activation: int  # 0 none, 1 relu, 2 relu6
    full_weight: Tuple[int, ...]  # the shared (full-width) weight's shape
    first: bool = False  # the stem: its input (the image) needs no gradient
    # one BN for every width (the last conv): training runs the conv, then the batch_norm_act
    # op with its own statistics pass (SlimConvBNAct fuses the statistics only for S-BN)
    shared_bn: bool = False

    @property
    def x(self) -> int:
        return self.n * self.cin * self.hw_in[0] * self.hw_in[1]

    @property
    def y(self) -> int:
        return self.n * self.cout * self.hw_out[0] * self.hw_out[1]

    @property
    def w(self) -> int:
        """Elements of the active weight prefix."""
        per_out = 1 if self.kind == "depthwise_conv2d" else self.cin
        return self.cout * per_out * self.k * self.k

    @property
    def w_full(self) -> int:
        return math.prod(self.full_weight)

    def macs(self) -> int:
        """Multiply-accumulates of the forward (the profiler's definition)."""
        return self.w * self.n * self.hw_out[0] * self.hw_out[1]

    def flops(self) -> float:
        """Forward FLOPs: 2 per MAC."""
        return 2.0 * self.macs()

    def peak(self) -> float:
        return PEAK_FMA_FP32 if self.kind == "depthwise_conv2d" else PEAK_TENSOR_FP16


def layers(width: float, batch: int, resolution: int = 224) -> List[Layer]:
    """S-MobileNet v2's conv and linear layers at ``width`` (shapes from a forward pass)."""
    from slimops.models import s_mobilenet_v2

    model = s_mobilenet_v2().eval()
    # Shapes scale with the batch: one image's forward gives them (a batch-256 forward on
    # the CPU would take minutes).
    found = model_layers(model, width, torch.randn(1, 3, resolution, resolution))
    return [dataclasses.replace(L, n=batch) for L in found]


def model_layers(model: torch.nn.Module, width: float, x: torch.Tensor) -> List[Layer]:
    """The ``SlimConvBNAct`` and ``SlimmableLinear`` layers of ``model`` as a forward of
    ``x`` at ``width`` meets them."""
    import slimops
    from slimops.nn import SlimConvBNAct, SlimmableLinear
    from slimops.reference import ACTIVATION_CODES

    found: List[Layer] = []

    def hook(name):
        def fn(module, args, kwargs, out):
            x = args[0]
            if isinstance(module, SlimmableLinear):
                found.append(Layer(name, "linear", x.shape[0], x.shape[1], out.shape[1],
                                   (1, 1), (1, 1), 1, 1, False, 0, tuple(module.weight.shape)))
                return
            residual = (args[1] if len(args) > 1 else kwargs.get("residual")) is not None
            conv = module.conv
            found.append(Layer(
                name, "depthwise_conv2d" if conv.depthwise else "conv2d", x.shape[0],
                x.shape[1], out.shape[1], tuple(x.shape[2:]), tuple(out.shape[2:]),
                conv.kernel_size[0], conv.stride[0], residual,
                ACTIVATION_CODES[module.activation], tuple(conv.weight.shape),
                first=not found, shared_bn=module.bn.shared))
        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True)
               for n, m in model.named_modules()
               if isinstance(m, (SlimConvBNAct, SlimmableLinear))]
    try:
        with torch.no_grad(), slimops.width(model, width):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found


# ----------------------------------------------------------------------------- slimops' plan


@contextlib.contextmanager
def launcher_rules(gpu: bool = True) -> Iterator[None]:
    """While active, the launchers' configuration helpers decide as on an H100 (``gpu``:
    GPU tuning entries, split targets from 132 SMs) or as under the interpreter (the
    smallest tiles, two-way splits: what the tests' CPU runs launch)."""
    from slimops.kernels import batch_norm_act, conv2d, epilogue, linear

    saved = [(m, "interpreting", m.interpreting) for m in (conv2d, linear, batch_norm_act)]
    saved.append((epilogue, "_target_programs", epilogue._target_programs))
    for m in (conv2d, linear, batch_norm_act):
        m.interpreting = (lambda: False) if gpu else (lambda: True)
    epilogue._target_programs = (lambda device: 4 * SMS) if gpu else (lambda device: 0)
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def _meta(shape: Sequence[int], dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def _geo(L: Layer) -> Tuple[int, ...]:
    p = L.k // 2
    return (L.stride, L.stride, p, p, 1, 1)


def spec_key(kernel: str, signature: Dict[str, str], constexprs: Dict[str, object],
             attrs: Dict[str, object], num_warps: int, num_stages: int) -> str:
    """A digest of one binary as the JIT specialises it: the kernel and its signature,
    constants, divisibility hints and launch options (two launches with equal keys run the
    same compile)."""
    blob = json.dumps([kernel, sorted(signature.items()),
                       sorted((k, repr(v)) for k, v in constexprs.items()),
                       sorted((k, repr(v)) for k, v in attrs.items()), num_warps, num_stages])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def case_key(case) -> str:
    """``spec_key`` of an ``AotCase``."""
    return spec_key(case.fn.__name__, case.signature, case.constexprs, case.attrs,
                    case.num_warps, case.num_stages)


def _with_exact(launch: Launch, kernel, built: Tuple) -> Launch:
    """``launch`` with the ``AotCase`` the JIT compiles for ``kernel[grid](*args, **kwargs)``
    (``built``: a launch builder's ``(grid, args, kwargs)``) and its key."""
    from slimops.kernels.epilogue import launch_case

    if type(kernel).__name__ not in ("JITFunction", "InterpretedFunction"):
        kernel = kernel.fn  # a wrapper around the module's kernel (the launch-plan test's)
    launch.exact = launch_case(launch.kernel, kernel, built)
    launch.spec = case_key(launch.exact)
    return launch


def _bn_train_launches(L: Layer, num_rows: int) -> List[Launch]:
    """Training-mode BN of the conv output: merge tree + finalize + normalise pass from
    ``num_rows`` rows of per-tile moments written by the conv (``batch_norm_act_from_partials``)
    followed by the running-statistics update (``record_batch_stats``:
    ``num_batches_tracked += 1`` and ``update_running_stats``' kernel); for a shared BN
    (``num_rows`` ignored) the ``batch_norm_act`` op: ``num_batches_tracked += 1``, its
    statistics pass, then the same merge, finalize and normalise, then
    ``update_running_stats``. Each Triton launch carries its own binary (``exact``), built
    from the launchers' own builders on meta tensors of the layer's shapes."""
    from slimops.kernels import batch_norm_act as bn
    from slimops.kernels import epilogue as ep

    c = L.cout
    count = L.y // c
    z = _meta((L.n, c) + tuple(L.hw_out))
    vec = _meta((c,))  # γ, β and the running buffers: the fp16 model's
    f32 = _meta((c,), torch.float32)  # mean, var (stats_dtype), alpha, beta
    out: List[Launch] = []
    if L.shared_bn:  # the op's own statistics pass writes the moments
        cfg = bn._reduce_config(count)
        num_rows, per_tile = bn.reduction_split(count, c, cfg, SMS)
    moments = _meta((3, num_rows, c), torch.float32)
    if L.shared_bn:
        out.append(Launch("torch:bn_bookkeeping", 1, 8))
        out.append(_with_exact(Launch(
            "_bn_stats_kernel", num_rows * c, ELEM * L.y + F32 * 3 * num_rows * c),
            bn._bn_stats_kernel, bn._stats_launch(z, moments, per_tile, cfg)))
    plan = bn.merge_plan(num_rows)
    for rows, out_rows in zip(plan, plan[1:]):
        dst = _meta((3, out_rows, c), torch.float32)
        out.append(_with_exact(Launch(
            "_bn_merge_kernel", out_rows * -(-c // bn.MERGE_BLOCK_C),
            F32 * 3 * c * (rows + out_rows)), bn._bn_merge_kernel,
            bn._merge_launch(moments, dst, rows)))
        moments = dst
    # both ops return fp32 statistics (stats_dtype): the *_f32stats binaries
    out.append(_with_exact(Launch(
        "_bn_finalize_kernel", -(-c // bn.MERGE_BLOCK_C),
        F32 * 3 * c * plan[-1] + ELEM * 2 * c + F32 * 4 * c), bn._bn_finalize_kernel,
        bn._finalize_launch(z, moments, count, vec, vec, None, None, True, 1e-5, f32, f32,
                            f32, f32)))
    launch = ep._epilogue_launch(z, None, f32, f32, z if L.residual else None, z,
                                 L.activation)
    out.append(_with_exact(Launch(
        "_epilogue_kernel", math.prod(launch[0]), ELEM * (2 + L.residual) * L.y + F32 * 2 * c),
        ep._epilogue_kernel, launch))
    # num_batches_tracked.add_ (the fused ops' record_batch_stats; the shared BN's came
    # first), then update_running_stats: one kernel, fp32 statistics into fp16 buffers (was
    # two casts, lerp_, mul_ and add_).
    if not L.shared_bn:
        out.append(Launch("torch:bn_bookkeeping", 1, 8))
    out.append(_with_exact(Launch(
        "_running_stats_kernel", -(-c // bn.RUNNING_STATS_BLOCK),
        (F32 + ELEM) * 2 * c + ELEM * 2 * c),
        bn._running_stats_kernel, bn._running_stats_launch(vec, vec, f32, f32, count, 0.1)))
    return out


def _bn_backward_launches(L: Layer) -> List[Launch]:
    """``batch_norm_act_backward``: per-tile sums, finalize, elementwise pass (fp32 saved
    statistics), each launch with its own binary."""
    from slimops.kernels import batch_norm_act as bn

    c, count = L.cout, L.y // L.cout
    cfg = bn._reduce_config(count)
    tiles, per_tile = bn.reduction_split(count, c, cfg, SMS)
    z = _meta((L.n, c) + tuple(L.hw_out))
    vec, f32 = _meta((c,)), _meta((c,), torch.float32)
    psg = _meta((tiles, c), torch.float32)
    stats = bn._backward_stats_launch(z, z, z, f32, psg, psg, per_tile, L.activation, cfg)
    final = bn._backward_finalize_launch(psg, psg, z, vec, f32, vec, vec, f32, f32, f32, count,
                                         1e-5, True)
    apply = bn._backward_apply_launch(z, z, z, f32, f32, f32, f32, z, L.activation, True)
    return [
        _with_exact(Launch("_bn_backward_stats_kernel", tiles * c,
                           ELEM * 3 * L.y + F32 * 2 * tiles * c),
                    bn._bn_backward_stats_kernel, stats),
        _with_exact(Launch("_bn_backward_finalize_kernel", math.prod(final[0]),
                           F32 * 2 * tiles * c + F32 * 6 * c),
                    bn._bn_backward_finalize_kernel, final),
        _with_exact(Launch("_bn_backward_apply_kernel", math.prod(apply[0]), ELEM * 4 * L.y),
                    bn._bn_backward_apply_kernel, apply),
    ]


def _conv_plan(L: Layer, training: bool, gpu: bool) -> List[Launch]:
    from slimops.kernels import conv2d as cv

    ho, wo = L.hw_out
    h, w = L.hw_in
    geo = _geo(L)
    x = _meta((L.n, L.cin, h, w))
    weight = _meta(L.full_weight)
    z = _meta((L.n, L.cout, ho, wo))
    fl, peak = L.flops(), L.peak()
    cfg = cv._pick(ho * wo, L.cout, torch.float16, cv._streamed(weight, geo, ho * wo, x))
    num_m = L.n * -(-ho * wo // cfg["BLOCK_M"])
    stats = training and not L.shared_bn
    moments = _meta((3, num_m, L.cout), torch.float32) if stats else None
    vec = _meta((L.cout,))
    launch = cv._forward_launch(
        x, weight, None, None if training else vec, None if training else vec,
        z if (L.residual and not training) else None, z, moments, L.cout, L.cin,
        L.full_weight[0], geo, 1, 0 if training else L.activation, cfg)
    grid = launch[0]
    if not training:
        return [_with_exact(Launch(
            "_conv_forward_kernel", math.prod(grid),
            ELEM * (L.x + L.w + L.y * (1 + L.residual) + 2 * L.cout), fl, peak),
            cv._conv_forward_kernel, launch)]
    plan = [_with_exact(Launch(
        "_conv_forward_kernel", math.prod(grid),
        ELEM * (L.x + L.w + L.y) + (F32 * 3 * num_m * L.cout if stats else 0), fl,
        peak), cv._conv_forward_kernel, launch)]
    plan += _bn_train_launches(L, num_m)
    plan += _bn_backward_launches(L)
    if not L.first:
        cfg = cv._pick(h * w, L.cin, torch.float16, cv._streamed(weight, geo, h * w, z))
        launch = cv._backward_input_launch(z, weight, x, L.cout, L.cin, L.full_weight[0],
                                           geo, 1, cfg)
        plan.append(_with_exact(Launch(
            "_conv_backward_input_kernel", math.prod(launch[0]), ELEM * (L.y + L.w + L.x), fl,
            peak), cv._conv_backward_input_kernel, launch))
    cfg = cv._pick(L.cout, L.cin, torch.float16, cv._streamed(weight, geo, ho * wo, z, x))
    splits, per_split = cv._weight_splits(L.n, ho * wo, L.cout, L.cin, weight, 1, cfg,
                                          2 * SMS if gpu else 0)
    plan.append(Launch("torch:zeros", -(-L.w_full * ELEM // 4096), ELEM * L.w_full))
    if splits == 1:  # as the launcher: straight into the full gradient (the weight's dtype)
        dst = weight
        dst_strides: Tuple[int, ...] = (0, L.full_weight[0] * weight.stride(0),
                                        *weight.stride())
    else:
        dst = _meta((splits, 1, L.cout, L.cin, L.k, L.k), torch.float32)
        dst_strides = dst.stride()
    launch = cv._backward_weight_launch(z, x, weight, dst, dst_strides, L.cout, L.cin, geo, 1,
                                        splits, per_split, cfg)
    written = F32 * splits * L.w if splits > 1 else ELEM * L.w
    plan.append(_with_exact(Launch(
        "_conv_backward_weight_kernel", math.prod(launch[0]), ELEM * (L.y + L.x) + written, fl,
        peak), cv._conv_backward_weight_kernel, launch))
    if splits > 1:  # dst.sum(0), then the cast-copy into the prefix
        plan.append(Launch("torch:sum", -(-L.w // 512), F32 * (splits + 1) * L.w))
        plan.append(Launch("torch:copy", -(-L.w // 512), (F32 + ELEM) * L.w))
    return plan


def _dw_plan(L: Layer, training: bool) -> List[Launch]:
    """The depthwise layer's launches, each with its own binary (the launchers' builders on
    meta tensors: the weight a channel prefix of the full one)."""
    from slimops.kernels import depthwise_conv2d as dw
    from slimops.kernels import epilogue as ep

    ho, wo = L.hw_out
    h, w = L.hw_in
    x = _meta((L.n, L.cin, h, w))
    z = _meta((L.n, L.cin, ho, wo))
    full = _meta(L.full_weight)
    weight = full[:L.cin]
    vec = _meta((L.cin,))
    pad = (L.k - 1) // 2
    geo = (L.stride, L.stride, pad, pad, 1, 1)
    t = dw._forward_tiling(x, ho, wo, L.k * L.k)
    fl, peak = L.flops(), L.peak()
    if not training:
        # scale/shift + act (+ residual): the "full" epilogue
        launch = dw._forward_launch(x, weight, None, vec, vec, z if L.residual else None, z,
                                    None, geo, L.activation, t)
        return [_with_exact(Launch(
            "_dw_forward_kernel", math.prod(launch[0]),
            ELEM * (L.x + L.w + L.y * (1 + L.residual) + 2 * L.cout), fl, peak),
            dw._dw_forward_kernel, launch)]
    tiles = t["strips"] * t["row_tiles"]
    num_rows = L.n * tiles
    moments = _meta((3, num_rows, L.cin), torch.float32)
    launch = dw._forward_launch(x, weight, None, None, None, None, z, moments, geo, 0, t)
    plan = [_with_exact(Launch(
        "_dw_forward_kernel", math.prod(launch[0]),
        ELEM * (L.x + L.w + L.y) + F32 * 3 * num_rows * L.cout, fl, peak),
        dw._dw_forward_kernel, launch)]
    plan += _bn_train_launches(L, num_rows)
    plan += _bn_backward_launches(L)
    launch = dw._backward_input_launch(z, weight, x, geo)
    plan.append(_with_exact(Launch(
        "_dw_backward_input_kernel", math.prod(launch[0]), ELEM * (L.y + L.w + L.x), fl, peak),
        dw._dw_backward_input_kernel, launch))
    num_tiles, taps, pix, per_tile = dw._weight_split(
        z, L.k, L.k, lambda total, c, pix, _: ep.split_tiles(total, c, pix,
                                                             torch.device("cuda")))
    partials = _meta((num_tiles, L.cin, taps), torch.float32)
    plan.append(Launch("torch:zeros", -(-L.w_full * ELEM // 4096), ELEM * L.w_full))
    launch = dw._weight_partials_launch(z, x, partials, L.k, L.k, geo, pix, per_tile)
    plan.append(_with_exact(Launch(
        "_dw_weight_partials_kernel", math.prod(launch[0]),
        ELEM * (L.y + L.x) + F32 * num_tiles * L.cin * taps, fl, peak),
        dw._dw_weight_partials_kernel, launch))
    launch = dw._weight_reduce_launch(partials, full)
    plan.append(_with_exact(Launch(
        "_dw_weight_reduce_kernel", math.prod(launch[0]),
        F32 * num_tiles * L.cin * taps + ELEM * L.w),
        dw._dw_weight_reduce_kernel, launch))
    return plan


def _linear_plan(L: Layer, training: bool) -> List[Launch]:
    from slimops.kernels import linear as ln

    n, cin, cout = L.n, L.cin, L.cout
    w = _meta(L.full_weight)
    bias = _meta((L.full_weight[0],))

    def gemm(a: torch.Tensor, a_strides: Tuple[int, int], b: torch.Tensor,
             b_strides: Tuple[int, int], c: torch.Tensor, mnk: Tuple[int, int, int],
             with_bias: bool, written: float) -> Launch:
        # the operands and strides as linear.py's launchers pass them, through its builder
        m, nn, k = mnk
        cfg = ln._pick(m, nn)
        launch = ln._gemm_launch(a, a_strides, b, b_strides, c, c.stride()[:2], m, nn, k,
                                 bias if with_bias else None, cfg)
        return _with_exact(Launch("_gemm_kernel", math.prod(launch[0]),
                                  ELEM * (m * k + k * nn) + written, 2.0 * m * nn * k,
                                  PEAK_TENSOR_FP16), ln._gemm_kernel, launch)

    x, gy = _meta((n, cin)), _meta((n, cout))
    # forward: input [n, cin] @ W[:cout, :cin]^T (the weight's strides swapped) + bias
    plan = [gemm(x, x.stride(), w, (w.stride(1), w.stride(0)), _meta((n, cout)),
                 (n, cout, cin), True, ELEM * (n * cout + cout))]
    if not training:
        return plan
    # input gradient: grad_out [n, cout] @ W[:cout, :cin]
    plan.append(gemm(gy, gy.stride(), w, w.stride(), _meta((n, cin)), (n, cin, cout), False,
                     ELEM * n * cin))
    plan.append(Launch("torch:zeros", -(-L.w_full * ELEM // 4096), ELEM * L.w_full))
    # weight gradient into the prefix of the full gradient: grad_out^T [cout, n] @ input
    plan.append(gemm(gy, (gy.stride(1), gy.stride(0)), x, x.stride(), _meta(L.full_weight),
                     (cout, cin, n), False, ELEM * L.w))
    # the bias gradient: grad_out.sum(0), padded to the full bias (csrc/autograd/linear.cpp)
    plan.append(Launch("torch:sum", 1, ELEM * (n * cout + cout)))
    plan.append(Launch("torch:pad", 1, ELEM * (cout + L.full_weight[0])))
    return plan


def slimops_plan(L: Layer, training: bool, gpu: bool = True) -> List[Launch]:
    """The launches slimops makes for layer ``L``: the eval forward (``training`` False) or
    a training step's forward + backward. ``gpu``: the launchers' H100 rules (else the
    interpreter's, for the tests)."""
    with launcher_rules(gpu):
        if L.kind == "linear":
            return _linear_plan(L, training)
        if L.kind == "depthwise_conv2d":
            return _dw_plan(L, training)
        return _conv_plan(L, training, gpu)


# ----------------------------------------------------------------------------- reference plan


def _prefix_copied(L: Layer) -> bool:
    """Whether the reference's weight prefix is non-contiguous, so ``F.conv2d`` copies it:
    a dense conv's ``W[:cout, :cin]`` with ``cin`` below the full input width. (A depthwise
    ``W[:C]`` and a row prefix are contiguous; cuBLAS takes a strided linear weight.)"""
    return L.kind == "conv2d" and L.cin < L.full_weight[1]


def reference_plan(L: Layer, training: bool) -> List[Launch]:
    """The launches of the layer run the ``slimops.reference`` way on a GPU (see the module
    docstring); grid sizes unknown (efficiency 1)."""
    fl, peak = L.flops(), L.peak()
    y = L.y
    plan: List[Launch] = []
    if L.kind == "linear":
        plan.append(Launch("cublas:addmm", 0, ELEM * (L.x + L.w + y + L.cout), fl, peak))
        if training:
            plan.append(Launch("cublas:mm_grad_input", 0, ELEM * (y + L.w + L.x), fl, peak))
            plan.append(Launch("cublas:mm_grad_weight", 0, ELEM * (y + L.x + L.w), fl, peak))
            plan.append(Launch("torch:sum", 0, ELEM * (y + L.cout)))
            plan += [Launch("torch:zeros", 0, ELEM * L.w_full),
                     Launch("torch:copy", 0, 2 * ELEM * L.w),
                     Launch("torch:zeros", 0, ELEM * L.full_weight[0]),
                     Launch("torch:copy", 0, 2 * ELEM * L.cout)]
        return plan
    if _prefix_copied(L):
        plan.append(Launch("torch:copy_weight_prefix", 0, 2 * ELEM * L.w))
    plan.append(Launch("cudnn:conv_fwd", 0, ELEM * (L.x + L.w + y), fl, peak))
    if training:
        # PyTorch's native BN for fp16 input and fp16 γ/β (cuDNN's BN takes fp32 γ/β only):
        # statistics, running-statistics update, normalise; plus the module's
        # num_batches_tracked += 1.
        plan.append(Launch("torch:bn_stats", 0, ELEM * y + F32 * 2 * L.cout))
        plan.append(Launch("torch:bn_update_stats", 0, F32 * 6 * L.cout))
        plan.append(Launch("torch:bn_normalize", 0, 2 * ELEM * y + F32 * 4 * L.cout))
        plan.append(Launch("torch:num_batches_tracked", 0, 8))
    else:
        plan.append(Launch("torch:bn_normalize", 0, 2 * ELEM * y + F32 * 4 * L.cout))
    if L.residual:
        plan.append(Launch("torch:add_residual", 0, 3 * ELEM * y))
    if L.activation:
        plan.append(Launch("torch:activation", 0, 2 * ELEM * y))
    if not training:
        return plan
    if L.activation:
        plan.append(Launch("torch:activation_backward", 0, 3 * ELEM * y))
    plan.append(Launch("torch:bn_backward_reduce", 0, 2 * ELEM * y + F32 * 4 * L.cout))
    plan.append(Launch("torch:bn_backward_elemt", 0, 3 * ELEM * y + F32 * 4 * L.cout))
    if not L.first:
        plan.append(Launch("cudnn:conv_bwd_data", 0, ELEM * (y + L.w + L.x), fl, peak))
    plan.append(Launch("cudnn:conv_bwd_filter", 0, ELEM * (y + L.x + L.w), fl, peak))
    # the slice's backward: a full-size zero gradient, the prefix copied in
    plan += [Launch("torch:zeros", 0, ELEM * L.w_full), Launch("torch:copy", 0, 2 * ELEM * L.w)]
    return plan


# ----------------------------------------------------------------------------- occupancy


TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_model_occupancy.json")
SCENARIOS = [(training, width, batch) for training in (False, True) for width in (1.0, 0.35)
             for batch in (1, 256)]


def table_cases(scenarios: Sequence[Tuple[bool, float, int]] = SCENARIOS) -> List[object]:
    """Every binary the occupancy table holds: the exact binary of every Triton launch of the
    ``scenarios`` (training, width, batch), named after its first launch. One per
    ``case_key``."""
    cases: Dict[str, object] = {}
    for training, width, batch in scenarios:
        for L in layers(width, batch):
            for x in slimops_plan(L, training):
                if x.exact is not None and x.spec not in cases:
                    name = (f"{x.kernel.strip('_').replace('_kernel', '')}_{L.name}_b{batch}"
                            f"_w{width:g}_{'train' if training else 'eval'}")
                    cases[x.spec] = dataclasses.replace(x.exact, name=name)
    return list(cases.values())


def _source(case) -> str:
    """The kernel's source digest (triton's ``cache_key``: its code and that of the jit
    functions and globals it uses), so a kernel edit shows as a stale entry."""
    return str(case.fn.cache_key)


def _compile_entries(cases: Sequence[object]) -> List[Dict[str, object]]:
    """Compile ``cases`` for sm_90 (``kernels._aot``; in a process without
    ``TRITON_INTERPRET``) and return the table's entries, sorted by kernel and name."""
    from slimops.kernels import _aot

    out = []
    for c in cases:
        r = _aot.compile_case(c, 90)
        out.append(dict(kernel=r.kernel, name=c.name, key=case_key(c), source=_source(c),
                        registers=r.registers, spill_bytes=r.spill_bytes,
                        stack_bytes=r.stack_bytes, shared_bytes=r.shared_bytes,
                        num_warps=c.num_warps, num_stages=c.num_stages,
                        occupancy=r.occupancy))
    return sorted(out, key=lambda e: (str(e["kernel"]), str(e["name"])))


def compile_table(keys: Optional[Sequence[str]] = None, jobs: int = 1
                  ) -> List[Dict[str, object]]:
    """The occupancy table as today's code compiles it (every ``table_cases`` binary, or
    those of ``keys``), computed in ``jobs`` subprocesses (each a share of the cases) without
    ``TRITON_INTERPRET`` (the interpreter's kernels cannot be compiled): about 330 compiles,
    5-10 CPU minutes."""
    import subprocess
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for part in range(jobs):
            out = os.path.join(tmp, f"part{part}.json")
            procs.append((out, subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--compile-table", out,
                 "--part", f"{part}/{jobs}", *(["--keys", *keys] if keys else [])], env=env)))
        entries: List[Dict[str, object]] = []
        for out, proc in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"gpu_model.py --compile-table failed ({proc.returncode})")
            with open(out) as f:
                entries += json.load(f)
    return sorted(entries, key=lambda e: (str(e["kernel"]), str(e["name"])))


def _write(entries: List[Dict[str, object]], path: str) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(entries, f, indent=0)
        f.write("\n")
    os.replace(path + ".tmp", path)


def occupancy_table(path: str = TABLE) -> List[Dict[str, object]]:
    """The checked-in table (``bench/gpu_model_occupancy.json``): per binary its kernel,
    name (``<kernel>_<layer>_b<batch>_w<width>_<pass>``, its first launch), ``key``
    (``spec_key``), ``source`` (``_source``) and the sm_90 compile's registers, spills,
    stack, shared memory, warps, stages and ``occupancy`` (resident blocks per SM).
    ``python bench/gpu_model.py --write-table`` regenerates it, ``--check`` says whether it is
    current;
    tests/test_bench_gpu_model.py checks its keys and sources against today's code and
    recompiles one entry per kernel."""
    with open(path) as f:
        return json.load(f)


class Occupancy:
    """Blocks per SM of a launch from the table: the entry of the launch's own binary
    (``Launch.spec``); a launch without one (torch's) keeps 0, "unknown"."""

    def __init__(self, entries: Sequence[Dict[str, object]]) -> None:
        self.by_key = {str(e["key"]): e for e in entries}

    def __call__(self, launch: Launch) -> Launch:
        best = self.by_key.get(launch.spec) if launch.spec else None
        if best is not None:
            launch.blocks_per_sm = int(best["occupancy"])
            launch.case = str(best["name"])
        return launch


# ----------------------------------------------------------------------------- totals


@dataclass
class Totals:
    launches: int = 0
    bytes: float = 0.0
    flops: float = 0.0
    time: float = 0.0
    time_unquantised: float = 0.0  # the same with every efficiency factor 1
    launch_time: float = 0.0
    by_kernel: Dict[str, List[float]] = field(default_factory=dict)

    def add(self, plan: Sequence[Launch]) -> "Totals":
        for x in plan:
            self.launches += 1
            self.bytes += x.bytes
            self.flops += x.flops
            self.time += x.time()
            self.time_unquantised += x.roof() + LAUNCH_S
            self.launch_time += LAUNCH_S
            agg = self.by_kernel.setdefault(x.kernel, [0, 0.0, 0.0, 0.0, 1.0])
            agg[0] += 1
            agg[1] += x.bytes
            agg[2] += x.time()
            agg[3] += x.roof()
            agg[4] = min(agg[4], x.efficiency())
        return self


def scenario(width: float, batch: int, training: bool,
             occupancy: Optional[Callable[[Launch], Launch]] = None,
             found: Optional[List[Layer]] = None
             ) -> List[Tuple[Layer, List[Launch], List[Launch]]]:
    """Per layer: (layer, slimops' launches, the reference's launches)."""
    rows = []
    for L in found if found is not None else layers(width, batch):
        mine = slimops_plan(L, training)
        if occupancy is not None:
            mine = [occupancy(x) for x in mine]
        rows.append((L, mine, reference_plan(L, training)))
    return rows


def _us(s: float) -> str:
    return f"{s * 1e6:,.0f}" if s >= 1e-4 else f"{s * 1e6:.1f}"


def totals_table(results: Dict[Tuple[float, int, bool], List]) -> str:
    out = ["| pass | width | batch | GFLOP | slimops launches | slimops MB | slimops us "
           "(launch share) | slimops us, factor 1 | reference launches | reference MB "
           "| reference us (launch share) | slimops / reference |", "|" + "---|" * 12]
    for (width, batch, training), rows in results.items():
        mine, ref = Totals(), Totals()
        for _, m, r in rows:
            mine.add(m)
            ref.add(r)
        out.append(
            f"| {'training step' if training else 'eval forward'} | {width:g} | {batch} "
            f"| {mine.flops / 1e9:,.1f} "
            f"| {mine.launches} | {mine.bytes / 1e6:,.1f} | {_us(mine.time)} "
            f"({mine.launch_time / mine.time:.0%}) | {_us(mine.time_unquantised)} "
            f"| {ref.launches} | {ref.bytes / 1e6:,.1f} "
            f"| {_us(ref.time)} ({ref.launch_time / ref.time:.0%}) "
            f"| {mine.time / ref.time:.2f} ({mine.time_unquantised / ref.time:.2f}) |")
    return "\n".join(out)


def family_table(rows: List) -> str:
    mine = Totals()
    for _, m, _ in rows:
        mine.add(m)
    cases: Dict[str, str] = {}
    for _, m, _ in rows:
        for x in m:
            if x.case:
                cases.setdefault(x.kernel, x.case)
    out = ["| kernel | launches | MB | roof us | modelled us | worst efficiency | "
           "blocks/SM (binary of the first launch) |", "|" + "---|" * 7]
    for k, (count, by, t, roof, eff) in sorted(mine.by_kernel.items(), key=lambda kv: -kv[1][2]):
        occ = {x.blocks_per_sm for _, m, _ in rows for x in m if x.kernel == k}
        occ_s = "/".join(str(o) for o in sorted(occ) if o) or "-"
        out.append(f"| `{k}` | {count} | {by / 1e6:,.1f} | {_us(roof)} | {_us(t)} | {eff:.2f} "
                   f"| {occ_s} {('(`' + cases[k] + '`)') if k in cases else ''} |")
    return "\n".join(out)


def layer_table(rows: List, names: Optional[Sequence[str]] = None) -> str:
    out = ["| layer | kind | cin->cout | out HxW | slimops launches | MB | us | eff (main) "
           "| reference launches | MB | us |", "|" + "---|" * 11]
    for L, m, r in rows:
        if names is not None and L.name not in names:
            continue
        mt, rt = Totals().add(m), Totals().add(r)
        main = max(m, key=lambda x: x.roof())
        out.append(
            f"| {L.name} | {L.kind}{' +res' if L.residual else ''} | {L.cin}->{L.cout} "
            f"| {L.hw_out[0]}x{L.hw_out[1]} | {mt.launches} | {mt.bytes / 1e6:,.2f} "
            f"| {_us(mt.time)} | {main.efficiency():.2f} | {rt.launches} "
            f"| {rt.bytes / 1e6:,.2f} | {_us(rt.time)} |")
    return "\n".join(out)


def cases_table(results: Dict[Tuple[float, int, bool], List]) -> str:
    """Where the occupancy figures came from: per kernel, how many binaries (each launch's
    own, sm_90) served how many launches of the scenarios, and their blocks per SM."""
    exact: Dict[str, List] = {}
    for rows in results.values():
        for _, m, _ in rows:
            for x in m:
                if x.case:
                    e = exact.setdefault(x.kernel, [set(), 0, set()])
                    e[0].add(x.spec)
                    e[1] += 1
                    e[2].add(x.blocks_per_sm)
    out = ["| kernel | binaries (sm_90, each launch's own) | blocks/SM | launches served |",
           "|---|---|---|---|"]
    for kernel, (specs, count, occ) in sorted(exact.items()):
        out.append(f"| `{kernel}` | {len(specs)} | {'/'.join(str(o) for o in sorted(occ))} "
                   f"| {count} |")
    return "\n".join(out)


# The rows docs/GPU_KERNELS.md shows: the stem, the first stride-1 bottleneck (56x56) with
# its residual, a 14x14 expand, the last 7x7 layers and the classifier.
REPRESENTATIVE = ("stem", "blocks.0.depthwise", "blocks.2.expand", "blocks.2.depthwise",
                  "blocks.2.project", "blocks.10.expand", "blocks.16.project", "last_conv",
                  "classifier")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.35])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--layers", action="store_true", help="every layer, not a selection")
    parser.add_argument("--write-table", action="store_true",
                        help=f"recompile the occupancy table into {os.path.basename(TABLE)}")
    parser.add_argument("--check", action="store_true",
                        help="recompile the table and exit 1 if the checked-in one differs")
    parser.add_argument("--compile-table", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=1,
                        help="compile processes for --write-table / --check")
    parser.add_argument("--keys", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--part", default="0/1", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_table:
        cases = table_cases()
        if args.keys:
            cases = [c for c in cases if case_key(c) in set(args.keys)]
        part, parts = (int(v) for v in args.part.split("/"))
        _write(_compile_entries(cases[part::parts]), args.compile_table)
        return
    if args.write_table or args.check:
        fresh = compile_table(jobs=args.jobs)
        if args.write_table:
            _write(fresh, TABLE)
            print(f"{TABLE}: {len(fresh)} entries")
            return
        stale = [e["name"] for e in fresh if e not in occupancy_table()]
        stale += [e["name"] for e in occupancy_table() if e not in fresh]
        print("\n".join(f"stale: {n}" for n in stale) or "the table is current")
        sys.exit(1 if stale else 0)
    occ = Occupancy(occupancy_table())
    results = {}
    for training in (False, True):
        for width in args.widths:
            for batch in args.batches:
                results[(width, batch, training)] = scenario(
                    width, batch, training, occ, layers(width, batch))
    print("## Totals (conv + linear layers)\n")
    print(totals_table(results))
    print("\n## Binaries the occupancy came from (all scenarios)\n")
    print(cases_table(results))
    for key in results:
        width, batch, training = key
        if training:
            print(f"\n## Per kernel, training step, width {width:g}, batch {batch}\n")
            print(family_table(results[key]))
    for key, rows in results.items():
        width, batch, training = key
        print(f"\n## Layers, {'training step' if training else 'eval forward'}, "
              f"width {width:g}, batch {batch}\n")
        print(layer_table(rows, None if args.layers else REPRESENTATIVE))


if __name__ == "__main__":
    main()
