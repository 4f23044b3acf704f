"""hpc-multires: multi-resolution CNN training on large scientific arrays, run by MPI."""

__version__ = "0.1.0"
