"""What an MPI job ended before its normal end leaves on the machine, and its removal.

Many tests end an mpiexec job on purpose (an error's MPI_Abort, a rank killed with
SIGKILL, a collective's timeout), and nothing then reaches the clean-up of a normal end:

- MPICH maps one shared-memory file per node, `/dev/shm/mpich_shm_*` (2 MiB for two
  ranks, more with more), and unlinks its name only in MPI_Finalize;
- hydra's proxy writes the node's hwloc topology to `/tmp/hydra_hwloc_xmlfile_*` for its
  ranks' MPI_Init and removes it only when the job ends normally;
- the named semaphores of multiprocessing's queues and locks (`/dev/shm/sem.mp-*`; the
  loader uses none, a library might) are unlinked by Python's resource tracker, which the
  abort kills too.

On a cluster the job's epilog clears /dev/shm, and `srun` starts no hydra proxy. This
machine runs hundreds of such jobs per test session, so the suite removes what they leave
itself (conftest.py): names that appeared while it ran and that no live process maps or
holds open. The product never looks at other processes for this.
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

MPICH_SEGMENT_PREFIX = "/dev/shm/mpich_shm_"
SEMAPHORE_PREFIX = "/dev/shm/sem.mp-"
HYDRA_TOPOLOGY_PREFIX = "/tmp/hydra_hwloc_xmlfile_"
LEFTOVER_PREFIXES = (MPICH_SEGMENT_PREFIX, SEMAPHORE_PREFIX, HYDRA_TOPOLOGY_PREFIX)
HYDRA_PROXY = "hydra_pmi_proxy"
# Wrapper processes allowed between a rank and its proxy (a shell script, `env`, `time`).
_MAX_WRAPPERS = 8


def mapped_files(maps: Path, prefix: str | tuple[str, ...] = MPICH_SEGMENT_PREFIX
                 ) -> list[str]:
    """Paths under `prefix` that a process has mapped (named or already unlinked), from its
    /proc/PID/maps; MPICH's node segments by default; none when that cannot be read."""
    paths: set[str] = set()
    with contextlib.suppress(OSError):
        for line in maps.read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(prefix):
                paths.add(fields[5].removesuffix(" (deleted)"))
    return sorted(paths)


def open_files(fds: Path, prefix: str | tuple[str, ...]) -> list[str]:
    """Paths under `prefix` that a process holds open (named or already unlinked), from its
    /proc/PID/fd; none when that cannot be read."""
    paths: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):  # closed while we looked
                target = os.readlink(fd)
                if target.startswith(prefix):
                    paths.add(target.removesuffix(" (deleted)"))
    return sorted(paths)


def _parent_pid(proc: Path, pid: int) -> int:
    # /proc/PID/stat: "pid (comm) state ppid ...", and comm may hold spaces or parentheses.
    return int((proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def hydra_topology_files(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """The topology files that the hydra proxy which started process `pid` (wrapper
    processes in between are passed over) holds open; none when no hydra proxy started it
    or /proc does not tell."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for _ in range(_MAX_WRAPPERS + 1):
            pid = _parent_pid(proc, pid)
            if pid <= 1:
                return []
            if (proc / str(pid) / "comm").read_text().strip() == HYDRA_PROXY:
                return open_files(proc / str(pid) / "fd", HYDRA_TOPOLOGY_PREFIX)
    return []


def job_files(pids: Iterable[int]) -> set[str]:
    """MPICH's node segments that the ranks `pids` map and the topology files their hydra
    proxies hold: what their job leaves behind if it never ends normally."""
    return {f for pid in pids for f in (*mapped_files(Path(f"/proc/{pid}/maps")),
                                        *hydra_topology_files(pid))}


def leftover_candidates() -> set[str]:
    """The names under LEFTOVER_PREFIXES that exist now, in use or not."""
    return {path for prefix in LEFTOVER_PREFIXES for path in glob.glob(glob.escape(prefix) + "*")}


def users(prefixes: tuple[str, ...] = LEFTOVER_PREFIXES, proc: Path = Path("/proc")
          ) -> dict[str, set[int]]:
    """Paths under `prefixes` that some live process maps or holds open, each with the ids
    of those processes."""
    used: dict[str, set[int]] = {}
    for pid in proc.iterdir():
        if pid.name.isdigit():
            for path in (*mapped_files(pid / "maps", prefixes),
                         *open_files(pid / "fd", prefixes)):
                used.setdefault(path, set()).add(int(pid.name))
    return used


def remove_unused(paths: Iterable[str], wait_s: float = 0.0) -> list[str]:
    """Unlink those of `paths` under LEFTOVER_PREFIXES that no live process maps or holds
    open (a job still running keeps its own); returns the paths removed.

    With `wait_s`, those still in use are looked at again until they are free or that
    time has passed: a job's launcher can return before the last of its killed ranks has
    left memory, and the rank maps the segment until then. What only this process and its
    helpers (in-process CLI runs' fork servers) hold stays held while it waits: no use
    waiting for those alone.
    """
    left = {p for p in paths if p.startswith(LEFTOVER_PREFIXES)}
    removed: list[str] = []
    deadline = time.monotonic() + wait_s
    while left:
        used = users()
        for path in sorted(left - used.keys()):
            left.discard(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
        if not left or time.monotonic() >= deadline:
            break
        own = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
        if all(used.get(path, set()) <= own for path in left):
            break
        time.sleep(0.25)
    return sorted(removed)
