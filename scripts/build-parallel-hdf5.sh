#!/usr/bin/env bash
# Build mpi4py and h5py against Debian's MPICH and MPI-enabled HDF5 into a venv of their
# own (default .venv-mpio), once per machine: the wheels are cached outside the
# repository, later runs install the cached ones. The project's main venv keeps the
# mpich wheel and the serial h5py wheel; MPI-IO needs one MPI throughout (HDF5's, mpi4py's
# and the launcher's), so it lives apart, launched with /usr/bin/mpiexec.mpich.
#
# Usage: scripts/build-parallel-hdf5.sh [VENV]   (default .venv-mpio)
# Cache: $PARALLEL_HDF5_WHEEL_CACHE, default ~/.cache/hpc-multires/parallel-hdf5
# Needs: Debian or Ubuntu; root (or the packages already installed): mpich,
# libhdf5-mpich-dev, pkg-config. About 10 minutes on 2 cores the first time.
set -euo pipefail

VENV=${1:-.venv-mpio}
PYTHON=${PYTHON:-python3}
PACKAGES=(mpich libhdf5-mpich-dev pkg-config)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "build-parallel-hdf5: needs the packages ${missing[*]}: sudo apt-get install -y ${missing[*]}" >&2
    exit 2
  fi
  echo "build-parallel-hdf5: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >/dev/null \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >/dev/null; }
fi
MPICC=/usr/bin/mpicc.mpich
MPIEXEC=/usr/bin/mpiexec.mpich
[ -x "$MPICC" ] || { echo "build-parallel-hdf5: $MPICC not found after installing mpich" >&2; exit 1; }
HDF5_VERSION=$(pkg-config --modversion hdf5-mpich)

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
KEY=$("$PY" -c 'import sys; print(f"py{sys.version_info.major}{sys.version_info.minor}")')-hdf5-$HDF5_VERSION-mpich
CACHE=${PARALLEL_HDF5_WHEEL_CACHE:-$HOME/.cache/hpc-multires/parallel-hdf5}/$KEY
mkdir -p "$CACHE"

"$PY" -m pip install --quiet --upgrade pip
# Build requirements (no build isolation for h5py: it must see this numpy and mpi4py).
"$PY" -m pip install --quiet "setuptools>=77" wheel "Cython>=3" numpy pkgconfig psutil
if ! ls "$CACHE"/mpi4py-*.whl >/dev/null 2>&1; then
  echo "build-parallel-hdf5: building mpi4py against $MPICC (about 4 minutes)"
  MPICC=$MPICC "$PY" -m pip wheel --quiet --no-deps --no-binary=mpi4py -w "$CACHE" mpi4py
fi
"$PY" -m pip install --quiet --no-deps --force-reinstall "$CACHE"/mpi4py-*.whl
if ! ls "$CACHE"/h5py-*.whl >/dev/null 2>&1; then
  echo "build-parallel-hdf5: building h5py against HDF5 $HDF5_VERSION (MPI) (about 5 minutes)"
  CC=$MPICC HDF5_MPI=ON HDF5_PKGCONFIG_NAME=hdf5-mpich \
    "$PY" -m pip wheel --quiet --no-deps --no-binary=h5py --no-build-isolation -w "$CACHE" h5py
fi
"$PY" -m pip install --quiet --no-deps --force-reinstall "$CACHE"/h5py-*.whl
"$PY" -c "import h5py; assert h5py.get_config().mpi, 'h5py built without MPI'; print('h5py', h5py.version.version, 'HDF5', h5py.version.hdf5_version, 'mpi', h5py.get_config().mpi)"

# Four ranks read one hyperslab each of one array, collectively, through the mpio driver.
check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
cat > "$check/check.py" <<'PYEOF'
import sys
import h5py
import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
path = sys.argv[1]
with h5py.File(path, "w", driver="mpio", comm=comm) as f:
    x = f.create_dataset("x", shape=(comm.size, 64, 64), dtype="i4")
    with x.collective:
        x[comm.rank] = np.full((64, 64), comm.rank, "i4")
with h5py.File(path, "r", driver="mpio", comm=comm) as f:
    x = f["x"]
    out = np.empty((64, 64), "i4")
    with x.collective:
        x.read_direct(out, np.s_[comm.rank])
assert (out == comm.rank).all(), out
ok = comm.allreduce(1)
if comm.rank == 0:
    print(f"collective mpio reads on {ok} ranks: ok")
PYEOF
"$MPIEXEC" -n 4 "$PY" "$check/check.py" "$check/x.h5"
echo "build-parallel-hdf5: $VENV ready; launch with $MPIEXEC -n N $PY ..."
