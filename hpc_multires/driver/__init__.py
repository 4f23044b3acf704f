"""Runs a plan: sets up ranks, data, model and run directory, then trains."""
