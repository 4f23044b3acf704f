"""Where a training step's time goes, per pyramid level and rank count, and which parts of
it are fixed per step (do not shrink with the level's input).

    python benchmarks/step_cost.py [--ranks 1,2,4] [--levels 0,1,2] [--backends ddp,mpi]

The CosmoFlow demo model (configs/cosmoflow-demo.toml: width 0.25, depth 4, gap head) at
global batch 32 on a generated 32^3, 1-channel dataset with a pyramid (`data synth
cosmoflow --size 32 --channels 1`, `data pyramid`), trained by `hpc-multires train` under
mpiexec (OMP_NUM_THREADS=1) with `log.step_parts = true`: each step record then carries the
mean milliseconds per step of each part of the step since the previous record (batch
fetch, host-to-device, forward, backward, allreduce, optimizer, stop vote, logging,
other; `hpc_multires/train/step_parts.py`). The figures are the medians over the step
records after the first epoch (its first steps start the reader processes).

For each rank count and backend, the table gives each level's step time and parts, its
steps per epoch, and its epoch cost (median step x steps per epoch) against level 0's;
a part is called fixed where the coarsest level's is at least half of level 0's (ideal:
1/8 per level in 3D). Every case is run `--repeats` times, the repeats of all cases
interleaved (a loaded machine then slows each alike), and the medians taken.

The last line: the largest rank count, the last backend of --backends:
    epoch cost vs level 0: level 1 = 1/X, level 2 = 1/Y
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, cli, machine

from hpc_multires.driver.run_dir import RunDir
from hpc_multires.train.metrics import read_metrics
from hpc_multires.train.step_parts import PARTS

GLOBAL_BATCH = 32


def train(data: Path, run: Path, ranks: int, level: int, backend: str, epochs: int
          ) -> tuple[dict[str, float], int]:
    """One run; returns the median ms per step of each part (and "step", their sum) over
    the step records after the first epoch, and the steps per epoch."""
    cli(["train", str(ROOT / "configs" / "cosmoflow-demo.toml"), "--run-dir", str(run),
         "--set", f"data.path={data}", "--set", f"data.level={level}",
         "--set", f"train.global_batch={GLOBAL_BATCH}", "--set", f"train.epochs={epochs}",
         "--set", "train.warmup_epochs=0", "--set", f"comm.backend={backend}",
         "--set", "log.step_parts=true"], ranks=ranks, mpiexec=True)
    records = read_metrics(RunDir(run).metrics)
    start = next(r for r in records if r["kind"] == "start")
    steps = [r["parts_ms"] for r in records if r["kind"] == "step" and r["epoch"] >= 1]
    if not steps:
        sys.exit(f"{run}: no step records after the first epoch; use --epochs 2 or more")
    parts = {p: statistics.median(s[p] for s in steps) for p in PARTS}
    parts["step"] = statistics.median(sum(s.values()) for s in steps)
    shutil.rmtree(run, ignore_errors=True)
    return parts, int(start["steps_per_epoch"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ranks", default="1,2,4", help="rank counts (default 1,2,4)")
    ap.add_argument("--levels", default="0,1,2", help="pyramid levels (default 0,1,2)")
    ap.add_argument("--backends", default="ddp,mpi",
                    help="gradient backends, compared side by side (default ddp,mpi)")
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=2,
                    help="epochs per run; the first is not counted (default 2)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each case, interleaved; medians taken (default 1)")
    ap.add_argument("--data", type=Path, help="a 32^3 dataset with its pyramid (default: "
                    "generated, 1 channel)")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    levels = sorted(int(v) for v in args.levels.split(","))
    backends = args.backends.split(",")
    if levels[0] != 0:
        sys.exit("--levels must include 0: costs are given against level 0")
    print(f"machine: {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="hpcmr-step-cost-"))
    try:
        data = args.data or tmp / "data"
        if args.data is None:
            cli(["data", "synth", "cosmoflow", "--out", str(data), "--samples",
                 str(args.samples), "--size", "32", "--channels", "1"])
            if levels[-1] > 0:
                cli(["data", "pyramid", str(data), "--levels", str(levels[-1])])
        print(f"model: configs/cosmoflow-demo.toml, global batch {GLOBAL_BATCH}, "
              f"{args.epochs} epochs per run (the first not counted), {args.repeats} "
              "run(s) per case interleaved; ms per step, medians")
        cases = [(n, b, level) for n in ranks for b in backends for level in levels]
        runs: dict[tuple[int, str, int], list[dict[str, float]]] = {c: [] for c in cases}
        steps_per_epoch: dict[int, int] = {}
        for repeat in range(args.repeats):
            for n, b, level in cases:
                parts, spe = train(data, tmp / f"run-{n}-{b}-{level}-{repeat}", n, level, b,
                                   args.epochs)
                runs[(n, b, level)].append(parts)
                steps_per_epoch[level] = spe
                print(f"  run {repeat + 1}: {n} rank(s), {b}, level {level}: step "
                      f"{parts['step']:.1f} ms", file=sys.stderr, flush=True)
        shown = [p for p in PARTS if p != "h2d"]  # h2d: no copy on a CPU
        print(f"{'ranks':>5} {'backend':>7} {'level':>5} {'step':>7} "
              + " ".join(f"{p:>9}" for p in shown)
              + f" {'steps/ep':>8} {'epoch s':>8} {'vs L0':>7}")
        last = ""
        for n in ranks:
            for b in backends:
                med = {level: {k: statistics.median(r[k] for r in runs[(n, b, level)])
                               for k in [*PARTS, "step"]} for level in levels}
                epoch = {level: med[level]["step"] * steps_per_epoch[level] / 1e3
                         for level in levels}
                for level in levels:
                    m = med[level]
                    print(f"{n:5d} {b:>7} {level:5d} {m['step']:7.1f} "
                          + " ".join(f"{m[p]:9.2f}" for p in shown)
                          + f" {steps_per_epoch[level]:8d} {epoch[level]:8.2f} "
                          f"1/{epoch[0] / epoch[level]:<5.1f}")
                coarse = levels[-1]
                ideal = 2.0 ** (-3 * coarse)  # a level-k step's share of level 0's work
                fixed = {p: med[coarse][p] - ideal * med[0][p] for p in shown
                         if med[coarse][p] >= max(1.0, 4 * ideal * med[0][p])}
                print(f"      fixed per step (level {coarse}: >= 1 ms and >= 4x its share "
                      f"of level 0's), ms over that share: "
                      f"{', '.join(f'{p} {v:.1f}' for p, v in fixed.items()) or 'none'}; "
                      f"level {coarse} step {med[coarse]['step']:.1f} ms against "
                      f"{ideal * med[0]['step']:.1f} ms ideal")
                last = "epoch cost vs level 0: " + ", ".join(
                    f"level {level} = 1/{epoch[0] / epoch[level]:.1f}" for level in levels[1:])
                print(f"      ranks {n}, {b}: {last}")
        print(last)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
