"""Rank discovery: one table row per launcher, each environment -> one RankInfo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, mpiexec_path, run_cli, run_env

from hpc_multires.comm.ranks import RankInfo, expand_nodelist, node_layout, rank_info_from_env

CASES: list[tuple[str, dict[str, str], RankInfo]] = [
    ("single", {}, RankInfo(0, 1, 0, 1, 0, 1, "single")),
    ("slurm 2 nodes x 2 tasks",
     {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
      "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_ID": "0",
      "SLURM_JOB_NODELIST": "n[1-2]", "PMI_RANK": "3", "PMI_SIZE": "4"},
     RankInfo(3, 4, 1, 2, 1, 2, "slurm")),
    ("slurm uneven tasks per node",
     {"SLURM_PROCID": "4", "SLURM_NTASKS": "5", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
      "SLURM_NNODES": "3", "SLURM_TASKS_PER_NODE": "2(x2),1", "SLURM_STEP_ID": "0"},
     RankInfo(4, 5, 0, 1, 2, 3, "slurm")),
    ("slurm batch shell (no step) is not a rank",
     {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NODEID": "0", "SLURM_NNODES": "2"},
     RankInfo(0, 1, 0, 1, 0, 1, "single")),
    ("open mpi",
     {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
      "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"},
     RankInfo(5, 8, 1, 4, 0, 1, "openmpi")),
    ("mpich hydra",
     {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"},
     RankInfo(2, 3, 2, 3, 0, 1, "mpich")),
    ("pmi without local rank",
     {"PMI_RANK": "1", "PMI_SIZE": "2"}, RankInfo(1, 2, 1, 2, 0, 1, "mpich")),
    ("srun --mpi=pmi2: slurm and PMI agree, slurm knows more",
     {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
      "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_STEP_ID": "3",
      "PMI_RANK": "1", "PMI_SIZE": "2", "PMIX_RANK": "1"},
     RankInfo(1, 2, 0, 1, 1, 2, "slurm")),
    # mpiexec inside an allocation starts one daemon per node with srun: the ranks inherit
    # that step's SLURM_PROCID (the daemon's index) and SLURM_NTASKS (the daemon count).
    ("mpich mpiexec inside a slurm allocation",
     {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
      "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_STEP_ID": "0",
      "PMI_RANK": "6", "PMI_SIZE": "8", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "4"},
     RankInfo(6, 8, 2, 4, 0, 1, "mpich")),
    ("open mpi mpirun inside a slurm allocation (same size, other rank)",
     {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
      "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_ID": "0",
      "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
      "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"},
     RankInfo(5, 8, 1, 4, 0, 1, "openmpi")),
    # srun --preserve-env keeps the allocation's SLURM_NTASKS/NNODES/TASKS_PER_NODE; the
    # SLURM_STEP_* values are always the step's.
    ("srun --preserve-env: 2 tasks in an allocation of 8",
     {"SLURM_PROCID": "1", "SLURM_NTASKS": "8", "SLURM_NNODES": "4", "SLURM_LOCALID": "0",
      "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "2(x4)", "SLURM_STEP_ID": "1",
      "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2",
      "SLURM_STEP_TASKS_PER_NODE": "1(x2)"},
     RankInfo(1, 2, 0, 1, 1, 2, "slurm")),
    ("torchrun inside a slurm allocation",
     {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
      "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
      "SLURM_STEP_ID": "0"},
     RankInfo(6, 8, 2, 4, 1, 2, "torchrun")),
]


@pytest.mark.parametrize(("env", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_launcher_table(env: dict[str, str], expected: RankInfo) -> None:
    assert rank_info_from_env(env) == expected


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(ValueError, match="PMI_RANK"):
        rank_info_from_env({"PMI_RANK": "x", "PMI_SIZE": "2"})
    with pytest.raises(ValueError, match="outside world size"):
        rank_info_from_env({"PMI_RANK": "2", "PMI_SIZE": "2"})


@pytest.mark.parametrize(("nodelist", "hosts"), [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu[01-02,07],login5", ["gpu01", "gpu02", "gpu07", "login5"]),
    ("a[8-10]b", ["a8b", "a9b", "a10b"]),
    ("n[01-03,07],gpu[1-2]", ["n01", "n02", "n03", "n07", "gpu1", "gpu2"]),
    ("rack[1-2]-n[01-02],login1",
     ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02", "login1"]),
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


def test_node_layout_from_hostnames() -> None:
    hosts = ["b", "b", "a", "a", "b"]  # cyclic placement: rank 4 is on the first node
    assert node_layout(hosts, 4) == (2, 3, 0, 2)
    assert node_layout(hosts, 3) == (1, 2, 1, 2)


# A launcher that publishes only PMIx (PRRTE's prterun): none of the table's names are
# set. Simulated under MPICH's mpiexec by hiding its PMI_* names after MPI is initialised.
PMIX_ONLY = """
import json, os
from mpi4py import MPI
for key in [k for k in os.environ if k.startswith(("PMI_", "MPI_LOCAL"))]:
    del os.environ[key]
os.environ["PMIX_RANK"] = str(MPI.COMM_WORLD.Get_rank())
from hpc_multires.comm.ranks import discover
from hpc_multires.data.parallel import data_world
info, world = discover(), data_world()
rows = MPI.COMM_WORLD.gather([info.rank, info.world_size, info.local_size, world.rank, world.size])
if MPI.COMM_WORLD.Get_rank() == 0:
    print(json.dumps(rows))
"""


@pytest.mark.mpi
def test_pmix_only_launcher_takes_the_mpi_world() -> None:
    """Every rank must not believe it is rank 0 of 1 (and each write every shard)."""
    r = subprocess.run([mpiexec_path(), "-n", "2", sys.executable, "-c", PMIX_ONLY],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env=run_env())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [[0, 2, 2, 0, 2], [1, 2, 2, 1, 2]]


def test_srun_without_mpi_is_refused_by_data_commands(tmp_path: Path) -> None:
    """`srun -n 2` without --mpi: each task is an MPI world of one.

    Taken at face value, every task would be rank 0 of 1 and write and delete every shard
    at the same time as the others. Rank 0 of the two, started alone here, must refuse.
    """
    out = tmp_path / "d"
    r = run_cli(["data", "synth", "cosmoflow", "--out", str(out), "--samples", "2",
                 "--size", "8"], timeout=60, SLURM_PROCID="0", SLURM_NTASKS="2",
                SLURM_STEP_ID="0", SLURM_NODEID="0", SLURM_NNODES="1", SLURM_LOCALID="0")
    assert r.returncode == 2, r.stderr
    assert "--mpi=pmi2" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() or not list(out.iterdir())


def test_slurm_rendezvous_is_on_the_steps_first_node(monkeypatch) -> None:
    """Without MPI to ask, rank 0's host is the first node of the step (not of the job,
    whose first node a step may not use), and two steps of a job get different ports."""
    from hpc_multires.comm import dist as comm_dist
    from hpc_multires.comm import ranks
    from hpc_multires.comm.ranks import RankInfo

    monkeypatch.setattr(ranks, "mpi_world", lambda: None)
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[01-04]")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "n[03-04]")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    info = RankInfo(1, 2, 0, 1, 1, 2, "slurm")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    host, port0 = comm_dist.rendezvous_address(info)
    assert host == "n03"
    monkeypatch.setenv("SLURM_STEP_ID", "1")
    assert comm_dist.rendezvous_address(info)[1] != port0
    monkeypatch.delenv("SLURM_STEP_NODELIST")
    assert comm_dist.rendezvous_address(info)[0] == "n01"


class _FakeWorld:
    """What `mpi_world` returns, reduced to rank and size."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.size


def test_the_mpi_world_counts_only_where_it_connects_the_launchers_ranks(monkeypatch) -> None:
    from hpc_multires.comm import ranks

    two = RankInfo(1, 2, 1, 2, 0, 1, "mpich")
    monkeypatch.setattr(ranks, "mpi_world", lambda: _FakeWorld(1, 2))
    assert ranks.mpi_of(two) is not None
    assert ranks.with_mpi_world(two) == two
    monkeypatch.setattr(ranks, "mpi_world", lambda: _FakeWorld(0, 1))  # srun without --mpi
    assert ranks.mpi_of(two) is None
    monkeypatch.setattr(ranks, "mpi_world", lambda: None)  # no mpi4py
    assert ranks.mpi_of(two) is None
    # A launcher outside the table (PMIx only): the environment says 0 of 1, MPI knows.
    single = RankInfo(0, 1, 0, 1, 0, 1, "single")
    monkeypatch.setattr(ranks, "mpi_world", lambda: _FakeWorld(3, 4))
    assert ranks.with_mpi_world(single) == RankInfo(3, 4, 0, 1, 0, 1, "mpi")
    assert ranks.mpi_of(single) is None and ranks.mpi_of(ranks.with_mpi_world(single))


def test_rank_and_size_for_messages_never_fails(monkeypatch) -> None:
    """The error path asks it: launcher variables when MPI is not running, and rank 0 of 1
    when they make no sense (the error being reported may be about them)."""
    from hpc_multires.comm import ranks

    monkeypatch.setattr(ranks, "running_mpi", lambda: None)
    for key in [k for k in os.environ if k.startswith(("PMI_", "OMPI_", "SLURM_"))]:
        monkeypatch.delenv(key)
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert ranks.rank_and_size() == (0, 1)
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("PMI_SIZE", "4")
    assert ranks.rank_and_size() == (3, 4)
    monkeypatch.setattr(ranks, "running_mpi", lambda: _FakeWorld(1, 2))
    assert ranks.rank_and_size() == (1, 2)  # MPI, when running, is the truth
    monkeypatch.setattr(ranks, "running_mpi", lambda: None)
    monkeypatch.setenv("PMI_RANK", "x")
    assert ranks.rank_and_size() == (0, 1)


def test_data_commands_take_mpis_world_only_where_it_is_the_launchers(monkeypatch) -> None:
    from hpc_multires.comm import ranks
    from hpc_multires.data import parallel
    from hpc_multires.errors import UserError

    for key in [k for k in os.environ if k.startswith(("PMI_", "OMPI_", "SLURM_"))]:
        monkeypatch.delenv(key)
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")

    def world(w: _FakeWorld | None) -> None:
        monkeypatch.setattr(ranks, "mpi_world", lambda: w)
        monkeypatch.setattr(parallel, "mpi_world", lambda: w)

    world(_FakeWorld(1, 2))
    assert (parallel.data_world().rank, parallel.data_world().size) == (1, 2)
    for fake, message in [(None, "mpi4py is not available"),
                          (_FakeWorld(0, 1), "started 2 ranks but MPI connects 1"),
                          (_FakeWorld(0, 2), "calls this process rank 1 but MPI calls it rank 0")]:
        world(fake)
        with pytest.raises(UserError, match=message):
            parallel.data_world()


def test_launched_ranks_start_mpi_before_importing_the_package(tmp_path: Path) -> None:
    """MPICH pads its start-up address exchange with whatever memory follows the address;
    text left there by the package's imports made the requests too long for Slurm's pmi2
    plugin, and steps hung in MPI_Init. Under a launcher, `python -m mpi4py -m hpc_multires`
    starts MPI before importing numpy or the rest of the package (-X importtime lists the
    imports in order)."""
    r = subprocess.run([mpiexec_path(), "-n", "2", "-prepend-rank", sys.executable, "-X",
                        "importtime", "-m",
                        "mpi4py", "-m", "hpc_multires", "data", "synth", "neuron", "--out",
                        str(tmp_path / "d"), "--samples", "4", "--bins", "16"],
                       capture_output=True, text=True, timeout=180, cwd=ROOT, env=run_env())
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(2):
        names = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()
                 if line.startswith(f"[{rank}] import time:")]
        assert "mpi4py.MPI" in names and "numpy" in names, names[:40]
        assert names.index("mpi4py.MPI") < names.index("numpy"), names[:80]
        assert names.index("mpi4py.MPI") < names.index("hpc_multires.cli.main")
