"""Does a cheap stage at full resolution, on sub-volumes, shorten the level-0 break-through?

    python benchmarks/crop_probe.py DATA [--crop 16] [--crop-epochs 12] [--seed 0]

A single-process probe on a CosmoFlow-style dataset, two arms one after the other:

1. baseline: the shipped network (configs/cosmoflow-baseline.toml: width 0.25, depth 4,
   gap head, Adam at 2e-3, one warm-up epoch, cosine over 12 epochs, batch 16) on whole
   level-0 samples;
2. crop start: the same network first trained on random CROP^3 sub-volumes of the level-0
   samples (one per sample per epoch, its own warm-up and cosine over `--crop-epochs`),
   then on whole samples over the last `--fine-epochs` of the baseline's schedule, as the
   shipped MRT and MRMF fine stages run.

A crop keeps the grid-scale texture that pyramid levels average away, at about the cost
per sample of level 1 (16^3 of 32^3), but sees a smaller box. The gap head takes both
sizes, so no fusion is needed between the two. During the crop stage the validation MAE is
the mean prediction over the 2^3 disjoint tiles of each validation sample; on whole
samples it is the plain one. Prints per epoch the cumulative training time, the validation
MAE and its per-label parts, then each arm's time to the target (the baseline's final MAE
+ 2%) and the ratio.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine

from hpc_multires.data.store import SampleStore
from hpc_multires.models import build_model
from hpc_multires.plan.config import ModelConfig

BATCH, LR = 16, 2e-3


def lr_at(step: int, steps_per_epoch: int, epochs: int, warmup: bool) -> float:
    if warmup and step < steps_per_epoch:
        return LR * (step + 1) / steps_per_epoch
    start = steps_per_epoch if warmup else 0
    return LR * 0.5 * (1 + math.cos(math.pi * (step - start)
                                    / max(1, steps_per_epoch * epochs - start)))


def val_mae(model: nn.Module, x: torch.Tensor, y: torch.Tensor, crop: int | None) -> list[float]:
    model.eval()
    with torch.no_grad():
        if crop is None:
            out = torch.cat([model(b) for b in x.split(64)])
        else:  # mean over the disjoint tiles of each sample
            n = x.shape[-1] // crop
            tiles = [x[:, :, a * crop:(a + 1) * crop, b * crop:(b + 1) * crop,
                       c * crop:(c + 1) * crop]
                     for a in range(n) for b in range(n) for c in range(n)]
            out = torch.stack([torch.cat([model(b) for b in t.split(64)]) for t in tiles]).mean(0)
    model.train()
    return (out - y).abs().mean(0).tolist()


def run(model: nn.Module, opt: torch.optim.Optimizer, data: tuple[torch.Tensor, ...],
        epochs: range, schedule_epochs: int, warmup: bool, crop: int | None,
        gen: torch.Generator, label: str, clock: list[float]) -> list[tuple[float, float]]:
    """Train over `epochs` of a `schedule_epochs` schedule; (cumulative s, val MAE) each epoch."""
    xt, yt, xv, yv = data
    spe = len(xt) // BATCH
    curve = []
    for epoch in epochs:
        t0 = time.perf_counter()
        perm = torch.randperm(len(xt), generator=gen)
        for b in range(spe):
            idx = perm[b * BATCH:(b + 1) * BATCH]
            x = xt[idx]
            if crop is not None:
                o = torch.randint(0, x.shape[-1] - crop + 1, (3,), generator=gen).tolist()
                x = x[:, :, o[0]:o[0] + crop, o[1]:o[1] + crop, o[2]:o[2] + crop]
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * spe + b, spe, schedule_epochs, warmup)
            loss = nn.functional.mse_loss(model(x), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        clock[0] += time.perf_counter() - t0
        parts = val_mae(model, xv, yv, crop)
        mae = sum(parts) / len(parts)
        curve.append((clock[0], mae))
        print(f"{label:<10} epoch {epoch + 1:>2}  {clock[0]:7.1f} s  val MAE {mae:.4f}  ("
              + " ".join(f"{p:.3f}" for p in parts) + ")", flush=True)
    return curve


def first_below(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, m in curve if m <= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", help="a CosmoFlow-style dataset (level 0 is used)")
    ap.add_argument("--crop", type=int, default=16, help="sub-volume edge in voxels")
    ap.add_argument("--crop-epochs", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=12, help="the baseline's schedule")
    ap.add_argument("--fine-epochs", type=int, default=8,
                    help="whole-sample epochs after the crop stage (the schedule's tail)")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine())

    store = SampleStore(args.data, level=0)
    n_val = round(len(store) * 0.125)
    xs, ys = zip(*(store.read(i) for i in range(len(store))), strict=True)
    x, y = torch.as_tensor(np.stack(xs)), torch.as_tensor(np.stack(ys))
    n_train = len(x) - n_val
    data = (x[:n_train], y[:n_train], x[n_train:], y[n_train:])
    if x.ndim != 5 or args.crop > x.shape[-1]:
        sys.exit(f"need 3D samples of at least {args.crop}^3; {args.data} holds "
                 f"{tuple(x.shape[1:])}")
    cfg = ModelConfig(name="cosmoflow", width=0.25, depth=4, head="gap", fc_sizes=(128, 64))

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
        torch.manual_seed(args.seed)
        model = build_model(cfg, tuple(x.shape[1:]), y.shape[1])
        return (model, torch.optim.Adam(model.parameters(), lr=LR),
                torch.Generator().manual_seed(args.seed + 100))

    model, opt, gen = fresh()
    base = run(model, opt, data, range(args.epochs), args.epochs, True, None, gen,
               "baseline", [0.0])
    target = base[-1][1] * 1.02

    model, opt, gen = fresh()
    clock = [0.0]
    run(model, opt, data, range(args.crop_epochs), args.crop_epochs, True, args.crop, gen,
        f"crop {args.crop}", clock)
    crop_s = clock[0]
    opt = torch.optim.Adam(model.parameters(), lr=LR)  # the fine stage's own optimizer
    fine = run(model, opt, data, range(args.epochs - args.fine_epochs, args.epochs),
               args.epochs, False, None, gen, "fine", clock)

    t_base, t_crop = first_below(base, target), first_below(fine, target)
    print(f"\ntarget (baseline final + 2%): {target:.4f}")
    print(f"baseline      final {base[-1][1]:.4f}  to target {t_base:.1f} s")
    print(f"crop start    final {fine[-1][1]:.4f}  crop stage {crop_s:.1f} s  to target "
          + (f"{t_crop:.1f} s" if t_crop is not None else "not reached"))
    print("speedup crop/baseline = "
          + (f"{t_base / t_crop:.2f}" if t_crop is not None and t_base else "not reached"))


if __name__ == "__main__":
    main()
