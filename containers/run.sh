#!/bin/bash
# Run a rank's Python inside the project's Apptainer image. Used as HPCMR_PYTHON, so the
# Slurm scripts start ranks as `srun containers/run.sh -m mpi4py -m hpc_multires ...`:
#   export HPCMR_IMAGE=/path/hpc-multires-gpu.sif HPCMR_PYTHON=$PWD/containers/run.sh
#   sbatch slurm/gpu.sbatch CONFIG RUN_DIR
# HPCMR_NV=1 adds --nv (GPUs); HPCMR_BIND adds binds (comma-separated, e.g. /scratch).
set -eu
: "${HPCMR_IMAGE:?set HPCMR_IMAGE to the .sif image (see docs/containers.md)}"
args=(exec)
[ -n "${HPCMR_NV:-}" ] && args+=(--nv)
args+=(--bind "$PWD")
[ -n "${HPCMR_BIND:-}" ] && args+=(--bind "$HPCMR_BIND")
exec apptainer "${args[@]}" "$HPCMR_IMAGE" /opt/venv/bin/python "$@"
