"""Training samples/s at 1, 2 and 4 ranks, the weak-scaling efficiency, and the data wait.

    python benchmarks/throughput.py [--ranks 1,2,4] [--local-batch 8] [--size 32]

Weak scaling: each rank keeps the same per-rank batch, so the global batch grows with
the ranks. Efficiency(n) = throughput(n) / (n * throughput(1)). Throughput is taken
from the training's own metrics (step records after the first epoch's warm-up steps).
On a machine with fewer cores than ranks, the ranks share cores and the efficiency
says so: read it beside the core count printed first.

"wait": the fraction of the steps' time the training process spent waiting for its
batches (the step records' `data_wait_s`, the mean over ranks, over the same steps as
the throughput); "+start": the same over whole epochs after the first, each epoch's
first step included, whose batches the freshly started reader processes read while the
training waits (acceptance: wait at most 2%).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, cli, machine

from hpc_multires.driver.run_dir import RunDir
from hpc_multires.train.metrics import read_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--local-batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--workers", type=int, default=1, help="data.num_workers")
    ap.add_argument("--prefetch", type=int, default=4, help="data.prefetch")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="hpcmr-bench-"))
    try:
        data = args.data or tmp / "data"
        if args.data is None:
            cli(["data", "synth", "cosmoflow", "--out", str(data), "--samples", str(args.samples),
                 "--size", str(args.size)], ranks=2)
        print(f"machine: {machine()}; {psutil.cpu_count(logical=False)} physical cores")
        print(f"model: configs/cosmoflow-demo.toml, {args.size}^3 x 4, per-rank batch "
              f"{args.local_batch}, {args.epochs} epochs, throughput excludes epoch 1; "
              f"data: {args.workers} reader process(es) per rank, prefetch {args.prefetch}")
        print(f"{'ranks':>5} {'global batch':>12} {'samples/s':>10} {'per rank':>9} "
              f"{'efficiency':>10} {'wait':>6} {'+start':>6}")
        base = 0.0
        for n in ranks:
            run = tmp / f"run-{n}"
            cli(["train", str(ROOT / "configs" / "cosmoflow-demo.toml"), "--run-dir", str(run),
                 "--set", f"data.path={data}",
                 "--set", f"train.global_batch={args.local_batch * n}",
                 "--set", f"train.epochs={args.epochs}", "--set", "log.every_steps=1",
                 "--set", "train.warmup_epochs=0",
                 "--set", f"data.num_workers={args.workers}",
                 "--set", f"data.prefetch={args.prefetch}"], ranks=n)
            recs = read_metrics(RunDir(run).metrics)
            steps = [r for r in recs if r["kind"] == "step" and r["epoch"] >= 1]
            ends = {r["epoch"]: r["wall_s"] for r in recs if r["kind"] == "epoch"}
            # samples/s between the first and last step record of the later epochs
            # (evaluation at the epoch boundary excluded).
            per_epoch: dict[int, list[dict]] = {}
            for r in steps:
                per_epoch.setdefault(r["epoch"], []).append(r)
            samples = sum((v[-1]["step"] - v[0]["step"]) * args.local_batch * n
                          for v in per_epoch.values())
            seconds = sum(v[-1]["wall_s"] - v[0]["wall_s"] for v in per_epoch.values())
            if samples == 0 or seconds <= 0:
                sys.exit(f"{n} rank(s): no two step records in an epoch after the first (epochs "
                         f"{args.epochs}, {len(steps)} step records there); use --epochs 2 or "
                         "more and enough --samples for two steps per epoch")
            sps = samples / seconds
            base = base or sps / n
            # The wait over the same steps (each record's covers the steps since the one
            # before), and over whole epochs: from the previous epoch's record (its end,
            # validation included) to the epoch's last step.
            wait = sum(r["data_wait_s"] for v in per_epoch.values() for r in v[1:]) / seconds
            whole = sum(v[-1]["wall_s"] - ends[e] for e, v in per_epoch.items())
            wait_start = sum(r["data_wait_s"] for r in steps) / whole
            print(f"{n:5d} {args.local_batch * n:12d} {sps:10.1f} {sps / n:9.1f} "
                  f"{sps / (n * base):10.2f} {100 * wait:5.1f}% {100 * wait_start:5.1f}%")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the generated data and the runs


if __name__ == "__main__":
    main()
