"""Gradient allreduce bandwidth: DDP (gloo), Horovod and raw MPI, side by side.

    python benchmarks/allreduce.py [--ranks 2,4] [--iters 10]

For two gradient-sized buffers, the demo model's (about 0.4 MB) and the full-size
CosmoFlow model's (8.9 M parameters, about 36 MB), each rank count runs under mpiexec:
  - raw MPI: mpi4py `Allreduce` of one float32 buffer of that many bytes (in place);
  - DDP: torch.distributed gloo allreduce of the same bytes cut into DDP's 25 MB
    gradient buckets, as DistributedDataParallel reduces them;
  - Horovod: `hvd.grouped_allreduce` of the model's actual gradient tensors (average),
    as DistributedOptimizer submits them (fused into its 64 MB buffer).
Bandwidth is algorithmic: bytes reduced per second per rank. Ratios are to raw MPI
measured in the same job. Horovod's row is omitted when it is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, ROOT, env, machine

BUCKET_BYTES = 25 * 2**20


def model_gradients(name: str) -> list[int]:
    """Element counts of each parameter's gradient."""
    from hpc_multires.models.cosmoflow import CosmoFlow

    if name == "demo":  # configs/cosmoflow-demo.toml at 32^3 x 4
        m = CosmoFlow(in_channels=4, spatial=(32, 32, 32), num_outputs=4, width=0.25, depth=4,
                      head="gap")
    else:  # the full-size model: 128^3 x 4, width 1, depth 5, flatten head
        m = CosmoFlow(in_channels=4, spatial=(128, 128, 128), num_outputs=4)
    return [p.numel() for p in m.parameters()]


def worker(iters: int) -> None:
    import datetime

    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    addr = comm.bcast(("127.0.0.1", 29500 + os.getpid() % 1000) if rank == 0 else None)
    dist.init_process_group("gloo", init_method=f"tcp://{addr[0]}:{addr[1]}", rank=rank,
                            world_size=size, timeout=datetime.timedelta(seconds=300))
    try:
        import horovod.torch as hvd

        hvd.init()
    except ImportError:
        hvd = None

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        fn()  # warm-up
        comm.Barrier()
        best = float("inf")
        for _ in range(iters):
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return comm.allreduce(best, op=MPI.MAX)  # the slowest rank sets the pace

    results = {}
    for name in ("demo", "full"):
        counts = model_gradients(name)
        total = sum(counts)
        nbytes = 4 * total
        flat = torch.ones(total, dtype=torch.float32)
        mpi_buf = flat.numpy()
        per_bucket = BUCKET_BYTES // 4
        buckets = [flat[i:i + per_bucket] for i in range(0, total, per_bucket)]
        grads = [torch.ones(c) for c in counts]
        row = {"bytes": nbytes,
               "mpi": timed(lambda buf=mpi_buf: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)),
               "ddp": timed(lambda bs=buckets: [dist.all_reduce(b) for b in bs])}
        if hvd is not None:
            row["horovod"] = timed(lambda gs=grads: hvd.grouped_allreduce(gs, op=hvd.Average))
        results[name] = row
    if rank == 0:
        print(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.iters)
        return
    print(f"machine: {machine()}")
    print(f"{'ranks':>5} {'buffer':>14} {'backend':>8} {'time ms':>9} {'MB/s':>9} {'vs MPI':>7}")
    for n in [int(r) for r in args.ranks.split(",")]:
        out = subprocess.run(
            [str(BIN / "mpiexec"), "-n", str(n), sys.executable, "-m", "mpi4py", __file__,
             "--worker", "--iters", str(args.iters)],
            capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env())
        if out.returncode != 0:
            sys.exit(out.stderr)
        results = json.loads(out.stdout.strip().splitlines()[-1])
        for name, row in results.items():
            label = f"{name} {row['bytes'] / 1e6:.1f} MB"  # MB = 1e6 bytes, as in MB/s
            for backend in ("mpi", "ddp", "horovod"):
                if backend not in row:
                    continue
                t = row[backend]
                print(f"{n:5d} {label:>14} {backend:>8} {1e3 * t:9.2f} "
                      f"{row['bytes'] / t / 1e6:9.1f} {row['mpi'] / t:7.2f}")


if __name__ == "__main__":
    main()
