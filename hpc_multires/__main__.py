"""`python -m hpc_multires` (and `python -m mpi4py -m hpc_multires` under mpiexec or srun)."""

import sys

from hpc_multires.comm.ranks import mpi_world

# Under an MPI launcher, start MPI before the rest of the package is imported: its start-up
# exchange must not carry the text those imports leave in memory (see `start_mpi`).
mpi_world()

from hpc_multires.cli.main import main  # noqa: E402

sys.exit(main())
