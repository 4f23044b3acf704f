"""Throughput of the parallel pyramid build at 1, 2 and 4 ranks.

    python benchmarks/pyramid.py [--ranks 1,2,4] [--samples 256] [--size 64] [--levels 2]

Each rank count builds levels 1..K on its own fresh copy of the same CosmoFlow-style
dataset (`hpc-multires data pyramid DIR --levels K` under mpiexec, 1 rank included), timed
from launch to exit, so each time includes the interpreter's and MPI's start-up, which the
plain copy does not. Printed per rank count: seconds, MiB/s and samples/s of level-0 input,
the speedup over 1 rank, and the ratio to a plain copy of the same shard files: the build
copies each shard before adding levels to the copy (so that an interrupted build leaves the
original intact), so one copy of the data is its I/O floor. On a machine with fewer cores than
ranks the ranks share cores; read the speedup beside the core count printed first.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cli, machine


def copy_seconds(src: Path, dst: Path) -> float:
    """Wall time of a plain copy of every shard file, page cache warm."""
    start = time.perf_counter()
    shutil.copytree(src, dst)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--levels", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2,
                    help="best of this many builds per rank count")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="hpcmr-bench-pyramid-"))
    try:
        data = tmp / "data"
        cli(["data", "synth", "cosmoflow", "--out", str(data), "--samples", str(args.samples),
             "--size", str(args.size)], ranks=min(2, max(ranks)))
        x_mib = args.samples * 4 * args.size**3 * 2 / 2**20  # uint16 counts, 4 channels
        print(f"machine: {machine()}; {psutil.cpu_count(logical=False)} physical cores")
        print(f"data: {args.samples} samples of 4 x {args.size}^3 uint16 ({x_mib:.0f} MiB of /x), "
              f"{len(list(data.glob('shard-*.h5')))} shards; levels 1..{args.levels}; "
              f"best of {args.repeats}")
        copy_s = min(copy_seconds(data, tmp / f"copy-{i}") for i in range(args.repeats))
        for i in range(args.repeats):
            shutil.rmtree(tmp / f"copy-{i}")
        print(f"plain copy of the shards: {copy_s:.2f} s ({x_mib / copy_s:.0f} MiB/s)")
        print(f"{'ranks':>5} {'seconds':>8} {'MiB/s':>7} {'samples/s':>9} {'speedup':>7} "
              f"{'copy / build':>12}")
        base = 0.0
        for n in ranks:
            best = float("inf")
            for i in range(args.repeats):
                target = tmp / f"build-{n}-{i}"
                shutil.copytree(data, target)
                start = time.perf_counter()
                cli(["data", "pyramid", str(target), "--levels", str(args.levels)], ranks=n,
                    mpiexec=True)  # 1 rank too: every rank count pays the same launch
                best = min(best, time.perf_counter() - start)
                shutil.rmtree(target)
            base = base or best
            print(f"{n:5d} {best:8.2f} {x_mib / best:7.0f} {args.samples / best:9.1f} "
                  f"{base / best:7.2f} {copy_s / best:12.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
