# Environment of every hpc-multires batch job; sourced by the scripts in slurm/ and by
# the scripts `hpc-multires submit` writes. Edit this one file for your site.
#
# Expects HPCMR_ROOT (the repository) to be set by the caller.

# Site modules, if your cluster uses them (examples):
# module load python/3.11 cuda/12.4 openmpi/4.1
# module load apptainer

# The Python that runs the ranks: the repository's .venv unless HPCMR_PYTHON is set
# (e.g. a site venv, or "apptainer exec --nv image.sif python" via slurm/run-in-container.sh).
: "${HPCMR_PYTHON:=${HPCMR_ROOT}/.venv/bin/python}"
export HPCMR_PYTHON

# One thread per rank unless the job gave each task more CPUs.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
export MKL_NUM_THREADS="${OMP_NUM_THREADS}"
# MPICH (the mpich wheel): do not busy-poll when ranks share cores.
export MPIR_CVAR_CH4_PROGRESS_THROTTLE=1
export PYTHONUNBUFFERED=1

# srun's MPI plugin: pmi2 works with the mpich wheel and most MPICH/Open MPI builds;
# use pmix where your site's MPI needs it.
: "${HPCMR_SRUN_MPI:=pmi2}"
export HPCMR_SRUN_MPI
