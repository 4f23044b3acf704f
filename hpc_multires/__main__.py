"""`python -m hpc_multires` (and `python -m mpi4py -m hpc_multires` under mpiexec)."""

import sys

from hpc_multires.cli.main import main

sys.exit(main())
