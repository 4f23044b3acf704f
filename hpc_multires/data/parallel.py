"""The MPI world of a data command (synth, convert, pyramid): rank, size, barrier.

Data commands need no torch.distributed: each rank writes its own shards and the
ranks only meet at a barrier. Without mpi4py (or with one process) this is rank 0 of 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpc_multires.comm.ranks import mpi_world, rank_info_from_env


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
    info = rank_info_from_env()
    mpi = mpi_world() if info.world_size > 1 else None
    if mpi is None:
        if info.world_size > 1:
            raise RuntimeError(
                f"{info.world_size} ranks but mpi4py is not available to coordinate them; "
                "install it (pip install mpi4py mpich) or run the data command on one rank")
        return DataWorld(0, 1)
    return DataWorld(mpi.Get_rank(), mpi.Get_size(), mpi)
