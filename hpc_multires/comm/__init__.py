"""Rank discovery, process groups and gradient allreduce backends."""
