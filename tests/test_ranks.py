"""Rank discovery: one table row per launcher, each environment -> one RankInfo."""

from __future__ import annotations

import pytest

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
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


def test_node_layout_from_hostnames() -> None:
    hosts = ["b", "b", "a", "a", "b"]  # cyclic placement: rank 4 is on the first node
    assert node_layout(hosts, 4) == (2, 3, 0, 2)
    assert node_layout(hosts, 3) == (1, 2, 1, 2)
