"""The MPI world of a data command (synth, convert, pyramid): rank, size, barrier.

Data commands need no torch.distributed: each rank writes its own shards and the
ranks only meet at a barrier. Without mpi4py (or with one process) this is rank 0 of 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpc_multires.comm.ranks import mpi_of, mpi_world, rank_info_from_env, with_mpi_world
from hpc_multires.errors import UserError


@dataclass
class DataWorld:
    rank: int
    size: int
    mpi: Any = None

    def barrier(self) -> None:
        if self.mpi is not None:
            self.mpi.Barrier()

    def gather_sum(self, value: int) -> int:
        return int(self.mpi.allreduce(value)) if self.mpi is not None else value

    def mine(self, num_items: int) -> range:
        """Round-robin share of range(num_items) for this rank."""
        return range(self.rank, num_items, self.size)


def data_world() -> DataWorld:
    """This process's rank and size among the ranks of the data command, from MPI.

    The launcher's environment and MPI must agree: when `srun` starts tasks without
    connecting their MPI (no `--mpi=pmi2`/`pmix`, and MpiDefault=none), every task
    is an MPI world of its own, and taking that for the truth would have each of them
    write (and delete) every shard at once.
    """
    # A launcher the environment table does not know (PMIx only) still gives MPI's world.
    info = with_mpi_world(rank_info_from_env())
    mpi = mpi_of(info)
    if info.world_size > 1 and mpi is None:
        world = mpi_world()
        if world is None:
            raise UserError(
                f"{info.world_size} ranks but mpi4py is not available to coordinate them; "
                "install it (pip install mpi4py mpich) or run the data command on one rank")
        if int(world.Get_size()) == info.world_size:  # the same count, numbered otherwise
            raise UserError(
                f"the {info.launcher} launcher calls this process rank {info.rank} but MPI "
                f"calls it rank {int(world.Get_rank())}; launch with mpiexec or "
                "`srun --mpi=pmi2` (or pmix) alone, not one launcher inside another")
        raise UserError(
            f"the {info.launcher} launcher started {info.world_size} ranks but MPI connects "
            f"{int(world.Get_size())}; launch with `srun --mpi=pmi2` (or pmix) or with "
            "mpiexec, and run `python -m mpi4py -m hpc_multires`")
    if mpi is None:
        return DataWorld(0, 1)
    return DataWorld(info.rank, info.world_size, mpi)
