# Environment of every hpc-multires batch job; sourced by the scripts in slurm/ and by
# the scripts `hpc-multires submit` writes. Edit this one file for your site.
#
# Expects HPCMR_ROOT (the repository) to be set by the caller.

# Site modules, if your cluster uses them (examples):
# module load python/3.11 cuda/12.4 openmpi/4.1
# module load apptainer

# The Python that runs the ranks: the repository's .venv unless HPCMR_PYTHON is set. It is
# one executable, run as "$HPCMR_PYTHON" (no arguments in it): a site venv's python, or
# containers/run.sh for the Apptainer image (HPCMR_IMAGE=image.sif HPCMR_NV=1 for GPUs; see
# docs/containers.md).
: "${HPCMR_PYTHON:=${HPCMR_ROOT}/.venv/bin/python}"
export HPCMR_PYTHON

# One thread per rank unless the job gave each task more CPUs.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
# srun 22.05 to 23.05 ignores the job's SLURM_CPUS_PER_TASK (each task got one CPU).
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi
export MKL_NUM_THREADS="${OMP_NUM_THREADS}"
# MPICH (the mpich wheel): do not busy-poll when ranks share cores.
export MPIR_CVAR_CH4_PROGRESS_THROTTLE=1
export PYTHONUNBUFFERED=1

# srun's MPI plugin: pmi2 works with the mpich wheel and most MPICH/Open MPI builds;
# use pmix where your site's MPI needs it.
: "${HPCMR_SRUN_MPI:=pmi2}"
export HPCMR_SRUN_MPI

# How many times a step that died in MPI start-up on Slurm's pmi2 plugin is started again.
: "${HPCMR_START_RETRIES:=5}"

# hpcmr_launch ARGS...: start the ranks as `srun ... python -m mpi4py -m hpc_multires ARGS`.
#
# Slurm's pmi2 plugin (22.05) reads each PMI-1 request with a single read() of at most 1024
# bytes. MPICH pads each rank's address in its start-up exchange with whatever memory follows
# it and compresses only runs of zero bytes; when that memory holds text, a request line
# passes 1024 bytes, the plugin reports "mpi/pmi2: value not properly terminated in client
# request" or "request not begin with 'cmd='" and the step dies inside MPI_Init.
# `python -m hpc_multires` starts MPI before importing the rest of the package, which keeps
# that memory free of the package's text (hpc_multires/comm/ranks.py, start_mpi); should a
# step still hit it, nothing has run yet (and the trainer resumes from its checkpoints
# anyway), so the step is started again, up to HPCMR_START_RETRIES times; any other failure
# is returned as it is.
hpcmr_launch() {
    local attempt=0 rc log
    log=$(mktemp "${TMPDIR:-/tmp}/hpcmr-srun.XXXXXX") || return 1
    while :; do
        # stdout as it is; stderr to the job's stderr and to $log, to look for the error.
        { srun --kill-on-bad-exit=1 --mpi="$HPCMR_SRUN_MPI" "$HPCMR_PYTHON" -m mpi4py \
            -m hpc_multires "$@" 2>&1 1>&3 3>&- | tee "$log" >&2; } 3>&1
        rc=${PIPESTATUS[0]}
        if [ "$rc" -eq 0 ] || [ "$attempt" -ge "$HPCMR_START_RETRIES" ] ||
           ! grep -qE "mpi/pmi2: (value not properly terminated|request not begin with)" "$log"; then
            break
        fi
        attempt=$((attempt + 1))
        echo "hpc-multires: Slurm's pmi2 plugin garbled the MPI start-up (exit $rc);" \
             "starting the step again ($attempt of $HPCMR_START_RETRIES)" >&2
        sleep $((2 * attempt))  # 2, 4, 6, ... s: the next try draws other per-run data
    done
    rm -f "$log"
    return "$rc"
}
