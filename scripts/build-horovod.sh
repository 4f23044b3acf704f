#!/usr/bin/env bash
# Build Horovod 0.28.1 against this venv's torch and MPI once per machine, cache the
# wheel outside the repository, install it. Later runs reuse the cached wheel.
#
# Why a build step: 0.28.1 is the last Horovod release and its CMakeLists.txt and
# horovod/torch/CMakeLists.txt pin C++14, which torch >= 2.1 headers do not compile
# with. With C++17 in both files it builds and runs (MPI and Gloo controllers).
#
# Usage: scripts/build-horovod.sh [VENV]   (default .venv)
# Cache: $HOROVOD_WHEEL_CACHE, default ~/.cache/hpc-multires/horovod
set -euo pipefail

VENV=${1:-.venv}
PY="$VENV/bin/python"
VERSION=0.28.1
[ -x "$PY" ] || { echo "build-horovod: no Python at $PY; run 'make setup' first" >&2; exit 2; }

# The wheel is only valid for this Python, this torch and this MPI: key the cache by them.
KEY=$("$PY" - <<'PYEOF'
import sys, torch
try:
    import mpi4py
    mpi = mpi4py.get_config().get("mpicc", "mpi").split("/")[-1]
except Exception:
    mpi = "nompi"
print(f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{mpi}")
PYEOF
)
CACHE=${HOROVOD_WHEEL_CACHE:-$HOME/.cache/hpc-multires/horovod}/$KEY
mkdir -p "$CACHE"

wheel=$(ls "$CACHE"/horovod-$VERSION-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$wheel" ]; then
  echo "build-horovod: using cached wheel $wheel"
else
  echo "build-horovod: building Horovod $VERSION for $KEY (about 8 minutes on 2 cores)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$VERSION" -d "$work"
  tar -xzf "$work"/horovod-$VERSION.tar.gz -C "$work"
  src="$work/horovod-$VERSION"
  for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
    grep -q 'CMAKE_CXX_STANDARD 14' "$f" || { echo "build-horovod: $f has no C++14 pin" >&2; exit 1; }
    sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$f"
  done
  # Build tools Horovod's setup.py imports; torch must be the venv's (no isolation).
  "$PY" -m pip install --quiet setuptools wheel packaging cloudpickle psutil pyyaml
  if ! command -v cmake >/dev/null 2>&1; then
    "$PY" -m pip install --quiet cmake
    export CMAKE_POLICY_VERSION_MINIMUM=3.5  # pip's cmake 4.x refuses Horovod's old minimum
  fi
  export PATH="$(cd "$VENV/bin" && pwd):$PATH"  # mpicxx of the mpich wheel
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
         HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
  export MAKEFLAGS="-j$(nproc)"
  "$PY" -m pip wheel --no-build-isolation --no-deps -w "$work/dist" "$src"
  cp "$work"/dist/horovod-$VERSION-*.whl "$CACHE"/
  wheel=$(ls "$CACHE"/horovod-$VERSION-*.whl | head -n 1)
  echo "build-horovod: cached $wheel"
fi
# Horovod's own requirements first, so that pip has none to report missing afterwards.
"$PY" -m pip install --quiet cffi cloudpickle psutil pyyaml packaging
"$PY" -m pip install --quiet --no-deps --force-reinstall "$wheel"
"$PY" -c "import horovod.torch as hvd; print('horovod', hvd.__version__ if hasattr(hvd, '__version__') else '$VERSION', 'mpi', hvd.mpi_built(), 'gloo', hvd.gloo_built())"
