# hpc-multires: set-up, demo and tests. `make demo` and `make test` work on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
RANKS ?= 2
DEMO_DATA ?= demo-data/cosmoflow
DEMO_RUN ?= runs/cosmoflow-demo
DEMO_SAMPLES ?= 1024

# Ranks share few cores here: one thread each, and MPICH must not busy-poll.
export OMP_NUM_THREADS ?= 1
export MPIR_CVAR_CH4_PROGRESS_THROTTLE ?= 1

MPIRUN := $(BIN)/mpiexec -n $(RANKS) $(PY) -m mpi4py -m hpc_multires

.PHONY: setup demo test check test-unit test-mpi test-slurm lint typecheck bench clean horovod \
	parallel-hdf5

# Containers and sites override these: VENV_FLAGS=--system-site-packages with
# TORCH_SPEC= keeps an image's own torch (containers/gpu.def); TORCH_INDEX picks a wheel index.
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned to 2.13.0 (a CPU wheel here), installed first: the project's range
	# (torch>=2.1) admits it, so the install of the package that follows keeps it (pip
	# upgrades a dependency only when the installed version does not satisfy it).
	$(if $(TORCH_SPEC),$(PY) -m pip install --quiet '$(TORCH_SPEC)' $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)))
	$(PY) -m pip install --quiet -e '.[mpi,dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	@# Generate the demo dataset once (in parallel); a complete one is reused.
	$(BIN)/hpc-multires data inspect --no-verify $(DEMO_DATA) >/dev/null 2>&1 || \
	  $(MPIRUN) data synth cosmoflow --out $(DEMO_DATA) --samples $(DEMO_SAMPLES) --size 32 --overwrite
	rm -rf $(DEMO_RUN)
	$(MPIRUN) train configs/cosmoflow-demo.toml --run-dir $(DEMO_RUN) --set data.path=$(DEMO_DATA)
	$(BIN)/hpc-multires report $(DEMO_RUN)

# Horovod 0.28.1 built against this venv's torch and MPI, cached outside the repo.
horovod: setup
	scripts/build-horovod.sh $(VENV)

# h5py with MPI-IO (Debian's MPICH and HDF5) in a venv of its own, wheels cached outside
# the repo; benchmarks/io.py --mpio uses it.
MPIO_VENV ?= .venv-mpio
parallel-hdf5:
	scripts/build-parallel-hdf5.sh $(MPIO_VENV)

lint: setup
	$(BIN)/ruff check hpc_multires tests benchmarks

typecheck: setup
	$(BIN)/mypy hpc_multires

test-unit: setup
	$(BIN)/pytest -m "not mpi"

# The quick loop while editing: lint, types and the one-process tests that take under a
# few seconds each (no mpiexec, no Slurm, no `slow`). `make test` runs everything.
check: lint typecheck
	$(BIN)/pytest -q -m "not mpi and not slurm and not slow"

test-mpi: setup
	$(BIN)/pytest -m "mpi and not slurm"

# Starts a real Slurm (slurmctld + two slurmd; installs slurm-wlm and munge if absent).
test-slurm: setup
	$(BIN)/pytest -m slurm

test: lint typecheck horovod
	HPC_MULTIRES_REQUIRE_HOROVOD=1 $(BIN)/pytest

bench: setup
	$(PY) benchmarks/io.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/pyramid.py

clean:
	rm -rf runs demo-data .pytest_cache .mypy_cache .ruff_cache
