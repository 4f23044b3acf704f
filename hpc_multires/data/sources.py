"""Large arrays as simulations write them, read a slab at a time for `data convert`.

Three layouts are understood, each as a set of *volumes* (C, *extent) with P labels each:

- a .npy array (V, C, *extent) with labels (V, P) in a second .npy (memory-mapped);
- ExaLearn's CosmoFlow universes: one HDF5 file per universe with `full`, (D, H, W, C)
  int16 counts with the channels last, and `unitPar` (P,) its parameters;
- the MRT/MRMF reference's files: `3Dmap` (N, S, S, S, C) with the channels last and
  `unitPar` (N, P), every map a volume.

`planes(v, a, b)` gives volume v's planes a..b-1 of its first spatial axis with the
channels first, (C, b - a, ...), so a converter holds one slab, never a whole universe
(a 512^3 x 4 int16 universe is 1 GiB). A file that ends before its array does is a
DataError naming it, not a crash half way through a conversion.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np

from hpc_multires.errors import DataError


class Volumes(Protocol):
    """V arrays of the same shape (C, *extent) and dtype, with labels (V, P)."""

    name: str
    num_volumes: int
    shape: tuple[int, ...]  # (C, *extent) of one volume
    dtype: np.dtype

    def planes(self, v: int, a: int, b: int) -> np.ndarray: ...

    def labels(self) -> np.ndarray: ...


def _npy_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"input {str(path)!r} not found; pass the path of a .npy file")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read: Any = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                         else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(f)
        except ValueError as e:
            raise DataError(f"{path} is not a readable .npy file ({e}); save the array "
                            "with numpy.save") from None
        need = f.tell() + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size < need:
        raise DataError(f"{path} holds {size} bytes, but its header says the array "
                        f"{tuple(shape)} {np.dtype(dtype)} needs {need}: the file is "
                        "truncated; copy or save it again")
    return np.load(path, mmap_mode="r", allow_pickle=False)


class NpyVolumes:
    """x.npy (V, C, *extent) and y.npy (V, P)."""

    def __init__(self, x: Path, y: Path | None) -> None:
        if y is None:
            raise DataError("--y is required with a .npy --x; pass the labels (V, P) of the "
                            "V arrays as --y Y.npy")
        self.name = str(x)
        self.x = _npy_array(x)
        self.y = np.asarray(_npy_array(y))
        if self.x.ndim < 3:
            raise DataError(f"{x} has shape {self.x.shape}; large arrays must be "
                            "(V, C, *extent): add the axes with x[None] (one array) and "
                            "x[:, None] (one channel)")
        self.num_volumes = int(self.x.shape[0])
        self.shape = tuple(int(s) for s in self.x.shape[1:])
        self.dtype = self.x.dtype
        if self.y.shape[:1] != (self.num_volumes,) or self.y.ndim != 2:
            raise DataError(f"{y} has shape {self.y.shape}; labels must be "
                            f"({self.num_volumes}, P), one row per array of {x}")

    def planes(self, v: int, a: int, b: int) -> np.ndarray:
        return np.asarray(self.x[v, :, a:b])

    def labels(self) -> np.ndarray:
        return self.y


class _ChannelsLast:
    """HDF5 files whose volumes are stored (..., D, H, W, C): ExaLearn and MRT/MRMF."""

    def __init__(self, files: Sequence[Path], key: str, per_file: list[int],
                 shape: tuple[int, ...], dtype: np.dtype, labels: np.ndarray) -> None:
        self.files = list(files)
        self.key = key
        self.per_file = per_file
        self.starts = np.cumsum([0, *per_file])
        self.num_volumes = int(self.starts[-1])
        self.shape = shape
        self.dtype = dtype
        self._labels = labels
        self.name = str(files[0]) if len(files) == 1 else f"{files[0].parent}/*.h5"
        self._open: tuple[int, h5py.File] | None = None

    def _dataset(self, v: int) -> tuple[h5py.Dataset, int]:
        k = int(np.searchsorted(self.starts, v, side="right")) - 1
        if self._open is None or self._open[0] != k:
            if self._open is not None:
                self._open[1].close()
            self._open = (k, h5py.File(self.files[k], "r", locking=False))
        return self._open[1][self.key], v - int(self.starts[k])

    def planes(self, v: int, a: int, b: int) -> np.ndarray:
        ds, row = self._dataset(v)
        try:
            slab = ds[a:b] if ds.ndim == len(self.shape) else ds[row, a:b]
        except (OSError, RuntimeError) as e:
            raise DataError(f"{ds.file.filename}: cannot read {self.key!r} planes {a}..{b - 1} "
                            f"({e}); the file is truncated or damaged: copy it again"
                            ) from None
        return np.moveaxis(slab, -1, 0)  # (C, b - a, H, W)

    def labels(self) -> np.ndarray:
        return self._labels


def _open_input(path: Path) -> h5py.File:
    if not path.is_file():
        raise DataError(f"input {str(path)!r} not found")
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        raise DataError(f"{path} is not a readable HDF5 file ({e}); it may be truncated: "
                        "copy it again") from None


def _check_size(path: Path, ds: h5py.Dataset) -> None:
    """A contiguous array that runs past the end of its (truncated) file."""
    offset = ds.id.get_offset()
    if offset is not None and offset + ds.id.get_storage_size() > path.stat().st_size:
        raise DataError(f"{path}: {ds.name!r} {ds.shape} ends at byte "
                        f"{offset + ds.id.get_storage_size()}, the file at "
                        f"{path.stat().st_size}: the file is truncated; copy it again")


def hdf5_volumes(files: Sequence[Path]) -> Volumes:
    """ExaLearn universes (`full`, `unitPar`) or MRT/MRMF maps (`3Dmap`, `unitPar`)."""
    shapes, counts, labels, dtypes = [], [], [], []
    key = ""
    for path in files:
        with _open_input(path) as f:
            names = sorted(f.keys())
            if "full" in f and "unitPar" in f:
                this, ds = "full", f["full"]
                if ds.ndim != 4:
                    raise DataError(f"{path}: 'full' has shape {ds.shape}; an ExaLearn "
                                    "universe is (D, H, W, C)")
                count, volume_labels = 1, np.asarray(f["unitPar"][...]).reshape(1, -1)
                shape = (ds.shape[-1], *ds.shape[:-1])
            elif "3Dmap" in f and "unitPar" in f:
                this, ds = "3Dmap", f["3Dmap"]
                if ds.ndim < 3:
                    raise DataError(f"{path}: '3Dmap' has shape {ds.shape}; the MRT/MRMF "
                                    "layout is (N, *spatial, C)")
                count, volume_labels = int(ds.shape[0]), np.asarray(f["unitPar"][...])
                shape = (ds.shape[-1], *ds.shape[1:-1])
                if volume_labels.shape[:1] != (count,):
                    raise DataError(f"{path}: 'unitPar' has shape {volume_labels.shape}, "
                                    f"'3Dmap' holds {count} maps; labels must be ({count}, P)")
            else:
                raise DataError(f"{path} holds {names}; `data convert` reads HDF5 files with "
                                "'full' and 'unitPar' (ExaLearn universes) or '3Dmap' and "
                                "'unitPar' (MRT/MRMF maps); save other arrays as .npy")
            if key and this != key:
                raise DataError(f"{path} holds {this!r}, {files[0]} holds {key!r}: convert "
                                "one layout at a time")
            key = this
            _check_size(path, ds)
            shapes.append(tuple(int(s) for s in shape))
            dtypes.append(ds.dtype)
            counts.append(count)
            labels.append(volume_labels.reshape(count, -1))
    if len(set(shapes)) > 1 or len(set(dtypes)) > 1:
        raise DataError(f"the inputs hold arrays of different shapes or dtypes "
                        f"({sorted(set(shapes))}, {sorted(map(str, set(dtypes)))}); a dataset "
                        "holds one kind: convert them separately")
    if len({lab.shape[1] for lab in labels}) > 1:
        raise DataError("the inputs' 'unitPar' differ in length; every volume needs the same "
                        "labels")
    return _ChannelsLast(files, key, counts, shapes[0], dtypes[0], np.concatenate(labels))


def layout_of(files: Sequence[Path]) -> str:
    """"exalearn" or "mrt" for HDF5 inputs, "" for anything else."""
    if not files or files[0].suffix not in (".h5", ".hdf5"):
        return ""
    with _open_input(files[0]) as f:
        return "exalearn" if "full" in f else "mrt" if "3Dmap" in f else "hdf5"
