"""Batches from a `SampleStore`, read by background worker processes with prefetch.

Reading overlaps compute: `num_workers` processes read and normalise the next batches
while the training step runs. Each worker opens its own read-only HDF5 handles. A step
that reads several pyramid levels (MGE) has its batches read together, one item per step
(`iterate_steps`); for an image task the workers also corrupt the clean images they read
(`ReadCorruption`), so the corruption overlaps compute too.

Workers are started by a fork server, never forked from the training process itself. That
process has threads (the queue feeders of the previous epoch's loader, the communication
backend's), and a fork that lands while one of them holds an interpreter lock leaves the
child waiting on it forever (seen here: a worker stuck in CPython's after-fork cleanup, its
rank stuck waiting for the worker, the other ranks in an allreduce, the job hung). The fork
server is a single-threaded process started once per training process, with the reading
modules already imported, so a worker still starts in milliseconds.

A worker's parent is therefore the fork server, which torch's own check ("is my parent
still there?") watches instead of the training process; and the fork server lives as long
as any worker does. So each worker watches the training process itself and ends when it is
gone (killed by the OOM killer or `kill -9`, which runs no clean-up): otherwise the workers
and the fork server would run on forever, holding memory and open shards.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from multiprocessing.context import BaseContext
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hpc_multires.data.corrupt import Corruption, corrupt
from hpc_multires.data.crop import region
from hpc_multires.data.store import SampleStore
from hpc_multires.errors import DataError, SampleError


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
# (interleaved runs), and an idle process spends 0.36 ms of CPU on a batch of 8 Neuron
# samples this way against 1.06 ms (benchmarks/step_cost.py).
PIPE_BYTES = 4 * 2**20


class WindowedBatch(NamedTuple):
    """A batch of windows: from sample indices[i], the block of `size` points per spatial
    axis that starts at starts[i]. Only that block is read."""

    indices: np.ndarray  # (b,)
    starts: np.ndarray  # (b, spatial axes)
    size: int


class ReadCorruption(NamedTuple):
    """Read for image restoration: the clean images as stored (not normalised), corrupted by
    `spec` with `seed` (`data/corrupt.py`: each sample's corruption follows from (seed, its
    index) alone, at every pyramid level). The batch's x is then the corrupted input and its
    y the clean image, the target."""

    spec: Corruption
    seed: int


Item = np.ndarray | WindowedBatch
Arrays = tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]


class BatchReader(Dataset):
    """Item i of the dataset is a whole batch: an array of sample indices (or a
    WindowedBatch) -> (x, y); with `corruption`, (corrupted x, clean x)."""

    def __init__(self, store: SampleStore, corruption: ReadCorruption | None = None) -> None:
        self.store = store
        self.corruption = corruption

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, item: Item) -> Arrays | _Failure:
        if isinstance(item, WindowedBatch):
            batch, regions = item.indices, [region(s, item.size) for s in item.starts]
        else:
            batch, regions = item, [()] * len(item)
        clean = self.corruption is not None
        try:
            # Reading in file order is kinder to the file system than permutation order.
            order = np.argsort(batch, kind="stable")
            xs: list[np.ndarray] = [np.empty(0)] * len(batch)
            ys: list[np.ndarray] = [np.empty(0)] * len(batch)
            for i in order:
                index = int(batch[i])
                xs[i], ys[i] = self.store.read(index, regions[i], normalise=not clean)
        except SampleError as e:  # its message names the sample and its shard
            return _Failure(str(e))
        except DataError as e:
            # A shard that cannot be opened (truncated or removed since the store was
            # opened): the message names the file, this adds the sample.
            return _Failure(f"cannot read sample {index}: {e}")
        x, y = np.stack(xs), np.stack(ys)  # (b, C, *spatial), (b, P)
        if self.corruption is not None:
            try:
                x, y = corrupt(x, batch, seed=self.corruption.seed, level=self.store.level,
                               spec=self.corruption.spec), x  # (b, C, H, W) each
            except ValueError as e:  # the driver checks the sizes first; say it in one line
                return _Failure(f"cannot corrupt samples {batch[:4].tolist()}...: {e}")
        if x.nbytes + y.nbytes <= PIPE_BYTES:
            return x, y
        return torch.from_numpy(x), torch.from_numpy(y)


class StepReader(Dataset):
    """Item i is one step's batches, one per store (a training step that reads several
    pyramid levels): a tuple of items -> a list of (x, y), in the same order."""

    def __init__(self, readers: Sequence[BatchReader]) -> None:
        self.readers = list(readers)

    def __len__(self) -> int:
        return len(self.readers[0])

    def __getitem__(self, items: tuple[Item, ...]) -> list[Arrays] | _Failure:
        out = []
        for reader, item in zip(self.readers, items, strict=True):
            got = reader[item]
            if isinstance(got, _Failure):
                return got
            out.append(got)
        return out


def _as_is(item: object) -> object:
    """The DataLoader's collate step, done nowhere: a reader item is already a batch."""
    return item


def _end_with_trainer(trainer_pid: int, worker_id: int) -> None:
    """Worker start-up (DataLoader's worker_init_fn): end this worker once the training
    process `trainer_pid` has exited (see the module docstring)."""
    try:
        pidfd: int | None = os.pidfd_open(trainer_pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux, or a kernel before 5.3)
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])  # readable once the process has exited
        else:
            while True:
                try:
                    os.kill(trainer_pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="watch-trainer", daemon=True).start()


_CONTEXT: BaseContext | None = None

# What Slurm sends every process of a job step (scancel, preemption, --signal=USR1@T),
# and a terminal's ^C sends the whole process group.
JOB_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _start_helpers_deaf_to_job_signals() -> None:
    """Start the fork server and Python's resource tracker with JOB_SIGNALS blocked.

    Those signals are for the training process, which checkpoints on them and ends its
    readers itself. Delivered to its helpers too, as Slurm and a terminal do, they would
    kill a reader in the middle of a batch (the training process then waits forever for the
    rest of a message: its own end of the queue keeps the pipe open) or the fork server
    just before the next epoch's readers start. A blocked signal stays blocked across the
    helpers' fork and exec, in every reader too; SIGKILL still ends them. The training
    process blocks the signals only while it starts the helpers, so none is lost: one
    that arrives meanwhile is delivered when they are unblocked."""
    from multiprocessing import forkserver, resource_tracker

    old = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        resource_tracker.ensure_running()  # unblocks SIGINT and SIGTERM here when it starts
        signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def worker_context() -> BaseContext:
    """The multiprocessing context reader workers start from (see the module docstring)."""
    global _CONTEXT
    if _CONTEXT is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "h5py", "hpc_multires.data.loader"])
        _start_helpers_deaf_to_job_signals()
        _CONTEXT = ctx
    return _CONTEXT


def iterate_batches(store: SampleStore, batches: Sequence[Item], num_workers: int,
                    prefetch: int, timeout_s: float = 0.0,
                    corruption: ReadCorruption | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) for each index batch, in order, read ahead by `num_workers` processes.

    With workers and `timeout_s` > 0, a wait of more than `timeout_s` for the next batch
    raises SampleError: a worker stuck in a read (a file system that stopped answering
    leaves it waiting in the kernel, alive and silent) would otherwise hold this rank, and
    with it every rank, until the job's time limit. With `corruption`, x is the corrupted
    image and y the clean one (`ReadCorruption`).
    """
    for (step,) in iterate_steps([store], [(b,) for b in batches], num_workers, prefetch,
                                 timeout_s, [corruption]):
        yield step


def iterate_steps(stores: Sequence[SampleStore], steps: Sequence[tuple[Item, ...]],
                  num_workers: int, prefetch: int, timeout_s: float = 0.0,
                  corruptions: Sequence[ReadCorruption | None] | None = None
                  ) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Yield, for each step, [(x, y) of its batch from stores[0], from stores[1], ...]: the
    batches of one step that reads several stores (pyramid levels) come together, read
    ahead by one pool of `num_workers` processes. As `iterate_batches` otherwise."""
    if not steps:
        return
    corruptions = list(corruptions) if corruptions is not None else [None] * len(stores)
    loader = DataLoader(
        StepReader([BatchReader(s, c) for s, c in zip(stores, corruptions, strict=True)]),
        sampler=list(steps),
        batch_size=None,
        collate_fn=_as_is,  # the default would turn small arrays into shared-memory tensors
        num_workers=num_workers,
        prefetch_factor=prefetch if num_workers > 0 else None,
        persistent_workers=False,
        multiprocessing_context=worker_context() if num_workers > 0 else None,
        # Waits in slices: after each, torch checks that the readers are alive (a dead one
        # is named within seconds, not after the whole timeout); _batches adds them up.
        timeout=min(timeout_s, POLL_S) if num_workers > 0 and timeout_s > 0 else 0,
        worker_init_fn=functools.partial(_end_with_trainer, os.getpid()) if num_workers > 0
        else None,
    )
    items = iter(loader)
    watch = _ReaderWatch(items)
    try:
        yield from _batches(items, stores[0], steps, timeout_s)
    finally:
        watch.stop()  # before the readers are ended on purpose
        # torch ends its readers with SIGTERM when they do not stop in time, but they
        # block it (see _start_helpers_deaf_to_job_signals): one stuck in a read would
        # outlive this loader until the training process ends. SIGKILL what is left.
        shutdown = getattr(items, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        left = [w for w in getattr(items, "_workers", []) if w.is_alive()]
        for worker in left:
            worker.kill()
        deadline = time.monotonic() + 5  # one wait for all (a read stuck in the kernel
        for worker in left:  # delays even SIGKILL until it returns)
            worker.join(timeout=max(0.0, deadline - time.monotonic()))


POLL_S = 5.0  # how often a wait for a batch checks that the readers are alive


class _ReaderWatch:
    """Ends this rank's wait for a batch when one of its readers is killed.

    torch notices a dead reader only between batches. One killed while it sends a batch
    larger than the pipe holds (the OOM killer picks the process with the most memory)
    leaves the training process reading the rest of that batch forever: its own end of
    the queue keeps the pipe open, so no end-of-file comes. A thread waits on the readers'
    exit and, for one that ends while the loader still expects batches from it, interrupts
    the main thread with SIGUSR2, whose handler raises the SampleError that names it. (It
    does not read the exit status: a process started by the fork server has its status
    read once, from its sentinel, and torch reads it.)
    """

    def __init__(self, items: Any) -> None:
        self.items = items
        self.workers = list(getattr(items, "_workers", []))
        self.message = ""
        self._stop_r, self._stop_w = os.pipe()
        self._old: Any = None
        self._thread: threading.Thread | None = None
        self._main = threading.main_thread().ident or 0
        if not self.workers or threading.current_thread() is not threading.main_thread():
            return
        self._old = signal.signal(signal.SIGUSR2, self._interrupted)
        self._thread = threading.Thread(target=self._watch, name="watch-readers", daemon=True)
        self._thread.start()

    def _interrupted(self, signum: int, frame: Any) -> None:
        raise SampleError(self.message)

    def _watch(self) -> None:
        from multiprocessing.connection import wait

        live = {w.sentinel: w for w in self.workers}
        ready = wait([*live, self._stop_r])
        if self._stop_r not in ready:
            if getattr(self.items, "_shutdown", False):
                return  # the loader is ending its readers: they leave as told
            worker = live[ready[0]]
            self.message = (
                f"a reader process of this rank (pid {worker.pid}) ended while batches were "
                "still due (killed, e.g. by the OOM killer); if it ran out of memory, lower "
                "data.prefetch or data.num_workers (data.num_workers = 0 reads in the "
                "training process)")
            signal.pthread_kill(self._main, signal.SIGUSR2)

    def stop(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join()
            signal.signal(signal.SIGUSR2, signal.SIG_DFL if self._old is None else self._old)
        os.close(self._stop_r)
        os.close(self._stop_w)


def _batches(items: Iterator[Any], store: SampleStore, batches: Sequence[object],
             timeout_s: float) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The loader's items as tensors, its failures as one-line SampleErrors."""
    done = 0
    waited = 0.0
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except RuntimeError as e:
            if "timed out after" in str(e):
                if waited + POLL_S < timeout_s:  # every reader alive: wait another slice
                    waited += POLL_S
                    continue
                raise SampleError(
                    f"no batch from this rank's reader processes in {timeout_s:g} s (batch "
                    f"{done + 1} of {len(batches)}, dataset {str(store.path)!r}): a read is "
                    "stuck, most often on a file system that stopped answering; check that "
                    "the dataset's file system responds, stage the data node-locally "
                    "(data.stage_to), or raise data.read_timeout_s if reads are this slow"
                    ) from None
            if "exited unexpectedly" not in str(e):
                raise
            # A worker died without a word (killed, e.g. by the OOM killer, or crashed in
            # the HDF5 library): torch says so as a bare RuntimeError.
            raise SampleError(
                f"a reader process of this rank ended unexpectedly ({e}) before batch "
                f"{done + 1} of {len(batches)} arrived; if it ran out of memory, lower "
                "data.prefetch or data.num_workers (data.num_workers = 0 reads in the "
                "training process)") from None
        if isinstance(item, _Failure):
            raise SampleError(item.message)
        done += 1
        waited = 0.0
        yield [(torch.as_tensor(x), torch.as_tensor(y)) for x, y in item]
