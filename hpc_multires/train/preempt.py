"""Stopping cleanly on a signal: Slurm's warning before a time limit or a preemption.

Slurm sends the signal asked for with `--signal=USR1@SECONDS` before the time limit, and
SIGTERM when it preempts or cancels a job. A handler only sets a flag; the training loop
asks every step whether any rank of the stage has it set (an allreduce of the flag), so
all ranks stop at the same step, write one checkpoint, and the job exits with
`PREEMPTED_EXIT` for the batch script to requeue itself.
"""

from __future__ import annotations

import signal
from types import FrameType

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later", what a requeued job does

_received: list[str] = []


def _handler(signum: int, frame: FrameType | None) -> None:
    del frame
    _received.append(signal.Signals(signum).name)


def install(signals: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
    """Catch `signals` from now on (call in the main thread of each rank)."""
    for s in signals:
        signal.signal(s, _handler)


def requested() -> bool:
    return bool(_received)


def reason() -> str:
    return _received[0] if _received else ""


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint; resume to continue."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
