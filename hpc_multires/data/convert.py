"""`hpc-multires data convert`: a user's arrays (N, C, *spatial) and (N, P) -> a store;
large arrays (ExaLearn universes, MRT/MRMF maps, a .npy of V arrays) -> shards or a volume
store (`convert_inputs`).

Inputs larger than memory are fine: a .npy file is memory-mapped, and an .npz member is
streamed row by row out of the zip archive (compressed or not), so memory stays
bounded by one sample whatever the size of the input.
"""

from __future__ import annotations

import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hpc_multires.data.parallel import data_world
from hpc_multires.data.sources import NpyVolumes, Volumes, hdf5_volumes, layout_of
from hpc_multires.data.store import provenance
from hpc_multires.data.volumes import Grid, write_volumes
from hpc_multires.data.writer import write_dataset
from hpc_multires.errors import DataError


class ArraySource:
    """Row access to one array in a .npy file (memory-mapped) or an .npz member (streamed)."""

    def __init__(self, path: Path, member: str | None) -> None:
        self.path = path
        self.member = member
        if not path.is_file():
            raise DataError(f"input {str(path)!r} not found; pass the path of a .npy or .npz file")
        if member is None:
            try:
                self._mmap: np.ndarray | None = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:
                raise DataError(f"{path} is not a readable .npy file ({e}); save the array "
                                "with numpy.save") from None
            self.shape = tuple(self._mmap.shape)
            self.dtype = self._mmap.dtype
        else:
            self._mmap = None
            with self._open_member() as f:
                self.shape, fortran, self.dtype = self._header(f)
            if fortran:
                raise DataError(f"{path}:{member} is stored in Fortran order; save it in C order "
                                "(numpy.ascontiguousarray) or as a .npy file")
        if self.dtype.hasobject:
            raise DataError(f"{self.name} holds Python objects; save a numeric array")

    @property
    def name(self) -> str:
        return f"{self.path}:{self.member}" if self.member else str(self.path)

    def _open_member(self) -> BinaryIO:
        try:
            z = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise DataError(f"{self.path} is not a readable .npz archive; save the arrays with "
                            "numpy.savez(path, x=..., y=...)") from None
        name = f"{self.member}.npy"
        if name not in z.namelist():
            raise DataError(f"{self.path} has no array {self.member!r} (it holds "
                            f"{[n.removesuffix('.npy') for n in z.namelist()]}); save the inputs "
                            "as numpy.savez(path, x=inputs, y=labels)")
        return z.open(name)  # type: ignore[return-value]

    @staticmethod
    def _header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
        version = np.lib.format.read_magic(f)
        reader: Any = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = reader(f)
        return tuple(shape), bool(fortran), np.dtype(dtype)

    def rows(self, start: int, stop: int) -> Iterator[np.ndarray]:
        """Rows start..stop-1, one at a time."""
        if self._mmap is not None:
            for i in range(start, stop):
                yield np.asarray(self._mmap[i])
            return
        row_shape = self.shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        with self._open_member() as f:
            self._header(f)
            # Skip forward by reading: a zip stream cannot seek, but this is sequential I/O.
            skipped = 0
            while skipped < start * row_bytes:
                got = len(f.read(min(start * row_bytes - skipped, 1 << 24)))
                if not got:  # the member ends early: read() gives b"" from here on
                    raise self._truncated(skipped // row_bytes)
                skipped += got
            for i in range(start, stop):
                buf = f.read(row_bytes)
                if len(buf) != row_bytes:
                    raise self._truncated(i)
                yield np.frombuffer(buf, dtype=self.dtype).reshape(row_shape)

    def _truncated(self, row: int) -> DataError:
        return DataError(f"{self.name} ends at row {row} of {self.shape[0]}; the file is "
                         "truncated")


def open_inputs(x: Path, y: Path | None) -> tuple[ArraySource, ArraySource]:
    if x.suffix == ".npz":
        return ArraySource(x, "x"), ArraySource(y if y else x, "y" if y is None or
                                                y.suffix == ".npz" else None)
    if y is None:
        raise DataError("--y is required with a .npy --x; pass the labels (N, P) as --y Y.npy")
    return ArraySource(x, None), ArraySource(y, "y" if y.suffix == ".npz" else None)


def scaled_labels(y_all: np.ndarray, names: tuple[str, ...], scale: bool, name: str,
                  notes: list[str] | None = None) -> tuple[np.ndarray, list[Any] | None]:
    """Labels (N, P) -> float32, each mapped to [-1, 1] when `scale`, and the provenance's
    label ranges; NaN refused, warnings (and `notes`) printed once."""
    bad = np.flatnonzero(~np.isfinite(y_all).all(axis=1))
    if bad.size:
        raise DataError(f"{name}: labels of samples {bad[:5].tolist()} are NaN or infinite; "
                        "drop or fix those samples")
    lo, hi = y_all.min(axis=0), y_all.max(axis=0)
    notes = list(notes or [])
    flat = [n for n, a, b in zip(names, lo, hi, strict=True) if a == b]
    if flat and scale:
        notes.insert(0, f"label(s) {', '.join(flat)} hold one value in every sample, stored as "
                        "-1: nothing to learn from them")
    if notes and data_world().rank == 0:
        for note in notes:
            print(f"hpc-multires: warning: {note}", file=sys.stderr, flush=True)
    if scale:
        span = np.where(hi > lo, hi - lo, 1.0)
        y_all = 2 * (y_all - lo) / span - 1
    elif y_all.size and np.abs(y_all).max() > 1.2:
        raise DataError("labels outside [-1.2, 1.2] cannot be reached by the model's scaled "
                        "tanh output; drop --no-scale-labels to map them to [-1, 1]")
    ranges = ([[n, float(a), float(b), False] for n, a, b in zip(names, lo, hi, strict=True)]
              if scale else None)
    return y_all.astype(np.float32), ranges


def convert(x_path: Path, y_path: Path | None, out: Path, *, samples_per_shard: int = 64,
            x_transform: str = "none", label_names: list[str] | None = None,
            scale_labels: bool = True, overwrite: bool = False,
            compression: str | None = None, chunk: int | None = None) -> int:
    """Convert arrays to a store; returns the number of shards. Runs on any number of ranks.
    `chunk`: /x in blocks of that many points per spatial axis (`data/chunks.py`)."""
    xs, ys = open_inputs(x_path, y_path)
    if len(xs.shape) < 3:
        raise DataError(f"{xs.name} has shape {xs.shape}; inputs must be (N, C, *spatial), "
                        "e.g. (N, 4, 64, 64, 64) for 3D or (N, 4, 1600) for 1D; add a channel "
                        "axis with x[:, None] if there is one channel")
    if len(ys.shape) == 1:
        raise DataError(f"{ys.name} has shape {ys.shape}; labels must be (N, P): use "
                        "y[:, None] for one label per sample")
    if len(ys.shape) != 2:
        raise DataError(f"{ys.name} has shape {ys.shape}: labels must be 2D, (N, P) = "
                        f"({xs.shape[0]}, P); reshape them, e.g. y.reshape(len(y), -1)")
    if ys.shape[0] != xs.shape[0]:
        raise DataError(f"{ys.name} has shape {ys.shape}, but {xs.name} holds {xs.shape[0]} "
                        f"samples; labels must be ({xs.shape[0]}, P)")
    if xs.dtype.kind not in "uif" or ys.dtype.kind not in "uif":
        raise DataError(f"inputs must be numeric arrays, got {xs.dtype} and {ys.dtype}")
    num, num_labels = xs.shape[0], ys.shape[1]
    names = tuple(label_names or [f"y{i}" for i in range(num_labels)])
    if len(names) != num_labels:
        raise DataError(f"--label-names gives {len(names)} names for {num_labels} labels")
    # Labels are small (N x P): read them whole to find the scaling and check for NaN.
    y_all = np.stack(list(ys.rows(0, num))).astype(np.float64) if num else np.zeros((0, 0))
    extra = []
    if len(xs.shape) == 4 and xs.shape[1] == xs.shape[2] == xs.shape[3] and xs.shape[1] > 8:
        extra.append(f"{xs.name} {xs.shape} is read as {xs.shape[1]} channels of "
                     f"{xs.shape[2]}x{xs.shape[3]} images; if it holds single-channel "
                     "volumes, save x[:, None] instead")
    y32, label_ranges = scaled_labels(y_all, names, scale_labels, ys.name, extra)
    sample_rows: dict[int, Iterator[np.ndarray]] = {}

    def sample(i: int) -> tuple[np.ndarray, np.ndarray]:
        shard = i // samples_per_shard
        if shard not in sample_rows:  # one sequential stream per shard this rank writes
            sample_rows.clear()
            sample_rows[shard] = xs.rows(i, min(num, (shard + 1) * samples_per_shard))
        x = next(sample_rows[shard])
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise DataError(f"{xs.name}: sample {i} holds NaN or infinity; drop or fix it "
                            "before converting")
        if x_transform == "log1p" and (x < 0).any():
            raise DataError(f"{xs.name}: sample {i} has negative values; --transform log1p "
                            "needs counts or other non-negative values")
        return x, y32[i]

    return write_dataset(
        out, num_samples=num, samples_per_shard=samples_per_shard, sample_fn=sample,
        sample_shape=tuple(int(s) for s in xs.shape[1:]),
        # Training computes in float32; float64 storage would only double the bytes read.
        x_dtype="float32" if xs.dtype == np.float64 else xs.dtype.name,
        label_names=names, x_transform=x_transform,
        prov=provenance("convert", x=str(x_path), y=str(y_path or x_path),
                        label_ranges=label_ranges),
        overwrite=overwrite, compression=compression, chunk=chunk)


def convert_inputs(x_paths: Sequence[Path], y_path: Path | None, out: Path, *,
                   subvolume: int | None = None, stride: int | None = None,
                   samples_per_shard: int = 64, volumes_per_file: int = 1,
                   x_transform: str = "none", label_names: list[str] | None = None,
                   scale_labels: bool = True, overwrite: bool = False,
                   compression: str | None = None, chunk: int | None = None) -> str:
    """`data convert`: .npy/.npz arrays, or HDF5 files of ExaLearn universes or MRT/MRMF
    maps (data/sources.py), to shards, or with `subvolume` to a volume store whose samples
    are the sub-volumes of a grid (data/volumes.py). Returns what was written, in words."""
    if not x_paths:
        raise DataError("--x names no input")
    layout = layout_of(x_paths)
    if not layout:
        if len(x_paths) > 1:
            raise DataError(f"--x names {len(x_paths)} files; .npy and .npz inputs are one "
                            "array each: concatenate them, or convert them one at a time")
        if subvolume is None:
            n = convert(x_paths[0], y_path, out, samples_per_shard=samples_per_shard,
                        x_transform=x_transform, label_names=label_names,
                        scale_labels=scale_labels, overwrite=overwrite,
                        compression=compression, chunk=chunk)
            return f"{n} shard(s)"
        if x_paths[0].suffix != ".npy":
            raise DataError(f"--subvolume reads large arrays from a .npy file (memory-mapped) "
                            f"or HDF5, not {x_paths[0].suffix}; save x with numpy.save")
        source: Volumes = NpyVolumes(x_paths[0], y_path)
    else:
        if y_path is not None:
            raise DataError(f"--y: {x_paths[0].name} holds its labels ('unitPar'); leave --y "
                            "out")
        source = hdf5_volumes(x_paths)
    if source.dtype.kind not in "uif":
        raise DataError(f"{source.name} holds {source.dtype}; inputs must be numeric")
    labels = np.asarray(source.labels(), np.float64)
    num_labels = labels.shape[1]
    names = tuple(label_names or [f"y{i}" for i in range(num_labels)])
    if len(names) != num_labels:
        raise DataError(f"--label-names gives {len(names)} names for {num_labels} labels")
    y32, ranges = scaled_labels(labels, names, scale_labels, source.name)
    x_dtype = "float32" if source.dtype == np.float64 else np.dtype(source.dtype).name
    prov = provenance("convert", x=[str(p) for p in x_paths], y=str(y_path or x_paths[0]),
                      layout=layout or "npy", label_ranges=ranges)
    extent = source.shape[1:]
    if subvolume is None:  # MRT/MRMF maps, one sample each, as shards
        if layout == "exalearn":
            raise DataError("ExaLearn universes are cut into sub-volumes: pass --subvolume "
                            "(128 gives the 64 crops of 128^3 of ExaLearn's CosmoFlow)")

        def sample(i: int) -> tuple[np.ndarray, np.ndarray]:
            x = source.planes(i, 0, extent[0])  # (C, *spatial)
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise DataError(f"{source.name}: map {i} holds NaN or infinity; drop or fix "
                                "it before converting")
            if x_transform == "log1p" and (x < 0).any():
                raise DataError(f"{source.name}: map {i} has negative values; --transform "
                                "log1p needs counts or other non-negative values")
            return x.astype(x_dtype, copy=False), y32[i]

        n = write_dataset(out, num_samples=source.num_volumes,
                          samples_per_shard=samples_per_shard, sample_fn=sample,
                          sample_shape=source.shape, x_dtype=x_dtype, label_names=names,
                          x_transform=x_transform, prov=prov, overwrite=overwrite,
                          compression=compression, chunk=chunk)
        return f"{n} shard(s) of {source.num_volumes} maps"
    if compression is not None:
        raise DataError("--compression: a volume store's blocks are read in place, "
                        "uncompressed; leave --compression out")
    grid = Grid(tuple(extent), (subvolume,) * len(extent),
                (stride or subvolume,) * len(extent))
    files = write_volumes(out, source, y32, grid=grid, block=chunk or subvolume,
                          label_names=names, x_transform=x_transform, prov=prov,
                          volumes_per_file=volumes_per_file, overwrite=overwrite)
    return (f"{source.num_volumes} array(s) of {source.shape} in {files} volume file(s), "
            f"{source.num_volumes * grid.per_volume} sub-volumes of {subvolume}^{len(extent)}")
