"""`hpc-multires data pyramid DIR --levels K`: coarse copies of every shard, built in parallel.

Level k holds each sample averaged over blocks of 2^k along every spatial (or time)
axis, in stored units (counts stay counts, averaged), channels and labels unchanged,
as `/levels/<k>/x` with its own normalisation sums. The read-time transform applies to
a level as to `/x`.

Safety: a shard is never modified in place. Its missing levels are added to a copy
(`shard-NNNNN.h5.<pid>-<random>.pyramid-tmp`, a name no other writer uses), which is
flushed and renamed over the original, so an interrupted build leaves every shard either
as it was or complete. Two builds of the same directory at once (two jobs) take turns per
shard: each holds an flock on `shard-NNNNN.h5.pyramid-lock` while it reads what the shard
lacks, builds and renames, so the second finds the levels done instead of writing into a
copy the first one renames. Leftovers of an interrupted build are removed by the next one
that holds the shard's lock. A level counts as present only when its group carries
`complete = 1`, written last, so a level written by anything that died half way is
rebuilt. Memory: one sample (or a slab of a large array, `slab_planes`) at a time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from hpc_multires import files
from hpc_multires.data.chunks import level_chunks
from hpc_multires.data.parallel import data_world
from hpc_multires.data.store import open_store, transform
from hpc_multires.errors import DataError

TMP_SUFFIX = ".pyramid-tmp"
LOCK_SUFFIX = ".pyramid-lock"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def average_pool(x: np.ndarray, factor: int) -> np.ndarray:
    """Mean over blocks of `factor` along every axis after the first: (C, *S) -> (C, *S/f)."""
    c, *spatial = x.shape
    if any(s % factor for s in spatial):
        raise DataError(f"sample axes {tuple(spatial)} are not divisible by {factor}; a "
                        f"pyramid level needs sizes divisible by 2^level")
    shape = [c]
    for s in spatial:
        shape += [s // factor, factor]
    blocks = x.astype(np.float64).reshape(shape)  # (C, S1/f, f, S2/f, f, ...)
    return blocks.mean(axis=tuple(range(2, 2 + 2 * len(spatial), 2)))


def level_is_complete(f: h5py.File, level: int) -> bool:
    g = f.get(f"levels/{level}")
    if g is None or "x" not in g or int(g.attrs.get("complete", 0)) != 1:
        return False
    n, *shape = f["x"].shape
    want = (n, shape[0], *(s >> level for s in shape[1:]))
    return tuple(g["x"].shape) == want


SLAB_BYTES = 256 * 2**20
"""Float64 bytes of input pooled per step: a large array (a whole simulated universe as
one row) is pooled in slabs of its first spatial axis, so memory stays bounded."""


def slab_planes(shape: tuple[int, ...], factor: int) -> int:
    """Planes of the first spatial axis per pooling step for rows of `shape` (C, *spatial):
    a multiple of `factor`, whole rows where they fit in SLAB_BYTES."""
    c, first, *rest = shape
    plane = c * int(np.prod(rest)) * 8
    fits = max(factor, SLAB_BYTES // max(1, plane) // factor * factor)
    return min(first, fits)


def _add_level(f: h5py.File, level: int, x_transform: str) -> None:
    if f"levels/{level}" in f:
        del f[f"levels/{level}"]  # an incomplete level from an interrupted writer
    x = f["x"]
    n, c, *spatial = x.shape
    coarse = tuple(s >> level for s in spatial)
    factor = 2**level
    g = f.require_group("levels").create_group(str(level))
    out = g.create_dataset("x", shape=(n, c, *coarse), dtype=np.float32,
                           chunks=level_chunks(x.chunks, (c, *coarse), level), fletcher32=True)
    planes = slab_planes((c, *spatial), factor)
    total = np.zeros((2, c))
    for i in range(n):
        for a in range(0, spatial[0], planes):  # (C, planes, ...) at a time
            pooled = average_pool(x[i, :, a:a + planes], factor).astype(np.float32)
            out[i, :, a // factor:a // factor + pooled.shape[1]] = pooled
            t = transform(pooled, x_transform).reshape(c, -1)
            total[0] += t.sum(axis=1, dtype=np.float64)
            total[1] += np.square(t, dtype=np.float64).sum(axis=1)
    g.attrs["factor"] = factor
    g.attrs["x_sum"] = total[0]
    g.attrs["x_sumsq"] = total[1]
    g.attrs["x_count"] = n * int(np.prod(coarse))
    g.attrs["complete"] = 1  # last: only now is the level usable


@contextlib.contextmanager
def _shard_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive flock for `path` (True), or yield False where the file system has
    no flock (Lustre mounted `noflock`): the copies' own names still keep shards whole."""
    lock = path.with_name(path.name + LOCK_SUFFIX)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with files.locked(fd) as held:
                try:  # the holder before us may have removed the file: then lock the new one
                    current = held and os.stat(lock).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    current = False
                if not held or current:
                    try:
                        yield held
                    finally:
                        if held:
                            lock.unlink(missing_ok=True)  # while held, so no one is left out
                    return
        finally:
            os.close(fd)


def build_shard(path: Path, levels: list[int], x_transform: str) -> list[int]:
    """Add the missing `levels` to one shard; returns those it built (empty: nothing to do)."""
    # A complete shard is only read: no lock file, so a read-only data set is fine.
    with h5py.File(path, "r", locking=False) as f:
        if all(level_is_complete(f, k) for k in levels):
            return []
    with _shard_lock(path) as locked:
        if locked:  # nobody else is writing a copy of this shard: any copy is a leftover
            for leftover in path.parent.glob(f"{path.name}*{TMP_SUFFIX}"):
                leftover.unlink(missing_ok=True)
        with h5py.File(path, "r", locking=False) as f:
            missing = [k for k in levels if not level_is_complete(f, k)]
            n, c, *spatial = f["x"].shape
        if not missing:
            return []
        need = path.stat().st_size + sum(4 * n * c * int(np.prod([s >> k for s in spatial]))
                                         for k in missing)
        tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            with files.atomic_path(path, tmp):
                shutil.copyfile(path, tmp)
                with h5py.File(tmp, "r+", locking=False) as f:
                    for k in missing:
                        _add_level(f, k, x_transform)
        except OSError as e:
            if e.errno not in NO_SPACE:
                raise
            err = DataError(
                f"no space for the pyramid of {path.name} in {path.parent}: the build writes "
                f"a copy of the shard with its new levels ({need / 2**20:.1f} MiB, "
                f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free); free space "
                "there (or raise the quota) and run it again, the shards are unchanged")
            err.all_ranks = False  # only the rank writing this shard sees it
            raise err from e
    return missing


def build_pyramid(path: Path, max_level: int) -> dict[str, int]:
    """Levels 1..max_level for every shard of the store at `path`, shards split over ranks."""
    if max_level < 1:
        raise DataError(f"--levels {max_level}: give the coarsest level to build, 1 or more")
    store = open_store(path)  # validates the store (same error on every rank)
    sizes = store.level_sizes()  # a volume store's arrays, sub-volumes and stride too
    if min(sizes) >> max_level < 1 or any(s % 2**max_level for s in sizes):
        most = _max_levels(sizes)
        fix = (f"use --levels <= {most}" if most else "a pyramid level halves every axis, so "
               "crop or pad the samples to even sizes (multiples of 2^K for K levels)")
        what = ("samples" if sizes == store.schema.spatial else
                "arrays, sub-volumes and strides")
        raise DataError(f"{what} of {sizes} cannot be halved {max_level} times evenly; {fix}")
    world = data_world()
    levels = list(range(1, max_level + 1))
    built = skipped = 0
    start = time.monotonic()
    mine = world.mine(len(store.shards))
    for done, i in enumerate(mine, 1):
        made = build_shard(store.shards[i].path, levels, store.schema.x_transform)
        built += bool(made)
        skipped += not made
        if world.rank == 0:
            print(f"pyramid: shard {done}/{len(mine)} on rank 0 of {world.size} "
                  f"({time.monotonic() - start:.1f} s)", file=sys.stderr, flush=True)
    world.barrier()
    return {"built": world.gather_sum(built), "skipped": world.gather_sum(skipped),
            "shards": len(store.shards)}


def _max_levels(spatial: tuple[int, ...]) -> int:
    k = 0
    while all(s % 2 ** (k + 1) == 0 and s >> (k + 1) >= 1 for s in spatial):
        k += 1
    return k
