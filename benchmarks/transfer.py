"""How much of what a coarse stage learned survives the move to level 0, and where it is lost.

    python benchmarks/transfer.py RUN_DIR STAGE [--samples 512]

Takes a finished stage of a run (its final weights, trained at pyramid level L >= 1) and
evaluates on the run's validation samples, in one invocation:

1. the stage's model on level L: what it learned;
2. the model moved to level 0 by `prolong`, on level-0 inputs: where a fine stage fused
   from it starts (its `start_val_mae`);
3. the same level-0 network on the level-L inputs repeated 2^L times along each axis.
   These samples hold no detail that the coarse model did not see, so what is lost here
   is lost by the network's change of grid, not by the data.

Then 2 and 3 again for level-0 networks that keep more of the coarse network's geometry:

- every convolution kernel 2^L times longer per axis, its taps resampled from the coarse
  kernel (what `prolong` does for kernels of a multiple size), so each kernel covers the
  stretch of the sample it covered on level L;
- the same, with every max-pooling window also 2^L times wider at an unchanged stride
  (overlapping windows), so that each pooled value looks at the stretch it looked at on
  level L while the maps stay 2^L times longer.

Lower is better everywhere; the mean predictor is printed for scale.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine

from hpc_multires.driver.run import open_splits
from hpc_multires.driver.run_dir import RunDir
from hpc_multires.errors import ConfigError
from hpc_multires.methods.fusion import prolong
from hpc_multires.models import build_model
from hpc_multires.plan.config import ModelConfig
from hpc_multires.plan.load import load_config


def load(split, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(split.store.read(int(i)) for i in split.indices[:limit]), strict=True)
    return torch.as_tensor(np.stack(xs)), torch.as_tensor(np.stack(ys))


def mae(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(torch.cat([model(xb) - yb for xb, yb in
                                zip(x.split(64), y.split(64), strict=True)]).abs().mean())


def repeat_axes(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, *S) -> (B, C, *(S * factor)), each value repeated along every spatial axis."""
    for axis in range(2, x.dim()):
        x = x.repeat_interleave(factor, dim=axis)
    return x


def widen_pools(model: nn.Module, factor: int) -> None:
    """Every max-pooling of window p becomes window p * factor at stride p, padded at the
    end with -inf so that the map keeps its length."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.MaxPool1d | nn.MaxPool3d):
            continue
        p = int(module.kernel_size if isinstance(module.kernel_size, int)
                else module.kernel_size[0])
        dims = 1 if isinstance(module, nn.MaxPool1d) else 3
        pad = (0, p * factor - p) * dims
        pad_layer = nn.ConstantPad1d(pad, float("-inf")) if dims == 1 else \
            nn.ConstantPad3d(pad, float("-inf"))
        pool = nn.MaxPool1d(p * factor, p) if dims == 1 else \
            nn.MaxPool3d(p * factor, p, ceil_mode=True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                nn.Sequential(pad_layer, pool))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("stage")
    ap.add_argument("--samples", type=int, default=512, help="validation samples used")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    run = RunDir(args.run_dir)
    cfg = load_config(run.config)
    final = run.final(args.stage)
    if not final.exists():
        sys.exit(f"no {final}: the stage has not finished (or the name is wrong; the run's "
                 f"stages are {run.stage_names()})")
    saved = torch.load(final, map_location="cpu", weights_only=False)
    level = int(saved["level"])
    if level < 1:
        sys.exit(f"stage {args.stage!r} trained at level 0; pick a coarse stage")
    factor = 2**level
    _, val_coarse = open_splits(cfg.data, level)
    _, val_fine = open_splits(cfg.data, 0)
    xc, yc = load(val_coarse, args.samples)
    x0, y0 = load(val_fine, args.samples)
    outputs = yc.shape[1]
    coarse = build_model(cfg.model, tuple(xc.shape[1:]), outputs, level)
    coarse.load_state_dict(saved["model"])

    print(machine())
    print(f"run {args.run_dir}, stage {args.stage} (level {level}), {len(x0)} validation "
          f"samples; mean predictor {float((y0 - y0.mean(0)).abs().mean()):.4f}")
    print(f"{'network':58} {'val MAE':>8}")
    print(f"{'coarse model on level ' + str(level):58} {mae(coarse, xc, yc):8.4f}")

    def variant(label: str, model_cfg: ModelConfig,
                change: Callable[[nn.Module], None] | None = None) -> None:
        try:
            fine = build_model(model_cfg, tuple(x0.shape[1:]), outputs, 0)
        except ConfigError as e:
            print(f"{label:58} n/a ({e})")
            return
        if change is not None:
            change(fine)
        shapes: dict[str, tuple[int, ...]] = coarse.dense_input_shapes()
        fine_shapes: dict[str, tuple[int, ...]] = fine.dense_input_shapes()
        dense = {n: (s, fine_shapes[n][1:]) for n, s in shapes.items() if n in fine_shapes}
        # As the driver's fused start does (Runner.fused_start): the level factor, and the
        # sampled form for a level-consistent network.
        try:
            start = prolong(saved["model"], fine.state_dict(), dense,
                            sampled=getattr(fine, "level_factor", 1) > 1, factor=factor)
        except ValueError as e:
            print(f"{label:58} n/a ({e})")
            return
        fine.load_state_dict(start)
        print(f"{label + ', level-0 inputs':58} {mae(fine, x0, y0):8.4f}")
        print(f"{label + f', level-{level} inputs repeated x{factor}':58} "
              f"{mae(fine, repeat_axes(xc, factor), yc):8.4f}")

    m = cfg.model
    longer = dataclasses.replace(m, kernel_size=m.kernel_size * factor)
    variant("prolong", m)
    variant(f"kernels x{factor}", longer)
    variant(f"kernels x{factor}, pool windows x{factor}", longer,
            lambda model: widen_pools(model, factor))


if __name__ == "__main__":
    main()
