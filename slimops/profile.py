"""Per-width profiling: active parameters, MACs and (optionally) latency on this device.

Counts follow the paper: parameters of convolutions and fully connected layers (biases
included) and, separately, BN parameters (γ and β); MACs of convolutions, fully connected
layers and average pooling, for one sample. Counting is analytic, from the active channel
counts and the output sizes seen in one forward pass per width.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from slimops._table import text_table
from slimops.nn import SlimConvBNAct, SlimmableConv2d, SlimmableLinear, SwitchableBatchNorm2d
from slimops.timing import summarize, time_calls
from slimops.width import model_widths, width


@dataclass
class WidthProfile:
    """One row of ``profile``: a width and what the model costs there (per sample)."""

    width: float
    output_shape: Tuple[int, ...]
    params: int  # conv + FC weights and biases
    bn_params: int  # BN γ and β
    macs: int
    latency_ms: Optional[float] = None


def _conv_counts(conv: nn.Conv2d, cin: int, cout: int, out: torch.Tensor) -> Tuple[int, int]:
    if isinstance(conv, SlimmableConv2d) and conv.depthwise:
        per_out = 1
    else:
        per_out = cin // conv.groups
    kh, kw = conv.kernel_size
    weights = cout * per_out * kh * kw
    params = weights + (cout if conv.bias is not None else 0)
    return params, weights * out.shape[2] * out.shape[3]


def _bn_params(bn: nn.Module) -> int:
    if isinstance(bn, SwitchableBatchNorm2d):
        active = bn.active_features()
        return 2 * active if bn.active_bn().affine else 0
    return 2 * bn.num_features if getattr(bn, "affine", False) else 0


class _Counter:
    """Forward hooks on the counted units; nested parts of a fused block are skipped."""

    def __init__(self, model: nn.Module) -> None:
        self.params = self.bn_params = self.macs = 0
        self.handles = []
        skip = set()
        for m in model.modules():
            if isinstance(m, SlimConvBNAct):
                skip.update(id(c) for c in m.modules() if c is not m)
        for m in model.modules():
            if id(m) not in skip and isinstance(m, (SlimConvBNAct, nn.Conv2d, nn.Linear,
                                                     SwitchableBatchNorm2d, nn.BatchNorm2d,
                                                     nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
                self.handles.append(m.register_forward_hook(self._hook))

    def _hook(self, module: nn.Module, inputs, output) -> None:
        x = inputs[0]
        per_sample = 1 if x.shape[0] == 0 else x.shape[0]
        if isinstance(module, SlimConvBNAct):
            cin, cout = module.conv.active_channels()
            p, m = _conv_counts(module.conv, cin, cout, output)
            self.params += p
            self.macs += m
            self.bn_params += _bn_params(module.bn)
        elif isinstance(module, nn.Conv2d):
            cin, cout = (module.active_channels() if isinstance(module, SlimmableConv2d)
                         else (module.in_channels, module.out_channels))
            p, m = _conv_counts(module, cin, cout, output)
            self.params += p
            self.macs += m
        elif isinstance(module, nn.Linear):
            fin, fout = (module.active_features() if isinstance(module, SlimmableLinear)
                         else (module.in_features, module.out_features))
            self.params += fin * fout + (fout if module.bias is not None else 0)
            self.macs += fin * fout * (output.numel() // max(1, output.shape[-1])) // per_sample
        elif isinstance(module, (SwitchableBatchNorm2d, nn.BatchNorm2d)):
            self.bn_params += _bn_params(module)
        else:  # average pooling: one accumulate per input element
            self.macs += x[0].numel() if x.shape[0] else 0

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def measure_latency(model: nn.Module, x: torch.Tensor, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of ``model(x)`` in milliseconds (inference mode, after warm-up; on a
    CUDA input the device is synchronised around each timed run)."""
    with torch.inference_mode():
        times = time_calls(lambda: model(x), repeats, warmup, device=x.device, scale=1e3)
    return summarize(times).median


def profile(
    model: nn.Module,
    input_size: Sequence[int] = (1, 3, 224, 224),
    widths: Optional[Sequence[float]] = None,
    latency: bool = False,
    warmup: int = 3,
    repeats: int = 10,
) -> List[WidthProfile]:
    """Profile ``model`` at each width (default: all of the model's widths), in eval mode.

    Args:
        input_size: the input shape ``(N, C, H, W)``; counts are per sample, latency is for
            the whole batch.
        latency: also measure latency (median of ``repeats`` after ``warmup``).
    Returns:
        one ``WidthProfile`` per width, ascending.
    """
    widths = tuple(widths) if widths is not None else model_widths(model)
    param = next(model.parameters())
    x = torch.randn(*input_size, dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for w in widths:
            with width(model, w):
                counter = _Counter(model)
                try:
                    with torch.inference_mode():
                        out = model(x)
                finally:
                    counter.close()
                row = WidthProfile(w, tuple(out.shape), counter.params, counter.bn_params,
                                   counter.macs)
                if latency:
                    row.latency_ms = measure_latency(model, x, warmup, repeats)
                rows.append(row)
    finally:
        model.train(was_training)
    return rows


def format_table(rows: List[WidthProfile], extra: Optional[Dict[str, List[str]]] = None) -> str:
    """A plain-text table of ``profile`` rows (``extra``: more columns, one value per row)."""
    header = ["width", "output", "params", "BN params", "MACs"]
    if any(r.latency_ms is not None for r in rows):
        header.append("latency ms")
    extra = extra or {}
    header += list(extra)
    body = []
    for i, r in enumerate(rows):
        cells = [f"{r.width:g}x", "x".join(map(str, r.output_shape)), f"{r.params:,}",
                 f"{r.bn_params:,}", human(r.macs)]
        if "latency ms" in header:
            cells.append("-" if r.latency_ms is None else f"{r.latency_ms:.2f}")
        cells += [col[i] for col in extra.values()]
        body.append(cells)
    return text_table(header, body)


def human(n: float) -> str:
    """``n`` with a K/M/G suffix (MACs, parameter counts)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def environment() -> str:
    """One line: the active backend, torch, threads and allocator settings."""
    from slimops.ops import backend_info

    info = backend_info()
    malloc = {k: os.environ[k] for k in os.environ if k.startswith("MALLOC_")} or "glibc defaults"
    return (f"backend: cpu={info['cpu']} ({', '.join(info['native_dtypes'])}), "
            f"torch {info['torch']}, threads={torch.get_num_threads()}, allocator: {malloc}")
