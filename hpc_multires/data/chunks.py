"""Chunks that match the reads, and reading a chunk's bytes where it lies in the file.

A store's `/x` is chunked one sample per chunk, `(1, C, *spatial)` (the default), or in
sub-volume blocks, `(1, 1, b, b, ...)` for `--chunk b`: one channel of a block of b points
per spatial axis. A read of a window, a sub-domain or a sub-volume then touches only the
blocks it overlaps, where one sample per chunk reads (and checksums) the whole sample.

`DirectChunks` reads chunks without HDF5's filter pipeline. A chunk stored without
compression is its values in C order, followed by the 4-byte Fletcher-32 checksum when
that filter is on; HDF5's own chunk index says where each chunk starts. One `pread` per
chunk then puts a chunk straight into the caller's buffer: a whole-sample chunk into its
row of the batch, a block into a chunk-sized scratch that is copied into place while it
is still in the cache. What it does not do is verify the checksum: HDF5's Fletcher-32
check costs 4-5x the read (docs/benchmarks.md), so the store takes this path only when
`data.verify_reads` lets it (a node-local copy whose SHA-256 staging verified, or "off").
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from hpc_multires.errors import DataError, SampleError

FLETCHER_BYTES = 4


def chunk_shape(sample_shape: Sequence[int], block: int | None) -> tuple[int, ...]:
    """/x's chunk for samples of `sample_shape` (C, *spatial): one sample per chunk for
    `block` None or 0, else one channel of `block` points per spatial axis."""
    c, *spatial = (int(s) for s in sample_shape)
    if not block:
        return (1, c, *spatial)
    if block < 1:
        raise DataError(f"--chunk {block}: give the block's points per spatial axis, 1 or "
                        "more (or leave it out: one sample per chunk)")
    if any(block > s for s in spatial):
        raise DataError(f"--chunk {block} is larger than the samples' "
                        f"{'x'.join(map(str, spatial))} points; use --chunk <= {min(spatial)}, "
                        "or leave it out for one sample per chunk")
    return (1, 1, *(block for _ in spatial))


def level_chunks(x_chunks: Sequence[int] | None, coarse: Sequence[int],
                 level: int) -> tuple[int, ...]:
    """The chunk of pyramid level `level`, whose samples are `coarse` (C, *spatial), from
    /x's chunk: the same blocks, halved per level as the samples are."""
    c, *spatial = (int(s) for s in coarse)
    if x_chunks is None:  # contiguous /x: one sample per chunk
        return (1, c, *spatial)
    return (1, int(x_chunks[1]), *(max(1, min(s, int(b) >> level))
                                  for b, s in zip(x_chunks[2:], spatial, strict=True)))


def direct_readable(ds: h5py.Dataset) -> bool:
    """Whether `ds`'s chunks hold its values as they are (no compression or shuffle, no
    filter but Fletcher-32, native byte order), so that `DirectChunks` can read them."""
    if ds.chunks is None or not ds.dtype.isnative or ds.dtype.kind not in "uif":
        return False
    dcpl = ds.id.get_create_plist()
    return all(dcpl.get_filter(i)[0] == h5py.h5z.FILTER_FLETCHER32
               for i in range(dcpl.get_nfilters()))


class DirectChunks:
    """The chunk index of one dataset, and `read`s that pread its chunks into a buffer.

    Built in the process that reads (its file descriptor does not survive a fork)."""

    def __init__(self, path: Path, ds: h5py.Dataset) -> None:
        assert direct_readable(ds), "direct reads need uncompressed chunks"
        self._fd = -1
        self.path = path
        self.shape = tuple(int(s) for s in ds.shape)
        self.chunks = tuple(int(c) for c in ds.chunks)
        self.dtype = ds.dtype
        self.fill = ds.fillvalue
        self.chunk_bytes = int(np.prod(self.chunks)) * self.dtype.itemsize
        self.stored = stored = self.chunk_bytes + (FLETCHER_BYTES if ds.fletcher32 else 0)
        self.index: dict[tuple[int, ...], int] = {}
        sizes: set[int] = set()

        def visit(info: h5py.h5d.StoreInfo) -> None:
            self.index[tuple(int(o) // c for o, c in zip(info.chunk_offset, self.chunks,
                                                          strict=True))] = info.byte_offset
            sizes.add(int(info.size))

        try:
            ds.id.chunk_iter(visit)
        except (AttributeError, NotImplementedError):  # HDF5 before 1.10.10 / 1.12.3
            for i in range(ds.id.get_num_chunks()):
                visit(ds.id.get_chunk_info(i))
        if sizes - {stored}:  # written by something that stores chunks otherwise
            raise DataError(f"{path}: chunks of {sorted(sizes)} bytes, expected {stored}")
        self._scratch = np.empty(self.chunks, self.dtype)
        self.rows = self._row_runs()
        self._row_scratch = np.empty(0, np.uint8)
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.bytes_read = 0

    def _row_runs(self) -> dict[int, tuple[int, np.ndarray | None]]:
        """For each row (sample) whose blocks lie close together in the file (as a writer
        that writes sample after sample leaves them, with HDF5's own index blocks here and
        there between them), the span to read: its first byte, and where each block starts
        in it (None: one after the other, in C order of the block coordinates)."""
        grid = [s // c for s, c in zip(self.shape[1:], self.chunks[1:], strict=True)]
        if self.chunks[0] != 1 or any(s % c for s, c in zip(self.shape[1:], self.chunks[1:],
                                                               strict=True)):
            return {}
        per_row = int(np.prod(grid))
        if per_row == 1:
            return {}  # one chunk per sample: the whole-chunk path reads it in one pread
        runs: dict[int, tuple[int, np.ndarray | None]] = {}
        for row in range(self.shape[0]):
            found = [self.index.get((row, *c)) for c in itertools.product(*map(range, grid))]
            if None in found:
                continue
            offsets = np.array(found, np.int64)
            base = int(offsets.min())
            span = int(offsets.max()) - base + self.stored
            if span > per_row * self.stored * 5 // 4:  # too much else in between
                continue
            starts = offsets - base
            uniform = bool((starts == np.arange(per_row) * self.stored).all())
            runs[row] = (base, None if uniform else starts)
        return runs

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def pread(self, buffer: np.ndarray, offset: int) -> None:
        """`buffer`'s bytes from the file at `offset` (a truncated file: SampleError)."""
        view = memoryview(buffer.data).cast("B")
        done = 0
        while done < len(view):  # Linux returns at most ~2 GiB per call
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise SampleError(f"{self.path.name} ends inside a chunk at byte {offset}: "
                                  "the file is truncated; regenerate or re-copy it")
            done += got
        self.bytes_read += done

    def _read_row(self, row: int, out: np.ndarray) -> None:
        """A whole sample whose blocks lie together in the file: one pread of their span,
        then one copy that puts every block in its place (numpy's strided copy)."""
        grid = [s // c for s, c in zip(self.shape[1:], self.chunks[1:], strict=True)]
        count = int(np.prod(grid))
        base, starts = self.rows[row]
        span = count * self.stored if starts is None else int(starts.max()) + self.stored
        if self._row_scratch.nbytes < span:
            self._row_scratch = np.empty(span, np.uint8)
        raw = self._row_scratch[:span]
        self.pread(raw, base)
        if starts is None:  # consecutive: a strided view, no copy
            blocks = raw.reshape(count, self.stored)[:, :self.chunk_bytes].view(self.dtype)
        else:  # gathered from their places (one copy)
            blocks = np.lib.stride_tricks.sliding_window_view(raw, self.chunk_bytes)[starts]
            blocks = blocks.view(self.dtype)
        blocks = blocks.reshape(*grid, *self.chunks[1:])  # (gC, gD, .., cC, cD, ..)
        axes = len(grid)
        # out[0] as (gC, cC, gD, cD, ...): block (g...) at (g0, :, g1, :, ...)
        target = out.reshape([n for g, c in zip(grid, self.chunks[1:], strict=True)
                              for n in (g, c)])
        order = [a for k in range(axes) for a in (k, axes + k)]
        np.copyto(target, blocks.transpose(order))

    def read(self, start: Sequence[int], out: np.ndarray) -> None:
        """Fill `out` (C-contiguous, of this dataset's dtype) with the block of the dataset
        that starts at `start` (one index per axis) and has `out`'s shape."""
        if (start[0] in self.rows and out.shape == (1, *self.shape[1:])
                and not any(start[1:]) and out.flags.c_contiguous):
            self._read_row(start[0], out)
            return
        if out.shape == self.chunks and out.flags.c_contiguous:  # one whole chunk
            coord = tuple(a // c for a, c in zip(start, self.chunks, strict=True))
            offset = self.index.get(coord)
            if offset is not None and all(a % c == 0 for a, c in zip(start, self.chunks,
                                                                      strict=True)):
                self.pread(out, offset)
                return
        stop = [a + n for a, n in zip(start, out.shape, strict=True)]
        ranges = [range(a // c, (b - 1) // c + 1)
                  for a, b, c in zip(start, stop, self.chunks, strict=True)]
        for coord in itertools.product(*ranges):
            origin = [k * c for k, c in zip(coord, self.chunks, strict=True)]
            lo = [max(a, o) for a, o in zip(start, origin, strict=True)]
            hi = [min(b, o + c, s) for b, o, c, s in zip(stop, origin, self.chunks,
                                                          self.shape, strict=True)]
            target = out[tuple(slice(a - s0, b - s0) for a, b, s0 in zip(lo, hi, start,
                                                                          strict=True))]
            offset = self.index.get(coord)
            if offset is None:  # never written: HDF5 reads the fill value
                target[...] = self.fill
                continue
            whole = all(a == o and b == o + c for a, b, o, c in zip(lo, hi, origin,
                                                                     self.chunks, strict=True))
            if whole and target.flags.c_contiguous:
                self.pread(target, offset)  # straight into place
            else:
                self.pread(self._scratch, offset)
                target[...] = self._scratch[tuple(slice(a - o, b - o) for a, b, o in
                                                  zip(lo, hi, origin, strict=True))]
