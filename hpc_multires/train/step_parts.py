"""Where a training step's time goes: laps of the loop, summed per part (`log.step_parts`).

The loop calls `lap(part)` at the end of each part of a step (batch fetch, host-to-device,
forward, backward, ...): the time since the previous lap is that part's. Laps are
continuous, so the parts of the steps between two log steps add up to the wall time
between them; nothing is left out, and what no named part covers is `other`. Each step
record then carries `parts_ms`, the mean milliseconds per step of each part since the
previous record, on the stage's first rank (`benchmarks/step_cost.py` reads them).

Disabled (the default), `lap` does nothing but return. Enabled, it costs one
`time.perf_counter()` call per part; on a GPU the parts are host time (launches), not
device time, unless something in the part waits for the device.
"""

from __future__ import annotations

import time

PARTS = ("fetch", "h2d", "forward", "backward", "allreduce", "optimizer", "vote", "log",
         "other")
"""The named parts, in a step's order. fetch: waiting for the reader's next batch; h2d:
host-to-device copies; backward includes DDP's and Horovod's gradient allreduce (it runs
during backward; the `mpi` backend's wait for its last buckets is `allreduce`); vote: the
stop vote; log: the step record (its loss allreduce, the metrics write) and checkpoints
inside an epoch; other: Python work between the parts."""


class StepParts:
    """Seconds per part of the steps since the last `take`."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._sums = dict.fromkeys(PARTS, 0.0)
        self._last = time.perf_counter()

    def restart(self) -> None:
        """Start counting from now (an epoch's first step: its fetch starts here)."""
        if self.enabled:
            self._sums = dict.fromkeys(PARTS, 0.0)
            self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        """The time since the previous lap was spent in `part`."""
        if not self.enabled:
            return
        now = time.perf_counter()
        self._sums[part] += now - self._last
        self._last = now

    def take(self, steps: int) -> dict[str, float]:
        """Mean milliseconds per step of each part over the last `steps` steps (those laps
        since the previous take), and start again; {} when disabled."""
        if not self.enabled:
            return {}
        self.lap("other")
        out = {p: round(1e3 * s / max(steps, 1), 4) for p, s in self._sums.items()}
        self._sums = dict.fromkeys(PARTS, 0.0)
        return out
