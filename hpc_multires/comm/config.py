"""The communication component's settings: gradient allreduce backend and timeouts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hpc_multires.errors import require


@dataclass(frozen=True, kw_only=True)
class CommConfig:
    """How ranks talk."""

    backend: Literal["ddp", "mpi", "horovod"] = "ddp"
    """Gradient allreduce: ddp (torch.distributed DDP: gloo on CPU, NCCL on GPU), mpi (CPU
    only: mpi4py Iallreduce of bucketed gradients during backward, one MPI communicator
    per stage group; needs an MPI launch) or horovod (hvd.DistributedOptimizer; one
    Horovod process set per stage group; `make horovod`)."""
    compression: Literal["none", "fp16"] = "none"
    """horovod: compress gradients to fp16 for the allreduce (none: full precision)."""
    timeout_s: float = 300.0
    """A collective waiting longer than this fails the job instead of hanging it."""

    def check(self) -> None:
        """Raise ConfigError naming the key and the fix for a value that cannot work."""
        require(self.timeout_s > 0, "comm.timeout_s", self.timeout_s,
                "use a positive number of seconds")
