"""What MPICH leaves on a node when a job never reaches MPI_Finalize: give the names up
once every rank has started.

- **The node segment.** MPICH maps one shared-memory file per node
  (`/dev/shm/mpich_shm_<id>_<n>`, 2 MiB for two ranks, more with more) and unlinks its name
  in MPI_Finalize. /dev/shm is the node's memory.
- **Hydra's topology file.** Under `mpiexec`, the hydra proxy of each node writes the
  node's hwloc topology to `/tmp/hydra_hwloc_xmlfile_<random>` for its ranks' MPI_Init to
  read, and removes it when the job ends normally.

A job that never gets to the normal end (MPI_Abort after an error, a rank killed by the
OOM killer, `scancel`, a time limit) leaves both behind, and every aborted job adds a pair
until someone cleans the node by hand. Once every rank has finished MPI_Init (a barrier
says so), every local rank has mapped the segment and read the topology, and the names
serve no one: unlinking them keeps the mappings valid, MPICH's and hydra's own unlinks at
the end find nothing to do and say nothing, and the memory is freed with the last rank
however the job ends. An error before that point (a config mistake, found before the ranks
talk) aborts the job; the aborting rank unlinks the names first, since nobody will need
them.

Only files this process maps, or that the hydra proxy which started it holds open, are
touched, and only MPICH's; other MPI libraries keep theirs elsewhere (Open MPI under its
session directory, which it cleans itself), and under `srun` there is no hydra proxy.
`HPC_MULTIRES_KEEP_MPI_SHM=1` leaves them alone.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

MPICH_SEGMENT_PREFIX = "/dev/shm/mpich_shm_"
HYDRA_TOPOLOGY_PREFIX = "/tmp/hydra_hwloc_xmlfile_"
HYDRA_PROXY = "hydra_pmi_proxy"
# Wrapper processes allowed between a rank and its proxy (a shell script, `env`, `time`).
_MAX_WRAPPERS = 8

_released = False


def mapped_shm_files(maps: Path = Path("/proc/self/maps"),
                     prefix: str = MPICH_SEGMENT_PREFIX) -> list[str]:
    """Paths under `prefix` that a process has mapped (named or already unlinked), from its
    /proc/PID/maps; MPICH's node segments by default."""
    paths: set[str] = set()
    with contextlib.suppress(OSError):
        for line in maps.read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(prefix):
                paths.add(fields[5].removesuffix(" (deleted)"))
    return sorted(paths)


def open_files(fds: Path, prefix: str) -> list[str]:
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


def hydra_topology_files(pid: int | None = None, proc: Path = Path("/proc")) -> list[str]:
    """The topology files that the hydra proxy which started process `pid` (this one by
    default; wrapper processes in between are passed over) holds open; none when no hydra
    proxy started it (`srun`, a single process) or /proc does not tell."""
    pid = os.getpid() if pid is None else pid
    with contextlib.suppress(OSError, ValueError, IndexError):
        for _ in range(_MAX_WRAPPERS + 1):
            pid = _parent_pid(proc, pid)
            if pid <= 1:
                return []
            if (proc / str(pid) / "comm").read_text().strip() == HYDRA_PROXY:
                return open_files(proc / str(pid) / "fd", HYDRA_TOPOLOGY_PREFIX)
    return []


def _keep() -> bool:
    return os.environ.get("HPC_MULTIRES_KEEP_MPI_SHM", "") not in ("", "0")


def unlink_node_files() -> None:
    """Unlink the names of the MPICH node segments this process maps and of the topology
    file its hydra proxy wrote. Safe alone only when no rank needs them any more: after
    `release_node_files`' barrier, or when the job is being aborted."""
    if _keep():
        return
    for path in mapped_shm_files() + hydra_topology_files():
        with contextlib.suppress(FileNotFoundError):  # another rank of the node was first
            os.unlink(path)


def release_node_files(mpi: Any) -> None:
    """Unlink the names of MPICH's node segments and hydra's topology files once every rank
    of `mpi` (COMM_WORLD) has started. Collective over `mpi` the first time it is called, a
    no-op after that."""
    global _released
    if _released or _keep():
        return
    _released = True
    if int(mpi.Get_size()) > 1:
        mpi.Barrier()  # every rank is past MPI_Init: each has mapped the segment, read the file
    unlink_node_files()
