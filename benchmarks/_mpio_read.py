"""The ranks of `io.py --mpio`, under the MPI that HDF5 was built with (`make parallel-hdf5`):
each rank reads its share of one large array's sub-volumes (hyperslabs), three ways, the
files opened beforehand:

- collective: h5py's mpio driver, every read inside `dataset.collective` (MPI-IO
  collective reads, two-phase I/O where the MPI library chooses it);
- mpio independent: the mpio driver, independent reads;
- own handle: each rank's own serial (sec2) handle, as the store reads without MPI-IO.

Rank 0 prints one line per way: ranks, way, MiB/s of the array read by all ranks together
(the slowest rank's time), and a checksum of what was read, equal for the three ways.
Imports only numpy, h5py and mpi4py: the MPI-IO venv has no torch.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import h5py
import numpy as np
from mpi4py import MPI


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", required=True)
    ap.add_argument("--subvolume", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    s = args.subvolume
    with h5py.File(args.file, "r", locking=False) as f:
        n, c, *extent = f["x"].shape
        dtype = f["x"].dtype
    cells = [(v, *(k * s for k in place)) for v in range(n)
             for place in np.ndindex(*(e // s for e in extent))]
    mine = cells[comm.rank::comm.size]
    assert len(cells) % comm.size == 0, "every rank reads as many sub-volumes"
    buffer = np.empty((c, *(s,) * len(extent)), dtype)
    mpio = h5py.File(args.file, "r", driver="mpio", comm=comm)
    own = h5py.File(args.file, "r", locking=False)

    checksum = [False]  # the untimed last pass sums what it read

    def reads(ds: h5py.Dataset) -> float:
        total = 0.0
        for v, *start in mine:
            ds.read_direct(buffer, np.s_[(v, slice(None), *(slice(a, a + s) for a in start))])
            if checksum[0]:
                total += float(buffer.sum(dtype=np.float64))
        return total

    def collective() -> float:
        x = mpio["x"]
        with x.collective:
            return reads(x)

    ways: list[tuple[str, Callable[[], float]]] = [
        ("collective", collective), ("mpio independent", lambda: reads(mpio["x"])),
        ("own handle", lambda: reads(own["x"]))]
    best = {name: float("inf") for name, _ in ways}
    for _ in range(args.repeats):
        for name, fn in ways:
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            elapsed = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            best[name] = min(best[name], elapsed)
    checksum[0] = True
    sums = {name: comm.allreduce(fn()) for name, fn in ways}
    mpio.close()
    own.close()
    nbytes = len(cells) * buffer.nbytes
    if comm.rank == 0:
        for name, _ in ways:
            print(f"{comm.size} {name} {nbytes / best[name] / 2**20:.1f} {sums[name]:.6e}",
                  flush=True)


if __name__ == "__main__":
    main()
