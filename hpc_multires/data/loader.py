"""Batches from a `SampleStore`, read by background reader processes with prefetch.

Reading overlaps compute: `num_workers` processes read and normalise the next batches
while the training step runs, each up to `prefetch` batches ahead. Each reader opens its
own read-only HDF5 handles. The pool is our own, on `multiprocessing` alone (no private
torch API): per reader one pipe for its batch indices and one for its batches, batch k
read by reader k mod num_workers, so the batches arrive in order without reordering.

A training step that reads several pyramid levels (MGE) has its batches read together:
one task per step names a batch of each level, and the reader sends them back as one
item (`iterate_steps`), so a step's batches arrive together and in order like single
batches. For an image task the readers read the clean images unnormalised and corrupt
them (`ReadCorruption`), so the corruption overlaps compute too.

Readers are started by a fork server, never forked from the training process itself. That
process has threads (the communication backend's, the previous epoch's), and a fork that
lands while one of them holds an interpreter lock leaves the child waiting on it forever
(seen here: a worker stuck in CPython's after-fork cleanup, its rank stuck waiting for the
worker, the other ranks in an allreduce, the job hung). The fork server is a
single-threaded process started once per training process, with the reading modules
already imported, so a reader still starts in milliseconds. A reader therefore holds only
the pipe ends it was given: the training process keeps no copy of a reader's sending end,
so a reader that dies, even in the middle of a batch larger than the pipe holds, is an
end of file at once, never a read that waits forever.

A reader's parent is the fork server, which lives as long as any reader does. So each
reader watches the training process itself and ends when it is gone (killed by the OOM
killer or `kill -9`, which runs no clean-up): otherwise the readers and the fork server
would run on forever, holding memory and open shards.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.util  # its exit handler must be registered before ours (_end_all)
import os
import queue
import select
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from typing import Any, NamedTuple

import numpy as np
import torch

from hpc_multires.data.batch import read_batch
from hpc_multires.data.corrupt import Corruption, corrupt
from hpc_multires.data.crop import region
from hpc_multires.data.store import SampleStore
from hpc_multires.errors import DataError, SampleError


class _Failure:
    """A read error carried from a reader to the training process as a value, so that its
    one-line message arrives intact."""

    def __init__(self, message: str) -> None:
        self.message = message


ReadFailure = _Failure  # for readers defined beside the loader (data/slots.py)


class _Crash:
    """An unexpected exception in a reader (a bug, not bad data): its traceback's text."""

    def __init__(self, text: str) -> None:
        self.text = text


# Where slots do not apply (a step of several stores, a read with corruption), batches up
# to this size cross from the reader process as pickled arrays through its pipe; larger
# ones as tensors in shared memory (torch's pickling of tensors, registered with
# multiprocessing by `import torch`), where not copying pays. Each shared-memory tensor
# costs a descriptor handshake with the reader (a socket connection and an authentication
# round trip), which waits on the reader being scheduled: 4 Neuron ranks on 2 cores
# trained an epoch in 7.4 s this way against 7.9 s with shared memory (interleaved runs),
# and the training process spends 0.14-0.18 ms of CPU on a batch of 8 Neuron samples this
# way against 0.63-0.70 ms (benchmarks/step_cost.py, docs/benchmarks.md).
PIPE_BYTES = 4 * 2**20
# A step's batch of one store, read without corruption (the common case), crosses in a
# shared-memory slot (data/slots.py) from this size on, whatever PIPE_BYTES says: only the
# slot's number goes through the pipe. A larger batch through the pipe takes a round trip
# between the reader and the training process per 64 KiB (what a Linux pipe holds), each
# waiting for the other to be scheduled: a batch of 4 x 16^3 samples (256 KiB) kept the
# training process waiting 11-19 ms a step on a loaded node, its slot 0.5 ms
# (docs/experiments/data-wait.md).
SLOT_BYTES = 64 * 2**10


class WindowedBatch(NamedTuple):
    """A batch of windows: from sample indices[i], the block of `size` points per spatial
    axis (or `size[k]` along axis k) that starts at starts[i]. Only that block is read."""

    indices: np.ndarray  # (b,)
    starts: np.ndarray  # (b, spatial axes)
    size: int | tuple[int, ...]


class ReadCorruption(NamedTuple):
    """Read for image restoration: the clean images as stored (not normalised), corrupted by
    `spec` with `seed` (`data/corrupt.py`: each sample's corruption follows from (seed, its
    index) alone, at every pyramid level). The batch's x is then the corrupted input and its
    y the clean image, the target."""

    spec: Corruption
    seed: int


Task = np.ndarray | WindowedBatch  # one batch to read
Arrays = tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]
Item = Arrays | _Failure
StepItem = list[Arrays] | _Failure


class BatchReader:
    """Reads one batch: an array of sample indices (or a WindowedBatch) -> (x, y), as
    arrays up to `pipe_bytes` of x and y, as tensors (shared memory once sent) above. x is
    the model's input, or with `normalise` False the stored values (`data/batch.py`). With
    `corruption`, (corrupted x, clean x) of the unnormalised samples."""

    def __init__(self, store: SampleStore, pipe_bytes: int | None = None,
                 corruption: ReadCorruption | None = None, normalise: bool = True) -> None:
        self.store = store
        self.pipe_bytes = PIPE_BYTES if pipe_bytes is None else pipe_bytes
        self.corruption = corruption
        self.normalise = normalise

    def read(self, item: Task) -> Item:
        if isinstance(item, WindowedBatch):
            batch, regions = item.indices, [region(s, item.size) for s in item.starts]
        else:
            batch, regions = item, [()] * len(item)
        try:
            if self.corruption is None:
                x, y = read_batch(self.store, batch, regions, self.normalise)  # (b, C, ...)
            else:
                x, y = self._clean(batch, regions)  # in the images' own units
        except SampleError as e:  # its message names the sample and its file
            return _Failure(str(e))
        except DataError as e:
            return _Failure(str(e))
        if self.corruption is not None:
            try:
                x, y = corrupt(x, batch, seed=self.corruption.seed, level=self.store.level,
                               spec=self.corruption.spec), x  # (b, C, H, W) each
            except ValueError as e:  # the driver checks the sizes first; say it in one line
                return _Failure(f"cannot corrupt samples {batch[:4].tolist()}...: {e}")
        if x.nbytes <= self.pipe_bytes:  # x's size, as slot_bytes measures it
            return x, y
        return torch.from_numpy(x), torch.from_numpy(y)

    def _clean(self, batch: np.ndarray, regions: Sequence[tuple[slice, ...]]
               ) -> tuple[np.ndarray, np.ndarray]:
        """The samples after the read-time transform, not normalised (images in [0, 1]
        stay there: the corruption and the PSNR assume it)."""
        xs: list[np.ndarray] = [np.empty(0)] * len(batch)
        ys: list[np.ndarray] = [np.empty(0)] * len(batch)
        # Reading in file order is kinder to the file system than permutation order.
        for i in np.argsort(batch, kind="stable"):
            xs[i], ys[i] = self.store.read(int(batch[i]), regions[i], normalise=False)
        return np.stack(xs), np.stack(ys)  # (b, C, *spatial), (b, P)


class StepReader:
    """Reads one step's batches, one per store (a training step that reads several pyramid
    levels): a tuple of tasks -> a list of (x, y), in the same order. Each batch crosses
    by pipe or shared memory by its own size, as `BatchReader` decides."""

    def __init__(self, readers: Sequence[BatchReader]) -> None:
        self.readers = list(readers)
        self.store = self.readers[0].store  # named in the timeout message

    def read(self, items: tuple[Task, ...]) -> StepItem:
        out: list[Arrays] = []
        for reader, item in zip(self.readers, items, strict=True):
            got = reader.read(item)
            if isinstance(got, _Failure):
                return got
            out.append(got)
        return out


AnyReader = BatchReader | StepReader


def _end_with_trainer(trainer_pid: int) -> None:
    """End this reader once the training process `trainer_pid` has exited (see the module
    docstring)."""
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


_END = None  # end of the tasks, and of a reader's batches


def _batch_priority() -> None:
    """Run this reader (and the threads it starts) under SCHED_BATCH: its fair share of the
    CPU, but its waking up does not preempt the process running. The training process
    wakes its reader at every step, sending the next batch to read; with the reader under
    the default policy, that write handed the core to the reader on the spot and the
    training process waited for its next turn, 10-15 ms a step on a loaded node, counted
    as waiting for data (docs/experiments/data-wait.md)."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def _reader_main(reader: AnyReader, tasks: Connection, results: Connection,
                 trainer_pid: int) -> None:
    """A reader process: read the batches `tasks` names, in order, and send them on
    `results`. A thread sends, so the next read starts while a batch is still being
    written to the pipe (the training process reads it when its step is done)."""
    _batch_priority()
    _end_with_trainer(trainer_pid)
    torch.set_num_threads(1)  # one core per reader; the training process has its own
    outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    stopped = threading.Event()  # the training process has stopped reading

    def send() -> None:
        while (item := outbox.get()) is not _END:
            try:
                results.send(item)
            except OSError:  # closed by the training process: it wants no more
                stopped.set()
                return

    sender = threading.Thread(target=send, name="send-batches", daemon=True)
    sender.start()
    try:
        while not stopped.is_set():
            try:
                task = tasks.recv()
            except (EOFError, OSError):
                break
            if task is _END:
                break
            try:
                outbox.put(reader.read(task))
            except Exception:
                outbox.put(_Crash(traceback.format_exc()))
                break
    finally:
        outbox.put(_END)
        sender.join()


_CONTEXT: ForkServerContext | None = None

# What Slurm sends every process of a job step (scancel, preemption, --signal=USR1@T),
# and a terminal's ^C sends the whole process group.
JOB_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _start_helpers_deaf_to_job_signals() -> None:
    """Start the fork server and Python's resource tracker with JOB_SIGNALS blocked.

    Those signals are for the training process, which checkpoints on them and ends its
    readers itself. Delivered to its helpers too, as Slurm and a terminal do, they would
    kill a reader in the middle of a batch or the fork server just before the next
    epoch's readers start. A blocked signal stays blocked across the helpers' fork and
    exec, in every reader too; SIGKILL still ends them. The training process blocks the
    signals only while it starts the helpers, so none is lost: one that arrives meanwhile
    is delivered when they are unblocked."""
    from multiprocessing import forkserver, resource_tracker

    old = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        resource_tracker.ensure_running()  # unblocks SIGINT and SIGTERM here when it starts
        signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def worker_context() -> ForkServerContext:
    """The multiprocessing context reader processes start from (see the module docstring)."""
    global _CONTEXT
    if _CONTEXT is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "h5py", "hpc_multires.data.loader"])
        _start_helpers_deaf_to_job_signals()
        _CONTEXT = ctx
    return _CONTEXT


LEAVE_S = 5.0  # how long the readers get to leave when asked, before SIGKILL


class _Readers:
    """`num_workers` reader processes and their pipes. Batch k goes to reader k mod n."""

    def __init__(self, reader: AnyReader, num_workers: int) -> None:
        ctx = worker_context()
        self.processes: list[Any] = []
        self.tasks: list[Connection] = []
        self.results: list[Connection] = []
        _LIVE.add(self)
        try:
            for w in range(num_workers):
                tasks_out, tasks_in = ctx.Pipe(duplex=False)  # (receiving end, sending end)
                results_out, results_in = ctx.Pipe(duplex=False)
                self.tasks.append(tasks_in)
                self.results.append(results_out)
                process = ctx.Process(target=_reader_main, name=f"reader-{w}", daemon=True,
                                      args=(reader, tasks_out, results_in, os.getpid()))
                try:
                    process.start()
                finally:
                    # The reader's ends live in the reader alone: its death closes its
                    # sending end, and this process sees an end of file, not a wait.
                    tasks_out.close()
                    results_in.close()
                self.processes.append(process)
        except BaseException:
            self.close()
            raise

    def send(self, k: int, task: Task | tuple[Task, ...]) -> None:
        self.tasks[k % len(self.tasks)].send(task)

    def receive(self, k: int, total: int, timeout_s: float, path: str
                ) -> Item | StepItem | _Crash:
        """Batch k; SampleError when its reader died or `timeout_s` (> 0) passed first."""
        w = k % len(self.results)
        if not self.results[w].poll(timeout_s if timeout_s > 0 else None):
            raise SampleError(
                f"no batch from this rank's reader processes in {timeout_s:g} s (batch "
                f"{k + 1} of {total}, dataset {path!r}): a read is stuck, most often on "
                "a file system that stopped answering; check that the dataset's file "
                "system responds, stage the data node-locally (data.stage_to), or raise "
                "data.read_timeout_s if reads are this slow")
        try:
            item: Item | StepItem | _Crash = self.results[w].recv()
            return item
        except Exception as e:
            # An end of file, or half a batch and then one (the reader killed, e.g. by the
            # OOM killer, while it sent), or a shared-memory tensor whose reader has gone.
            process = self.processes[w]
            process.join(timeout=LEAVE_S)
            if process.exitcode is None:
                raise
            raise SampleError(
                f"a reader process of this rank (pid {process.pid}) ended unexpectedly "
                f"({_exit_text(process.exitcode)}) before batch {k + 1} of {total} "
                "arrived; if it ran out of memory, lower data.prefetch or data.num_workers "
                "(data.num_workers = 0 reads in the training process)") from e

    def close(self) -> None:
        """End the readers: asked first (they may be inside a read, which finishes), then
        SIGKILL. They block SIGTERM (see _start_helpers_deaf_to_job_signals), and one stuck
        in a read would otherwise outlive this loop until the training process ends."""
        for conn in self.results:  # a reader's next send fails: it stops reading
            conn.close()
        for conn in self.tasks:
            with contextlib.suppress(OSError):  # the reader has gone
                conn.send(_END)
            conn.close()
        deadline = time.monotonic() + LEAVE_S
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        left = [p for p in self.processes if p.is_alive()]
        for process in left:
            process.kill()
        deadline = time.monotonic() + LEAVE_S  # one wait for all (a read stuck in the
        for process in left:  # kernel delays even SIGKILL until it returns)
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        _LIVE.discard(self)

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()


_LIVE: weakref.WeakSet[_Readers] = weakref.WeakSet()


@atexit.register
def _end_all() -> None:
    """At exit, kill the readers of a loop that was never closed: multiprocessing's own
    exit handler (which runs after this one) asks them with SIGTERM, which they block, and
    then waits for them."""
    for readers in list(_LIVE):
        readers.kill()


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def read_ahead(reader: AnyReader, batches: Sequence[Any], num_workers: int, prefetch: int,
               timeout_s: float = 0.0) -> Iterator[Any]:
    """`reader`'s batches in order (a BatchReader's (x, y), a StepReader's list of them),
    read ahead by `num_workers` processes, each at most `prefetch` batches (steps) ahead
    (with 0 workers, read here when asked). A read error is a one-line SampleError; so is a
    wait of more than `timeout_s` (> 0) for the next batch and the death of a reader."""
    if num_workers == 0 or not batches:
        for task in batches:
            yield _checked(reader.read(task))
        return
    readers = _Readers(reader, min(num_workers, len(batches)))
    ahead = max(1, prefetch) * len(readers.processes)  # batches asked for, not yet received
    path = str(reader.store.path)
    try:
        for k in range(min(ahead, len(batches))):
            readers.send(k, batches[k])
        for k in range(len(batches)):
            item = readers.receive(k, len(batches), timeout_s, path)
            if k + ahead < len(batches):  # the same reader's next: it reads during our step
                readers.send(k + ahead, batches[k + ahead])
            if isinstance(item, _Crash):
                raise RuntimeError(f"a reader process of this rank failed:\n{item.text}")
            yield _checked(item)
    finally:
        readers.close()


def _checked(item: Item | StepItem) -> Arrays | list[Arrays]:
    if isinstance(item, _Failure):
        raise SampleError(item.message)
    return item


def iterate_batches(store: SampleStore, batches: Sequence[Task], num_workers: int,
                    prefetch: int, timeout_s: float = 0.0,
                    corruption: ReadCorruption | None = None,
                    transform_device: torch.device | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) for each index batch, in order, read ahead by `num_workers` processes.

    With workers and `timeout_s` > 0, a wait of more than `timeout_s` for the next batch
    raises SampleError: a worker stuck in a read (a file system that stopped answering
    leaves it waiting in the kernel, alive and silent) would otherwise hold this rank, and
    with it every rank, until the job's time limit. With `corruption`, x is the corrupted
    image and y the clean one (`ReadCorruption`).

    A batch larger than SLOT_BYTES arrives in a shared-memory slot that is reused once the
    batch after the next one has been taken (`data/slots.py`): copy x to keep it longer.
    With `transform_device` (and no corruption), the readers send the stored values and the
    read-time transform runs here, on that device, after the copy (`data.transform_on =
    "device"`).
    """
    from hpc_multires.data.slots import read_in_slots, slot_bytes  # it imports this module

    if corruption is not None:
        transform_device = None
    normalise = transform_device is None
    loaded: Iterator[tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]]
    if (corruption is None and num_workers and batches
            and slot_bytes(store, batches, normalise) > SLOT_BYTES):
        # Large batches: into shared buffers allocated once (data/slots.py).
        loaded = read_in_slots(store, batches, num_workers, prefetch, timeout_s, normalise)
    else:
        loaded = read_ahead(BatchReader(store, corruption=corruption, normalise=normalise),
                            batches, num_workers, prefetch, timeout_s)
    for x, y in loaded:
        if transform_device is None:
            yield torch.as_tensor(x), torch.as_tensor(y)
        else:
            stored = torch.as_tensor(x).to(transform_device, non_blocking=True)
            yield store.normaliser().torch(stored), torch.as_tensor(y)


def iterate_steps(stores: Sequence[SampleStore], steps: Sequence[tuple[Task, ...]],
                  num_workers: int, prefetch: int, timeout_s: float = 0.0,
                  corruptions: Sequence[ReadCorruption | None] | None = None,
                  transform_device: torch.device | None = None
                  ) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Yield, for each step, [(x, y) of its batch from stores[0], from stores[1], ...]: the
    batches of one step that reads several stores (pyramid levels) come together, one task
    per step, read ahead by the same reader processes. As `iterate_batches` otherwise (a
    step of one batch goes through it, large batches in shared-memory slots included)."""
    corruptions = list(corruptions) if corruptions is not None else [None] * len(stores)
    if len(stores) == 1:
        for x, y in iterate_batches(stores[0], [s[0] for s in steps], num_workers, prefetch,
                                    timeout_s, corruptions[0], transform_device):
            yield [(x, y)]
        return
    reader = StepReader([BatchReader(s, corruption=c) for s, c in zip(stores, corruptions,
                                                                      strict=True)])
    for step in read_ahead(reader, steps, num_workers, prefetch, timeout_s):
        yield [(torch.as_tensor(x), torch.as_tensor(y)) for x, y in step]
