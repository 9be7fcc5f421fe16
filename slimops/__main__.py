"""Command line: ``python -m slimops {demo,profile,info}``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch


def _environment() -> str:
    from slimops import backend_info

    info = backend_info()
    malloc = {k: os.environ[k] for k in os.environ if k.startswith("MALLOC_")} or "glibc defaults"
    return (f"backend: cpu={info['cpu']} ({', '.join(info['native_dtypes'])}), "
            f"torch {info['torch']}, threads={torch.get_num_threads()}, allocator: {malloc}")


def _demo(args: argparse.Namespace) -> int:
    from slimops.models import slim_cnn
    from slimops.profile import format_table, profile

    torch.manual_seed(0)
    model = slim_cnn(widths=args.widths)
    print("slimops demo: one slimmable CNN, one set of shared weights, "
          f"{len(model.classifier.widths)} widths")
    print(_environment())
    print(f"input: {tuple(args.input_size)} (latency: median of {args.repeats} runs, eval)\n")
    rows = profile(model, args.input_size, latency=True, repeats=args.repeats)
    print(format_table(rows))
    return 0


def _profile(args: argparse.Namespace) -> int:
    from slimops.models import MODELS
    from slimops.models.paper import PAPER_MACS, PAPER_MODELS
    from slimops.profile import format_table, human, profile

    names = args.models or list(PAPER_MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"unknown model {unknown[0]!r}; available: {', '.join(sorted(MODELS))}",
              file=sys.stderr)
        return 2
    if args.latency:
        print(_environment())
    for name in names:
        model = MODELS[name]()
        rows = profile(model, args.input_size, latency=args.latency, repeats=args.repeats)
        extra = {}
        paper = PAPER_MACS.get(name)
        if paper and tuple(args.input_size[1:]) == (3, 224, 224):
            extra["paper MACs"] = [human(paper[r.width]) if r.width in paper else "-"
                                   for r in rows]
        print(f"\n{name}, input {tuple(args.input_size)}")
        print(format_table(rows, extra))
    return 0


def _info(args: argparse.Namespace) -> int:
    from slimops import backend_info

    print(json.dumps(backend_info(), indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="slimops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="switch a small slimmable CNN through its widths")
    demo.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    demo.add_argument("--input-size", type=int, nargs=4, default=[1, 3, 64, 64],
                      metavar=("N", "C", "H", "W"))
    demo.add_argument("--repeats", type=int, default=20)
    demo.set_defaults(func=_demo)

    prof = sub.add_parser(
        "profile", help="per-width parameters, MACs (and latency) of models (default: the paper's four)"
    )
    prof.add_argument("models", nargs="*", metavar="MODEL")
    prof.add_argument("--input-size", type=int, nargs=4, default=[1, 3, 224, 224],
                      metavar=("N", "C", "H", "W"))
    prof.add_argument("--latency", action="store_true")
    prof.add_argument("--repeats", type=int, default=10)
    prof.set_defaults(func=_profile)

    info = sub.add_parser("info", help="which backends are active")
    info.set_defaults(func=_info)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
