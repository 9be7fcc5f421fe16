"""What switching width costs on one model instance (eval, batch 1, 224x224, this CPU).

    .venv/bin/python bench/switch_cost.py [model]

Prints, per width: ``set_width`` itself; the steady-state forward at that width; a forward
right after switching to it from another width (``set_width`` + forward, the previous call at
another width) and its overhead over the steady forward; then the one-time cost of the first
eval forward after the BN changed (or ever), when every conv+BN unit computes the eval
scale/shift of every listed width (O(channels) each), and the memory that per-width state
holds next to the weights. Nothing is copied or re-folded per width: the weights are shared.
"""

from __future__ import annotations

import sys

import torch

import slimops
from slimops.models import MODELS
from slimops.nn import SlimConvBNAct
from slimops.timing import summarize, time_calls


def _median_ms(fn, repeats: int = 21, setup=None) -> float:
    """Median ms of ``repeats`` timed calls of ``fn`` (``setup`` untimed before each)."""
    return summarize(time_calls(fn, repeats, setup=setup)).median * 1e3


def main(name: str = "s_mobilenet_v2") -> None:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(1, 3, 224, 224)
    units = [m for m in model.modules() if isinstance(m, SlimConvBNAct)]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    widths = slimops.model_widths(model)
    print(f"{name}, batch 1, 224x224, {torch.get_num_threads()} threads; "
          f"{slimops.backend_info()['cpu_isa']} kernels; weights {weight_bytes / 2**20:.1f} MiB")
    print(f"{'width':>6} {'set_width':>10} {'steady fwd':>11} {'after switch':>13} "
          f"{'overhead':>9}")
    with torch.inference_mode():
        model(x)
        for i, w in enumerate(widths):
            other = widths[i - 1]
            set_ms = _median_ms(lambda: slimops.set_width(model, w))
            slimops.set_width(model, w)
            model(x)
            steady = _median_ms(lambda: model(x), 11)
            # each timed call follows a forward at the other width (untimed)
            switched = _median_ms(lambda: (slimops.set_width(model, w), model(x)), 11,
                                  setup=lambda: (slimops.set_width(model, other), model(x)))
            print(f"{w:>6g} {set_ms * 1e3:>8.1f}us {steady:>9.2f}ms {switched:>11.2f}ms "
                  f"{switched - steady:>7.2f}ms")

        slimops.set_width(model, widths[-1])
        steady = _median_ms(lambda: model(x), 11)

        def cold():
            for unit in units:
                unit._eval_plans.clear()
            model(x)

        first = _median_ms(cold, 11)
        state = sum(p.scale.numel() * p.scale.element_size() * 2
                    for unit in units for p in unit._eval_plans.values())
    print(f"first eval forward (every listed width's BN scale/shift): +{first - steady:.2f} ms, "
          f"once; per-width state {state / 1024:.1f} KiB for {len(widths)} widths "
          f"({100 * state / weight_bytes:.2f}% of the weights)")


if __name__ == "__main__":
    main(*sys.argv[1:])
