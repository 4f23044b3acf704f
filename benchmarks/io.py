"""The batch read path beside a raw read of the same files, and beside the read path as it
was (commit f117df6), measured in one run.

    python benchmarks/io.py [--data DIR] [--samples 24] [--size 128] [--chunk 32]
    python benchmarks/io.py --mpio [--size 256]      # after `make parallel-hdf5`

Data: CosmoFlow samples of 4 x SIZE^3 uint16 (log1p counts), generated unless --data
names a store; the same samples are also written in blocks of CHUNK^3 per channel
(`--chunk`). The page cache is warmed first, so this measures CPU work per byte, not the
disk; each figure is the best of --repeats rounds, every case once per round. Rows:

- raw read: the shard files read in file order with `pread` (the system call of the
  direct path), a sample's bytes at a time, into a preallocated buffer of a batch's size;
  and the same for the bytes of each sample's chunk, at their offsets (at 128^3 twice as
  fast here, likely because copies whose source and destination share their offset in a
  4 KiB page are slower). The faster of the two is the ceiling that "vs raw" divides by;
- read path: `read_batch(..., normalise=False)`, the stored values of shuffled batches
  into one preallocated batch buffer: through direct chunk reads (unverified) and through HDF5 with
  its Fletcher-32 check (verified), for one sample per chunk and for blocks;
- + transform: the same, with the float conversion, log1p and normalisation;
- before: `SampleStore.read` as it was, one sample at a time, then stacked;
- pipeline: the loader with one reader process, batches to the training process (in
  shared-memory slots, `data/slots.py`), today and before; "stored values only" is what
  the reader delivers when the transform runs on the device (`data.transform_on`).

The last two lines are `read path / raw read` (unverified, one sample per chunk) and the
pipeline's samples/s per reader process against the path before.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _before_read import BeforeBatchReader, read_sample
from _common import ROOT, best_seconds, cli, env, machine

from hpc_multires.data.batch import read_batch
from hpc_multires.data.crop import region, window_starts
from hpc_multires.data.loader import iterate_batches, read_ahead
from hpc_multires.data.slots import read_in_slots
from hpc_multires.data.store import SampleStore


def rechunk(src: Path, dst: Path, chunk: int) -> None:
    """A copy of the store `src` with /x in blocks of `chunk` points per axis per channel."""
    dst.mkdir(parents=True)
    for shard in sorted(src.glob("shard-*.h5")):
        shutil.copyfile(shard, dst / shard.name)
        with h5py.File(dst / shard.name, "r+") as f:
            x = f["x"][...]
            del f["x"]
            f.create_dataset("x", data=x, chunks=(1, 1, *(chunk,) * (x.ndim - 2)),
                             fletcher32=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, help="existing store (default: generate one)")
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--chunk", type=int, help="block points per axis (default: size // 4)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many passes")
    ap.add_argument("--epoch-batches", type=int, default=64,
                    help="batches per pass of the pipeline (the samples again as needed)")
    ap.add_argument("--window", type=int, help="window points per axis (default: size // 2)")
    ap.add_argument("--mpio", action="store_true",
                    help="instead: collective MPI-IO reads against independent ones at 1, 2 "
                         "and 4 ranks (needs `make parallel-hdf5`)")
    ap.add_argument("--mpio-python", type=Path, default=ROOT / ".venv-mpio" / "bin" / "python")
    ap.add_argument("--mpiexec", default="/usr/bin/mpiexec.mpich",
                    help="the launcher of the MPI that HDF5 was built with")
    args = ap.parse_args()
    if args.mpio:
        mpio_main(args)
        return

    tmp = tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent)
    data = args.data
    if data is None:
        data = Path(tmp.name) / "bench"
        cli(["data", "synth", "cosmoflow", "--out", str(data), "--samples", str(args.samples),
             "--size", str(args.size), "--samples-per-shard", "8"])
    store = SampleStore(data)
    spatial = store.sample_shape[1:]
    chunk = args.chunk or max(1, min(spatial) // 4)
    blocks = Path(tmp.name) / "blocks"
    rechunk(data, blocks, chunk)
    n = len(store)
    sample_bytes = int(np.prod(store.sample_shape)) * np.dtype(store.schema.x_dtype).itemsize
    file_bytes = sum(s.path.stat().st_size for s in store.shards)
    if n < args.batch:
        sys.exit(f"{n} samples make no batch of {args.batch}; lower --batch or add samples")
    order = np.random.default_rng(0).permutation(n)
    batches = [order[i:i + args.batch] for i in range(0, n - args.batch + 1, args.batch)]
    batched = len(batches) * args.batch  # samples in whole batches

    # The raw read's destination is a batch buffer too, filled a sample's bytes at a time.
    buffer = np.empty((args.batch, sample_bytes), np.uint8)

    def raw() -> None:
        k = 0
        for s in store.shards:
            fd = os.open(s.path, os.O_RDONLY)
            try:  # the same system call as the direct path, in file order
                offset = 0
                while got := os.preadv(fd, [buffer[k % args.batch]], offset):
                    offset += got
                    k += 1
            finally:
                os.close(fd)

    # Where each sample's chunk lies (one sample per chunk), in file order.
    chunk_bytes: list[tuple[Path, int]] = []
    for shard in store.shards:
        with h5py.File(shard.path, "r", locking=False) as f:
            x = f["x"]
            chunk_bytes += sorted((shard.path, x.id.get_chunk_info(i).byte_offset)
                                  for i in range(x.id.get_num_chunks()))

    def raw_chunks() -> None:
        fds = {s.path: os.open(s.path, os.O_RDONLY) for s in store.shards}
        try:
            for k, (path, offset) in enumerate(chunk_bytes):
                os.preadv(fds[path], [buffer[k % args.batch]], offset)
        finally:
            for fd in fds.values():
                os.close(fd)

    stores = {(layout, verify): SampleStore(path, verify_reads=verify)
              for layout, path in (("sample", data), ("blocks", blocks))
              for verify in (False, True)}

    def path_of(layout: str, verify: bool, normalise: bool) -> Callable[[], None]:
        """Batches read into one preallocated batch buffer (as a reader process does)."""
        s = stores[(layout, verify)]
        shape = (args.batch, *store.sample_shape)
        out = np.empty(shape, np.float32 if normalise else s.raw_dtype)
        scratch = np.empty(int(np.prod(shape)) * s.raw_dtype.itemsize, np.uint8)

        def run() -> None:
            for b in batches:
                read_batch(s, b, normalise=normalise, out=out, scratch=scratch)
        return run

    def before() -> None:
        for b in batches:
            np.stack([read_sample(store, int(i))[0] for i in np.sort(b)])

    # A loader starts its reader processes and allocates its slots once per epoch: its
    # passes read an epoch of at least --epoch-batches batches (the same ones again).
    epoch = batches * max(1, -(-args.epoch_batches // len(batches)))

    def pipeline(s: SampleStore, normalise: bool = True) -> Callable[[], None]:
        def run() -> None:
            for _ in read_in_slots(s, epoch, 1, 4, 0.0, normalise):
                pass
        return run

    def pipeline_before() -> None:
        for _ in read_ahead(BeforeBatchReader(store), epoch, 1, prefetch=4):
            pass

    raw()  # warm the page cache
    for s in stores.values():
        read_batch(s, order[:1])  # open the shards and the chunk indices
    # Start the readers' fork server (once per process, a second or more: it imports
    # torch), so that it is not charged to whichever pipeline runs first.
    for _ in iterate_batches(store, batches[:1], 1, prefetch=1):
        pass
    fast = stores[("sample", False)]
    cases: list[tuple[str, Callable[[], None], int]] = [
        ("raw file read (sequential)", raw, n),
        ("raw read of the chunks' bytes", raw_chunks, n),
        ("read path, 1 sample/chunk, direct", path_of("sample", False, False), batched),
        ("read path, 1 sample/chunk, verified", path_of("sample", True, False), batched),
        (f"read path, {chunk}^3 blocks, direct", path_of("blocks", False, False), batched),
        (f"read path, {chunk}^3 blocks, verified", path_of("blocks", True, False), batched),
        ("+ transform, 1 sample/chunk, direct", path_of("sample", False, True), batched),
        ("+ transform, 1 sample/chunk, verified", path_of("sample", True, True), batched),
        ("before: SampleStore.read + stack", before, batched),
        ("pipeline, 1 reader, direct", pipeline(fast), len(epoch) * args.batch),
        ("pipeline, 1 reader, verified", pipeline(stores[("sample", True)]),
         len(epoch) * args.batch),
        ("pipeline, 1 reader, stored values only", pipeline(fast, False),
         len(epoch) * args.batch),
        ("pipeline before, 1 reader", pipeline_before, len(epoch) * args.batch),
    ]
    print(f"machine: {machine()}")
    print(f"data: {n} samples of {store.sample_shape} {store.schema.x_dtype}, "
          f"{n * sample_bytes / 2**20:.0f} MiB of /x in {len(store.shards)} shard files "
          f"({file_bytes / 2**20:.0f} MiB); batches of {args.batch}; page cache warm; "
          f"best of {args.repeats}")
    print(f"{'reader':<40} {'MiB/s':>9} {'samples/s':>10} {'vs raw':>7}")
    # Rounds of every case, best of the rounds per case: on a shared machine the load
    # changes by the minute, and interleaving spreads it over the cases alike.
    best = {name: float("inf") for name, _, _ in cases}
    for _ in range(args.repeats):
        for name, fn, _ in cases:
            best[name] = min(best[name], best_seconds(fn, 1))
    rates = {name: samples / best[name] for name, _, samples in cases}  # samples/s
    # The ceiling: the faster raw read (the stricter).
    raw_bytes_s = max(file_bytes / best[cases[0][0]], n * sample_bytes / best[cases[1][0]])
    for name, fn, samples in cases:
        bytes_s = (file_bytes if fn is raw else samples * sample_bytes) / best[name]
        print(f"{name:<40} {bytes_s / 2**20:9.1f} {rates[name]:10.1f} "
              f"{bytes_s / raw_bytes_s:7.3f}")

    size = args.window or max(1, min(spatial) // 2)
    starts = window_starts(spatial, size, n, np.random.default_rng(1))
    share = float(np.prod([size / d for d in spatial]))

    def windows(layout: str) -> Callable[[], None]:
        s = stores[(layout, False)]

        def run() -> None:
            for i, start in zip(order, starts, strict=True):
                read_batch(s, [int(i)], [region(start, size)])
        return run

    whole_s = best_seconds(path_of("sample", False, True), args.repeats) / batched
    one = best_seconds(windows("sample"), args.repeats) / n
    blocked = best_seconds(windows("blocks"), args.repeats) / n
    print(f"\nwindows of {size}^3 ({share:.3f} of a sample), + transform, direct: "
          f"{1 / one:.1f}/s from 1 sample/chunk, {1 / blocked:.1f}/s from {chunk}^3 blocks, "
          f"against {1 / whole_s:.1f} whole samples/s (ideal {1 / share:.0f}x: "
          f"{whole_s / one:.2f}x and {whole_s / blocked:.2f}x)")
    read_bytes_s = sample_bytes * rates["read path, 1 sample/chunk, direct"]
    print(f"read path / raw read = {read_bytes_s / raw_bytes_s:.2f}")
    print(f"pipeline samples/s per process = {rates['pipeline, 1 reader, direct']:.0f} "
          f"(before: {rates['pipeline before, 1 reader']:.0f})")
    for s in stores.values():
        s.close()
    store.close()


def mpio_main(args: argparse.Namespace) -> None:
    """`--mpio`: one large array of 4 x SIZE^3 uint16 as a volume store chunked by
    sub-volumes of SIZE/4; its ranks (benchmarks/_mpio_read.py) read every sub-volume once
    between them, collectively through MPI-IO, independently through MPI-IO, and through
    their own handles, at 1, 2 and 4 ranks."""
    if not args.mpio_python.exists():
        sys.exit(f"{args.mpio_python} not found: build it with `make parallel-hdf5`")
    size = args.size
    sub = max(1, size // 4)
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        x = np.random.default_rng(0).poisson(3.0, size=(1, 4, size, size, size))
        np.save(Path(tmp) / "x.npy", x.astype(np.uint16))
        np.save(Path(tmp) / "y.npy", np.zeros((1, 1)))
        cli(["data", "convert", "--x", f"{tmp}/x.npy", "--y", f"{tmp}/y.npy", "--out",
             f"{tmp}/vol", "--subvolume", str(sub), "--no-scale-labels"])
        path = Path(tmp) / "vol" / "volume-00000.h5"
        path.read_bytes()  # warm the page cache
        print(f"machine: {machine()}")
        print(f"data: one array of (4, {size}, {size}, {size}) uint16 "
              f"({x.size * 2 / 2**20:.0f} MiB), chunked in {sub}^3 blocks; every rank reads "
              f"as many {sub}^3 x 4 sub-volumes (hyperslabs); page cache warm; best of "
              f"{args.repeats}; MiB/s of the whole array over the slowest rank's time")
        print(f"{'ranks':>5} {'collective':>11} {'mpio indep.':>12} {'own handle':>11} "
              f"{'coll./own':>10}")
        for ranks in (1, 2, 4):
            r = subprocess.run([args.mpiexec, "-n", str(ranks), str(args.mpio_python),
                                str(Path(__file__).resolve().parent / "_mpio_read.py"),
                                "--file", str(path), "--subvolume", str(sub),
                                "--repeats", str(args.repeats)],
                               capture_output=True, text=True, timeout=900, env=env())
            if r.returncode != 0:
                sys.exit(f"{ranks} ranks failed:\n{r.stderr}")
            rows = [line.split(" ", 1)[1].rsplit(" ", 2) for line in r.stdout.splitlines()]
            rate = {name: float(mib) for name, mib, _ in rows}
            if len({total for _, _, total in rows}) != 1:
                sys.exit(f"{ranks} ranks: the ways read different values: {rows}")
            print(f"{ranks:>5} {rate['collective']:>11.1f} {rate['mpio independent']:>12.1f} "
                  f"{rate['own handle']:>11.1f} "
                  f"{rate['collective'] / rate['own handle']:>10.2f}")


if __name__ == "__main__":
    main()
