"""The HDF5 sample store: a directory of shard files (docs/data-format.md specifies it).

Each shard `shard-NNNNN.h5` holds `/x` (N, C, *spatial) chunked one sample per chunk
(or in sub-volume blocks, `data/chunks.py`),
`/y` (N, P) float32 labels in [-1, 1], and root attributes that describe the schema,
the normalisation and where the data came from. Shards are written to a temporary name
and renamed when complete, so a reader never sees a half-written shard.

Readers open shards lazily, read-only, with HDF5 file locking off (many ranks read the
same files on a parallel file system), and read a sample (or a region of one) straight
into the caller's buffer: HDF5's `read_direct`, or a pread of its chunks (`data/chunks.py`)
where the Fletcher-32 check is not asked for. `data/batch.py` reads whole batches.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpc_multires.data.batch import Normalise, read_batch
from hpc_multires.data.chunks import DirectChunks, chunk_shape, direct_readable
from hpc_multires.errors import DataError, SampleError
from hpc_multires.files import replace_atomic

FORMAT = "hpc-multires-store"
SCHEMA_VERSION = 1
SHARD_PATTERN = re.compile(r"shard-(\d{5})\.h5")
VOLUME_PATTERN = re.compile(r"volume-(\d{5})\.h5")  # a volume store's (data/volumes.py)
# In a dataset directory while hpc-multires writes it; removed once every shard is written.
# A write that failed or was interrupted leaves it, and readers then refuse the directory.
INCOMPLETE = ".incomplete"
TRANSFORMS = ("none", "log1p")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def store_file(name: str) -> bool:
    """Whether `name` is one of a dataset's files: a shard or a volume file."""
    return bool(SHARD_PATTERN.fullmatch(name) or VOLUME_PATTERN.fullmatch(name))


@dataclass(frozen=True)
class Schema:
    """What every shard of a store agrees on."""

    sample_shape: tuple[int, ...]
    """(C, *spatial) of one sample at level 0."""
    x_dtype: str
    """Stored dtype of /x (e.g. uint16 for counts, float32)."""
    label_names: tuple[str, ...]
    """One name per column of /y."""
    x_transform: str
    """Applied at read time before normalisation: "none" or "log1p"."""
    num_samples: int
    """Samples in the whole store."""
    num_shards: int
    class_names: tuple[str, ...] = ()
    """A classification store's classes, by index: its one label column holds each
    sample's class index (0 .. K-1, not scaled); empty for a store of regression labels."""

    @property
    def channels(self) -> int:
        return self.sample_shape[0]

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.sample_shape[1:]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def spatial_at(self, level: int) -> tuple[int, ...]:
        return tuple(s >> level for s in self.spatial)

    @property
    def num_classes(self) -> int:
        """Classes of a classification store; 0 for a store of regression labels."""
        return len(self.class_names)


def transform(x: np.ndarray, name: str) -> np.ndarray:
    """Stored values -> float32 model input, before normalisation (one new array)."""
    out = x.astype(np.float32, copy=True)
    if name == "log1p":
        np.log1p(out, out=out)
    return out


class ShardWriter:
    """Writes one shard to `<name>.tmp` and renames it into place on `close()`.

    Samples are added in order with `write`; the running per-channel sums for the
    normalisation and the SHA-256 of the stored bytes are computed on the way, so a
    shard is written in one pass and in memory bounded by one sample.
    """

    def __init__(self, directory: str | Path, index: int, *, num_shards: int, first_sample: int,
                 total_samples: int, num_samples: int, sample_shape: Sequence[int],
                 x_dtype: str | np.dtype, label_names: Sequence[str], x_transform: str,
                 prov: dict[str, Any], compression: str | None = None,
                 chunk: int | None = None, class_names: Sequence[str] = ()) -> None:
        """`chunk`: /x in blocks of that many points per spatial axis, one channel each
        (`data/chunks.py`); None: one sample per chunk. `class_names`: a classification
        store's classes; its one label column then holds class indices 0 .. K-1."""
        if x_transform not in TRANSFORMS:
            raise DataError(f"unknown transform {x_transform!r}; use one of {TRANSFORMS}")
        self.class_names = tuple(str(n) for n in class_names)
        if self.class_names and len(label_names) != 1:
            raise DataError(f"a classification store has one label column (the class index), "
                            f"not {len(label_names)}: {list(label_names)}")
        if len(set(self.class_names)) != len(self.class_names):
            raise DataError(f"class names {list(self.class_names)} repeat a name; give each "
                            "class its own")
        self.path = Path(directory) / shard_name(index)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.num_samples = num_samples
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.x_transform = x_transform
        self._file = h5py.File(self.tmp, "w", locking=False)
        c = self.sample_shape[0]
        self._x = self._file.create_dataset(
            "x", shape=(num_samples, *self.sample_shape), dtype=np.dtype(x_dtype),
            chunks=chunk_shape(self.sample_shape, chunk), compression=compression,
            # A checksum per chunk: a flipped bit on disk is an error at read time,
            # not silently wrong training data.
            fletcher32=True)
        self._y = self._file.create_dataset("y", shape=(num_samples, len(label_names)),
                                            dtype=np.float32)
        a = self._file.attrs
        a["format"] = FORMAT
        a["schema_version"] = SCHEMA_VERSION
        a["sample_shape"] = np.asarray(self.sample_shape, dtype=np.int64)
        a["x_dtype"] = np.dtype(x_dtype).name
        a["x_transform"] = x_transform
        a["label_names"] = json.dumps(list(label_names))
        if self.class_names:  # absent: regression labels (a store written before classes)
            a["class_names"] = json.dumps(list(self.class_names))
        a["shard_index"] = index
        a["num_shards"] = num_shards
        a["first_sample"] = first_sample
        a["total_samples"] = total_samples
        a["num_samples"] = num_samples
        a["provenance"] = json.dumps(prov)
        self._sum = np.zeros(c, np.float64)
        self._sumsq = np.zeros(c, np.float64)
        self._x_hash = hashlib.sha256()
        self._y_hash = hashlib.sha256()
        self._next = 0

    def write(self, x: np.ndarray, y: np.ndarray) -> None:
        """Append one sample: x (C, *spatial), y (P,)."""
        if tuple(x.shape) != self.sample_shape:
            raise DataError(f"sample {self._next} of {self.path.name} has shape {x.shape}, "
                            f"expected {self.sample_shape}")
        x = np.ascontiguousarray(x, dtype=self._x.dtype)
        y = np.ascontiguousarray(y, dtype=np.float32)
        if not np.isfinite(y).all() or (x.dtype.kind == "f" and not np.isfinite(x).all()):
            raise DataError(f"sample {self._next} of {self.path.name} holds NaN or infinity; "
                            "clean the input arrays before writing them")
        k = len(self.class_names)
        if k and not (float(y[0]).is_integer() and 0 <= y[0] < k):
            raise DataError(f"sample {self._next} of {self.path.name} has class {y[0]}, not "
                            f"an index of its {k} classes (0 .. {k - 1})")
        self._x[self._next] = x
        self._y[self._next] = y
        t = transform(x, self.x_transform).reshape(x.shape[0], -1)  # (C, voxels)
        self._sum += t.sum(axis=1, dtype=np.float64)
        self._sumsq += np.square(t, dtype=np.float64).sum(axis=1)
        self._x_hash.update(x.tobytes())
        self._y_hash.update(y.tobytes())
        self._next += 1

    def close(self) -> Path:
        if self._next != self.num_samples:
            self.abort()
            raise DataError(f"{self.path.name}: wrote {self._next} of {self.num_samples} samples")
        voxels = int(np.prod(self.sample_shape[1:]))
        a = self._file.attrs
        a["x_sum"] = self._sum
        a["x_sumsq"] = self._sumsq
        a["x_count"] = self.num_samples * voxels
        a["x_sha256"] = self._x_hash.hexdigest()
        a["y_sha256"] = self._y_hash.hexdigest()
        self._file.close()
        replace_atomic(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._file.id.valid:
            self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def provenance(generator: str, **extra: Any) -> dict[str, Any]:
    import sys

    from hpc_multires import __version__

    return {"generator": generator, "command": " ".join(sys.argv),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hpc_multires": __version__, **extra}


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    index: int
    first_sample: int
    num_samples: int


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        raise DataError(
            f"{path} is not a readable HDF5 file ({e}); it may be truncated or corrupted: "
            "regenerate or re-copy it (`hpc-multires data inspect DIR` checks every shard)"
        ) from None


def _attr(f: h5py.File | h5py.Group, path: Path, name: str) -> Any:
    if name not in f.attrs:
        raise DataError(f"{path}: attribute {name!r} missing; this is not a complete "
                        f"{FORMAT} file (see docs/data-format.md)")
    v = f.attrs[name]
    return v.decode() if isinstance(v, bytes) else v


open_readonly = _open  # for the volume store (data/volumes.py)
read_attr = _attr


def open_store(path: str | Path, level: int = 0, verify_reads: bool = True,
               mpio: Any = None) -> SampleStore:
    """The store at `path`: shards (`SampleStore`) or large arrays cut into sub-volumes
    (`VolumeStore`, data/volumes.py), whichever files the directory holds. `mpio`: an
    MPI communicator whose ranks all open a volume store's files now, through MPI-IO
    (shards are read with each rank's own handles)."""
    from hpc_multires.data.volumes import VolumeStore, is_volume_store  # it imports this

    if is_volume_store(Path(path)) and not (Path(path) / shard_name(0)).exists():
        return VolumeStore(path, level, verify_reads, mpio)
    return SampleStore(path, level, verify_reads)


class SampleStore:
    """A store opened for reading at one pyramid level. Picklable: handles reopen lazily.

    Opening reads only the shard headers and checks that they agree; samples are read
    on demand with `read(index)`.
    """

    def __init__(self, path: str | Path, level: int = 0, verify_reads: bool = True) -> None:
        """`verify_reads`: every read checks the Fletcher-32 checksum of each chunk it
        touches (HDF5's filter); False reads uncompressed chunks directly, unchecked
        (`data/chunks.py`; `data.verify_reads` says when that is safe)."""
        self.path = Path(path)
        self.level = level
        self.verify_reads = verify_reads
        if not self.path.exists():
            raise DataError(f"dataset {str(self.path)!r} not found; create one with "
                            "`hpc-multires data synth cosmoflow|neuron --out DIR` or "
                            "`hpc-multires data convert`, or point data.path at it (--set "
                            "data.path=DIR)")
        if not self.path.is_dir():
            raise DataError(f"dataset {str(self.path)!r} is a file; data.path must be the "
                            "directory holding shard-*.h5 files")
        if (self.path / INCOMPLETE).exists():
            raise DataError(f"dataset {str(self.path)!r} is incomplete: the command that wrote "
                            "it failed or was interrupted; run it again with --overwrite")
        names = sorted(p.name for p in self.path.iterdir() if SHARD_PATTERN.fullmatch(p.name))
        if not names:
            raise DataError(f"no shard-*.h5 files in {str(self.path)!r}; is this the dataset "
                            "directory?")
        self.shards: list[ShardInfo] = []
        sums: list[np.ndarray] = []
        schema: Schema | None = None
        for name in names:
            p = self.path / name
            with _open(p) as f:
                s = self._read_header(f, p)
                if schema is None:
                    schema = s
                elif s != schema:
                    raise DataError(f"{p} disagrees with {self.shards[0].path.name} on the "
                                    f"schema ({s} vs {schema}); a store holds one kind of "
                                    "sample: rebuild it")
                self._check_datasets(f, p, s)
                first = int(_attr(f, p, "first_sample"))
                n = int(_attr(f, p, "num_samples"))
                self.shards.append(ShardInfo(p, int(_attr(f, p, "shard_index")), first, n))
                # Normalisation sums of this level: the root's for level 0, the level
                # group's otherwise (a coarse level has its own statistics).
                holder = f if self.level == 0 else f[f"levels/{self.level}"]
                sums.append(np.stack([
                    np.asarray(_attr(holder, p, "x_sum"), np.float64),
                    np.asarray(_attr(holder, p, "x_sumsq"), np.float64),
                    np.full(s.channels, float(_attr(holder, p, "x_count")))]))
        assert schema is not None
        self.schema = schema
        self._check_complete()
        total = np.sum(sums, axis=0)  # (3, C): sum, sum of squares, count
        self.mean = (total[0] / total[2]).astype(np.float32)  # (C,)
        var = np.maximum(total[1] / total[2] - np.square(total[0] / total[2]), 0.0)
        self.std = np.sqrt(var).astype(np.float32).clip(min=1e-6)  # (C,)
        self._starts = np.array([s.first_sample for s in self.shards])
        self._files: dict[int, h5py.File] = {}
        # (x, y) dataset handles per open shard: looking a dataset up by name costs ~400 us
        # in h5py, reading one sample through a kept handle ~10 us.
        self._datasets: dict[int, tuple[h5py.Dataset, h5py.Dataset]] = {}
        self._direct: dict[int, DirectChunks | None] = {}
        self._labels: dict[int, np.ndarray] = {}
        self._row_offsets: dict[int, list[int]] = {}

    def relocate(self, directory: Path, names: Set[str]) -> None:
        """Read the shards named in `names` from copies in `directory` (a node's share of a
        partitioned dataset, data/partition.py); the others stay where they are. Before
        any read: handles open lazily."""
        self.shards = [replace(s, path=directory / s.path.name) if s.path.name in names
                       else s for s in self.shards]

    def _read_header(self, f: h5py.File, p: Path) -> Schema:
        fmt = _attr(f, p, "format")
        if fmt != FORMAT:
            raise DataError(f"{p}: format {fmt!r} is not {FORMAT!r}; convert the data with "
                            "`hpc-multires data convert`")
        version = int(_attr(f, p, "schema_version"))
        if version != SCHEMA_VERSION:
            raise DataError(f"{p}: schema version {version}, this hpc-multires reads version "
                            f"{SCHEMA_VERSION}; rebuild the store with this version")
        x_transform = str(_attr(f, p, "x_transform"))
        if x_transform not in TRANSFORMS:
            raise DataError(f"{p}: unknown x_transform {x_transform!r}; expected one of "
                            f"{TRANSFORMS}")
        x_dtype = str(_attr(f, p, "x_dtype"))
        try:
            np.dtype(x_dtype)
        except TypeError:
            raise DataError(f"{p}: x_dtype {x_dtype!r} is not a numpy dtype name; set it to "
                            "/x's dtype, e.g. 'float32' or 'uint16'") from None
        return Schema(
            sample_shape=tuple(int(v) for v in _attr(f, p, "sample_shape")),
            x_dtype=x_dtype,
            label_names=tuple(json.loads(_attr(f, p, "label_names"))),
            x_transform=x_transform,
            num_samples=int(_attr(f, p, "total_samples")),
            num_shards=int(_attr(f, p, "num_shards")),
            class_names=tuple(json.loads(_attr(f, p, "class_names")))
            if "class_names" in f.attrs else (),
        )

    def _check_datasets(self, f: h5py.File, p: Path, s: Schema) -> None:
        n = int(_attr(f, p, "num_samples"))
        key = self._x_key
        if self.level > 0 and (key not in f or
                               int(f[f"levels/{self.level}"].attrs.get("complete", 0)) != 1):
            raise DataError(f"{p} has no complete pyramid level {self.level}; build it with "
                            f"`hpc-multires data pyramid {self.path} --levels {self.level}`")
        if key not in f:
            raise DataError(f"{p}: dataset /x missing; the shard is incomplete: regenerate it")
        if self.level == 0 and f["x"].dtype != np.dtype(s.x_dtype):
            raise DataError(f"{p}: /x holds {f['x'].dtype}, but the attribute x_dtype says "
                            f"{s.x_dtype!r}; set x_dtype to the dataset's dtype (see "
                            "docs/data-format.md)")
        want_x = (n, s.channels, *s.spatial_at(self.level))
        for name, want in ((key, want_x), ("y", (n, s.num_labels))):
            if name not in f:
                raise DataError(f"{p}: dataset /{name} missing; the shard is incomplete")
            got = tuple(f[name].shape)
            if got != want:
                raise DataError(f"{p}: /{name} has shape {got}, the attributes say {want}; "
                                "the shard is inconsistent: regenerate it")

    @property
    def _x_key(self) -> str:
        return "x" if self.level == 0 else f"levels/{self.level}/x"

    def _check_complete(self) -> None:
        s = self.schema
        indices = sorted(info.index for info in self.shards)
        if indices != list(range(s.num_shards)):
            missing = sorted(set(range(s.num_shards)) - set(indices))
            raise DataError(f"{self.path}: shards {[shard_name(i) for i in missing][:5]} of "
                            f"{s.num_shards} are missing; copy them or regenerate the dataset")
        self.shards.sort(key=lambda info: info.first_sample)
        expected = 0
        for info in self.shards:
            if info.first_sample != expected:
                raise DataError(f"{info.path}: first_sample = {info.first_sample}, expected "
                                f"{expected}; the shards come from different datasets")
            expected += info.num_samples
        if expected != s.num_samples:
            raise DataError(f"{self.path}: shards hold {expected} samples, the attributes say "
                            f"{s.num_samples}; the dataset is incomplete")

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return self.schema.num_samples

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, *spatial) of a sample at this store's level."""
        return (self.schema.channels, *self.schema.spatial_at(self.level))

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} outside 0..{len(self) - 1}")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - self.shards[shard].first_sample

    def _file(self, shard: int) -> h5py.File:
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = _open(self.shards[shard].path)
        return f

    def level_sizes(self) -> tuple[int, ...]:
        """Sizes a pyramid level halves: the samples' spatial axes."""
        return self.schema.spatial

    @property
    def raw_dtype(self) -> np.dtype:
        """dtype of the stored values at this level (a pyramid level holds float32)."""
        return np.dtype(self.schema.x_dtype) if self.level == 0 else np.dtype(np.float32)

    def normaliser(self) -> Normalise:
        """Stored values -> model input, with this store's (or, for a validation set, the
        training set's) statistics."""
        return Normalise(self.schema.x_transform, self.mean, self.std)

    def where(self, index: int) -> str:
        """Sample `index`'s file and row, for messages."""
        shard, row = self._locate(index)
        return f"{self.shards[shard].path.name}, row {row}"

    def _handles(self, shard: int) -> tuple[h5py.Dataset, h5py.Dataset]:
        handles = self._datasets.get(shard)
        if handles is None:
            f = self._file(shard)
            handles = self._datasets[shard] = (f[self._x_key], f["y"])
        return handles

    def _shard_labels(self, shard: int) -> np.ndarray:
        """A shard's labels (n, P), read whole once (a read per sample costs ~30 us)."""
        labels = self._labels.get(shard)
        if labels is None:
            labels = self._labels[shard] = self._handles(shard)[1][:]
        return labels

    def _direct_chunks(self, shard: int) -> DirectChunks | None:
        if shard not in self._direct:
            x = self._handles(shard)[0]
            self._direct[shard] = (DirectChunks(self.shards[shard].path, x)
                                   if direct_readable(x) else None)
        return self._direct[shard]

    def read_whole_into(self, indices: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        """Whole samples `indices` into `out` (b, C, *spatial), each with one pread, in
        file order; their labels (b, P). None where that path does not apply (checksums
        asked for, or not one sample per uncompressed chunk): read them one by one. The
        per-sample work here is a few microseconds, which matters for small samples."""
        if self.verify_reads or not len(indices):
            return None
        if indices.min() < 0 or indices.max() >= len(self):
            raise IndexError(f"samples {indices.tolist()} outside 0..{len(self) - 1}")
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        rows = indices - self._starts[shards]
        chunks: dict[int, tuple[DirectChunks, list[int]]] = {}
        for shard in np.unique(shards).tolist():
            direct = self._direct_chunks(shard)
            if direct is None or direct.chunks[1:] != direct.shape[1:]:
                return None
            offsets = self._row_offsets.get(shard)
            if offsets is None:
                zeros = (0,) * (len(direct.shape) - 1)
                offsets = self._row_offsets[shard] = [
                    direct.index.get((row, *zeros), -1) for row in range(direct.shape[0])]
            chunks[shard] = (direct, offsets)
        ys = []
        for i in np.lexsort((rows, shards)).tolist():  # file order
            direct, offsets = chunks[int(shards[i])]
            offset = offsets[int(rows[i])]
            if offset < 0:  # never written: let HDF5 give the fill value
                return None
            direct.pread(out[i], offset)
        for shard, row in zip(shards.tolist(), rows.tolist(), strict=True):
            ys.append(self._shard_labels(shard)[row])
        return np.stack(ys)

    def read_raw_into(self, index: int, region: tuple[slice, ...], out: np.ndarray
                      ) -> np.ndarray:
        """Stored x of sample `index` (its `region` of the spatial axes, or whole) into
        `out` (C, *shape), C-contiguous, of `raw_dtype`; returns its y (P,)."""
        shard, row = self._locate(index)
        try:
            x = self._handles(shard)[0]
            direct = None if self.verify_reads else self._direct_chunks(shard)
            if direct is not None:
                direct.read((row, 0, *(int(r.start) for r in region),
                             *(0 for _ in out.shape[1 + len(region):])), out[None])
            else:
                x.read_direct(out, np.s_[(row, slice(None), *region)])
            return self._shard_labels(shard)[row]
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:
            raise SampleError(
                f"cannot read sample {index} ({self.shards[shard].path.name}, row {row}): {e}; "
                "the shard is corrupted: regenerate or re-copy it") from None

    def read_raw(self, index: int, region: tuple[slice, ...] = ()
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Stored x (C, *spatial) at this level and y (P,), no transform. `region`: slices
        of the spatial axes, to read only that block (only the chunks it touches)."""
        x, y = read_batch(self, [index], [region], normalise=False)
        return x[0], y[0]

    def read(self, index: int, region: tuple[slice, ...] = (), normalise: bool = True
             ) -> tuple[np.ndarray, np.ndarray]:
        """Model-ready x (C, *spatial) float32, normalised per channel, and y (P,) float32;
        with `region`, only that block of the spatial axes. `normalise` False: x in its own
        units after the read-time transform (images in [0, 1] stay in [0, 1], which a
        restoration task's corruption and its PSNR assume)."""
        if normalise:
            x, y = read_batch(self, [index], [region])
            return x[0], y[0]
        raw, y = read_batch(self, [index], [region], normalise=False)
        return transform(raw[0], self.schema.x_transform), y[0]

    def labels(self) -> np.ndarray:
        """All labels (N, P), read in one go per shard (they are small)."""
        out = [self._file(i)["y"][:] for i in range(len(self.shards))]
        return np.concatenate(out).astype(np.float32)

    def close(self) -> None:
        for direct in self._direct.values():
            if direct is not None:
                direct.close()
        self._direct.clear()
        self._labels.clear()
        self._datasets.clear()
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __getstate__(self) -> dict[str, Any]:
        # Open HDF5 handles do not survive fork/pickle; each reader process opens its own.
        state = self.__dict__.copy()
        state["_files"] = {}
        state["_datasets"] = {}
        state["_direct"] = {}
        state["_labels"] = {}
        state["_row_offsets"] = {}
        return state


PIECE_BYTES = 64 * 2**20


def row_pieces(x: h5py.Dataset, i: int) -> Iterator[np.ndarray]:
    """Row i of `x` in C order, whole, or for a large row (a volume store's array) a
    channel's slab of its first spatial axis at a time."""
    if x.ndim < 3 or int(np.prod(x.shape[1:])) * x.dtype.itemsize <= PIECE_BYTES:
        yield np.ascontiguousarray(x[i])
        return
    plane = int(np.prod(x.shape[3:])) * x.dtype.itemsize
    step = max(1, PIECE_BYTES // max(1, plane))
    for c in range(x.shape[1]):
        for a in range(0, x.shape[2], step):
            yield np.ascontiguousarray(x[i, c, a:a + step])


def checksum_shard(path: Path) -> dict[str, Any]:
    """Recompute the SHA-256 of a shard's /x and /y bytes and compare with its attributes.

    "levels": the pyramid levels training can read; "incomplete_levels": those whose group
    exists but was never finished (an interrupted build), which training refuses.
    """
    from hpc_multires.data.pyramid import level_is_complete  # pyramid imports this module

    with _open(path) as f:
        x, y = f["x"], f["y"]
        hx, hy = hashlib.sha256(), hashlib.sha256()
        nonfinite = 0
        for i in range(x.shape[0]):
            for xi in row_pieces(x, i):
                hx.update(xi.tobytes())
                if xi.dtype.kind == "f":
                    nonfinite += int((~np.isfinite(xi)).sum())
            yi = np.ascontiguousarray(y[i])
            hy.update(yi.tobytes())
            nonfinite += int((~np.isfinite(yi)).sum())
        want_x = _attr(f, path, "x_sha256")
        want_y = _attr(f, path, "y_sha256")
        levels = sorted(int(k) for k in f["levels"] if k.isdigit()) if "levels" in f else []
        complete = [k for k in levels if level_is_complete(f, k)]
        notes = []
        if x.chunks is None or x.chunks[0] != 1:
            stored = f"in chunks of {x.chunks}" if x.chunks else "contiguous"
            notes.append(f"/x is stored {stored}, not one sample per chunk "
                         f"{(1, *x.shape[1:])} or blocks of one: reads fetch more than the "
                         "sample they need")
        if not x.fletcher32:
            notes.append("/x has no Fletcher-32 filter: a damaged chunk reads as garbage "
                         "instead of an error")
        return {"x_sha256": hx.hexdigest(), "y_sha256": hy.hexdigest(), "notes": notes,
                "ok": hx.hexdigest() == want_x and hy.hexdigest() == want_y,
                "nonfinite": nonfinite, "levels": complete,
                "incomplete_levels": [k for k in levels if k not in complete]}
