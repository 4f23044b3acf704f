"""torch.distributed set-up and the few collectives the trainer needs.

`Comm` works unchanged with one process: every collective is then a no-op, nothing is
initialised, and the same code runs on a laptop and on 512 ranks.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hpc_multires.comm.ranks import RankInfo, discover, expand_nodelist, mpi_of


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def rendezvous_address(info: RankInfo) -> tuple[str, int]:
    """Where rank 0's TCP store listens.

    Order: the launcher's own MASTER_ADDR/MASTER_PORT (torchrun); an mpi4py broadcast of
    rank 0's host name and a free port; the first host of the Slurm step's node list (the
    job's when the step's is not set) with a port derived from the job and step ids (so
    every rank derives the same one without talking).
    """
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    mpi = mpi_of(info)
    if mpi is not None:
        address = (socket.gethostname(), _free_port()) if info.rank == 0 else None
        host, port = mpi.bcast(address, root=0)
        return str(host), int(port)
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if nodes:
        # Rank 0 runs on the step's first node, not always the job's; the port depends on
        # the step too, so that two steps of one job at the same time do not collide.
        first = expand_nodelist(nodes)[0]
        step = f"{os.environ.get('SLURM_JOB_ID', '0')}.{os.environ.get('SLURM_STEP_ID', '0')}"
        return first, 20000 + zlib.crc32(step.encode()) % 20000
    raise RuntimeError(
        f"{info.world_size} ranks but no way to find rank 0: install mpi4py "
        "(pip install mpi4py mpich) and launch with `python -m mpi4py -m hpc_multires`, "
        "or set MASTER_ADDR and MASTER_PORT")


class Comm:
    """A set of ranks (the whole job, or one stage's group), its device, its collectives.

    `rank` and `world_size` are within the set; `global_ranks` maps them to job ranks.
    With `mpi` (an MPI communicator of the same ranks, the `mpi` backend's), the scalar
    collectives of every step (`sum`, `max_started`) and `barrier` go through MPI rather
    than gloo: a few microseconds in shared memory, no gloo thread woken per step.
    """

    def __init__(self, info: RankInfo, device: torch.device,
                 group: dist.ProcessGroup | None = None,
                 global_ranks: tuple[int, ...] | None = None,
                 store: dist.Store | None = None, mpi: Any = None) -> None:
        self.info = info
        self.device = device
        self.group = group
        self.global_ranks = global_ranks or tuple(range(info.world_size))
        self.store = store
        self.mpi = mpi

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def is_root(self) -> bool:
        return self.info.rank == 0

    @property
    def distributed(self) -> bool:
        return self.info.world_size > 1

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks of a few scalars, in float64 (a sync point)."""
        if self.mpi is not None and self.distributed:
            from mpi4py import MPI

            a = np.array(values, dtype=np.float64)
            self.mpi.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
            return [float(v) for v in a]
        t = torch.tensor(list(values), dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(t, group=self.group)
        return [float(v) for v in t.tolist()]

    def max(self, value: float) -> float:
        """Max over ranks of one scalar (a sync point)."""
        return self.max_started([value])()[0]

    def max_started(self, values: Sequence[float]) -> Callable[[], list[float]]:
        """Element-wise max over ranks, started now; call the result to wait for it.

        For a vote taken every step: started after one step and collected after the next,
        it is complete by then, so the step never waits on it (a blocking one waits for the
        slowest rank's round trip).
        """
        if self.mpi is not None and self.distributed:
            from mpi4py import MPI

            a = np.array(values, dtype=np.float64)
            request = self.mpi.Iallreduce(MPI.IN_PLACE, a, op=MPI.MAX)

            def counted() -> list[float]:
                request.Wait()
                return [float(v) for v in a]
            return counted
        t = torch.tensor(list(values), dtype=torch.float64)
        if not self.distributed:
            return lambda: [float(v) for v in t.tolist()]
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

        def result() -> list[float]:
            work.wait()
            return [float(v) for v in t.tolist()]
        return result

    def barrier(self) -> None:
        if self.mpi is not None and self.distributed:
            self.mpi.Barrier()
        elif self.distributed:
            dist.barrier(group=self.group)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` of this set's rank `src`, on every rank of the set."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.global_ranks[src], group=self.group)
        return box[0]

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank of the set."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def subgroup(self, ranks: tuple[int, ...], group: dist.ProcessGroup | None,
                 mpi: Any = None) -> Comm:
        """The Comm of a subset of this job's ranks (this rank must be in it); `mpi`: an MPI
        communicator of those ranks for the scalar collectives."""
        info = replace(self.info, rank=ranks.index(self.info.rank), world_size=len(ranks))
        return Comm(info, self.device, group, ranks, self.store, mpi)

    def wait_all(self, tag: str, poll_s: float = 0.2,
                 interrupt: Callable[[], None] | None = None) -> None:
        """A barrier over the whole job that may wait for hours without timing out.

        Ranks idle here while other rank groups finish their stages, for as long as those
        take; a collective would hit its timeout. Each rank counts itself in on the
        rendezvous store and polls, sleeping, until all have.
        """
        if self.store is None or not self.distributed:
            return
        self.store.add(tag, 1)
        while self.store.add(tag, 0) < self.info.world_size:
            if interrupt is not None:
                interrupt()  # may raise, e.g. when the job is being preempted
            time.sleep(poll_s)

    def flag(self, key: str, value: str | None = None) -> str | None:
        """A job-wide string set by any rank and read by any (None: not set)."""
        if self.store is None:
            return value
        if value is not None:
            self.store.set(key, value)
            return value
        return self.store.get(key).decode() if self.store.check([key]) else None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as trained: DDP (gradient allreduce during backward) when distributed.

        DDP broadcasts rank 0's parameters at construction, so all ranks start equal.
        """
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=ids, process_group=self.group)


def init(timeout_s: float = 300.0) -> Comm:
    """Discover ranks, pick the device and initialise torch.distributed when needed.

    gloo on CPU; when CUDA is present (the local rank picks the GPU), NCCL for CUDA
    tensors and gloo for CPU ones. With one process nothing is initialised.
    """
    info = discover()
    if torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if info.world_size == 1:
        return Comm(info, device)
    host, port = rendezvous_address(info)
    timeout = datetime.timedelta(seconds=timeout_s)
    # Our own TCP store (rather than init_method=tcp://) so that the driver can use it for
    # barriers without timeout between plan waves and for job-wide flags.
    store = dist.TCPStore(host, port, info.world_size, is_master=info.rank == 0,
                          timeout=timeout)
    # With CUDA the gradients go through NCCL, and the scalar collectives on CPU tensors
    # (losses, metrics, votes) through gloo: NCCL alone cannot reduce a CPU tensor.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=info.rank,
                            world_size=info.world_size, timeout=timeout)
    return Comm(info, device, store=store)


def shutdown(comm: Comm | None = None) -> None:
    """Leave together: no rank tears down the rendezvous store while others still use it."""
    if dist.is_available() and dist.is_initialized():
        # Whatever still holds a process group (a finished stage's DDP wrapper caught in a
        # reference cycle) is freed here, while the groups are valid, not during
        # interpreter exit, where freeing gloo work objects can abort the process
        # ("terminate called without an active exception", seen rarely at the end of runs).
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    if comm is not None and comm.store is not None:
        if comm.is_root:
            time.sleep(0.5)  # the store lives in rank 0: let the clients disconnect first
        comm.store = None
