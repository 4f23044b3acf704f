"""How far MGE's gradient is from the full fine-level gradient, per unit of work, against a
plain fine-level batch: the question whether MGE can reach an accuracy with less work.

    python benchmarks/mge_variance.py --data DIR [--model STAGE_DIR/final.pt ...] \
        [--task denoise] [--samples 512] [--draws 40]

DIR is an image store with pyramid levels 1 and 2 (`hpc-multires data pyramid DIR --levels
2`). For each model (the untrained residual UNet of configs/images-*.toml, and any
checkpoints given) and each estimator, the script draws `--draws` gradient estimates on
`--samples` training images, each with its corruption fixed (seed 0, the restricted
corruption at every level, which MGE's unbiasedness needs), and prints the mean squared
distance to the full level-0 gradient over those images, relative to its squared norm
(`rel. var`), and that times the estimator's work per step in level-0 samples (`work x
var`): an estimator's variance falls like 1/batch, so `work x var` is what it costs to
reach a given gradient accuracy. Below the plain batch's, MGE reaches it with less work;
above, it cannot be faster than the baseline per unit of work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine

from hpc_multires.data.corrupt import Corruption, corrupt
from hpc_multires.methods.mge import level_batch_sizes, mge_loss, mge_step_cost
from hpc_multires.models.unet import UNet

# (name, level batch sizes finest first); a single size is the plain level-0 batch.
ESTIMATORS = [("plain 16", [16]), ("mge 8,16,32", level_batch_sizes(8, 3)),
              ("plain 8", [8]), ("mge 4,8,16", level_batch_sizes(4, 3)),
              ("mge 8,8,8", level_batch_sizes(8, 3, 1.0))]


def load(data: Path, n: int, spec: Corruption) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(corrupted, clean) tensors (n, C, H/2^l, W/2^l) at levels 0, 1, 2."""
    out = []
    for level in range(3):
        key = "x" if level == 0 else f"levels/{level}/x"
        parts = []
        for shard in sorted(data.glob("shard-*.h5")):
            with h5py.File(shard, "r", locking=False) as f:
                parts.append(np.asarray(f[key], dtype=np.float32))
            if sum(len(p) for p in parts) >= n:
                break
        clean = np.concatenate(parts)[:n]
        noisy = corrupt(clean, np.arange(n), seed=0, level=level, spec=spec)
        out.append((torch.from_numpy(noisy), torch.from_numpy(clean)))
    return out


def flat_grad(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return torch.cat([g.reshape(-1) for g in grads])


def estimate(model: torch.nn.Module, levels: list[tuple[torch.Tensor, torch.Tensor]],
             sizes: list[int], rng: np.random.Generator) -> torch.Tensor:
    """One gradient estimate: each level's own draw of its size, at that level."""
    n = len(levels[0][0])
    batches = []
    for k, size in enumerate(sizes):
        idx = torch.from_numpy(rng.choice(n, size=size, replace=False))
        batches.append((levels[k][0][idx], levels[k][1][idx]))
    return flat_grad(model, mge_loss(model, F.mse_loss, batches).loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, action="append", default=[],
                    help="a checkpoint (a stage's final.pt) of configs/images-*.toml's UNet")
    ap.add_argument("--no-untrained", action="store_true",
                    help="only the checkpoints given, not the untrained network")
    ap.add_argument("--task", default="denoise")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--draws", type=int, default=40)
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = Corruption(task=args.task, t_range=(0.5, 1.0))
    levels = load(args.data, args.samples, spec)
    print(f"machine: {machine()}")
    print(f"task {args.task}, {args.samples} images of {tuple(levels[0][0].shape[1:])}, "
          f"{args.draws} draws per estimator")
    models: list[tuple[str, dict | None]] = [] if args.no_untrained else [("untrained", None)]
    models += [(str(p), torch.load(p, map_location="cpu", weights_only=False)["model"])
               for p in args.model]
    for name, state in models:
        model = UNet(in_channels=levels[0][0].shape[1], base_channels=16,
                     multipliers=(1, 2, 4), residual=True)
        if state is not None:
            model.load_state_dict(state)
        full = torch.zeros(sum(p.numel() for p in model.parameters()))
        x0, y0 = levels[0]
        for start in range(0, len(x0), 64):  # the mean loss's gradient, in chunks
            chunk = slice(start, start + 64)
            n = len(x0[chunk])
            full += flat_grad(model, F.mse_loss(model(x0[chunk]), y0[chunk])) * n / len(x0)
        norm2 = float(full.square().sum())
        print(f"\nmodel {name}: |full gradient|^2 = {norm2:.3e}")
        print(f"{'estimator':<14} {'work':>6} {'rel. var':>9} {'work x var':>10} "
              f"{'rel. bias':>9}")
        for label, sizes in ESTIMATORS:
            rng = np.random.default_rng(1)
            draws = torch.stack([estimate(model, levels, sizes, rng)
                                 for _ in range(args.draws)])
            var = float((draws - full).square().sum(dim=1).mean()) / norm2
            bias = float((draws.mean(dim=0) - full).square().sum()) / norm2
            work = mge_step_cost(sizes, dims=2)
            print(f"{label:<14} {work:6.2f} {var:9.3f} {work * var:10.2f} {bias:9.3f}",
                  flush=True)
    print("(rel. var: mean |g - full|^2 / |full|^2; rel. bias: |mean g - full|^2 / "
          "|full|^2, which holds var / draws of noise)")


if __name__ == "__main__":
    main()
