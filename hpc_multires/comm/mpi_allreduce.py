"""MPI as the gradient allreduce backend on CPU ranks (`[comm] backend = "mpi"`).

The gradients go through mpi4py's `Iallreduce` on flat buffers, bucketed like DDP's: each
`.grad` is a view of its bucket, backward accumulates into it (the loss scaled by
1/ranks, so that the sum is the mean), and a bucket's allreduce starts from a hook
(`register_post_accumulate_grad_hook`) once all its gradients are in, while backward
goes on with the layers below. `GradientReducer.wait` (before the optimizer step)
finishes the last buckets. Buckets start in their fixed order on every rank, as MPI
requires of nonblocking collectives.

Each stage group gets its own communicator, split from the job's MPI world once for every
distinct group on every rank (as the torch process groups are), so concurrent stages
reduce only among their own ranks. torch.distributed (gloo) still carries the driver's
control messages. CUDA tensors are refused: NCCL (backend "ddp") is the GPU path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpc_multires.comm.ranks import RankInfo, mpi_of
from hpc_multires.errors import ConfigError, UserError

BUCKET_BYTES = 25 * 2**20
"""A bucket's size, as DDP's default: few enough allreduces for a large model, and the
last layers' bucket starts while backward still runs through the first layers."""
FIRST_BUCKET_BYTES = 2**20
"""The first bucket (the last layers' gradients, ready first) is small, as DDP's, so that
communication starts early in backward."""


class MpiGroups:
    """The job's MPI world split into one communicator per distinct stage group."""

    def __init__(self, groups: list[tuple[int, ...]], info: RankInfo, device: torch.device
                 ) -> None:
        if device.type != "cpu":
            raise ConfigError(
                f"comm.backend = 'mpi' with {device.type} tensors: the mpi backend reduces "
                "CPU gradients; use backend = \"ddp\" (NCCL) on GPUs")
        self.rank = info.rank
        self.comms: dict[tuple[int, ...], Any] = {}  # the gradients'
        self.control: dict[tuple[int, ...], Any] = {}  # the scalar collectives' (Comm.mpi)
        world = mpi_of(info)
        if world is None:
            if info.world_size > 1:
                raise UserError(
                    f"[comm] backend = \"mpi\" but the {info.world_size} ranks are not one MPI "
                    "job (launched by torchrun, or by srun without --mpi=pmi2/pmix?); launch "
                    "with mpiexec or srun --mpi=pmi2 and `python -m mpi4py -m hpc_multires`, "
                    "or use backend = \"ddp\"")
            return
        from mpi4py import MPI

        # Every rank takes part in every split, in the same order (a collective of the
        # world); a rank outside a group gets COMM_NULL and keeps nothing.
        for group in dict.fromkeys(groups):
            sub = world.Split(0 if info.rank in group else MPI.UNDEFINED, key=info.rank)
            if sub != MPI.COMM_NULL:
                self.comms[group] = sub
                self.control[group] = sub.Dup()

    def control_comm(self, ranks: tuple[int, ...]) -> Any:
        """The communicator of `ranks` for the stage's scalar collectives (its losses, stop
        vote, barriers: `Comm.mpi`), apart from the gradients' (None with one rank)."""
        return self.control.get(ranks)

    def reducer(self, model: nn.Module, ranks: tuple[int, ...]) -> GradientReducer | None:
        """Gradient averaging over `ranks` (this rank's stage group) for `model`, whose
        parameters and buffers are first set to the group's first rank's, as DDP does
        when built. None with one rank: there is nothing to reduce."""
        comm = self.comms.get(ranks)
        if comm is None or comm.Get_size() == 1:
            return None
        for tensor in [*model.parameters(), *model.buffers()]:
            comm.Bcast(tensor.detach().numpy(), root=0)
        return GradientReducer(list(model.parameters()), comm)

    def free(self) -> None:
        for comm in [*self.comms.values(), *self.control.values()]:
            comm.Free()
        self.comms.clear()
        self.control.clear()


class GradientReducer:
    """Averages the gradients of `params` over `comm` during backward, in buckets.

    Each `.grad` is a view of its bucket (as DDP's `gradient_as_bucket_view`): `zero_grad`
    zeroes the buckets, backward accumulates into them in place, and a bucket is reduced
    where it lies, with no copy per parameter. The training step differentiates the loss
    times `scale` (1/ranks), so the sum over the ranks is the mean with no pass over the
    gradients to divide them (exact for 2, 4, 8... ranks: a power of two scales without
    rounding). The last bucket (the first layers'
    gradients) is complete only when backward ends, with nothing left to overlap: it has
    no hooks, and `wait` reduces it.
    """

    def __init__(self, params: list[nn.Parameter], comm: Any,
                 bucket_bytes: int = BUCKET_BYTES,
                 first_bucket_bytes: int = FIRST_BUCKET_BYTES) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm
        self.scale = 1.0 / comm.Get_size()
        trained = [p for p in params if p.requires_grad]
        for p in trained:
            if p.dtype not in (torch.float32, torch.float64):
                raise ConfigError(f"comm.backend = 'mpi' with {p.dtype} parameters: it "
                                  "reduces float32 and float64 gradients; use backend = "
                                  "\"ddp\"")
        # Buckets in reverse parameter order: backward yields the last layers' gradients
        # first. A bucket holds one dtype.
        self.buckets: list[torch.Tensor] = []  # flat (n,) buffers
        self.arrays: list[Any] = []  # the same memory, as MPI takes it
        self.views: list[list[tuple[nn.Parameter, torch.Tensor]]] = []  # (param, its view)
        self.where: dict[nn.Parameter, tuple[int, torch.Tensor]] = {}  # (bucket, grad view)
        limit, size, current = first_bucket_bytes, 0, []  # type: ignore[var-annotated]
        for p in reversed(trained):
            if current and (size + p.numel() * p.element_size() > limit
                            or p.dtype != current[0].dtype):
                self._add_bucket(current)
                limit, size, current = bucket_bytes, 0, []
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            self._add_bucket(current)
        self.filled = [0] * len(self.buckets)  # gradients in each bucket this step
        self.started: list[Any] = []  # requests of the buckets started, in bucket order
        self.hooked = [p for views in self.views[:-1] for p, _ in views]
        self.hooks = [p.register_post_accumulate_grad_hook(self.ready) for p in self.hooked]
        self.zero_grad()
        for p, (_, view) in self.where.items():
            p.grad = view

    def _add_bucket(self, params: list[nn.Parameter]) -> None:
        bucket = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype)
        offset, views = 0, []
        for p in params:
            view = bucket[offset:offset + p.numel()].view_as(p)
            self.where[p] = (len(self.buckets), view)
            views.append((p, view))
            offset += p.numel()
        self.buckets.append(bucket)
        self.arrays.append(bucket.numpy())
        self.views.append(views)

    def zero_grad(self) -> None:
        """Every `.grad` zero, in its bucket (instead of the optimizer's zero_grad, which
        would drop the views)."""
        for bucket in self.buckets:
            bucket.zero_()

    @staticmethod
    def _in_bucket(p: nn.Parameter, view: torch.Tensor) -> None:
        """Where `p.grad` is not its view of the bucket (set to None or replaced since),
        copy it in (None: 0)."""
        if p.grad is None:
            view.zero_()
        else:
            view.copy_(p.grad)
        p.grad = view

    def ready(self, p: torch.Tensor) -> None:
        """Backward has accumulated `p.grad` (a hooked parameter's): start the buckets now
        complete, in order."""
        index, view = self.where[p]  # type: ignore[index]
        if p.grad is not view:
            self._in_bucket(p, view)  # type: ignore[arg-type]
        self.filled[index] += 1
        while len(self.started) < len(self.buckets) - 1:
            index = len(self.started)
            if self.filled[index] < len(self.views[index]):
                break
            self.started.append(self.comm.Iallreduce(self.MPI.IN_PLACE, self.arrays[index],
                                                     op=self.MPI.SUM))
        if self.started:
            # MPI moves a nonblocking collective on only inside MPI calls: give it one.
            self.MPI.Request.Testall(self.started)

    def wait(self) -> None:
        """Finish this step's reduction: every `.grad` is then the mean over the ranks.

        The buckets not started during backward (the last, and any that a parameter
        without a gradient left incomplete) go through a blocking `Allreduce`, which
        MPI's shared-memory collectives make several times faster than `Iallreduce` for
        small buffers. Which buckets those are is the same on every rank (same model, same
        objective), so every rank makes the same calls in the same order, as MPI requires.
        A parameter backward gave no gradient (unused in this step) counts as 0, as DDP's
        unused parameters do."""
        self.MPI.Request.Waitall(self.started)
        for index in range(len(self.started), len(self.buckets)):
            for p, view in self.views[index]:
                if p.grad is not view:
                    self._in_bucket(p, view)
            self.comm.Allreduce(self.MPI.IN_PLACE, self.arrays[index], op=self.MPI.SUM)
        self.started = []
        self.filled = [0] * len(self.buckets)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
