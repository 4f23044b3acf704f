"""Helpers shared by the benchmark scripts: running the CLI, machine description."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def machine() -> str:
    import torch

    return (f"{platform.node()}: {psutil.cpu_count(logical=True)} CPUs, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.platform()}")


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The shortest of `repeats` timed calls of `fn`, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("MPIR_CVAR_CH4_PROGRESS_THROTTLE", "1")
    e.update(extra)
    return e


def cli(args: list[str], ranks: int = 1, timeout: float = 1800,
        mpiexec: bool = False) -> str:
    """`hpc-multires ARGS`: under mpiexec when ranks > 1 or `mpiexec` (so that timings at
    every rank count, 1 included, pay the same launcher)."""
    cmd = [sys.executable, "-m", "hpc_multires", *args]
    if ranks > 1 or mpiexec:
        cmd = [str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m",
               "hpc_multires", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env=env())
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    return r.stdout
