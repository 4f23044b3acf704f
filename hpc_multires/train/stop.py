"""When a stage stops early: asked for (`StopAt`) or agreed by its ranks (`StopVote`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from hpc_multires.comm.dist import Comm
from hpc_multires.train import preempt


@dataclass
class StopAt:
    """Stop (with a checkpoint) once `epoch` epochs of `stage` (None: any stage) are done."""

    epoch: int
    stage: str | None = None

    def applies(self, stage: str, epoch: int) -> bool:
        return (self.stage is None or self.stage == stage) and epoch >= self.epoch


class Vote(NamedTuple):
    """What the stage's ranks agreed after a step."""

    preempted: bool
    """Some rank was signalled, or another group stopped the job on a signal."""
    elapsed_s: float
    """The slowest rank's seconds of training in this stage."""


class StopVote:
    """The stop vote of a stage's ranks, taken every step.

    Each rank offers its preemption flag and its stage clock; the max over ranks decides.
    The vote is an allreduce started after one step and counted after the next: every rank
    acts on the same vote after the same step, and no step waits for the slowest rank's
    round trip. A signal to a rank of another group reaches this stage through the
    job-wide flag, which the stage's root polls about once every `flag_every_s` (reading
    the store is a network round trip) and carries into the vote.
    """

    def __init__(self, comm: Comm, clock: Callable[[], float], stage_start: float,
                 flag_every_s: float = 1.0) -> None:
        self.comm = comm
        self.clock = clock
        self.stage_start = stage_start  # the clock's reading when the stage began to train
        self.flag_every_s = flag_every_s
        self._pending: Callable[[], list[float]] | None = None  # started, not yet counted
        self._flag_polled = -math.inf  # when the job-wide flag was last read

    def cast(self) -> Vote | None:
        """Start this step's vote; return the previous step's, now counted (None after the
        first step of an epoch)."""
        started = self.comm.max_started([float(preempt.requested() or self._job_preempted()),
                                          self.clock() - self.stage_start])
        decided, self._pending = self._pending, started
        return _counted(decided)

    def close(self) -> Vote | None:
        """The last step's vote, counted (at an epoch's end, however the epoch ended)."""
        decided, self._pending = self._pending, None
        return _counted(decided)

    def _job_preempted(self) -> bool:
        """Whether a rank of another group stopped the job on a signal (read by the stage's
        root only: the vote carries it to the other ranks)."""
        now = self.clock()
        if not self.comm.is_root or now - self._flag_polled < self.flag_every_s:
            return False
        self._flag_polled = now
        return self.comm.flag("preempted") is not None


def _counted(started: Callable[[], list[float]] | None) -> Vote | None:
    if started is None:
        return None
    preempted, elapsed_s = started()
    return Vote(preempted > 0, elapsed_s)
