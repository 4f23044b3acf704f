"""How much of the class does a quarter of an image show? Whole images against quarters.

    python benchmarks/classes_quarters.py DATA [--epochs 8] [--seed 0]

DATA: a classification store of square 2D images (`hpc-multires data synth classes`).
A single-process probe, two arms one after the other, with the network and schedule of
configs/images-classify.toml (convnet2d width 1, depth 4, batch norm, gap head, fc 64;
Adam at 5e-3, half an epoch of warm-up, cosine):

1. whole: trained and validated on whole images (global batch 32);
2. quarters: the same network trained on the four 2x2 quarters of every training image,
   each labelled with its image's class (batch 128 quarters: the pixels of 32 images, so a
   step costs about what a whole-image step does), and validated three ways: each quarter
   alone (what a local model on one sub-image knows), the mean of the four quarters'
   softmax probabilities (averaging), and the majority vote of their predictions (ties to
   the most probable of the tied classes).

The last quarter of the store is the validation set, as data.val_fraction = 0.25 takes
it. Prints the accuracy after every epoch, then each arm's final accuracy and its ratio
to the whole-image one, all measured in this one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine

from hpc_multires.data.store import SampleStore
from hpc_multires.models import build_model
from hpc_multires.plan.config import ModelConfig, TrainConfig
from hpc_multires.train.optim import learning_rate, set_learning_rate

MODEL = ModelConfig(name="convnet2d", width=1.0, depth=4, norm="batch", head="gap",
                    fc_sizes=(64,))
SCHEDULE = TrainConfig(optimizer="adam", lr=5e-3, warmup_epochs=0.5, schedule="cosine")
BATCH = 32


def quarters(x: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) -> (4, B, C, S/2, S/2): top left, top right, bottom left, bottom right."""
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    return torch.stack([x[..., a:a + h, b:b + w] for a in (0, h) for b in (0, w)])


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    out = torch.cat([model(b) for b in x.split(128)])
    model.train()
    return out


def vote(q_logits: torch.Tensor) -> torch.Tensor:
    """Majority vote of the quarters' predictions (4, B, K) -> (B,), ties to the tied class
    with the largest summed probability."""
    k = q_logits.shape[-1]
    votes = F.one_hot(q_logits.argmax(-1), k).sum(0).float()  # (B, K)
    tie_break = q_logits.softmax(-1).sum(0) / 10  # < 1: orders only the tied classes
    return (votes + tie_break).argmax(-1)


def train(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor,
          epochs: int, seed: int, on_quarters: bool, classes: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = build_model(MODEL, tuple(x.shape[1:]), classes)
    opt = torch.optim.Adam(model.parameters(), lr=SCHEDULE.lr)
    gen = torch.Generator().manual_seed(seed + 100)
    schedule = dataclasses.replace(SCHEDULE, epochs=epochs)
    if on_quarters:
        x = quarters(x).flatten(0, 1)  # (4B, C, S/2, S/2), quarter q of image i at q * B + i
        y = y.repeat(4)
    batch = BATCH * 4 if on_quarters else BATCH
    spe = len(x) // batch
    clock, result = 0.0, {}
    for epoch in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(x), generator=gen)
        for b in range(spe):
            idx = perm[b * batch:(b + 1) * batch]
            set_learning_rate(opt, learning_rate(schedule, epoch * spe + b, epochs * spe, spe))
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        clock += time.perf_counter() - t0
        if on_quarters:
            q = logits_of(model, quarters(xv).flatten(0, 1)).unflatten(0, (4, len(xv)))
            result = {"quarter alone": float((q.argmax(-1) == yv).float().mean()),
                      "averaging": float((q.softmax(-1).mean(0).argmax(-1) == yv)
                                         .float().mean()),
                      "voting": float((vote(q) == yv).float().mean())}
        else:
            result = {"whole": float((logits_of(model, xv).argmax(-1) == yv).float().mean())}
        print(f"{'quarters' if on_quarters else 'whole':<8} epoch {epoch + 1:>2} "
              f"{clock:7.1f} s  " + "  ".join(f"{k} {v:.3f}" for k, v in result.items()),
              flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", help="a classification store (data synth classes)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine())
    store = SampleStore(args.data)
    classes = store.schema.num_classes
    if not classes or len(store.sample_shape) != 3 or min(store.sample_shape[1:]) < 16:
        sys.exit(f"{args.data}: need a classification store of 2D images of 16x16 or more "
                 "(hpc-multires data synth classes)")
    xs = np.stack([store.read(i)[0] for i in range(len(store))])
    x = torch.as_tensor(xs)
    y = torch.as_tensor(np.rint(store.labels()[:, 0]).astype(np.int64))
    n_train = len(x) - round(len(x) * 0.25)
    data = (x[:n_train], y[:n_train], x[n_train:], y[n_train:])
    whole = train(*data, args.epochs, args.seed, False, classes)["whole"]
    parts = train(*data, args.epochs, args.seed, True, classes)
    print(f"\n{len(x)} images of {tuple(x.shape[1:])}, {classes} classes, chance "
          f"{1 / classes:.3f}, {n_train} for training, {args.epochs} epochs, seed {args.seed}")
    print(f"{'whole image':<14} {whole:.3f}")
    for name, acc in parts.items():
        print(f"{name:<14} {acc:.3f}  ({acc / whole:.2f} of the whole image's)")


if __name__ == "__main__":
    main()
