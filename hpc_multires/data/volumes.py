"""Large arrays as a store: samples are the sub-volumes of a grid over each array.

A simulation writes a few large arrays (a universe of 512^3 x 4 counts with its four
parameters); a CNN trains on sub-volumes of them (ExaLearn's CosmoFlow: 64 crops of 128^3
per universe). Rather than copy every crop into a shard of its own, a *volume store*
keeps the arrays whole, chunked in blocks the size of a sub-volume, and `VolumeStore`
serves sample i as the i-th cell of the grid (row-major over volumes, then grid cells),
with its array's labels: one pread per channel where a block is a sub-volume. Pyramid
levels are built once per array (`data pyramid`, the same code as for shards). The
layout is specified in docs/data-format.md:

```
DIR/volume-00000.h5   /x (V, C, *extent)  chunks (1, 1, *block), Fletcher-32
                      /y (V, P) float32; /levels/<k>/x (V, C, *extent / 2^k)
```

`VolumeStore` has the interface of `SampleStore` (it is one: len, sample_shape, schema,
read, read_raw, read_raw_into, labels, region reads), so training works unchanged.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence, Set
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpc_multires.data.chunks import DirectChunks
from hpc_multires.data.parallel import data_world
from hpc_multires.data.sources import Volumes
from hpc_multires.data.store import (
    INCOMPLETE,
    SCHEMA_VERSION,
    TRANSFORMS,
    VOLUME_PATTERN,
    SampleStore,
    Schema,
    ShardInfo,
    open_readonly,
    read_attr,
    row_pieces,
    store_file,
    transform,
)
from hpc_multires.data.writer import prepare_output
from hpc_multires.errors import DataError, SampleError, UserError
from hpc_multires.files import fsync_dir, replace_atomic

VOLUME_FORMAT = "hpc-multires-volumes"
SLAB_BYTES = 256 * 2**20  # input held in memory per step of a conversion


def volume_name(index: int) -> str:
    return f"volume-{index:05d}.h5"


def is_volume_store(path: Path) -> bool:
    return path.is_dir() and any(VOLUME_PATTERN.fullmatch(p.name) for p in path.iterdir())


@dataclass(frozen=True)
class Grid:
    """Sub-volumes of `sample` points per axis, one every `stride` points, over arrays of
    `extent` points per axis: (extent - sample) / stride + 1 per axis."""

    extent: tuple[int, ...]
    sample: tuple[int, ...]
    stride: tuple[int, ...]

    def check(self) -> None:
        """DataError naming the fix where the grid does not tile the arrays."""
        ext = "x".join(map(str, self.extent))
        if len(self.sample) != len(self.extent) or len(self.stride) != len(self.extent):
            raise DataError(f"sub-volume {self.sample} every {self.stride} points for arrays "
                            f"of {ext}: give one size per spatial axis")
        if any(s < 1 for s in self.sample) or any(t < 1 for t in self.stride):
            raise DataError(f"sub-volume {self.sample} every {self.stride} points: use 1 or "
                            "more points for both")
        if any(s > e for s, e in zip(self.sample, self.extent, strict=True)):
            raise DataError(f"--subvolume {self.sample[0]} is larger than the arrays' {ext} "
                            f"points; use --subvolume <= {min(self.extent)}")
        if any((e - s) % t for e, s, t in zip(self.extent, self.sample, self.stride,
                                              strict=True)):
            common = int(np.gcd.reduce(np.asarray(self.extent)))
            fits = max(d for d in range(1, min(self.sample) + 1) if common % d == 0)
            raise DataError(f"sub-volumes of {'x'.join(map(str, self.sample))} every "
                            f"{'x'.join(map(str, self.stride))} points do not tile the arrays' "
                            f"{ext} points: on every axis the extent less the sub-volume must "
                            f"be a multiple of the stride; use e.g. --subvolume {fits} (it "
                            f"divides {common}) with no --stride")

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple((e - s) // t + 1 for e, s, t in zip(self.extent, self.sample,
                                                         self.stride, strict=True))

    @property
    def per_volume(self) -> int:
        return int(np.prod(self.counts))

    def start(self, cell: int) -> tuple[int, ...]:
        """Where sub-volume `cell` (row-major over the grid) starts."""
        place = np.unravel_index(cell, self.counts)
        return tuple(int(p) * t for p, t in zip(place, self.stride, strict=True))

    def at(self, level: int) -> Grid:
        return Grid(*(tuple(s >> level for s in sizes)
                      for sizes in (self.extent, self.sample, self.stride)))

    def halvable(self, level: int) -> bool:
        return all(s % 2**level == 0 and s >> level >= 1
                   for s in (*self.extent, *self.sample, *self.stride))


def block_shape(extent: Sequence[int], block: int) -> tuple[int, ...]:
    """/x's chunk: one channel of `block` points per spatial axis."""
    if block < 1:
        raise DataError(f"--chunk {block}: give the block's points per spatial axis, 1 or more")
    if any(block > e for e in extent):
        raise DataError(f"--chunk {block} is larger than the arrays' "
                        f"{'x'.join(map(str, extent))} points; use --chunk <= {min(extent)} "
                        "(the sub-volume's size is the natural choice)")
    return (1, 1, *(block for _ in extent))


class VolumeWriter:
    """Writes one volume file to `<name>.tmp`, slab by slab, and renames it on `close()`.

    The normalisation sums are added up slab by slab; the SHA-256 of /x is computed by
    reading it back in C order at the end (the slabs are written all channels at a time,
    which is not C order), which also reads every chunk's checksum once."""

    def __init__(self, directory: Path, index: int, *, num_files: int, first_volume: int,
                 total_volumes: int, num_volumes: int, shape: tuple[int, ...], dtype: np.dtype,
                 grid: Grid, block: int, label_names: Sequence[str], x_transform: str,
                 prov: dict[str, Any]) -> None:
        if x_transform not in TRANSFORMS:
            raise DataError(f"unknown transform {x_transform!r}; use one of {TRANSFORMS}")
        self.path = directory / volume_name(index)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.shape = shape
        self.x_transform = x_transform
        self._file = h5py.File(self.tmp, "w", locking=False)
        self._x = self._file.create_dataset("x", shape=(num_volumes, *shape), dtype=dtype,
                                            chunks=block_shape(shape[1:], block),
                                            fletcher32=True)
        self._y = self._file.create_dataset("y", shape=(num_volumes, len(label_names)),
                                            dtype=np.float32)
        a = self._file.attrs
        a["format"] = VOLUME_FORMAT
        a["schema_version"] = SCHEMA_VERSION
        a["volume_shape"] = np.asarray(shape, np.int64)
        a["sample_shape"] = np.asarray((shape[0], *grid.sample), np.int64)
        a["stride"] = np.asarray(grid.stride, np.int64)
        a["x_dtype"] = np.dtype(dtype).name
        a["x_transform"] = x_transform
        a["label_names"] = json.dumps(list(label_names))
        a["file_index"] = index
        a["num_files"] = num_files
        a["first_volume"] = first_volume
        a["num_volumes"] = num_volumes
        a["total_volumes"] = total_volumes
        a["provenance"] = json.dumps(prov)
        self._sums = np.zeros((2, shape[0]))
        self._block = block

    def write(self, v: int, source: Volumes, source_index: int, y: np.ndarray) -> None:
        """Row `v` of this file: volume `source_index` of `source`, slab by slab."""
        c, first, *rest = self.shape
        plane = c * int(np.prod(rest)) * np.dtype(source.dtype).itemsize
        step = max(self._block, SLAB_BYTES // max(1, plane) // self._block * self._block)
        for a in range(0, first, step):
            slab = np.ascontiguousarray(source.planes(source_index, a, min(first, a + step)))
            if slab.shape != (c, min(first, a + step) - a, *rest):
                raise DataError(f"{source.name}: volume {source_index} planes {a}.. have shape "
                                f"{slab.shape}; expected {(c, min(first, a + step) - a, *rest)}")
            if slab.dtype.kind == "f" and not np.isfinite(slab).all():
                raise DataError(f"{source.name}: volume {source_index} holds NaN or infinity "
                                f"(planes {a}..); fix it before converting")
            if self.x_transform == "log1p" and slab.dtype.kind in "if" and (slab < 0).any():
                raise DataError(f"{source.name}: volume {source_index} has negative values; "
                                "--transform log1p needs counts or other non-negative values")
            self._x[v, :, a:a + slab.shape[1]] = slab
            t = transform(slab, self.x_transform).reshape(c, -1)
            self._sums[0] += t.sum(axis=1, dtype=np.float64)
            self._sums[1] += np.square(t, dtype=np.float64).sum(axis=1)
        self._y[v] = y

    def close(self) -> Path:
        a = self._file.attrs
        a["x_sum"], a["x_sumsq"] = self._sums[0], self._sums[1]
        a["x_count"] = self._x.shape[0] * int(np.prod(self.shape[1:]))
        a["x_sha256"] = hash_rows(self._x)
        a["y_sha256"] = hashlib.sha256(np.ascontiguousarray(self._y[...]).tobytes()).hexdigest()
        self._file.close()
        replace_atomic(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._file.id.valid:
            self._file.close()
        self.tmp.unlink(missing_ok=True)


def hash_rows(x: h5py.Dataset) -> str:
    """SHA-256 of a dataset's bytes in C order, read a slab at a time."""
    h = hashlib.sha256()
    for i in range(x.shape[0]):
        for piece in row_pieces(x, i):
            h.update(piece.tobytes())
    return h.hexdigest()


def write_volumes(out: Path, source: Volumes, labels: np.ndarray, *, grid: Grid, block: int,
                  label_names: tuple[str, ...], x_transform: str, prov: dict[str, Any],
                  volumes_per_file: int = 1, overwrite: bool = False) -> int:
    """Write `source`'s volumes with `labels` (V, P) float32 as a volume store; files split
    over the ranks of the data command. Returns the number of files."""
    grid.check()
    block_shape(source.shape[1:], block)
    world = data_world()
    prepare_output(out, overwrite)
    world.barrier()
    num = source.num_volumes
    num_files = -(-num // volumes_per_file)
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
    for done, k in enumerate(world.mine(num_files), 1):
        first = k * volumes_per_file
        count = min(volumes_per_file, num - first)
        w = VolumeWriter(out, k, num_files=num_files, first_volume=first, total_volumes=num,
                         num_volumes=count, shape=source.shape, dtype=source.dtype, grid=grid,
                         block=block, label_names=label_names, x_transform=x_transform,
                         prov=prov)
        try:
            for row in range(count):
                w.write(row, source, first + row, labels[first + row])
            w.close()
        except UserError as e:
            w.abort()
            error = type(e)(f"{e}; nothing in {out} is usable: it stays marked incomplete, "
                            "so fix the input and run again with --overwrite")
            error.all_ranks = False
            raise error from None
        except BaseException:
            w.abort()
            raise
        if world.rank == 0:
            print(f"volume file {done} on rank 0 of {world.size} "
                  f"({time.monotonic() - start:.1f} s)", file=sys.stderr, flush=True)
    world.barrier()
    if world.rank == 0:
        (out / INCOMPLETE).unlink()
        fsync_dir(out)
    world.barrier()
    return num_files


@dataclass(frozen=True)
class VolumeInfo:
    path: Path
    index: int
    first_volume: int
    num_volumes: int


def mpio_communicator(setting: str, num_workers: int) -> Any:
    """The communicator a volume store opens its files with for `data.mpio` = `setting`,
    or None (each rank its own handles). "on" was checked with the config (h5py with MPI,
    no reader processes); "auto" is "on" where that holds, under an MPI launcher."""
    if setting == "off" or not h5py.get_config().mpi or num_workers > 0:
        return None
    from hpc_multires.comm.ranks import mpi_world, start_mpi

    world = mpi_world()
    if world is None and setting == "on":  # one process, no launcher: MPI-IO on itself
        world = start_mpi().COMM_SELF
    return world


class VolumeStore(SampleStore):
    """A volume store opened for reading at one pyramid level: sample i is grid cell
    i mod (cells per volume) of volume i div (cells per volume). Picklable, lazy handles,
    the reads of `SampleStore`."""

    def __init__(self, path: str | Path, level: int = 0, verify_reads: bool = True,
                 mpio: Any = None) -> None:
        """`mpio`: an MPI communicator; its ranks all open the files here, collectively,
        with h5py's mpio driver, and read through MPI-IO (independent reads: each rank
        reads its own samples when it wants them). Such a store stays in its process."""
        self.path = Path(path)
        self.level = level
        self.verify_reads = verify_reads or mpio is not None  # through HDF5, so MPI-IO
        self.mpio = mpio
        if (self.path / INCOMPLETE).exists():
            raise DataError(f"dataset {str(self.path)!r} is incomplete: the command that wrote "
                            "it failed or was interrupted; run it again with --overwrite")
        names = sorted(p.name for p in self.path.iterdir() if VOLUME_PATTERN.fullmatch(p.name))
        if not names:
            raise DataError(f"no volume-*.h5 files in {str(self.path)!r}")
        self.files: list[VolumeInfo] = []
        header: tuple[Any, ...] | None = None
        sums = []
        for name in names:
            p = self.path / name
            with open_readonly(p) as f:
                if read_attr(f, p, "format") != VOLUME_FORMAT:
                    raise DataError(f"{p}: format {read_attr(f, p, 'format')!r} is not "
                                    f"{VOLUME_FORMAT!r}; a dataset holds shards or volume "
                                    "files, not both")
                h = self._header(f, p)
                if header is None:
                    header = h
                elif h != header:
                    raise DataError(f"{p} disagrees with {names[0]} on the layout ({h} vs "
                                    f"{header}); a store holds one kind of array: rebuild it")
                n = int(read_attr(f, p, "num_volumes"))
                self._check_arrays(f, p, n, h[0], h[3])
                self.files.append(VolumeInfo(p, int(read_attr(f, p, "file_index")),
                                             int(read_attr(f, p, "first_volume")), n))
                holder = f if level == 0 else f[f"levels/{level}"]
                sums.append(np.stack([
                    np.asarray(read_attr(holder, p, "x_sum"), np.float64),
                    np.asarray(read_attr(holder, p, "x_sumsq"), np.float64),
                    np.full(h[0][0], float(read_attr(holder, p, "x_count")))]))
        assert header is not None
        volume_shape, sample_shape, stride, x_dtype, x_transform, label_names, total, count = \
            header
        self.volume_shape = volume_shape
        self.grid = Grid(volume_shape[1:], sample_shape[1:], stride)
        self.grid.check()
        self._check_files(total, count)
        self.schema = Schema(sample_shape=sample_shape, x_dtype=x_dtype,
                             label_names=label_names, x_transform=x_transform,
                             num_samples=total * self.grid.per_volume, num_shards=count)
        per = self.grid.per_volume
        self.shards = [ShardInfo(v.path, v.index, v.first_volume * per, v.num_volumes * per)
                       for v in self.files]
        total_sums = np.sum(sums, axis=0)  # (3, C)
        self.mean = (total_sums[0] / total_sums[2]).astype(np.float32)
        var = np.maximum(total_sums[1] / total_sums[2] - np.square(total_sums[0] /
                                                                   total_sums[2]), 0.0)
        self.std = np.sqrt(var).astype(np.float32).clip(min=1e-6)
        self._starts = np.array([v.first_volume for v in self.files])
        self._files: dict[int, h5py.File] = {}
        self._datasets: dict[int, tuple[h5py.Dataset, h5py.Dataset]] = {}
        self._direct: dict[int, DirectChunks | None] = {}
        self._labels: dict[int, np.ndarray] = {}
        self._row_offsets: dict[int, list[int]] = {}
        if mpio is not None:  # collective opens: every rank, every file, in this order
            for k, v in enumerate(self.files):
                self._files[k] = h5py.File(v.path, "r", driver="mpio", comm=mpio)

    def relocate(self, directory: Path, names: Set[str]) -> None:
        super().relocate(directory, names)
        self.files = [replace(v, path=directory / v.path.name) if v.path.name in names else v
                      for v in self.files]

    def __getstate__(self) -> dict[str, Any]:
        if self.mpio is not None:
            raise DataError("a volume store opened with MPI-IO (data.mpio) is read in the "
                            "training process only; set data.num_workers = 0")
        return super().__getstate__()

    @staticmethod
    def _header(f: h5py.File, p: Path) -> tuple[Any, ...]:
        version = int(read_attr(f, p, "schema_version"))
        if version != SCHEMA_VERSION:
            raise DataError(f"{p}: schema version {version}, this hpc-multires reads version "
                            f"{SCHEMA_VERSION}; rebuild the store with this version")
        x_transform = str(read_attr(f, p, "x_transform"))
        if x_transform not in TRANSFORMS:
            raise DataError(f"{p}: unknown x_transform {x_transform!r}; expected one of "
                            f"{TRANSFORMS}")
        return (tuple(int(v) for v in read_attr(f, p, "volume_shape")),
                tuple(int(v) for v in read_attr(f, p, "sample_shape")),
                tuple(int(v) for v in read_attr(f, p, "stride")),
                str(read_attr(f, p, "x_dtype")), x_transform,
                tuple(json.loads(read_attr(f, p, "label_names"))),
                int(read_attr(f, p, "total_volumes")), int(read_attr(f, p, "num_files")))

    def _check_arrays(self, f: h5py.File, p: Path, n: int, volume_shape: tuple[int, ...],
                      x_dtype: str) -> None:
        key = self._x_key
        if self.level > 0 and (key not in f or
                               int(f[f"levels/{self.level}"].attrs.get("complete", 0)) != 1):
            raise DataError(f"{p} has no complete pyramid level {self.level}; build it with "
                            f"`hpc-multires data pyramid {self.path} --levels {self.level}`")
        want = (n, volume_shape[0], *(s >> self.level for s in volume_shape[1:]))
        if key not in f or "y" not in f:
            raise DataError(f"{p}: dataset /x or /y missing; the file is incomplete: "
                            "convert again")
        if tuple(f[key].shape) != want:
            raise DataError(f"{p}: /{key} has shape {tuple(f[key].shape)}, the attributes say "
                            f"{want}; the file is inconsistent: convert again")
        if self.level == 0 and f["x"].dtype != np.dtype(x_dtype):
            raise DataError(f"{p}: /x holds {f['x'].dtype}, but x_dtype says {x_dtype!r}")

    def _check_files(self, total: int, count: int) -> None:
        indices = sorted(v.index for v in self.files)
        if indices != list(range(count)):
            missing = sorted(set(range(count)) - set(indices))
            raise DataError(f"{self.path}: volume files {[volume_name(i) for i in missing][:5]} "
                            f"of {count} are missing; copy them or convert again")
        self.files.sort(key=lambda v: v.first_volume)
        expected = 0
        for v in self.files:
            if v.first_volume != expected:
                raise DataError(f"{v.path}: first_volume = {v.first_volume}, expected "
                                f"{expected}; the files come from different datasets")
            expected += v.num_volumes
        if expected != total:
            raise DataError(f"{self.path}: the files hold {expected} arrays, the attributes "
                            f"say {total}; the dataset is incomplete")

    def level_sizes(self) -> tuple[int, ...]:
        """Sizes a pyramid level halves: the arrays, the sub-volumes and their stride."""
        return (*self.grid.extent, *self.grid.sample, *self.grid.stride)

    def _place(self, index: int) -> tuple[int, int, tuple[int, ...]]:
        """File, row and the start of sample `index`'s sub-volume at this level."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} outside 0..{len(self) - 1}")
        volume, cell = divmod(index, self.grid.per_volume)
        k = int(np.searchsorted(self._starts, volume, side="right")) - 1
        return k, volume - self.files[k].first_volume, self.grid.at(self.level).start(cell)

    def read_whole_into(self, indices: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        return None  # a sub-volume is a chunk per channel: read_raw_into reads them

    def where(self, index: int) -> str:
        k, row, start = self._place(index)
        return f"{self.files[k].path.name}, array {row} at {start}"

    def read_raw_into(self, index: int, region: tuple[slice, ...], out: np.ndarray
                      ) -> np.ndarray:
        k, row, start = self._place(index)
        offsets = [a + int(r.start) for a, r in zip(start, region, strict=True)] if region \
            else list(start)
        try:
            x = self._handles(k)[0]
            direct = None if self.verify_reads else self._direct_chunks(k)
            if direct is not None:
                direct.read((row, 0, *offsets), out[None])
            else:
                x.read_direct(out, np.s_[(row, slice(None), *(slice(a, a + n) for a, n in
                                                              zip(offsets, out.shape[1:],
                                                                  strict=True)))])
            return self._shard_labels(k)[row]
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:
            raise SampleError(f"cannot read sample {index} ({self.where(index)}): {e}; the "
                              "file is corrupted: convert or copy it again") from None

    def labels(self) -> np.ndarray:
        """Every sample's labels (N, P): its array's."""
        per_file = [self._handles(k)[1][:] for k in range(len(self.files))]
        return np.repeat(np.concatenate(per_file), self.grid.per_volume, axis=0
                         ).astype(np.float32)
