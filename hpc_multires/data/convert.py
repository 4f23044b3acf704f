"""`hpc-multires data convert`: a user's arrays (N, C, *spatial) and (N, P) -> a store.

Inputs larger than memory are fine: a .npy file is memory-mapped, and an .npz member is
streamed row by row out of the zip archive (compressed or not), so memory stays
bounded by one sample whatever the size of the input.
"""

from __future__ import annotations

import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hpc_multires.data.parallel import data_world
from hpc_multires.data.store import provenance
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
    bad = np.flatnonzero(~np.isfinite(y_all).all(axis=1))
    if bad.size:
        raise DataError(f"{ys.name}: labels of samples {bad[:5].tolist()} are NaN or infinite; "
                        "drop or fix those samples")
    lo, hi = y_all.min(axis=0), y_all.max(axis=0)
    notes = []
    flat = [n for n, a, b in zip(names, lo, hi, strict=True) if a == b]
    if flat and scale_labels:
        notes.append(f"label(s) {', '.join(flat)} hold one value in every sample, stored as -1: "
                     "nothing to learn from them")
    if len(xs.shape) == 4 and xs.shape[1] == xs.shape[2] == xs.shape[3] and xs.shape[1] > 8:
        notes.append(f"{xs.name} {xs.shape} is read as {xs.shape[1]} channels of "
                     f"{xs.shape[2]}x{xs.shape[3]} images; if it holds single-channel "
                     "volumes, save x[:, None] instead")
    if notes and data_world().rank == 0:
        for note in notes:
            print(f"hpc-multires: warning: {note}", file=sys.stderr, flush=True)
    if scale_labels:
        span = np.where(hi > lo, hi - lo, 1.0)
        y_all = 2 * (y_all - lo) / span - 1
    elif np.abs(y_all).max() > 1.2:
        raise DataError("labels outside [-1.2, 1.2] cannot be reached by the model's scaled "
                        "tanh output; drop --no-scale-labels to map them to [-1, 1]")
    y32 = y_all.astype(np.float32)
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
                        label_ranges=[[n, float(a), float(b), False]
                                      for n, a, b in zip(names, lo, hi, strict=True)]
                        if scale_labels else None),
        overwrite=overwrite, compression=compression, chunk=chunk)
