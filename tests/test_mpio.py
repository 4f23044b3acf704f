"""MPI-IO for volume stores (data.mpio): refused in one line where h5py has no MPI, and,
where `make parallel-hdf5` built the MPI-IO environment, the same samples read through the
mpio driver on 4 ranks as through each rank's own handles."""

from __future__ import annotations

import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, run_env

from hpc_multires.data.config import DataConfig
from hpc_multires.errors import ConfigError

MPIO_PYTHON = ROOT / ".venv-mpio" / "bin" / "python"
MPIEXEC_MPICH = Path("/usr/bin/mpiexec.mpich")


def mpio_ready() -> bool:
    """Whether `make parallel-hdf5` has built the MPI-IO environment here."""
    if not (MPIO_PYTHON.exists() and MPIEXEC_MPICH.exists()):
        return False
    check = "import h5py, mpi4py; assert h5py.get_config().mpi"
    return subprocess.run([str(MPIO_PYTHON), "-c", check], capture_output=True,
                          timeout=60).returncode == 0


@pytest.mark.skipif(h5py.get_config().mpi, reason="this h5py has MPI-IO")
def test_mpio_on_without_an_mpi_h5py_is_one_line(cli, tiny_config) -> None:
    with pytest.raises(ConfigError, match=r"data.mpio = 'on': this h5py has no MPI-IO"):
        DataConfig(path="x", mpio="on").check()
    DataConfig(path="x", mpio="auto").check()
    r = cli(["train", str(tiny_config()), "--set", "data.mpio=on"])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("hpc-multires: error")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "make parallel-hdf5" in lines[0]


READ_BOTH_WAYS = """
import sys

import numpy as np
from mpi4py import MPI
from hpc_multires.data.store import open_store
from hpc_multires.data.volumes import VolumeStore

comm = MPI.COMM_WORLD
path = sys.argv[1]
mpio = open_store(path, mpio=comm)  # every rank opens every file, collectively
own = open_store(path, verify_reads=False)
assert isinstance(mpio, VolumeStore) and mpio.mpio is comm
mine = list(range(comm.rank, len(own), comm.size))
for i in mine:  # each rank its own samples, whenever it wants them (independent reads)
    a, b = mpio.read(i), own.read(i)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), i
window = (slice(2, 6), slice(0, 8), slice(1, 5))
assert np.array_equal(mpio.read_raw(mine[-1], window)[0], own.read_raw(mine[-1], window)[0])
count = comm.allreduce(len(mine))
if comm.rank == 0:
    print(f"read {count} samples both ways on {comm.size} ranks: equal")
"""


@pytest.mark.mpi
@pytest.mark.skipif(not mpio_ready(),
                    reason="no MPI-IO environment: `make parallel-hdf5` builds it")
def test_volume_store_reads_through_mpio_on_4_ranks(tmp_path: Path) -> None:
    from hpc_multires.data.convert import convert_inputs

    x = np.random.default_rng(4).poisson(3.0, size=(2, 2, 32, 32, 32)).astype(np.uint16)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(4.0).reshape(2, 2))
    convert_inputs([tmp_path / "x.npy"], tmp_path / "y.npy", tmp_path / "vol", subvolume=8,
                   x_transform="log1p")
    script = tmp_path / "read.py"
    script.write_text(READ_BOTH_WAYS)
    env = run_env(PYTHONPATH=str(ROOT))
    env.pop("VIRTUAL_ENV", None)
    r = subprocess.run([str(MPIEXEC_MPICH), "-n", "4", str(MPIO_PYTHON), str(script),
                        str(tmp_path / "vol")], capture_output=True, text=True, timeout=300,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "read 128 samples both ways on 4 ranks: equal" in r.stdout
