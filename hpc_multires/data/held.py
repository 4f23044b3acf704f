"""A coarse level's samples read once into the training process, batches taken from memory.

A step at pyramid level k in 3D has 1/8^k of a level-0 step's data, and so little compute
that a per-batch read costs a large share of it: opening chunks, the read-time transform
and the hand-off from a reader process take about the same time for 16 samples of 8^3 as
for 16 of 32^3 (2.3 ms of a 9 ms level-2 step at 2 ranks, benchmarks/step_cost.py). Such a
level is small, so a rank can hold the samples it draws: `HeldSamples` reads them once, at
the stage's start, through the same `read_batch` a reader uses (the same transform, the
same NaN check), and a batch is then rows of that array. A sample comes out bit for bit as
a reader gives it, so a held stage trains as the same stage read from its files. An image
task's samples are held clean and corrupted per batch here, as its readers would.

`data.hold_mb` bounds what one rank holds (`hold_splits`); level 0 is always read from its
files, where reader processes overlap the reads with steps long enough to hide them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hpc_multires.data.batch import read_batch, region_shape
from hpc_multires.data.corrupt import corrupt
from hpc_multires.data.crop import region
from hpc_multires.data.loader import ReadCorruption, Task, WindowedBatch
from hpc_multires.data.store import SampleStore, transform

READ_BLOCK = 256
"""Samples per read while filling the array (bounds the scratch the read needs)."""


def held_bytes(store: SampleStore, count: int) -> int:
    """What `count` samples of `store` take held: float32 after the transform."""
    return count * int(np.prod(store.sample_shape)) * 4


class HeldSamples:
    """Samples `indices` of `store`, read and transformed once; `read(task)` gives a
    batch's (x, y) as tensors, as a `BatchReader` would give them.

    `clean`: hold the samples in their own units, not normalised (an image task's clean
    images), and `read(task, corruption)` gives (corrupted x, clean x) as a reader with
    that `ReadCorruption` does: the corruption follows from (seed, sample index, level)."""

    def __init__(self, store: SampleStore, indices: np.ndarray, clean: bool = False) -> None:
        self.store = store
        self.clean = clean
        self.indices = np.unique(np.asarray(indices, dtype=np.int64))
        n = len(self.indices)
        self.x = np.empty((n, *store.sample_shape), np.float32)  # (n, C, *spatial)
        ys: list[np.ndarray] = []
        for lo in range(0, n, READ_BLOCK):
            block = self.indices[lo:lo + READ_BLOCK]
            if clean:  # as `SampleStore.read(normalise=False)`: the transform, elementwise
                raw, y = read_batch(store, block, normalise=False)
                self.x[lo:lo + len(block)] = transform(raw, store.schema.x_transform)
            else:
                _, y = read_batch(store, block, out=self.x[lo:lo + len(block)])
            ys.append(y)
        self.y = np.concatenate(ys) if ys else np.zeros((0, 0), np.float32)  # (n, P)
        # sample index -> row; -1 for a sample not held
        self.row = np.full(int(self.indices[-1]) + 1 if n else 0, -1, np.int64)
        self.row[self.indices] = np.arange(n)

    @property
    def nbytes(self) -> int:
        return self.x.nbytes + self.y.nbytes

    def rows(self, indices: np.ndarray) -> np.ndarray:
        rows = self.row[indices] if len(self.row) > int(indices.max(initial=-1)) else None
        if rows is None or (rows < 0).any():
            raise ValueError(f"samples {indices.tolist()} of {self.store.path} are not all "
                             "held: the sampler drew outside the indices it was held for")
        return rows

    def read(self, task: Task, corruption: ReadCorruption | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch (x (b, C, *spatial), y (b, P)), copies of the held rows (whole samples,
        or each sample's window of a WindowedBatch); with `corruption` (clean samples
        held), (corrupted x, clean x)."""
        if (corruption is not None) != self.clean:
            raise ValueError(f"samples of {self.store.path} held "
                             f"{'clean' if self.clean else 'normalised'}, read "
                             f"{'with' if corruption is not None else 'without'} a corruption")
        if isinstance(task, WindowedBatch):
            rows = self.rows(np.asarray(task.indices))
            shape = region_shape(self.store, region(task.starts[0], task.size)) if len(
                rows) else self.store.sample_shape
            x = np.empty((len(rows), *shape), np.float32)
            for i, (r, start) in enumerate(zip(rows, task.starts, strict=True)):
                window: tuple[int | slice, ...] = (int(r), slice(None),
                                                   *region(start, task.size))
                x[i] = self.x[window]
        else:
            rows = self.rows(np.asarray(task))
            x = self.x[rows]
        if corruption is not None:
            indices = task.indices if isinstance(task, WindowedBatch) else task
            noisy = corrupt(x, indices, seed=corruption.seed, level=self.store.level,
                            spec=corruption.spec)
            return torch.from_numpy(noisy), torch.from_numpy(x)
        return torch.from_numpy(x), torch.from_numpy(self.y[rows])


def hold_splits(splits: Sequence[tuple[SampleStore, np.ndarray]], budget_mb: float,
                clean: bool = False) -> list[HeldSamples | None]:
    """For each (store, indices) in order, its `HeldSamples` (`clean`: in the samples'
    own units) while the held bytes stay within `budget_mb` MiB in all, or None: a level-0
    store (read from its files by the reader processes) or one that does not fit what is
    left."""
    left = budget_mb * 2**20
    out: list[HeldSamples | None] = []
    for store, indices in splits:
        unique = np.unique(indices)
        need = held_bytes(store, len(unique))
        if store.level == 0 or need > left or not len(unique):
            out.append(None)
            continue
        out.append(HeldSamples(store, unique, clean))
        left -= need
    return out
