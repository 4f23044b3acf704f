"""Gradient allreduce bandwidth: the mpi backend, DDP (gloo), Horovod and raw MPI, side by side.

    python benchmarks/allreduce.py [--ranks 2,4] [--iters 20]

For two gradient-sized buffers, the demo model's (about 0.4 MB) and the full-size
CosmoFlow model's (8.9 M parameters, about 36 MB), each rank count runs under mpiexec:
  - raw MPI: mpi4py `Allreduce` of one float32 buffer of that many bytes (in place);
  - mpi backend: the `comm.backend = "mpi"` reducer (`comm/mpi_allreduce.py`) on the
    model's parameters: `zero_grad` (the gradients are views of its buckets), each hook
    as backward calls it (complete buckets started), then `wait` (the last bucket; every
    `.grad` the mean): all the reduction a training step pays, none of it hidden behind
    backward;
  - DDP: torch.distributed gloo allreduce of the same bytes cut into DDP's 25 MB
    gradient buckets, as DistributedDataParallel reduces them;
  - Horovod: `hvd.grouped_allreduce` of the model's actual gradient tensors (average),
    as DistributedOptimizer submits them (fused into its 64 MB buffer).
Bandwidth is algorithmic: bytes reduced per second per rank. Ratios are raw MPI's time
over the backend's, measured in the same job (1.0: as fast as raw MPI). Horovod's row is
omitted when it is not installed. The last line is the mpi backend's lowest ratio.
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
NAMES = {"mpi": "raw MPI", "backend": "mpi", "ddp": "ddp", "horovod": "horovod"}


def model(name: str):  # type: ignore[no-untyped-def]
    from hpc_multires.models.cosmoflow import CosmoFlow

    if name == "demo":  # configs/cosmoflow-demo.toml at 32^3 x 4
        m = CosmoFlow(in_channels=4, spatial=(32, 32, 32), num_outputs=4, width=0.25, depth=4,
                      head="gap")
    else:  # the full-size model: 128^3 x 4, width 1, depth 5, flatten head
        m = CosmoFlow(in_channels=4, spatial=(128, 128, 128), num_outputs=4)
    return m


def model_gradients(name: str) -> list[int]:
    """Element counts of each parameter's gradient."""
    return [p.numel() for p in model(name).parameters()]


def worker(iters: int) -> None:
    import datetime

    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    from hpc_multires.comm.mpi_allreduce import GradientReducer

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

    def timed(fns: dict) -> dict[str, float]:  # type: ignore[type-arg]
        """Best seconds of each of `fns`, the slowest rank's, rounds interleaved: on a
        loaded machine each side meets the same moments."""
        best = dict.fromkeys(fns, float("inf"))
        for _ in range(iters + 1):  # the first round warms up
            for key, fn in fns.items():
                comm.Barrier()
                t0 = time.perf_counter()
                fn()
                best[key] = min(best[key], time.perf_counter() - t0)
        return {k: comm.allreduce(v, op=MPI.MAX) for k, v in best.items()}

    results = {}
    for name in ("demo", "full"):
        net = model(name)
        counts = [p.numel() for p in net.parameters()]
        total = sum(counts)
        nbytes = 4 * total
        flat = torch.ones(total, dtype=torch.float32)
        mpi_buf = flat.numpy()
        per_bucket = BUCKET_BYTES // 4
        buckets = [flat[i:i + per_bucket] for i in range(0, total, per_bucket)]
        grads = [torch.ones(c) for c in counts]
        params = list(net.parameters())
        reducer = GradientReducer(params, comm.Dup())

        def backend(r=reducer) -> None:  # type: ignore[no-untyped-def]
            r.zero_grad()  # as the training step does, before backward
            for p in r.hooked:  # backward's hooks, last layers first
                r.ready(p)
            r.wait()

        fns = {"mpi": lambda buf=mpi_buf: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
               "backend": backend,
               "ddp": lambda bs=buckets: [dist.all_reduce(b) for b in bs]}
        if hvd is not None:
            fns["horovod"] = lambda gs=grads: hvd.grouped_allreduce(gs, op=hvd.Average)
        row = {"bytes": nbytes, **timed(fns)}
        results[name] = row
    if rank == 0:
        print(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.iters)
        return
    print(f"machine: {machine()}")
    print(f"{'ranks':>5} {'buffer':>14} {'backend':>8} {'time ms':>9} {'MB/s':>9} {'vs MPI':>7}")
    ratios = []
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
            for backend in ("mpi", "backend", "ddp", "horovod"):
                if backend not in row:
                    continue
                t = row[backend]
                print(f"{n:5d} {label:>14} {NAMES[backend]:>8} {1e3 * t:9.2f} "
                      f"{row['bytes'] / t / 1e6:9.1f} {row['mpi'] / t:7.2f}")
            ratios.append(row["mpi"] / row["backend"])
    print(f"mpi backend / raw MPI: min {min(ratios):.2f}")


if __name__ == "__main__":
    main()
