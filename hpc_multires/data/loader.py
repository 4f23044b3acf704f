"""Batches from a `SampleStore`, read by background worker processes with prefetch.

Reading overlaps compute: `num_workers` processes read and normalise the next batches
while the training step runs. Each worker opens its own read-only HDF5 handles.

Workers are started by a fork server, never forked from the training process itself. That
process has threads (the queue feeders of the previous epoch's loader, the communication
backend's), and a fork that lands while one of them holds an interpreter lock leaves the
child waiting on it forever (seen here: a worker stuck in CPython's after-fork cleanup, its
rank stuck waiting for the worker, the other ranks in an allreduce, the job hung). The fork
server is a single-threaded process started once per training process, with the reading
modules already imported, so a worker still starts in milliseconds.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from multiprocessing.context import BaseContext

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hpc_multires.data.store import SampleStore
from hpc_multires.errors import SampleError


class _Failure:
    """A read error carried from a worker to the training process as a value.

    Raising in a worker would reach us wrapped in DataLoader's traceback text; a value
    keeps the one-line message intact.
    """

    def __init__(self, message: str) -> None:
        self.message = message


# Batches up to this size cross from the reader process as pickled arrays through its pipe;
# larger ones as tensors in shared memory (torch's way), where not copying pays. Each
# shared-memory tensor costs a descriptor handshake with the reader (a socket connection and
# an authentication round trip), which waits on the reader being scheduled: 4 Neuron ranks
# on 2 cores trained an epoch in 7.4 s this way against 7.9 s with shared memory
# (interleaved runs); an idle process sees no difference (benchmarks/step_cost.py).
PIPE_BYTES = 4 * 2**20


class BatchReader(Dataset):
    """Item i of the dataset is a whole batch: an array of sample indices -> (x, y)."""

    def __init__(self, store: SampleStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, batch: np.ndarray
                    ) -> tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray] | _Failure:
        try:
            # Reading in file order is kinder to the file system than permutation order.
            order = np.argsort(batch, kind="stable")
            xs: list[np.ndarray] = [np.empty(0)] * len(batch)
            ys: list[np.ndarray] = [np.empty(0)] * len(batch)
            for i in order:
                xs[i], ys[i] = self.store.read(int(batch[i]))
        except SampleError as e:
            return _Failure(str(e))
        x, y = np.stack(xs), np.stack(ys)  # (b, C, *spatial), (b, P)
        if x.nbytes <= PIPE_BYTES:
            return x, y
        return torch.from_numpy(x), torch.from_numpy(y)


def _as_is(item: object) -> object:
    """The DataLoader's collate step, done nowhere: a reader item is already a batch."""
    return item


_CONTEXT: BaseContext | None = None


def worker_context() -> BaseContext:
    """The multiprocessing context reader workers start from (see the module docstring)."""
    global _CONTEXT
    if _CONTEXT is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "h5py", "hpc_multires.data.loader"])
        _CONTEXT = ctx
    return _CONTEXT


def iterate_batches(store: SampleStore, batches: Sequence[np.ndarray], num_workers: int,
                    prefetch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) for each index batch, in order, read ahead by `num_workers` processes."""
    if not batches:
        return
    loader = DataLoader(
        BatchReader(store),
        sampler=list(batches),
        batch_size=None,
        collate_fn=_as_is,  # the default would turn small arrays into shared-memory tensors
        num_workers=num_workers,
        prefetch_factor=prefetch if num_workers > 0 else None,
        persistent_workers=False,
        multiprocessing_context=worker_context() if num_workers > 0 else None,
    )
    for item in loader:
        if isinstance(item, _Failure):
            err = SampleError(item.message)
            raise err
        x, y = item
        yield torch.as_tensor(x), torch.as_tensor(y)
