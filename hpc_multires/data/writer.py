"""Writes a dataset in parallel: each rank writes its own shards.

Shard j always holds samples [j * per_shard, (j + 1) * per_shard), and the caller's
`sample_fn(i)` decides what sample i is, so a dataset whose samples are functions of
their index is the same whatever the number of ranks that wrote it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hpc_multires.data.chunks import chunk_shape
from hpc_multires.data.parallel import data_world
from hpc_multires.data.store import INCOMPLETE, ShardWriter, store_file
from hpc_multires.errors import UserError
from hpc_multires.files import fsync_dir

SampleFn = Callable[[int], tuple[np.ndarray, np.ndarray]]


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse to mix a new dataset with an old one (checked identically on every rank)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory")
    if (out / INCOMPLETE).exists() and not overwrite:
        raise UserError(f"{out} holds an incomplete dataset (an earlier write failed or was "
                        "interrupted); pass --overwrite to write it again")
    has_shards = out.is_dir() and any(store_file(p.name) for p in out.iterdir())
    if has_shards and not overwrite:
        raise UserError(f"{out} already holds a dataset; choose another --out or pass "
                        "--overwrite to replace it")


def write_dataset(out: Path, *, num_samples: int, samples_per_shard: int, sample_fn: SampleFn,
                  sample_shape: tuple[int, ...], x_dtype: str, label_names: tuple[str, ...],
                  x_transform: str, prov: dict[str, object], overwrite: bool = False,
                  compression: str | None = None, chunk: int | None = None,
                  class_names: tuple[str, ...] = ()) -> int:
    """Write `num_samples` samples made by `sample_fn(i)`; returns the number of shards.
    `chunk`: /x in blocks of that many points per spatial axis (`data/chunks.py`).
    `class_names`: a classification store's classes (its one label is the class index)."""
    if samples_per_shard < 1:
        raise UserError(f"--samples-per-shard {samples_per_shard}: need at least 1")
    if num_samples < 1:
        raise UserError(f"{num_samples} samples to write: a dataset needs at least 1")
    chunk_shape(sample_shape, chunk)  # a block larger than the samples: refused first
    world = data_world()
    prepare_output(out, overwrite)
    world.barrier()  # everyone checked before rank 0 deletes anything
    num_shards = -(-num_samples // samples_per_shard)
    if world.rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --out {out} ({e.strerror}); choose a directory "
                            "you can write to") from None
        (out / INCOMPLETE).write_text("hpc-multires is writing this dataset\n")
        for old in out.iterdir():
            if store_file(old.name) or old.name.endswith(".h5.tmp"):
                old.unlink()
    world.barrier()
    start = time.monotonic()
    mine = world.mine(num_shards)
    for done, shard in enumerate(mine, 1):
        first = shard * samples_per_shard
        count = min(samples_per_shard, num_samples - first)
        try:
            with ShardWriter(out, shard, num_shards=num_shards, first_sample=first,
                             total_samples=num_samples, num_samples=count,
                             sample_shape=sample_shape, x_dtype=x_dtype,
                             label_names=label_names, x_transform=x_transform, prov=prov,
                             compression=compression, chunk=chunk,
                             class_names=class_names) as w:
                for i in range(first, first + count):
                    x, y = sample_fn(i)
                    w.write(x, y)
        except UserError as e:
            # Only this rank writes these samples, so only it sees what is wrong with them:
            # it must report and abort at once, not wait for a rank 0 that never fails.
            error = type(e)(f"{e}; nothing in {out} is usable: it stays marked incomplete, "
                              "so fix the input and run again with --overwrite")
            error.all_ranks = False
            raise error from None
        if world.rank == 0:
            rate = done * samples_per_shard * world.size / max(time.monotonic() - start, 1e-9)
            print(f"shard {done}/{len(mine)} on rank 0 of {world.size} "
                  f"(~{rate:.1f} samples/s over all ranks)", file=sys.stderr, flush=True)
    world.barrier()  # every shard is in place
    if world.rank == 0:
        (out / INCOMPLETE).unlink()
        fsync_dir(out)
    world.barrier()  # nobody opens the dataset while it is still marked incomplete
    return num_shards
