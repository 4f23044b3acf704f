"""The `hpc-multires` command line."""
