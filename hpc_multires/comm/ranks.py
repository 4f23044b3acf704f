"""Who am I? Rank discovery from the launcher's environment.

Every launcher tells its processes their place in the job through environment
variables, each with its own names. `LAUNCHERS` is that table; `rank_info_from_env`
turns the first matching row into one `RankInfo`, skipping the Slurm row in a batch
script's shell (no step id) and under mpiexec inside an allocation (an MPI row disagrees
with it). The node index is not published by every launcher (Open MPI and MPICH do not);
`discover` fills it in from an mpi4py hostname exchange when mpi4py is loaded, and takes
rank and size from MPI under a launcher that matches no row (PMIx only).

Everything else that asks where this process stands asks here: `rank_and_size` (cheap,
for the command line's messages, never starts MPI), `mpi_of` (the MPI communicator that
connects the job's ranks, or None), `start_mpi` (the one place MPI is started),
`with_mpi_world` (MPI's world where the environment
names none) and `node_barrier` (a wait for the other ranks of this node).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job."""

    rank: int
    """Global rank, 0 .. world_size - 1."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank among the processes on this node; picks the GPU."""
    local_size: int
    """Number of processes on this node."""
    node_index: int
    """Index of this node among the job's nodes, 0 .. node_count - 1."""
    node_count: int
    """Number of nodes in the job."""
    launcher: str
    """Which row of `LAUNCHERS` matched ("slurm", "openmpi", "mpich", "torchrun"), "mpi"
    (no row matched; MPI's world, see `discover`) or "single"."""

    @property
    def is_root(self) -> bool:
        return self.rank == 0


Names = str | tuple[str, ...] | None
"""One variable name, or several in order of preference (the first one set wins)."""


@dataclass(frozen=True)
class Launcher:
    """Environment variable names one launcher sets. `None`: the launcher does not set it."""

    name: str
    rank: Names
    world_size: Names
    local_rank: Names
    local_size: Names
    node_index: Names
    node_count: Names


# Order matters: under `srun --mpi=pmi2`, Slurm and PMI variables are both set and the
# Slurm row knows more (node index and count); torchrun inside a Slurm allocation sets
# RANK and also inherits SLURM_* of the batch step, so torchrun's own names come first.
# srun always sets the SLURM_STEP_* sizes of its step; SLURM_NTASKS and SLURM_NNODES keep
# the allocation's under `srun --preserve-env`, so they are only the fallback.
LAUNCHERS: tuple[Launcher, ...] = (
    Launcher("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
             "GROUP_RANK", "GROUP_WORLD_SIZE"),
    Launcher("slurm", "SLURM_PROCID", ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
             "SLURM_LOCALID", None, "SLURM_NODEID", ("SLURM_STEP_NUM_NODES", "SLURM_NNODES")),
    Launcher("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
             "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", None, None),
    Launcher("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", None, None),
)

# Rows of MPI launchers. mpiexec/mpirun inside a Slurm allocation starts its daemons
# with srun, one per node, and the ranks inherit that step's SLURM_PROCID/SLURM_NTASKS
# (daemon index, daemon count): when such a row disagrees with Slurm's, it is the truth.
_MPI_ROWS = ("openmpi", "mpich")


def _int(env: Mapping[str, str], names: Names) -> int | None:
    for name in (names,) if isinstance(names, str) else names or ():
        if name not in env:
            continue
        value = env[name].strip()
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return None


def _started_by_mpi_launcher(env: Mapping[str, str], rank: int, size: int) -> bool:
    """An MPI launcher's rank and size are set and differ from Slurm's `rank` and `size`."""
    for row in LAUNCHERS:
        if row.name in _MPI_ROWS:
            mpi_rank, mpi_size = _int(env, row.rank), _int(env, row.world_size)
            if mpi_rank is not None and mpi_size is not None and (mpi_rank, mpi_size) != (
                    rank, size):
                return True
    return False


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int | None:
    """Tasks on this node from SLURM_STEP_TASKS_PER_NODE ("2(x3),1") and SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE"))
    node = _int(env, "SLURM_NODEID")
    if spec is None or node is None:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node] if node < len(counts) else None


def rank_info_from_env(env: Mapping[str, str] | None = None) -> RankInfo:
    """The first launcher of `LAUNCHERS` whose rank and size variables are set, else one process.

    Values a launcher does not publish get single-node defaults (local rank = rank,
    one node); `discover` corrects them with mpi4py when it can.
    """
    env = os.environ if env is None else env
    for row in LAUNCHERS:
        rank, size = _int(env, row.rank), _int(env, row.world_size)
        if rank is None or size is None:
            continue
        if row.name == "slurm" and "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
            continue  # a batch script's shell, not a task started by srun
        if row.name == "slurm" and _started_by_mpi_launcher(env, rank, size):
            continue  # mpiexec inside an allocation: SLURM_* describe its daemons' step
        local_rank = _int(env, row.local_rank)
        local_size = _int(env, row.local_size)
        if row.name == "slurm":
            local_size = _slurm_tasks_on_node(env)
        node_index = _int(env, row.node_index)
        node_count = _int(env, row.node_count)
        info = RankInfo(
            rank=rank,
            world_size=size,
            local_rank=rank if local_rank is None else local_rank,
            local_size=size if local_size is None else local_size,
            node_index=0 if node_index is None else node_index,
            node_count=1 if node_count is None else node_count,
            launcher=row.name,
        )
        _check(info)
        return info
    return RankInfo(0, 1, 0, 1, 0, 1, "single")


def _check(info: RankInfo) -> None:
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"launcher {info.launcher} gave rank {info.rank} outside world size "
                         f"{info.world_size}; check the launcher's environment")
    if not 0 <= info.node_index < info.node_count:
        raise ValueError(f"launcher {info.launcher} gave node {info.node_index} outside node "
                         f"count {info.node_count}")


def node_layout(hostnames: list[str], rank: int) -> tuple[int, int, int, int]:
    """(local_rank, local_size, node_index, node_count) of `rank` from every rank's hostname.

    Nodes are numbered in order of their lowest rank, as Slurm numbers them.
    """
    order: dict[str, int] = {}
    for host in hostnames:
        order.setdefault(host, len(order))
    mine = hostnames[rank]
    same = [r for r, host in enumerate(hostnames) if host == mine]
    return same.index(rank), len(same), order[mine], len(order)


def discover(env: Mapping[str, str] | None = None) -> RankInfo:
    """`rank_info_from_env`, with the node layout taken from MPI when mpi4py is loaded.

    A launcher outside the table (one that publishes only PMIx, such as PRRTE's prterun)
    leaves every process looking like rank 0 of 1; MPI's world is then the truth.
    """
    info = rank_info_from_env(env)
    if info.launcher in ("slurm", "torchrun"):
        return info  # they publish the node layout; host names may not tell nodes apart
    info = with_mpi_world(info)
    mpi = mpi_of(info)
    if mpi is None:
        return info  # one rank, or MPI a singleton here (e.g. torchrun): the environment is right
    import socket

    hosts: list[str] = mpi.allgather(socket.gethostname())
    local_rank, local_size, node_index, node_count = node_layout(hosts, info.rank)
    return replace(info, local_rank=local_rank, local_size=local_size,
                   node_index=node_index, node_count=node_count)


def with_mpi_world(info: RankInfo) -> RankInfo:
    """`info`, or MPI's world when the environment names one rank and MPI connects more.

    A launcher outside the table (PMIx only) leaves every process looking like rank 0 of
    1; MPI's world is then the truth (launcher "mpi", one node until `discover` looks).
    """
    if info.world_size > 1:
        return info
    mpi = mpi_world()
    if mpi is None or int(mpi.Get_size()) == 1:
        return info
    return RankInfo(int(mpi.Get_rank()), int(mpi.Get_size()), 0, 1, 0, 1, "mpi")


def mpi_of(info: RankInfo) -> Any:
    """MPI.COMM_WORLD when it connects the ranks of `info` as `info` numbers them, else None:
    with one rank, without MPI, or where each process is an MPI world of its own (torchrun,
    `srun` without `--mpi=pmi2`/`pmix`). Starts MPI when an MPI launcher started us."""
    if info.world_size == 1:
        return None
    mpi = mpi_world()
    if mpi is None or (int(mpi.Get_size()), int(mpi.Get_rank())) != (info.world_size,
                                                                     info.rank):
        return None
    return mpi


def node_barrier(info: RankInfo) -> bool:
    """Wait for the other ranks of this node (MPI's shared-memory split of the world).

    Collective over every rank of `info`'s job. False, having waited for nobody, when MPI
    does not connect them (`mpi_of`): the caller then waits for the whole job instead.
    """
    mpi = mpi_of(info)
    if mpi is None:
        return False
    from mpi4py import MPI

    node = mpi.Split_type(MPI.COMM_TYPE_SHARED, key=info.rank)
    try:
        node.Barrier()
    finally:
        node.Free()
    return True


def running_mpi() -> Any:
    """MPI.COMM_WORLD when this process has initialised MPI and not finalised it, else None.

    Never starts MPI: for the error path, which must not begin MPI's start-up where it
    has not happened (a torchrun job's ranks do not all start it)."""
    import sys

    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return None
    return mpi.COMM_WORLD


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the job's size, cheaply and without failing: MPI's when MPI
    is running with more than one rank (the truth under any launcher, one that publishes
    only PMIx included), else the launcher's variables, else rank 0 of 1. Never starts MPI.
    """
    mpi = running_mpi()
    if mpi is not None and int(mpi.Get_size()) > 1:  # a world of 1 under srun --mpi=none:
        return int(mpi.Get_rank()), int(mpi.Get_size())  # the launcher knows better
    try:
        info = rank_info_from_env()
    except ValueError:
        return 0, 1
    return info.rank, info.world_size


def mpi_world() -> Any:
    """MPI.COMM_WORLD when mpi4py is importable and the job was started by an MPI launcher.

    Importing mpi4py initialises MPI; we only do it when the environment says an MPI
    launcher (or srun) started us, so a plain `python -m hpc_multires` never does.
    """
    import sys

    if "mpi4py.MPI" not in sys.modules:
        launched_by_mpi = any(k in os.environ for k in (
            "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_STEP_ID"))
        if not launched_by_mpi or ("RANK" in os.environ and "LOCAL_RANK" in os.environ):
            return None
    try:
        MPI = start_mpi()
    except ImportError:
        return None
    return MPI.COMM_WORLD


def start_mpi() -> Any:
    """Import mpi4py.MPI, which initialises MPI on its first import; the one place that does.

    MPICH (4.x, 5.0) sends each rank's network address in its
    start-up exchange padded to a fixed size by reading past the address into whatever
    memory follows it, hex-encoded with runs of zero bytes compressed. Over Slurm's pmi2
    plugin (22.05), which reads a request with a single read of at most 1024 bytes, a
    padding full of text (source code read by earlier imports) makes a request too long,
    the plugin reports "value not properly terminated in client request" and the step dies
    or hangs in MPI_Init. `python -m hpc_multires` therefore starts MPI before importing
    the rest of the package (see `__main__`).
    """
    import sys

    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        return mpi
    from mpi4py import MPI

    return MPI


def _split_top_level(text: str) -> list[str]:
    """`text` cut at the commas outside brackets: "n[1,3],m" -> ["n[1,3]", "m"]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_host(pattern: str) -> list[str]:
    """One host pattern with any number of bracket groups: "r[1-2]-n[01-02]" -> 4 hosts."""
    open_at = pattern.find("[")
    if open_at < 0:
        return [pattern]
    close_at = pattern.find("]", open_at)
    if close_at < 0:
        raise ValueError(f"Slurm host list pattern {pattern!r} has an unclosed '['")
    prefix, ranges, rest = pattern[:open_at], pattern[open_at + 1:close_at], pattern[close_at + 1:]
    values: list[str] = []
    for part in ranges.split(","):
        lo, _, hi = part.strip().partition("-")
        if not hi:
            values.append(lo)
            continue
        width = len(lo)  # zero padding is kept: "01-02" -> "01", "02"
        values += [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
    tails = _expand_host(rest)
    return [f"{prefix}{value}{tail}" for value in values for tail in tails]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist: "n[1-3,7],gpu05" -> ["n1", "n2", "n3", "n7", "gpu05"].

    Zero padding is kept ("n[01-02]" -> "n01", "n02"); a host may hold several bracket
    groups ("rack[1-2]-n[01-02]" -> "rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02").
    """
    return [host for pattern in _split_top_level(nodelist) for host in _expand_host(pattern)]
