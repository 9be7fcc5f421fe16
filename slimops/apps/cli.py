"""Command line: ``python -m slimops {demo,train,eval,export,profile,info,bench,pick-width}``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from typing import Callable, List, Optional

import torch

from slimops._files import atomic_write_text, remove_stale_temporaries
from slimops._version import __version__
from slimops.profile import environment
from slimops.apps.imagefolder import (
    RECIPES,
    ImageFolder,
    TrainTransform,
    ValTransform,
    make_scheduler,
)
from slimops.apps.runs import (
    ACCURACY_KEYS,
    RunError,
    best_score,
    load_run,
    metrics_csv,
    plot_accuracy_vs_macs,
    run_meta,
)


# --- argument types: every value is checked while parsing (argparse then prints a one-line
# error and exits 2), before a command creates a folder, a file or a model.


def _int_at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse


def _float_in(positive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'> 0' if positive else '>= 0'}, got {text}")
        return v
    parse.__name__ = "positive number" if positive else "non-negative number"
    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)
_positive_float, _non_negative_float = _float_in(True), _float_in(False)


def _width_value(text: str) -> float:
    v = _positive_float(text)
    if v > 1e6:
        raise argparse.ArgumentTypeError(f"a width is a fraction of the full model, got {text}")
    return v


def _ema_decay(text: str) -> float:
    v = _non_negative_float(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"an EMA decay is in [0, 1), got {text}")
    return v


def _device_arg(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available")
    return text


def _new_file(text: str) -> str:
    """A path a command will write: its folder must exist now (not after minutes of work)."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text}: the folder {folder} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    return text


def _demo(args: argparse.Namespace) -> int:
    from slimops.apps.demo import run_demo

    run_demo(epochs=args.epochs, seed=args.seed, widths=args.widths,
             extra_blocks=args.extra_blocks, batch_size=args.batch_size, lr=args.lr,
             repeats=args.repeats, quick=args.quick, reference_epochs=args.reference_epochs,
             workers=args.workers)
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
        print(environment())
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
    from slimops.ops import backend_info

    print(json.dumps(backend_info(), indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    """Under torchrun (WORLD_SIZE > 1 in the environment): one process per rank, gloo on
    CPU, NCCL on CUDA (device cuda:LOCAL_RANK); rank 0 prints and writes the files."""
    import contextlib

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _train_run(args, rank=0, world=1)
    if not dist.is_available():
        print("train: WORLD_SIZE > 1 but this torch has no torch.distributed", file=sys.stderr)
        return 2
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    quiet = open(os.devnull, "w") if rank != 0 else None
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            code = _train_run(args, rank=rank, world=dist.get_world_size())
        # Every rank finishes before any tears down: a rank that destroyed its process group
        # while rank 0 was still writing its files aborted at exit ("terminate called without
        # an active exception", SIGABRT) in ~1 of 4 two-process CPU runs.
        dist.barrier()
        return code
    finally:
        if quiet is not None:
            quiet.close()
        dist.destroy_process_group()


def _train_run(args: argparse.Namespace, rank: int, world: int) -> int:
    from slimops.models import MODELS
    from slimops.train import Trainer, param_groups, wrap_distributed

    if args.model not in RECIPES:
        print(f"unknown model {args.model!r}; available: {', '.join(sorted(RECIPES))}",
              file=sys.stderr)
        return 2
    if args.resume is not None and args.overwrite:
        print("train: --resume and --overwrite exclude each other", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = dict(RECIPES[args.model])
    for key in ("epochs", "batch_size", "lr", "weight_decay", "image_size"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    if args.widths:
        recipe["widths"] = tuple(args.widths)
    torch.manual_seed(args.seed)  # model init; data order and augmentation: see below

    train_dir, val_dir = os.path.join(args.data, "train"), os.path.join(args.data, "val")
    try:
        train_set = ImageFolder(train_dir, TrainTransform(recipe["image_size"],
                                                          recipe["crop_scale"]))
        val_set = (ImageFolder(val_dir, ValTransform(recipe["image_size"]), train_set.classes)
                   if os.path.isdir(val_dir) else None)
    except (FileNotFoundError, ValueError) as e:
        print(f"train: {e}", file=sys.stderr)
        return 2

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # --batch-size is the global batch: each of the `world` processes takes its share.
    per_rank = max(1, recipe["batch_size"] // world)
    loader_kwargs = dict(batch_size=per_rank, num_workers=args.workers,
                         pin_memory=device.type == "cuda")
    # Shuffling and the workers' seeds come from this generator, re-seeded from (seed,
    # epoch) before every epoch, so a resumed run sees the batches an uninterrupted one
    # would (in-process augmentation draws from torch's global RNG, which the checkpoint
    # restores; workers are not persistent, so their seeds follow the generator too).
    # Distributed: each rank its shard (DistributedSampler: same size on every rank, a new
    # shuffle per epoch through the Trainer's set_epoch; the val shards are padded with a
    # few repeated images when the val set does not divide evenly).
    generator = torch.Generator()
    samplers = (None, None)
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler

        samplers = (DistributedSampler(train_set, shuffle=True, seed=args.seed),
                    DistributedSampler(val_set, shuffle=False) if val_set is not None else None)
    train_loader = torch.utils.data.DataLoader(train_set, shuffle=samplers[0] is None,
                                               sampler=samplers[0], generator=generator,
                                               drop_last=False, **loader_kwargs)
    val_loader = (torch.utils.data.DataLoader(val_set, shuffle=False, sampler=samplers[1],
                                              **loader_kwargs)
                  if val_set is not None else None)

    model = MODELS[args.model](widths=recipe["widths"], num_classes=len(train_set.classes))
    model.to(device)
    if world > 1:
        model = wrap_distributed(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(param_groups(model, recipe["weight_decay"]), lr=recipe["lr"],
                                momentum=0.9, nesterov=True)
    scheduler, interval = make_scheduler(optimizer, recipe, recipe["epochs"], len(train_loader))
    amp_dtype, scaler = None, None
    if args.amp is not None:
        kind = args.amp
        if kind == "auto":
            kind = "fp16" if device.type == "cuda" and not torch.cuda.is_bf16_supported() \
                else "bf16"
        if kind == "fp16" and device.type != "cuda":
            print("train: --amp fp16 needs a CUDA device (on CPU: --amp bf16)", file=sys.stderr)
            return 2
        amp_dtype = torch.float16 if kind == "fp16" else torch.bfloat16
        if kind == "fp16":
            scaler = torch.amp.GradScaler("cuda")
    trainer = Trainer(model, optimizer, scheduler=scheduler, scheduler_interval=interval,
                      autocast_dtype=amp_dtype, scaler=scaler,
                      sandwich=args.sandwich,
                      inplace_distillation=args.inplace_distillation, seed=args.seed,
                      device=device, progress=not args.no_progress, ema_decay=args.ema)
    # What eval and export need to rebuild the model from a checkpoint alone.
    trainer.meta = run_meta(args.model, recipe["widths"], train_set.classes,
                            recipe["image_size"])

    out = args.out or os.path.join("runs", args.model)
    latest, best = os.path.join(out, "latest.pt"), os.path.join(out, "best.pt")
    if os.path.exists(latest) and args.resume is None and not args.overwrite:
        print(f"train: {latest} exists (a previous run's checkpoint); continue it with "
              f"--resume, or start over with --overwrite", file=sys.stderr)
        return 2
    if args.resume is not None:
        path = latest if args.resume == "" else args.resume
        if not os.path.isfile(path):
            print(f"train: no checkpoint to resume at {path}", file=sys.stderr)
            return 2
        try:
            trainer.load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 (another model, widths, recipe; not a checkpoint)
            print(f"train: cannot resume from {path}: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:300] if str(e) else 'not a checkpoint'}",
                  file=sys.stderr)
            return 2
        print(f"resumed from {path} after epoch {trainer.epoch}")
    if rank == 0:  # the only writer
        os.makedirs(out, exist_ok=True)
        # Temporary files of saves that were killed (no other process writes OUT meanwhile).
        remove_stale_temporaries(latest)
        remove_stale_temporaries(best)
        atomic_write_text(os.path.join(out, "config.json"), json.dumps(
            {"model": args.model, "data": os.path.abspath(args.data),
             "classes": train_set.classes, "device": str(device), "world_size": world,
             **recipe}, indent=1, default=list))

    widths = ", ".join(f"{w:g}x" for w in trainer.widths)
    print(f"train {args.model} (widths {widths}) on {args.data}: {len(train_set.classes)} "
          f"classes, {len(train_set)} train / {len(val_set) if val_set else 0} val images, "
          f"{recipe['image_size']}px; device {device}"
          + (f"; {world} processes (DDP), batch {per_rank} each" if world > 1 else ""))
    sched = {"exp": f"x{recipe.get('gamma')} per epoch",
             "multistep": f"x{recipe.get('gamma')} at epochs {list(recipe.get('milestones', ()))}",
             "linear": "linear to 0 per step"}[recipe["schedule"]]
    print(f"SGD Nesterov 0.9, lr {recipe['lr']:g} ({sched}), weight decay "
          f"{recipe['weight_decay']:g}, batch {recipe['batch_size']}, {recipe['epochs']} epochs; "
          f"checkpoints: {latest}")
    if amp_dtype is not None:
        # Which layers autocast reaches: slimops' ops autocast on CUDA only (their CPU
        # kernels are float32/float64), so on the CPU a model built from them computes in
        # float32 whatever --amp says; say so.
        size = recipe["image_size"]  # a probe that draws from no RNG training uses
        probe = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        from slimops.width import width as width_scope

        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype), \
                width_scope(trainer.module, max(trainer.widths)):
            was = trainer.module.training
            trainer.module.eval()
            low = trainer.module(probe).dtype == amp_dtype
            trainer.module.train(was)
        print(f"mixed precision: autocast {str(amp_dtype).replace('torch.', '')} on "
              f"{device.type}{', GradScaler' if scaler is not None else ''}"
              + ("" if low else "; note: this model's output stays float32 (slimops' ops "
                 "autocast on CUDA only: here only stock layers run in reduced precision)"))
    if recipe["batch_size"] != RECIPES[args.model]["batch_size"] and args.lr is None:
        print(f"note: the recipe's lr {recipe['lr']:g} is for batch "
              f"{RECIPES[args.model]['batch_size']}; it is not rescaled (set --lr)")
    if val_set is None:
        print(f"(no {val_dir}: no validation)")

    def pct(acc) -> str:
        return " ".join(f"{_width_name(w)}:{100 * a:.2f}" for w, a in acc.items())

    # best.pt: the state with the highest mean top-1 over the widths seen so far (a resumed
    # run continues from its history's best).
    scores = [best_score(e) for e in trainer.history]
    best_so_far = max([v for v in scores if v is not None], default=None)

    def record(entry, score) -> bool:
        """Checkpoint the state that scored ``score``: latest.pt, best.pt if it beats every
        earlier state, metrics.csv from the whole history. True if it is the best."""
        nonlocal best_so_far
        trainer.save_checkpoint(latest)  # rank 0 only
        is_best = score is not None and (best_so_far is None or score > best_so_far)
        if is_best:
            trainer.save_checkpoint(best)
            best_so_far = score
        if rank == 0:
            atomic_write_text(os.path.join(out, "metrics.csv"), metrics_csv(trainer.history))
        return is_best

    while trainer.epoch < recipe["epochs"]:
        t0 = time.perf_counter()
        generator.manual_seed(args.seed * 1_000_003 + trainer.epoch)
        losses = trainer.train_epoch(train_loader)
        bad = {w: v for w, v in losses.items() if not math.isfinite(v)}
        if bad:
            # Parameters and BN statistics are non-finite now: keep the last good checkpoint.
            print(f"train: epoch {trainer.epoch}: non-finite training loss at width(s) "
                  f"{', '.join(_width_name(w) for w in bad)}; stopped without saving ({latest} "
                  f"keeps the last good epoch). Try a lower --lr.", file=sys.stderr)
            return 1
        entry = {"epoch": trainer.epoch, "train_loss": losses}
        if val_loader is not None:
            acc = trainer.evaluate(val_loader, topk=(1, 5))
            entry["val_acc"] = {w: a[1] for w, a in acc.items()}
            entry["val_top5"] = {w: a[5] for w, a in acc.items()}
            if trainer.ema is not None:
                acc = trainer.evaluate_ema(val_loader, topk=(1, 5))
                entry["ema_acc"] = {w: a[1] for w, a in acc.items()}
                entry["ema_top5"] = {w: a[5] for w, a in acc.items()}
        trainer.history.append(entry)
        is_best = record(entry, best_score(entry))
        line = (f"epoch {trainer.epoch}/{recipe['epochs']} {time.perf_counter() - t0:.1f}s "
                "loss " + " ".join(f"{_width_name(w)}:{v:.4f}" for w, v in losses.items()))
        if "val_acc" in entry:
            line += f" top-1 % {pct(entry['val_acc'])} top-5 % {pct(entry['val_top5'])}"
        if "ema_acc" in entry:
            line += f" EMA top-1 % {pct(entry['ema_acc'])}"
        print(line + (" (best)" if is_best else ""), flush=True)

    if args.calibrate_bn and trainer.history:
        # The evaluated widths' BN statistics from the training data (a cumulative average
        # over N batches instead of the momentum average training kept), then the final
        # evaluation and checkpoint.
        from slimops.train import average_buffers, calibrate_bn

        t0 = time.perf_counter()
        generator.manual_seed(args.seed * 1_000_003 + 999_983)
        calibrate_bn(trainer.model, train_loader, widths=trainer.widths,
                     num_batches=args.calibrate_bn, device=device)
        if trainer.ema is not None:
            generator.manual_seed(args.seed * 1_000_003 + 999_983)
            calibrate_bn(trainer.ema.module, train_loader, widths=trainer.widths,
                         num_batches=args.calibrate_bn, device=device)
            if trainer.world_size > 1:  # each rank calibrated the copy on its shard
                average_buffers(trainer.ema.module, trainer.model.process_group)
        entry = trainer.history[-1]
        line = (f"BN calibrated on {min(args.calibrate_bn, len(train_loader))} training "
                f"batches per width, {time.perf_counter() - t0:.1f}s")
        if val_loader is not None:
            acc = trainer.evaluate(val_loader, topk=(1, 5))
            entry["calibrated_acc"] = {w: a[1] for w, a in acc.items()}
            entry["calibrated_top5"] = {w: a[5] for w, a in acc.items()}
            line += (f": top-1 % {pct(entry['calibrated_acc'])} "
                     f"top-5 % {pct(entry['calibrated_top5'])}")
            if trainer.ema is not None:
                acc = trainer.evaluate_ema(val_loader, topk=(1, 5))
                entry["calibrated_ema_acc"] = {w: a[1] for w, a in acc.items()}
                entry["calibrated_ema_top5"] = {w: a[5] for w, a in acc.items()}
                line += f" EMA top-1 % {pct(entry['calibrated_ema_acc'])}"
        is_best = record(entry, best_score(entry) if "calibrated_acc" in entry else None)
        print(line + (" (best)" if is_best else ""), flush=True)

    if rank == 0:
        _summary(trainer, out, recipe["image_size"], args.latency_repeats)
    return 0


def _width_name(w) -> str:
    return f"{w:g}x" if isinstance(w, float) else str(w)


def _summary(trainer, out: str, image_size: int, repeats: int) -> None:
    """The final per-width table: best top-1 (and its top-5) over the epochs, parameters,
    MACs and batch-1 latency on this machine's CPU; also OUT/summary.json."""
    import copy

    from slimops.profile import profile

    best, best_ema = {}, {}
    for e in trainer.history:
        for k1, k5, _, weights in ACCURACY_KEYS:
            into = best if weights == "model" else best_ema
            for w, a in (e.get(k1) or {}).items():
                if w not in into or a > into[w][0]:
                    into[w] = (a, (e.get(k5) or {}).get(w), e["epoch"])
    model = copy.deepcopy(trainer.module).cpu().eval()
    rows = profile(model, (1, 3, image_size, image_size), widths=trainer.widths,
                   latency=repeats > 0, repeats=max(1, repeats))
    table = []
    for r in rows:
        a, a5, epoch = best.get(r.width, (None, None, None))
        table.append({"width": r.width, "best_top1": None if a is None else 100 * a,
                      "top5": None if a5 is None else 100 * a5, "epoch": epoch,
                      "params": r.params, "macs": r.macs, "latency_ms": r.latency_ms})
        if best_ema:
            table[-1]["ema_best_top1"] = 100 * best_ema[r.width][0] if r.width in best_ema \
                else None
    print(f"\nsummary (best top-1 per width over {len(trainer.history)} epoch(s); MACs and "
          f"params per image at {image_size}px"
          + (f"; latency: batch 1, {torch.get_num_threads()} thread(s), CPU, median of "
             f"{repeats}" if repeats > 0 else "") + ")")
    print(f"{'width':>7} {'top-1 %':>8} {'top-5 %':>8} {'epoch':>5} {'params':>11} "
          f"{'MACs':>13}" + (f" {'latency ms':>10}" if repeats > 0 else "")
          + (f" {'EMA top-1 %':>11}" if best_ema else ""))
    for t in table:
        print(f"{t['width']:>6g}x " + (f"{t['best_top1']:>8.2f} " if t["best_top1"] is not None
                                      else f"{'-':>8} ")
              + (f"{t['top5']:>8.2f} " if t["top5"] is not None else f"{'-':>8} ")
              + f"{t['epoch'] if t['epoch'] is not None else '-':>5} {t['params']:>11,} "
              f"{t['macs']:>13,}" + (f" {t['latency_ms']:>10.3f}" if repeats > 0 else "")
              + ((f" {t['ema_best_top1']:>11.2f}" if t.get("ema_best_top1") is not None
                  else f" {'-':>11}") if best_ema else ""))
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(
        {"image_size": image_size, "latency_threads": torch.get_num_threads(),
         "latency_repeats": repeats, "widths": table}, indent=1))
    png = os.path.join(out, "accuracy_vs_macs.png")
    if importlib.util.find_spec("matplotlib") is None:
        print("(no accuracy-vs-MACs plot: matplotlib is not installed)")
    elif plot_accuracy_vs_macs(table, png, f"{trainer.meta.get('model', '')}, "
                                            f"{image_size}px, {len(trainer.history)} epoch(s)"):
        print(f"plot: {png}")
    print(f"best checkpoint (by the mean top-1 over the widths): "
          f"{os.path.join(out, 'best.pt') if best else '- (no validation)'}; "
          f"per-epoch metrics: {os.path.join(out, 'metrics.csv')}")


def _eval_folder(data: str, classes: List[str]) -> str:
    """The class folder ``eval`` reads: ``DATA/val`` when DATA is a training data folder
    (``train/`` and ``val/``, neither a class of the checkpoint), else DATA itself."""
    val = os.path.join(data, "val")
    if os.path.isdir(val) and "val" not in classes and (
            "train" not in classes or os.path.isdir(os.path.join(data, "train"))):
        return val
    return data


def _eval(args: argparse.Namespace) -> int:
    from slimops.train import evaluate
    from slimops.width import width_range

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, meta, state = load_run(args.checkpoint, ema=args.ema)
    except RunError as e:
        print(f"eval: {e}", file=sys.stderr)
        return 2
    widths = tuple(args.widths) if args.widths else tuple(meta["widths"])
    listed, span = set(meta["widths"]), width_range(model)
    odd = [w for w in widths if w not in listed and not (span and span[0] <= w <= span[1])]
    if odd:
        print(f"eval: {meta['model']} does not run at width {odd[0]:g} (its widths: "
              f"{', '.join(f'{w:g}' for w in meta['widths'])})", file=sys.stderr)
        return 2
    folder = _eval_folder(args.data, meta["classes"])
    try:
        data = ImageFolder(folder, ValTransform(meta["image_size"]), meta["classes"])
    except (FileNotFoundError, ValueError) as e:
        print(f"eval: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    print(f"eval {args.checkpoint}{' (EMA weights)' if args.ema else ''}: {meta['model']} "
          f"after epoch {state['epoch']}, {len(data)} images of {len(meta['classes'])} "
          f"classes in {folder}, {meta['image_size']}px; device {device}")
    try:
        acc = evaluate(model, loader, widths, device, topk=(1, 5))
    except (ValueError, RuntimeError) as e:  # e.g. an uncalibrated in-between width
        print(f"eval: {str(e).splitlines()[0][:300]}", file=sys.stderr)
        return 2
    print(f"{'width':>7} {'top-1 %':>8} {'top-5 %':>8}")
    for w in sorted(acc):
        print(f"{w:>6g}x {100 * acc[w][1]:>8.2f} {100 * acc[w][5]:>8.2f}")
    if args.json:
        atomic_write_text(args.json, json.dumps(
            {"checkpoint": os.path.abspath(args.checkpoint), "data": os.path.abspath(folder),
             "images": len(data), "ema": args.ema,
             "widths": {f"{w:g}": {"top1": 100 * acc[w][1], "top5": 100 * acc[w][5]}
                        for w in sorted(acc)}}, indent=1))
    return 0


EXPORT_FORMATS = ("pt", "onnx", "torchscript")


def _export(args: argparse.Namespace) -> int:
    import warnings

    from slimops.export import export, export_onnx

    try:
        model, meta, state = load_run(args.checkpoint, ema=args.ema)
    except RunError as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    size = args.image_size or meta["image_size"]
    shape = (1, 3, size, size)
    try:
        if args.format == "onnx":
            plain = export_onnx(model, args.width, args.output, input_size=shape,
                                fold_bn=not args.no_fold_bn)
        else:
            plain = export(model, args.width, fold_bn=not args.no_fold_bn).eval()
            if args.format == "pt":
                # The whole module (stock layers, and slimops.export.ConvBNAct blocks):
                # torch.load(OUT, weights_only=False) with slimops importable.
                with open(args.output, "wb") as f:
                    torch.save(plain, f)
            else:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.jit's deprecation notes
                    traced = torch.jit.trace(plain, torch.randn(shape))
                traced.save(args.output)
    except (ValueError, TypeError) as e:  # a width the model does not run at, uncalibrated
        print(f"export: {str(e).splitlines()[0][:300]}", file=sys.stderr)
        return 2
    params = sum(p.numel() for p in plain.parameters())
    print(f"{meta['model']} at width {args.width:g}x (epoch {state['epoch']}"
          f"{', EMA weights' if args.ema else ''}) -> {args.output} ({args.format}, "
          f"{params:,} parameters, input [N, 3, {size}, {size}], {len(meta['classes'])} classes"
          f"{', BN folded' if not args.no_fold_bn else ''})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from slimops.apps.benchmark_report import bench_dir, main as bench_main

    if args.matrix:
        # bench/matrix.py: the performance matrix (its own interleaved runner, not
        # pytest-benchmark). bench/ is a folder of scripts, not a package.
        import importlib
        import sys

        folder = str(bench_dir())
        if folder not in sys.path:
            sys.path.insert(0, folder)
        matrix = importlib.import_module("matrix")
        argv = (["--quick"] if args.quick else []) + (["--busy"] if args.busy else []) + (
            ["--threads", str(args.threads)] if args.threads else []) + (
            ["--guard"] if args.guard else []) + (
            ["--cells", args.cells] if args.cells else []) + (
            ["--repeat", str(args.repeat)] if args.repeat else []) + (
            ["--emulate", args.emulate] if args.emulate else [])
        return matrix.main(argv)
    return bench_main(quick=args.quick, keyword=args.k, out_dir=args.out, json_path=args.json,
                      plot_path=args.plot, report_only=args.report, threads=args.threads,
                      with_compile=args.compile)


def _table_mismatch(table, name: str) -> Optional[str]:
    """Why a saved latency table does not describe model ``name`` (None if it may): the
    registry name the CLI recorded when it measured, else the model class and the widths
    that LatencyTable.measure recorded. A table without either (hand-made) is taken as is."""
    from slimops.models import MODELS
    from slimops.width import model_widths

    recorded = table.meta.get("model_name")
    if recorded is not None:
        return None if recorded == name else f"was measured for {recorded}, not {name}"
    cls = table.meta.get("model")
    if cls is None:
        return None
    model = MODELS[name]()
    if type(model).__name__ != cls:
        return f"was measured for a {cls} model, not {name} (a {type(model).__name__})"
    unknown = sorted(set(table.widths) - set(model_widths(model)))
    if unknown:
        return (f"has widths {', '.join(f'{w:g}' for w in unknown)} that {name} does not "
                f"run at (its widths: {', '.join(f'{w:g}' for w in model_widths(model))})")
    return None


def _pick_width(args: argparse.Namespace) -> int:
    from slimops.deploy import LatencyTable
    from slimops.models import MODELS

    if args.model not in MODELS:
        print(f"unknown model {args.model!r}; available: {', '.join(sorted(MODELS))}",
              file=sys.stderr)
        return 2
    if args.table:
        try:
            table = LatencyTable.load(args.table)
        except (OSError, ValueError) as e:
            print(f"pick-width: cannot load {args.table}: {e}", file=sys.stderr)
            return 2
        problem = _table_mismatch(table, args.model)
        if problem is not None:
            print(f"pick-width: the table {args.table} {problem}", file=sys.stderr)
            return 2
        print(f"latency table from {args.table} (not measured now)")
    else:
        print(environment())
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("pick-width: --device cuda but no CUDA device is available", file=sys.stderr)
            return 2
        model = MODELS[args.model]().to(device)
        what = "frozen TorchScript of " if args.frozen else ""
        print(f"measuring {what}{args.model} on {device}, input {tuple(args.input_size)}, "
              f"{args.repeats} runs per width ...", flush=True)
        table = LatencyTable.measure(model, tuple(args.input_size), repeats=args.repeats,
                                     frozen=args.frozen)
        table.meta["model_name"] = args.model  # what a later --table run checks
    print(table.format(args.budget_ms))
    if args.save:
        table.save(args.save)
        print(f"saved to {args.save}")
    try:
        choice = table.pick_width(args.budget_ms)
    except ValueError as e:
        print(f"pick-width: {e}", file=sys.stderr)
        return 1
    print(f"budget {args.budget_ms:g} ms -> width {choice:g}x "
          f"({table.latency(choice):.2f} ms median)")
    return 0


# Optional packages each command needs: (module, pip name, extra of pyproject.toml). Checked
# after parsing and before the command makes anything, so a missing one is a one-line error
# naming what to install (exit 2), not a traceback halfway through (issue 16).
COMMAND_NEEDS = {
    "demo": [("sklearn", "scikit-learn", "demo")],
    "train": [("PIL", "Pillow", "train")],
    "eval": [("PIL", "Pillow", "train")],
    # export_onnx's exporter (torch.onnx's default, torch.export-based) needs both
    "export --format onnx": [("onnx", "onnx", "onnx"), ("onnxscript", "onnxscript", "onnx")],
}
# Packages a command runs without, with a note of what is missing.
COMMAND_WANTS = {
    "train": [("tqdm", "tqdm", "train", "no progress bar"),
              ("matplotlib", "matplotlib", "train", "no accuracy-vs-MACs plot")],
}


def _missing_packages(command: str) -> Optional[str]:
    """The one-line error for ``command``'s missing required packages, or None; prints a note
    for each missing optional one."""
    missing = [(pip, extra) for module, pip, extra in COMMAND_NEEDS.get(command, [])
               if importlib.util.find_spec(module) is None]
    if missing:
        names = ", ".join(pip for pip, _ in missing)
        extras = ",".join(sorted({extra for _, extra in missing}))
        return (f"slimops {command}: needs {names}, which "
                f"{'is' if len(missing) == 1 else 'are'} not installed "
                f"(pip install {names}, or the package's extra: pip install 'slimops[{extras}]')")
    for module, pip, extra, without in COMMAND_WANTS.get(command, []):
        if importlib.util.find_spec(module) is None:
            print(f"slimops {command}: {pip} is not installed: {without} "
                  f"(pip install {pip}, or 'slimops[{extra}]')", file=sys.stderr)
    return None


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: one subcommand per command (tests/test_packaging.py runs
    ``slimops COMMAND --help`` of an installed wheel for each)."""
    parser = argparse.ArgumentParser(prog="slimops", description=__doc__)
    parser.add_argument("--version", action="version",
                        version=f"slimops {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="train a slimmable CNN on real digits (about a minute): per width, "
        "switchable BN vs one shared BN vs individually trained networks",
        description="Trains slim_cnn on scikit-learn's 8x8 handwritten digits with Algorithm 1 "
        "and prints, per width, the test accuracy of (a) the slimmable network (switchable "
        "BN), (b) the same trained with one BN shared by all widths, (c) one network per "
        "width trained individually, and the slimmable model's params, MACs and latency. "
        "(The per-width cost table of a randomly initialised model: "
        "python -m slimops profile slim_cnn --latency.)")
    demo.add_argument("--epochs", type=_positive_int, default=30, help="epochs of every training (30)")
    demo.add_argument("--seed", type=int, default=0,
                      help="init, shuffling (0); the train/test split is fixed")
    demo.add_argument("--widths", type=_width_value, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    demo.add_argument("--extra-blocks", type=_non_negative_int, default=4,
                      help="separable blocks added to slim_cnn's 3 (4; 0: plain slim_cnn)")
    demo.add_argument("--batch-size", type=_positive_int, default=64)
    demo.add_argument("--lr", type=_positive_float, default=0.1)
    demo.add_argument("--repeats", type=_positive_int, default=50, help="latency runs per width (50)")
    demo.add_argument("--reference-epochs", type=_non_negative_int, default=5, metavar="N",
                      help="epochs of the same training through plain PyTorch, timed beside "
                           "slimops' (5; 0: skip)")
    demo.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                      help="trainings run at once, each in its own process (2 on a machine "
                           "with 2+ cores; 1: one after the other in this process)")
    demo.add_argument("--quick", action="store_true",
                      help="1 epoch on 192 training images (a smoke test, not a result)")
    demo.set_defaults(func=_demo)

    tr = sub.add_parser(
        "train", help="train a slimmable model on an ImageFolder directory (Algorithm 1, "
        "the original recipe per model)",
        description="Algorithm 1 on DATA/train/<class>/*.jpg|png, validated per width on "
        "DATA/val/<class>/... after every epoch, with the original implementation's recipe "
        "for the model (SGD Nesterov 0.9; lr, schedule, epochs, batch size, weight decay, "
        "crop scale): " + "; ".join(
            f"{n}: lr {r['lr']:g} {r['schedule']}, {r['epochs']} epochs, batch {r['batch_size']}"
            for n, r in RECIPES.items()) + ". The trainer's full state goes to OUT/latest.pt "
        "after every epoch, and to OUT/best.pt when its mean top-1 over the widths is the "
        "best so far; OUT/metrics.csv has one row per epoch and width (loss, top-1 and top-5 "
        "in %%); a final table gives each width's best top-1, MACs and latency here.")
    tr.add_argument("--model", required=True, choices=sorted(RECIPES))
    tr.add_argument("--data", required=True, metavar="DIR",
                    help="with train/<class>/ and (optional) val/<class>/ image folders")
    tr.add_argument("--epochs", type=_positive_int, help="total epochs (default: the recipe's)")
    tr.add_argument("--batch-size", type=_positive_int, help="default: the recipe's")
    tr.add_argument("--lr", type=_positive_float, help="initial learning rate (default: the recipe's)")
    tr.add_argument("--weight-decay", type=_non_negative_float, help="default: the recipe's (1e-4)")
    tr.add_argument("--image-size", type=_positive_int, help="training crop (default: 224; slim_cnn 32)")
    tr.add_argument("--widths", type=_width_value, nargs="+", help="default: the recipe's")
    tr.add_argument("--workers", type=_non_negative_int, default=min(8, os.cpu_count() or 1),
                    help="data loading processes (default: min(8, CPUs); 0: in-process)")
    tr.add_argument("--out", metavar="DIR",
                    help="latest.pt, best.pt (by the mean top-1 over the widths), "
                    "metrics.csv, summary.json and config.json (default: runs/MODEL)")
    tr.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                    help="continue from CHECKPOINT (default: OUT/latest.pt)")
    tr.add_argument("--overwrite", action="store_true",
                    help="start a fresh run even if OUT/latest.pt exists (it is replaced "
                    "after the first epoch); without it, an existing checkpoint needs --resume")
    tr.add_argument("--device", type=_device_arg, help="default: cuda if available, else cpu")
    tr.add_argument("--seed", type=int, default=0, help="(0)")
    tr.add_argument("--inplace-distillation", action="store_true",
                    help="smaller widths learn from the largest width's prediction")
    tr.add_argument("--sandwich", type=_non_negative_int, metavar="N",
                    help="sandwich rule: per step the largest, the smallest and N random "
                    "widths between them (default: every listed width)")
    tr.add_argument("--calibrate-bn", type=_positive_int, nargs="?", const=100, metavar="N",
                    help="after training, recompute the evaluated widths' BN statistics "
                    "on N training batches each (100), then evaluate and checkpoint again")
    tr.add_argument("--ema", type=_ema_decay, metavar="DECAY",
                    help="also keep an exponential moving average of the weights and BN "
                    "statistics (e.g. 0.9999), evaluated every epoch and checkpointed "
                    "(eval/export --ema); best.pt still follows the trained weights")
    tr.add_argument("--amp", nargs="?", const="auto", choices=("auto", "bf16", "fp16"),
                    help="mixed precision training (torch.autocast; evaluation stays "
                    "float32): bf16 on CPU; on CUDA bf16 where supported, else fp16 with a "
                    "GradScaler (default with no value: auto)")
    tr.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's)")
    tr.add_argument("--latency-repeats", type=_non_negative_int, default=20, metavar="N",
                    help="batch-1 CPU latency runs per width in the final summary (20; 0: "
                    "no latency)")
    tr.add_argument("--no-progress", action="store_true", help="no per-batch progress bar")
    tr.set_defaults(func=_train)

    ev = sub.add_parser(
        "eval", help="per-width top-1 and top-5 accuracy (%%) of a train checkpoint on an "
        "image folder",
        description="Rebuilds the model of a `slimops train` checkpoint (latest.pt, best.pt; "
        "it records the model, widths, classes and image size) and evaluates every width on "
        "DIR/<class>/*.jpg|png (DIR/val/ when DIR is a train/ + val/ data folder) with the "
        "validation transform (resize to size/0.875, center crop). Exit 2 for a checkpoint "
        "or folder it cannot use.")
    ev.add_argument("checkpoint", metavar="CKPT")
    ev.add_argument("--data", required=True, metavar="DIR")
    ev.add_argument("--widths", type=_width_value, nargs="+",
                    help="default: the checkpoint's widths")
    ev.add_argument("--ema", action="store_true", help="the EMA weights (runs with --ema)")
    ev.add_argument("--batch-size", type=_positive_int, default=100)
    ev.add_argument("--workers", type=_non_negative_int, default=min(8, os.cpu_count() or 1))
    ev.add_argument("--device", type=_device_arg, help="default: cuda if available, else cpu")
    ev.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's)")
    ev.add_argument("--json", type=_new_file, metavar="PATH", help="also write the results")
    ev.set_defaults(func=_eval)

    exp = sub.add_parser(
        "export", help="one width of a train checkpoint as a plain network (pt, onnx, "
        "torchscript)",
        description="Rebuilds the model of a `slimops train` checkpoint and writes it at one "
        "width as a network of stock PyTorch layers (slimops.export: each width's BN folded "
        "into its conv unless --no-fold-bn): pt: the module, torch.save'd (torch.load(OUT, "
        "weights_only=False), slimops importable); onnx: an ONNX graph with a dynamic batch "
        "(input 'input', output 'output'; needs the onnx extra); torchscript: torch.jit.trace "
        "of the plain network (torch.jit.load, no slimops needed).")
    exp.add_argument("checkpoint", metavar="CKPT")
    exp.add_argument("--width", type=_width_value, required=True)
    exp.add_argument("--format", choices=EXPORT_FORMATS, default="pt", help="(pt)")
    exp.add_argument("-o", "--output", type=_new_file, required=True, metavar="OUT")
    exp.add_argument("--ema", action="store_true", help="the EMA weights (runs with --ema)")
    exp.add_argument("--image-size", type=_positive_int,
                     help="the traced input's side (default: the checkpoint's)")
    exp.add_argument("--no-fold-bn", action="store_true",
                     help="keep each width's BN as nn.BatchNorm2d")
    exp.set_defaults(func=_export)

    prof = sub.add_parser(
        "profile", help="per-width parameters, MACs (and latency) of models (default: the paper's four)"
    )
    prof.add_argument("models", nargs="*", metavar="MODEL")
    prof.add_argument("--input-size", type=_positive_int, nargs=4, default=[1, 3, 224, 224],
                      metavar=("N", "C", "H", "W"))
    prof.add_argument("--latency", action="store_true")
    prof.add_argument("--repeats", type=_positive_int, default=10)
    prof.set_defaults(func=_profile)

    info = sub.add_parser("info", help="which backends are active")
    info.set_defaults(func=_info)

    bench = sub.add_parser(
        "bench", help="run the benchmark suite (bench/ of a source checkout) and report it",
        description="Runs bench/ with pytest-benchmark (per layer and per model at every "
        "width: slimops, the original implementation's style, the dense network in eager "
        "PyTorch, and traced + frozen + optimized for inference; an Algorithm 1 training "
        "step with peak memory), then prints median ms per variant with slimops' ratios and "
        "plots latency against width. The full run takes several minutes on 2 cores.")
    bench.add_argument("--quick", action="store_true",
                       help="smoke run: extreme widths, batch 1, few rounds (not a result)")
    bench.add_argument("--matrix", action="store_true",
                       help="run the performance matrix instead (bench/matrix.py: training "
                       "steps and batch-1 eval, slimops vs the reference style vs dense-jit, "
                       "interleaved; ratios as a Markdown table)")
    bench.add_argument("--busy", action="store_true",
                       help="with --matrix: keep one core busy with another process")
    bench.add_argument("--cells", choices=("train", "ops", "eval", "resnet", "sweep", "all"),
                       help="with --matrix: which cells (default all; resnet: S-ResNet-50 at "
                       "224, eval b1 per width and a batch-8 training step, ~1 min more; "
                       "sweep: 40 random conv layer geometries, not part of all)")
    bench.add_argument("--guard", action="store_true",
                       help="with --matrix: exit 1 if slimops is slower than the reference "
                       "style in any cell")
    bench.add_argument("--repeat", type=_positive_int, metavar="N",
                       help="with --matrix: N passes over the cells; medians, each cell's "
                       "ratio range, SLOWER judged by the median ratio")
    bench.add_argument("--emulate", choices=("avx2",),
                       help="with --matrix: run every library in the process at this "
                       "instruction set (slimops' kernels, oneDNN, MKL, ATen: what a machine "
                       "without AVX-512 gives both sides); SLIMOPS_CPU_ISA caps slimops only")
    bench.add_argument("-k", metavar="EXPR", help="pytest -k expression selecting benchmarks")
    bench.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's)")
    bench.add_argument("--compile", action="store_true",
                       help="also torch.compile (inductor, freezing) the dense networks "
                       "per model (slow to compile: minutes more)")
    bench.add_argument("--out", default=os.path.join("runs", "bench"), metavar="DIR",
                       help="where the JSON and PNG go (runs/bench)")
    bench.add_argument("--json", metavar="PATH", help="the JSON file (default: OUT/bench-<time>.json)")
    bench.add_argument("--plot", metavar="PATH", help="the PNG (default: the JSON's name, .png)")
    bench.add_argument("--report", metavar="JSON", nargs="+",
                       help="no run: report saved pytest-benchmark JSON files (several "
                       "runs of the same code: the least contended measurement of each)")
    bench.set_defaults(func=_bench)

    pick = sub.add_parser(
        "pick-width", help="measure a model's latency per width here (or load a saved "
        "table) and pick the widest width within a latency budget",
        description="Times MODEL at each of its widths on this machine (eval, inference mode, "
        "median of --repeats runs after 3 warm-up runs, random weights: latency does not "
        "depend on them) and prints the widest width whose median latency is at most "
        "--budget-ms. Exit code 1 if no width fits, 2 for an unknown model or a broken table.")
    pick.add_argument("model", metavar="MODEL")
    pick.add_argument("--budget-ms", type=_positive_float, required=True, help="latency budget (ms)")
    pick.add_argument("--input-size", type=_positive_int, nargs=4, default=[1, 3, 224, 224],
                      metavar=("N", "C", "H", "W"))
    pick.add_argument("--repeats", type=_positive_int, default=20, help="timed runs per width (20)")
    pick.add_argument("--table", metavar="JSON",
                      help="load a table saved with --save instead of measuring")
    pick.add_argument("--save", metavar="JSON", type=_new_file, help="save the table as JSON")
    pick.add_argument("--device", type=_device_arg, default="cpu",
                      help="where to measure: cpu (default) or cuda (synchronised timings)")
    pick.add_argument("--frozen", action="store_true",
                      help="time the frozen TorchScript deployment (slimops.export."
                      "torchscript_widths(..., freeze=True), the fastest CPU inference) "
                      "instead of the eager model: pick from what will run")
    pick.set_defaults(func=_pick_width)
    return parser


def command_names() -> List[str]:
    """The commands of ``slimops``, in the order ``--help`` lists them."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command
    if command == "export" and args.format != "pt":
        command = f"export --format {args.format}"
    error = _missing_packages(command)
    if error is not None:
        print(error, file=sys.stderr)
        return 2
    if args.command == "bench":  # a source checkout's bench/ folder, never installed
        from slimops.apps.benchmark_report import bench_dir

        try:
            bench_dir()
        except FileNotFoundError as e:
            print(f"slimops bench: {e}", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
