"""MPICH's node segment in /dev/shm: give its name up once every rank has attached.

MPICH maps one shared-memory file per node (`/dev/shm/mpich_shm_<id>_<n>`, 2 MiB for two
ranks, more with more) and unlinks its name in MPI_Finalize. A job that never gets there
(MPI_Abort after an error, a rank killed by the OOM killer, `scancel`, a time limit) leaves
the file behind, and /dev/shm is the node's memory: every aborted job costs the node a few
MiB until someone cleans it by hand. Once every rank has finished MPI_Init (a barrier says
so), all have the file mapped and the name serves no one: unlinking it keeps the mappings
valid, MPICH's own unlink at finalize finds nothing to do and says nothing, and the memory
is freed with the last rank however the job ends. An error before that point (a config
mistake, found before the ranks talk) aborts the job; the aborting rank unlinks the name
first, since nobody will need it.

Only names this process has mapped are touched, and only MPICH's; other MPI libraries keep
their segments elsewhere (Open MPI under its session directory, which it cleans itself).
`HPC_MULTIRES_KEEP_MPI_SHM=1` leaves them alone.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

MPICH_SEGMENT_PREFIX = "/dev/shm/mpich_shm_"

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


def _keep() -> bool:
    return os.environ.get("HPC_MULTIRES_KEEP_MPI_SHM", "") not in ("", "0")


def unlink_node_segments() -> None:
    """Unlink the names of the MPICH node segments this process maps. Safe alone only when
    no rank needs the name any more: after `release_node_segments`' barrier, or when the
    job is being aborted."""
    if _keep():
        return
    for path in mapped_shm_files():
        with contextlib.suppress(FileNotFoundError):  # another rank of the node was first
            os.unlink(path)


def release_node_segments(mpi: Any) -> None:
    """Unlink the names of MPICH's node segments once every rank of `mpi` (COMM_WORLD) has
    attached. Collective over `mpi` the first time it is called, a no-op after that."""
    global _released
    if _released or _keep():
        return
    _released = True
    if int(mpi.Get_size()) > 1:
        mpi.Barrier()  # every rank is past MPI_Init, so every local rank has mapped the file
    unlink_node_segments()
