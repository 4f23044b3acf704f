"""Reader throughput beside a raw read of the same files, measured in one run.

    python benchmarks/io.py [--data DIR] [--samples 128] [--size 64]

Prints bytes/s of: a raw sequential read of the shard files (the ceiling), h5py
hyperslab reads of one sample at a time in shuffled order, `SampleStore.read` (adds
the log1p transform and normalisation), and the prefetching loader with 1 and 2
worker processes; each as a ratio to the raw read. Then the windows a stage with
`crop` reads (`--window`, default half the sample per axis: an eighth of it): samples/s of
`SampleStore.read` of one window against a whole sample, side by side. The page cache is
warmed first, so this measures the reader's overhead, not the disk.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_seconds, cli, machine

from hpc_multires.data.crop import region, window_starts
from hpc_multires.data.loader import iterate_batches
from hpc_multires.data.store import SampleStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, help="existing store (default: generate one)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many passes")
    ap.add_argument("--window", type=int, help="window points per axis (default: size // 2)")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    data = args.data
    if data is None:
        data = Path(tmp.name) / "bench"
        cli(["data", "synth", "cosmoflow", "--out", str(data), "--samples", str(args.samples),
             "--size", str(args.size)])
    store = SampleStore(data)
    n = len(store)
    x_bytes = n * int(np.prod(store.sample_shape)) * np.dtype(store.schema.x_dtype).itemsize
    file_bytes = sum(s.path.stat().st_size for s in store.shards)
    if n < args.batch:
        sys.exit(f"{n} samples make no batch of {args.batch}; lower --batch or add samples")
    sample_bytes = x_bytes // n
    order = np.random.default_rng(0).permutation(n)
    # Shard and row of every sample (shards may differ in size).
    firsts = np.array([s.first_sample for s in store.shards])
    shard_of = np.searchsorted(firsts, order, side="right") - 1
    row_of = order - firsts[shard_of]

    def raw() -> None:
        for s in store.shards:
            with open(s.path, "rb") as f:
                while f.read(1 << 24):
                    pass

    def hyperslab() -> None:
        files = [h5py.File(s.path, "r", locking=False) for s in store.shards]
        for shard, row in zip(shard_of, row_of, strict=True):
            files[shard]["x"][row]
        for f in files:
            f.close()

    def store_read() -> None:
        for i in order:
            store.read(int(i))

    batches = [order[i:i + args.batch] for i in range(0, n - args.batch + 1, args.batch)]
    batched_bytes = len(batches) * args.batch * sample_bytes  # the loader skips a last part

    def loader(workers: int):  # type: ignore[no-untyped-def]
        def run() -> None:
            for _ in iterate_batches(store, batches, workers, prefetch=4):
                pass
        return run

    raw()  # warm the page cache
    # Start the workers' forkserver (once per process, a second or more: it imports torch),
    # so that it is not charged to whichever worker case runs first.
    for _ in iterate_batches(store, batches[:1], 1, prefetch=1):
        pass
    cases = [("raw file read (sequential)", raw, file_bytes),
             ("h5py hyperslab, 1 sample/read", hyperslab, x_bytes),
             ("SampleStore.read (+log1p, norm.)", store_read, x_bytes),
             ("loader, 0 workers", loader(0), batched_bytes),
             ("loader, 1 worker", loader(1), batched_bytes),
             ("loader, 2 workers", loader(2), batched_bytes)]
    print(f"machine: {machine()}")
    print(f"data: {n} samples of {store.sample_shape} {store.schema.x_dtype}, "
          f"{x_bytes / 2**20:.0f} MiB of /x in {len(store.shards)} shard files "
          f"({file_bytes / 2**20:.0f} MiB); page cache warm; best of {args.repeats}")
    print(f"{'reader':<36} {'MiB/s':>9} {'samples/s':>10} {'vs raw':>7}")
    raw_rate = 0.0
    for name, fn, nbytes in cases:
        best = best_seconds(fn, args.repeats)
        rate = nbytes / best / 2**20
        raw_rate = raw_rate or rate
        samples = nbytes / sample_bytes if fn is not raw else n
        print(f"{name:<36} {rate:9.1f} {samples / best:10.1f} {rate / raw_rate:7.3f}")
    spatial = store.sample_shape[1:]
    size = args.window or max(1, min(spatial) // 2)
    starts = window_starts(spatial, size, n, np.random.default_rng(1))

    def window_read() -> None:
        for i, start in zip(order, starts, strict=True):
            store.read(int(i), region(start, size))

    whole_s = best_seconds(store_read, args.repeats)
    window_s = best_seconds(window_read, args.repeats)
    share = float(np.prod([size / d for d in spatial]))
    print(f"\nwindows of {size} per axis ({share:.3f} of a sample), SampleStore.read: "
          f"{n / window_s:.1f} windows/s against {n / whole_s:.1f} whole samples/s, "
          f"{whole_s / window_s:.2f}x (ideal {1 / share:.0f}x)")
    store.close()


if __name__ == "__main__":
    main()
