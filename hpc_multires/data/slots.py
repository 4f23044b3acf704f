"""Batches that cross from the reader processes in shared-memory slots allocated once.

A batch larger than the loader's pipe limit used to cross as a new shared-memory tensor
each time: the reader copied it into fresh shared memory (a page fault on every page) and
its descriptor went through a socket handshake. At 4 x 64^3 float32 a batch of 8 is
32 MiB, and that crossing, not the read, set the pipeline's rate (docs/benchmarks.md).
Here the training process allocates `count` shared buffers once per loader; each reader
receives them when it starts, writes batch k straight into slot k mod count
(`read_batch(..., out=...)`) and sends only the slot's number, the batch's shape and its
labels through its pipe; the training process wraps the slot as a tensor, without a copy.

Slots are reused: batch k's slot is written again for batch k + count. With count =
(batches in flight) + 2, a batch stays intact until the batch after the next one has been
taken, which is what a training step needs (it is done with batch k before it asks for
batch k + 1). A consumer that keeps a batch longer must copy it.

Slots also outlive their loader: fresh shared memory costs about 1 ms per MiB on first
touch (measured here: 6 slots of 32 MiB took 0.24 s to allocate), as much as reading an
epoch of a few hundred samples, so a finished loader leaves its slots to the next one (the
next epoch, the validation), which sends them to its own readers. A loader takes them for
as long as it runs; two loaders at once never share one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from hpc_multires.data.batch import BatchStore, batch_shape, read_batch
from hpc_multires.data.crop import region
from hpc_multires.data.loader import BatchReader, Item, ReadFailure, WindowedBatch, read_ahead
from hpc_multires.errors import DataError


class SlotTask(NamedTuple):
    """Read `item` into slot `slot`."""

    slot: int
    item: np.ndarray | WindowedBatch


class InSlot(NamedTuple):
    """What a reader sends for a batch it wrote into a slot."""

    slot: int
    shape: tuple[int, ...]  # (b, C, *spatial)
    dtype: str
    y: np.ndarray  # (b, P)


def _split(item: np.ndarray | WindowedBatch) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
    if isinstance(item, WindowedBatch):
        return item.indices, [region(s, item.size) for s in item.starts]
    return item, [()] * len(item)


def _view(slot: torch.Tensor, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return slot.numpy()[:nbytes].view(dtype).reshape(shape)


class SlotReader(BatchReader):
    """A BatchReader that writes each batch into the slot its task names."""

    def __init__(self, store: BatchStore, slots: list[torch.Tensor], normalise: bool) -> None:
        super().__init__(store, normalise=normalise)  # type: ignore[arg-type]
        self.slots = slots
        self.scratch = np.empty(0, np.uint8)  # the stored values before the transform

    def read(self, item: np.ndarray | WindowedBatch | SlotTask) -> Item:
        assert isinstance(item, SlotTask), "a SlotReader reads SlotTasks"
        batch, regions = _split(item.item)
        store = self.store
        try:
            shape = batch_shape(store, len(batch), regions)
            dtype = np.dtype(np.float32) if self.normalise else store.raw_dtype
            scratch = None
            if self.normalise:
                need = int(np.prod(shape)) * store.raw_dtype.itemsize
                if self.scratch.nbytes < need:
                    self.scratch = np.empty(need, np.uint8)
                scratch = self.scratch
            _, y = read_batch(store, batch, regions, self.normalise,
                              out=_view(self.slots[item.slot], shape, dtype), scratch=scratch)
        except DataError as e:  # its message names the sample and its file
            return ReadFailure(str(e))
        return InSlot(item.slot, shape, dtype.str, y)  # type: ignore[return-value]


def slot_bytes(store: BatchStore, batches: Sequence[np.ndarray | WindowedBatch],
               normalise: bool) -> int:
    """The largest batch's bytes as read (float32 normalised, else the stored dtype)."""
    itemsize = 4 if normalise else store.raw_dtype.itemsize
    return max(int(np.prod(batch_shape(store, len(indices), regions))) * itemsize
               for indices, regions in map(_split, batches))


def read_in_slots(store: BatchStore, batches: Sequence[np.ndarray | WindowedBatch],
                  num_workers: int, prefetch: int, timeout_s: float, normalise: bool
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """As `read_ahead` with `num_workers` >= 1 readers: (x, y) tensors of each batch, x a
    view of its slot (valid until the batch after the next one is taken)."""
    workers = min(num_workers, len(batches))
    count = min(max(1, prefetch) * workers + 2, len(batches))
    slots = _take(count, slot_bytes(store, batches, normalise))
    try:
        reader = SlotReader(store, slots, normalise)
        tasks = [SlotTask(k % count, b) for k, b in enumerate(batches)]
        for item in read_ahead(reader, tasks, workers, prefetch,
                               timeout_s):
            done = item
            assert isinstance(done, InSlot), "a SlotReader sends InSlot"
            x = _view(slots[done.slot], done.shape, np.dtype(done.dtype))
            yield torch.from_numpy(x), torch.from_numpy(done.y)
    finally:
        _IDLE[:] = slots  # the last loader's slots wait for the next one


_IDLE: list[torch.Tensor] = []  # slots of the loader that finished last, for the next


def _take(count: int, size: int) -> list[torch.Tensor]:
    """`count` shared buffers of at least `size` bytes: idle ones first, then new ones."""
    fit = [s for s in _IDLE if s.numel() >= size][:count]
    _IDLE[:] = [s for s in _IDLE if all(s is not f for f in fit)]
    new = [torch.empty(size, dtype=torch.uint8).share_memory_()
           for _ in range(count - len(fit))]
    return fit + new
