"""Does a cheap stage at full resolution, on sub-volumes, shorten the level-0 break-through?

    python benchmarks/crop_probe.py DATA [--crop 16] [--crop-epochs 12] [--seed 0]

A single-process probe on a CosmoFlow-style dataset, two arms one after the other:

1. baseline: the shipped network (configs/cosmoflow-baseline.toml: width 0.25, depth 4,
   gap head, Adam at 2e-3, one warm-up epoch, cosine over 12 epochs, batch 16) on whole
   level-0 samples;
2. crop start: the same network first trained on random CROP^3 sub-volumes of the level-0
   samples (one per sample per epoch, each at its own place, as a stage with `crop` takes
   them; its own warm-up and cosine over `--crop-epochs`), then on whole samples over the
   last `--fine-epochs` of the baseline's schedule with no warm-up, as the shipped MRT and
   MRMF fine stages run (`schedule_epochs`, `schedule_offset`).

The schedule and the tiles are the trainer's own (`learning_rate`, `tiles`).

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
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine

from hpc_multires.data.crop import region, tiles, window_starts
from hpc_multires.data.store import SampleStore
from hpc_multires.models import build_model
from hpc_multires.plan.config import ModelConfig, TrainConfig
from hpc_multires.train.optim import learning_rate, set_learning_rate

BATCH = 16
# The shipped schedule (configs/cosmoflow-baseline.toml), computed as the trainer does.
SCHEDULE = TrainConfig(optimizer="adam", lr=2e-3, warmup_epochs=1, schedule="cosine")


def val_mae(model: nn.Module, x: torch.Tensor, y: torch.Tensor, crop: int | None) -> list[float]:
    model.eval()
    with torch.no_grad():
        if crop is None:
            out = torch.cat([model(b) for b in x.split(64)])
        else:  # as a stage on windows validates: the mean over the tiles of each sample
            out = torch.cat([torch.stack([model(t) for t in tiles(b, crop)]).mean(0)
                             for b in x.split(64)])
    model.train()
    return (out - y).abs().mean(0).tolist()


def run(model: nn.Module, opt: torch.optim.Optimizer, data: tuple[torch.Tensor, ...],
        epochs: range, schedule: TrainConfig, crop: int | None, gen: torch.Generator,
        rng: np.random.Generator, label: str, clock: list[float]) -> list[tuple[float, float]]:
    """Train over `epochs` of `schedule`; (cumulative s, val MAE) after each epoch."""
    xt, yt, xv, yv = data
    spe = len(xt) // BATCH
    curve = []
    for epoch in epochs:
        t0 = time.perf_counter()
        perm = torch.randperm(len(xt), generator=gen)
        for b in range(spe):
            idx = perm[b * BATCH:(b + 1) * BATCH]
            x = xt[idx]
            if crop is not None:  # each sample's own window, as the reader takes them
                starts = window_starts(x.shape[2:], crop, len(x), rng)
                x = torch.stack([x[(i, slice(None), *region(s, crop))]
                                 for i, s in enumerate(starts)])
            set_learning_rate(opt, learning_rate(schedule, epoch * spe + b,
                                                 schedule.epochs * spe, spe))
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
        return (model, torch.optim.Adam(model.parameters(), lr=SCHEDULE.lr),
                torch.Generator().manual_seed(args.seed + 100))

    rng = np.random.default_rng(args.seed + 200)  # window places
    base_schedule = dataclasses.replace(SCHEDULE, epochs=args.epochs)
    model, opt, gen = fresh()
    base = run(model, opt, data, range(args.epochs), base_schedule, None, gen, rng,
               "baseline", [0.0])
    target = base[-1][1] * 1.02

    model, opt, gen = fresh()
    clock = [0.0]
    run(model, opt, data, range(args.crop_epochs),
        dataclasses.replace(SCHEDULE, epochs=args.crop_epochs), args.crop, gen, rng,
        f"crop {args.crop}", clock)
    crop_s = clock[0]
    # The fine stage: its own optimizer, on the baseline's last epochs with no warm-up (as
    # the shipped fine stages' schedule_epochs / schedule_offset give).
    opt = torch.optim.Adam(model.parameters(), lr=SCHEDULE.lr)
    fine = run(model, opt, data, range(args.epochs - args.fine_epochs, args.epochs),
               dataclasses.replace(base_schedule, warmup_epochs=0), None, gen, rng, "fine",
               clock)

    t_base, t_crop = first_below(base, target), first_below(fine, target)
    print(f"\ntarget (baseline final + 2%): {target:.4f}")
    print(f"baseline      final {base[-1][1]:.4f}  to target {t_base:.1f} s")
    print(f"crop start    final {fine[-1][1]:.4f}  crop stage {crop_s:.1f} s  to target "
          + (f"{t_crop:.1f} s" if t_crop is not None else "not reached"))
    print("speedup crop/baseline = "
          + (f"{t_base / t_crop:.2f}" if t_crop is not None and t_base else "not reached"))


if __name__ == "__main__":
    main()
