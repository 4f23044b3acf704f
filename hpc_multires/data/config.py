"""The data component's settings: where samples come from and how they are read."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hpc_multires.errors import require

VERIFY_READS = ("auto", "on", "off")
TRANSFORM_ON = ("reader", "device")
MPIO = ("auto", "on", "off")
STAGE = ("copy", "partition")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the samples come from and how they are read."""

    path: str = ""
    """Dataset directory (shard-*.h5 files). Required; `--set data.path=DIR` overrides it."""
    val_path: str = ""
    """Separate validation dataset; empty: hold out `val_fraction` of `path`."""
    val_fraction: float = 0.2
    """Fraction of `path` (its last samples) used for validation when `val_path` is empty."""
    level: int = 0
    """Pyramid level to train on: 0 = original, k = downsampled by 2^k per spatial axis.
    Only for a config without [[stages]]; a non-zero value beside them is an error (each
    stage sets its own `level`)."""
    num_workers: int = 1
    """Background reader processes per rank; 0 reads in the training process."""
    prefetch: int = 4
    """Batches each reader process keeps ready ahead of the training step."""
    hold_mb: float = 256.0
    """Per rank, MiB of a coarse pyramid level's samples (level >= 1, float32 after the
    read-time transform) held in memory: a stage whose training samples (then its
    validation ones) fit is read once at its start and its batches come from memory, with
    no reader processes and no per-batch reads, which would cost a large share of a coarse
    step (data/held.py). Level 0 is always read from its files; 0 holds nothing."""
    read_timeout_s: float = 120.0
    """With num_workers > 0: a rank waiting longer than this for its next batch (a read
    stuck on a file system that stopped answering) ends the job with a message saying so,
    instead of holding every rank until the job's time limit; 0 waits forever."""
    stage_to: str = ""
    """Node-local directory (e.g. "$TMPDIR") to copy the shards to before training, once
    per node, checksums verified, removed at the end; empty: read in place."""
    stage: str = "copy"
    """What data.stage_to copies to each node: "copy", the whole dataset; "partition",
    only the node's share of the training shards (balanced by samples; the validation
    samples whole), for data larger than a node's disk or memory. Each rank then draws its
    part of every global batch from its node's share: an epoch still reads every training
    sample once across the job, but shuffles within node shares (docs/slurm.md)."""
    verify_reads: str = "auto"
    """Whether training reads check each chunk's Fletcher-32 checksum: "on" (HDF5's filter,
    4-5x the CPU time of the read itself), "off" (chunks read directly, unchecked;
    `data inspect` still verifies every byte), "auto": on when reading in place, off when
    reading a copy that data.stage_to staged (its SHA-256 was verified when copied)."""
    mpio: str = "auto"
    """MPI-IO for volume stores (large arrays): "on" opens their files with h5py's mpio
    driver on every rank (needs h5py built with MPI, `make parallel-hdf5`, and
    data.num_workers = 0: reader processes are not MPI processes), "off" reads them with
    each rank's own handles, "auto" does "on" where both hold. Reads are the same."""
    transform_on: str = "reader"
    """Where the read-time transform (float conversion, log1p, normalisation) runs:
    "reader" (the reader processes, on the CPU) or "device" (the training process, after
    the copy to its device: the stored values cross, half the bytes of float32 for uint16
    counts, and an accelerator does the arithmetic). On a CPU-only run "reader" is faster."""

    def check(self) -> None:
        """Raise ConfigError naming the key and the fix for a value that cannot work."""
        require(0.0 <= self.val_fraction < 1.0, "data.val_fraction", self.val_fraction,
                "use a fraction in [0, 1)")
        require(self.level >= 0, "data.level", self.level,
                "use 0 (original) or a pyramid level k >= 1")
        require(self.num_workers >= 0, "data.num_workers", self.num_workers, "use 0 or more")
        require(self.prefetch >= 1, "data.prefetch", self.prefetch, "use 1 or more")
        require(math.isfinite(self.hold_mb) and self.hold_mb >= 0, "data.hold_mb",
                self.hold_mb, "use 0 (read every level from its files) or more MiB")
        require(math.isfinite(self.read_timeout_s) and self.read_timeout_s >= 0,
                "data.read_timeout_s", self.read_timeout_s,
                "use 0 (wait forever) or a positive number of seconds")
        require(self.verify_reads in VERIFY_READS, "data.verify_reads", self.verify_reads,
                f"use one of {', '.join(map(repr, VERIFY_READS))}")
        require(self.transform_on in TRANSFORM_ON, "data.transform_on", self.transform_on,
                f"use one of {', '.join(map(repr, TRANSFORM_ON))}")
        require(self.mpio in MPIO, "data.mpio", self.mpio,
                f"use one of {', '.join(map(repr, MPIO))}")
        require(self.stage in STAGE, "data.stage", self.stage,
                f"use one of {', '.join(map(repr, STAGE))}")
        if self.stage == "partition":
            require(bool(self.stage_to), "data.stage", self.stage,
                    "a partition is staged to node-local disks: set data.stage_to (e.g. "
                    "\"$TMPDIR\"), or use 'copy'")
            require(self.mpio != "on", "data.stage", self.stage,
                    "MPI-IO opens every file on every rank, and a node holds only its share: "
                    "set data.mpio = 'auto' or 'off', or data.stage = 'copy'")
        if self.mpio == "on":
            import h5py

            require(bool(h5py.get_config().mpi), "data.mpio", self.mpio,
                    "this h5py has no MPI-IO (h5py.get_config().mpi is False); build one "
                    "with `make parallel-hdf5` and run there, or use 'auto'")
            require(self.num_workers == 0, "data.mpio", self.mpio,
                    "MPI-IO reads happen in the training process: set data.num_workers = 0")

    def verified_reads(self, staged: bool) -> bool:
        """Whether training reads check chunk checksums, for data read in place or from a
        staged (SHA-256-verified) copy."""
        return self.verify_reads == "on" or (self.verify_reads == "auto" and not staged)
