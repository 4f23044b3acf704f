"""Horovod as the gradient allreduce backend (`[comm] backend = "horovod"`).

torch.distributed (gloo) still carries the driver's control messages (barriers, metric
sums, broadcasts of small objects); Horovod carries the gradients. Each stage group that
is not the whole job gets its own Horovod process set, created at `hvd.init`, so that
concurrent stages reduce only among their own ranks.
"""

from __future__ import annotations

from typing import Any

import torch

from hpc_multires.errors import UserError


def import_horovod() -> Any:
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise UserError(
            f"[comm] backend = \"horovod\" but Horovod cannot be imported ({e}); build and "
            "install it with `make horovod` (see docs/horovod.md), load your site's Horovod "
            "module, or use backend = \"ddp\"") from None
    return hvd


class HorovodGroups:
    """Horovod initialised with one process set per distinct stage group."""

    def __init__(self, groups: list[tuple[int, ...]], world_size: int) -> None:
        self.hvd = import_horovod()
        subsets = [g for g in dict.fromkeys(groups) if len(g) < world_size]
        self.sets = {g: self.hvd.ProcessSet(list(g)) for g in subsets}
        self.hvd.init(process_sets=list(self.sets.values()))
        if self.hvd.size() != world_size:
            raise UserError(
                f"Horovod sees {self.hvd.size()} ranks, the launcher {world_size}; launch "
                "with mpiexec/srun so that Horovod's MPI or Gloo controller sees every rank")

    def process_set(self, ranks: tuple[int, ...]) -> Any:
        return self.sets.get(ranks, self.hvd.global_process_set)

    def distribute(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   ranks: tuple[int, ...], compression: str,
                   broadcast: bool) -> torch.optim.Optimizer:
        """Wrap the optimizer so that `step` averages gradients over `ranks`.

        With `broadcast`, the group's first rank's parameters and optimizer state are
        sent to the rest (a fresh or fused start; a resumed one loads them everywhere).
        """
        hvd = self.hvd
        pset = self.process_set(ranks)
        comp = hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
        if broadcast:
            # hvd.broadcast_parameters / broadcast_optimizer_state take no process set in
            # 0.28.1: broadcast tensor by tensor (root_rank is a job rank in the set).
            for name, tensor in model.state_dict().items():
                hvd.broadcast_(tensor, root_rank=ranks[0], name=f"init.{name}",
                               process_set=pset)
            state = hvd.broadcast_object(optimizer.state_dict(), root_rank=ranks[0],
                                         name="init.optimizer", process_set=pset)
            optimizer.load_state_dict(state)
        return hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                        compression=comp, op=hvd.Average, process_set=pset)

    def shutdown(self) -> None:
        self.hvd.shutdown()
