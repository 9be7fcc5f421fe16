"""What switching width costs on one model instance (eval, batch 1, 224x224, this CPU).

    .venv/bin/python bench/switch_cost.py [model]

Prints, per width: ``set_width`` itself (switching to a width used before costs only this);
a forward right after switching with no cached per-width BN scale/shift, the steady-state
forward, and their difference (what the *first* request at a width pays once per model
instance: each conv+BN unit computes its eval scale/shift, O(channels)); and the memory that
per-width state holds next to the weights. Nothing is copied or re-folded per width: the
weights are shared by every width.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import slimops
from slimops.models import MODELS
from slimops.nn import SlimConvBNAct


def _median_ms(fn, repeats: int = 21) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(name: str = "s_mobilenet_v2") -> None:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(1, 3, 224, 224)
    units = [m for m in model.modules() if isinstance(m, SlimConvBNAct)]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{name}, batch 1, 224x224, {torch.get_num_threads()} threads; "
          f"{slimops.backend_info()['cpu_isa']} kernels; weights {weight_bytes / 2**20:.1f} MiB")
    print(f"{'width':>6} {'set_width':>10} {'first fwd':>10} {'steady fwd':>11} "
          f"{'first use':>10} {'state KiB':>10}")
    widths = slimops.model_widths(model)
    with torch.inference_mode():
        for w in widths:
            set_us = _median_ms(lambda: slimops.set_width(model, w)) * 1e3
            slimops.set_width(model, w)
            model(x)  # warm the kernels / allocator at this width

            def cold():
                for unit in units:
                    unit._eval_plans.clear()
                model(x)

            first = _median_ms(cold, 11)
            steady = _median_ms(lambda: model(x), 11)
            state = sum(p.scale.numel() * p.scale.element_size() * 2
                        for unit in units for p in unit._eval_plans.values())
            print(f"{w:>6g} {set_us:>8.1f}us {first:>8.2f}ms {steady:>9.2f}ms "
                  f"{first - steady:>8.2f}ms {state / 1024:>10.1f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
