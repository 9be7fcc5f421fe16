"""Roofline estimate of the GPU kernels at S-MobileNet v2's layer shapes on an H100.

    python bench/roofline.py            # markdown tables: plain roofs per layer

The H100 figures here are the ones bench/gpu_model.py (the per-layer model docs/GPU_KERNELS.md
embeds: every launch of slimops' and the reference's plans, eval and training) reads.

An *estimate*, not a measurement: no machine of this project has a GPU. For each conv and
linear layer of S-MobileNet v2 at a width (shapes read from a forward pass with hooks), the
kernel that runs it (implicit-GEMM conv, depthwise conv, linear; BN folded into the
epilogue in eval), its FLOPs, the bytes it must move at least (each input, weight prefix,
residual and output element once), the arithmetic intensity, which roof bounds it and the
time that roof allows: ``max(FLOPs / peak, bytes / bandwidth)``. Real kernels also pay a
launch (a few microseconds each), tile quantisation on small channel counts, and re-reads
when a tile's working set misses L2; the tables say how far below that floor batch 1 is.

H100 SXM5 (80 GB) datasheet figures: dense float16 tensor-core peak 989 TFLOP/s, float32
(CUDA cores, FMA) 67 TFLOP/s, HBM3 3.35 TB/s. A depthwise conv does not map to tensor cores
(one input channel per output channel), so its compute roof is the float32 FMA rate even for
float16 data (the kernels accumulate in float32).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Tuple

import torch

import slimops
from slimops.nn import SlimConvBNAct, SlimmableLinear

PEAK_TENSOR_FP16 = 989e12
PEAK_FMA_FP32 = 67e12
HBM_BYTES_PER_S = 3.35e12
LAUNCH_S = 3e-6  # a typical kernel launch + tail on an idle stream (order of magnitude)


@dataclass
class Layer:
    name: str
    kernel: str  # "conv2d" | "depthwise_conv2d" | "linear"
    n: int
    cin: int
    cout: int
    hw_in: Tuple[int, int]
    hw_out: Tuple[int, int]
    k: int
    residual: bool

    def flops(self) -> float:
        ho, wo = self.hw_out
        if self.kernel == "depthwise_conv2d":
            return 2.0 * self.n * self.cout * ho * wo * self.k * self.k
        if self.kernel == "linear":
            return 2.0 * self.n * self.cin * self.cout
        return 2.0 * self.n * self.cout * ho * wo * self.cin * self.k * self.k

    def bytes(self, elem: int) -> float:
        hi, wi = self.hw_in
        ho, wo = self.hw_out
        x = self.n * self.cin * hi * wi
        y = self.n * self.cout * ho * wo
        w = self.cout * self.k * self.k * (1 if self.kernel == "depthwise_conv2d" else self.cin)
        epilogue = 2 * self.cout * 4  # scale, shift (float32)
        return elem * (x + y + w + (y if self.residual else 0)) + epilogue

    def roof(self, elem: int) -> Tuple[float, str, float]:
        """(time in s, bound, intensity) under the roofline."""
        peak = PEAK_FMA_FP32 if self.kernel == "depthwise_conv2d" else PEAK_TENSOR_FP16
        t_compute = self.flops() / peak
        t_memory = self.bytes(elem) / HBM_BYTES_PER_S
        bound = "compute" if t_compute > t_memory else "memory"
        return max(t_compute, t_memory), bound, self.flops() / self.bytes(elem)


def layers(width: float, batch: int, resolution: int = 224) -> List[Layer]:
    """S-MobileNet v2's conv and linear layers at ``width`` (shapes from a forward pass)."""
    from slimops.models import s_mobilenet_v2

    model = s_mobilenet_v2().eval()
    found: List[Layer] = []

    def hook(name):
        def fn(module, args, kwargs, out):
            x = args[0]
            if isinstance(module, SlimmableLinear):
                found.append(Layer(name, "linear", x.shape[0], x.shape[1], out.shape[1],
                                   (1, 1), (1, 1), 1, False))
                return
            residual = (args[1] if len(args) > 1 else kwargs.get("residual")) is not None
            kind = "depthwise_conv2d" if module.conv.depthwise else "conv2d"
            found.append(Layer(name, kind, x.shape[0], x.shape[1], out.shape[1],
                               tuple(x.shape[2:]), tuple(out.shape[2:]),
                               module.conv.kernel_size[0], residual))
        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True)
               for n, m in model.named_modules()
               if isinstance(m, (SlimConvBNAct, SlimmableLinear))]
    with torch.no_grad(), slimops.width(model, width):
        model(torch.randn(batch, 3, resolution, resolution))
    for h in handles:
        h.remove()
    return found


def table(width: float, batch: int, elem: int = 2, per_layer: bool = False) -> str:
    rows = layers(width, batch)
    out = [f"**width {width:g}, batch {batch}, float16** ({len(rows)} conv/linear kernels)", ""]
    if per_layer:
        out += ["| layer | kernel | cin->cout | out HxW | k | MFLOP | KB moved | FLOP/B | bound "
                "| roof us |", "|---|---|---|---|---|---|---|---|---|---|"]
    total_t = 0.0
    by_kind = {}
    for L in rows:
        t, bound, ai = L.roof(elem)
        total_t += t
        agg = by_kind.setdefault(L.kernel, [0, 0.0, 0.0, 0.0])
        agg[0] += 1
        agg[1] += L.flops()
        agg[2] += L.bytes(elem)
        agg[3] += t
        if per_layer:
            out.append(f"| {L.name} | {L.kernel}{' +res' if L.residual else ''} | {L.cin}->{L.cout} "
                       f"| {L.hw_out[0]}x{L.hw_out[1]} | {L.k} | {L.flops() / 1e6:.2f} "
                       f"| {L.bytes(elem) / 1e3:.1f} | {ai:.1f} | {bound} | {t * 1e6:.2f} |")
    if per_layer:
        out.append("")
    out += ["| kernel | count | GFLOP | MB moved | roof us (sum) |", "|---|---|---|---|---|"]
    for kind, (count, fl, by, t) in by_kind.items():
        out.append(f"| {kind} | {count} | {fl / 1e9:.3f} | {by / 1e6:.2f} | {t * 1e6:.1f} |")
    z_bytes = sum(elem * L.n * L.cout * L.hw_out[0] * L.hw_out[1] for L in rows
                  if L.kernel != "linear")
    out += ["", f"Sum of roofs: {total_t * 1e6:.1f} us; {len(rows)} launches at ~"
            f"{LAUNCH_S * 1e6:.0f} us each: {len(rows) * LAUNCH_S * 1e6:.0f} us.",
            f"Training-mode S-BN: the conv outputs are {z_bytes / 1e6:.2f} MB; reducing the "
            "batch statistics in the conv's epilogue (partial sums per tile) saves one read "
            f"of them per layer, {z_bytes / HBM_BYTES_PER_S * 1e6:.1f} us at the HBM roof, "
            "against a separate statistics kernel; normalise + activation still reads and "
            f"writes them ({2 * z_bytes / HBM_BYTES_PER_S * 1e6:.1f} us)."]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.35, 1.0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--layers", action="store_true", help="a row per layer too")
    args = parser.parse_args()
    for w in args.widths:
        for b in args.batches:
            print(table(w, b, per_layer=args.layers))
            print()


if __name__ == "__main__":
    main()
