"""The batch read path: chunks that match the reads (bytes counted per read), direct chunk
reads, the transform on the whole batch, and results equal to the sample-by-sample path."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import write_arrays_store
from counting_file import CountingFile

from hpc_multires.data.batch import read_batch
from hpc_multires.data.chunks import chunk_shape, level_chunks
from hpc_multires.data.loader import BatchReader, WindowedBatch
from hpc_multires.data.store import SampleStore, ShardWriter, provenance, transform
from hpc_multires.errors import DataError, SampleError

C, S = 2, 32


@pytest.fixture
def arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    x = rng.poisson(4.0, size=(10, C, S, S, S)).astype(np.uint16)  # (N, C, D, H, W)
    y = rng.uniform(-1, 1, size=(10, 3)).astype(np.float32)
    return x, y


def write_store(out: Path, x: np.ndarray, y: np.ndarray, chunk: int | None,
                per_shard: int = 4) -> Path:
    out.mkdir(parents=True)
    n = len(x)
    shards = -(-n // per_shard)
    for s in range(shards):
        first = s * per_shard
        count = min(per_shard, n - first)
        with ShardWriter(out, s, num_shards=shards, first_sample=first, total_samples=n,
                         num_samples=count, sample_shape=x.shape[1:], x_dtype=x.dtype,
                         label_names=["a", "b", "c"], x_transform="log1p",
                         prov=provenance("test"), chunk=chunk) as w:
            for i in range(first, first + count):
                w.write(x[i], y[i])
    return out


def reference(x: np.ndarray, store: SampleStore, i: int) -> np.ndarray:
    """What docs/data-format.md says sample i reads as, computed here in float64."""
    t = np.log1p(x[i].astype(np.float64))
    return (t - store.mean[:, None, None, None]) / store.std[:, None, None, None]


def test_chunk_shapes_and_their_errors() -> None:
    assert chunk_shape((4, 64, 64, 64), None) == (1, 4, 64, 64, 64)
    assert chunk_shape((4, 64, 64, 64), 32) == (1, 1, 32, 32, 32)
    assert chunk_shape((4, 1600), 400) == (1, 1, 400)
    with pytest.raises(DataError, match=r"--chunk 64 is larger than the samples' 32x32x32"):
        chunk_shape((4, 32, 32, 32), 64)
    assert level_chunks((1, 1, 32, 32, 32), (4, 32, 32, 32), 1) == (1, 1, 16, 16, 16)
    assert level_chunks((1, 4, 64, 64, 64), (4, 16, 16, 16), 2) == (1, 4, 16, 16, 16)
    assert level_chunks((1, 1, 2, 2, 2), (4, 8, 8, 8), 2) == (1, 1, 1, 1, 1)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("chunk", [None, 8, 12])
def test_every_layout_and_path_reads_the_same_values(tmp_path: Path, arrays, chunk,
                                                     verify: bool) -> None:
    """One sample per chunk, blocks that divide the sample and blocks that do not (edge
    chunks), each through HDF5 (verified) and through direct chunk reads: the same stored
    values, and the same model input as the format defines it."""
    x, y = arrays
    store = SampleStore(write_store(tmp_path / "s", x, y, chunk), verify_reads=verify)
    with h5py.File(store.shards[0].path, "r") as f:
        assert f["x"].chunks == chunk_shape((C, S, S, S), chunk) and f["x"].fletcher32
    if chunk == 8 and not verify:  # blocks written sample after sample: one pread each
        store.read_raw(0)
        direct = store._direct_chunks(0)
        assert direct is not None and sorted(direct.rows) == [0, 1, 2, 3]
    for i in (0, 3, 4, 9):
        raw, label = store.read_raw(i)
        np.testing.assert_array_equal(raw, x[i])
        np.testing.assert_array_equal(label, y[i])
        np.testing.assert_allclose(store.read(i)[0], reference(x, store, i), rtol=1e-5,
                                   atol=1e-5)
    region = (slice(5, 21), slice(0, 16), slice(17, 32))  # crosses blocks, unaligned
    np.testing.assert_array_equal(store.read_raw(6, region)[0], x[6][(slice(None), *region)])
    bx, by = read_batch(store, [9, 2, 5], [region] * 3)
    for k, i in enumerate((9, 2, 5)):
        np.testing.assert_allclose(bx[k], reference(x, store, i)[(slice(None), *region)],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(by[k], y[i])


def test_a_batch_equals_its_samples_bit_for_bit(tmp_path: Path, arrays) -> None:
    """The transform runs block by block per sample and channel, so a sample reads the same
    in any batch; and it equals the sample-by-sample arithmetic the store used before."""
    x, y = arrays
    store = SampleStore(write_store(tmp_path / "s", x, y, 8), verify_reads=False)
    bx, by = read_batch(store, [7, 1, 4, 0])
    for k, i in enumerate((7, 1, 4, 0)):
        np.testing.assert_array_equal(bx[k], store.read(i)[0])
        before = transform(x[i], "log1p")
        before -= store.mean.reshape(-1, 1, 1, 1)
        before *= (1.0 / store.std).reshape(-1, 1, 1, 1)
        np.testing.assert_array_equal(bx[k], before)
    np.testing.assert_array_equal(by, y[[7, 1, 4, 0]])


def test_the_transform_on_the_device_gives_the_same_input(tmp_path: Path, arrays) -> None:
    x, y = arrays
    store = SampleStore(write_store(tmp_path / "s", x, y, None))
    raw, _ = read_batch(store, [1, 2], normalise=False)
    assert raw.dtype == np.uint16  # half the bytes of float32 cross to the device
    on_device = store.normaliser().torch(torch.from_numpy(raw))
    np.testing.assert_allclose(on_device.numpy(), read_batch(store, [1, 2])[0], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 16])
def test_a_sub_domain_read_touches_only_its_chunks(tmp_path: Path, arrays, chunk) -> None:
    """A 16^3 sub-domain of a 32^3 sample: with 16^3 blocks HDF5 reads one block per channel
    (an eighth of the sample), with one sample per chunk the whole sample; the direct path
    reads the same chunks with one pread each."""
    x, y = arrays
    path = write_store(tmp_path / "s", x, y, chunk)
    sample_bytes = x[0].nbytes
    block = (slice(16, 32), slice(0, 16), slice(16, 32))
    counted = CountingFile(path / "shard-00000.h5")
    with h5py.File(counted, "r") as f:
        ds = f["x"]
        ds[0, 0, 0, 0, 0]  # the chunk index and headers, read once
        counted.bytes_read = 0
        got = ds[(2, slice(None), *block)]
        hdf5_bytes = counted.bytes_read
    counted.close()
    np.testing.assert_array_equal(got, x[2][(slice(None), *block)])
    store = SampleStore(path, verify_reads=False)
    store.read_raw(0)  # opens the shard and its chunk index
    direct = store._direct_chunks(0)
    assert direct is not None
    direct.bytes_read = 0
    np.testing.assert_array_equal(store.read_raw(2, block)[0], x[2][(slice(None), *block)])
    if chunk:
        assert direct.bytes_read == sample_bytes // 8  # exactly its blocks
        assert sample_bytes // 8 <= hdf5_bytes < sample_bytes // 8 + 4096
    else:
        assert direct.bytes_read == sample_bytes
        assert hdf5_bytes >= sample_bytes


def test_verify_reads_decides_whether_a_flipped_byte_is_caught(tmp_path: Path, arrays) -> None:
    x, y = arrays
    path = write_store(tmp_path / "s", x, y, None)
    shard = path / "shard-00000.h5"
    with h5py.File(shard, "r") as f:
        offset = f["x"].id.get_chunk_info(1).byte_offset
    raw = bytearray(shard.read_bytes())
    raw[offset + 10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(SampleError, match=r"sample 1 \(shard-00000.h5, row 1\).*corrupted"):
        SampleStore(path).read(1)
    unchecked, _ = SampleStore(path, verify_reads=False).read_raw(1)  # read as stored
    assert (unchecked != x[1]).sum() == 1


def test_a_truncated_shard_is_one_line_on_the_direct_path(tmp_path: Path, arrays) -> None:
    x, y = arrays
    path = write_store(tmp_path / "s", x, y, None)
    shard = path / "shard-00000.h5"
    with h5py.File(shard, "r") as f:
        offset = f["x"].id.get_chunk_info(3).byte_offset
    store = SampleStore(path, verify_reads=False)
    store.read_raw(0)
    with open(shard, "r+b") as f:
        f.truncate(offset + 100)
    with pytest.raises(SampleError, match=r"shard-00000.h5 ends inside a chunk.*truncated"):
        store.read_raw(3)


def test_nan_in_a_batch_names_the_sample(tmp_path: Path) -> None:
    x = np.ones((6, 1, 4, 4), np.float32)
    y = np.zeros((6, 1), np.float32)
    path = write_arrays_store(tmp_path / "s", x, y, per_shard=4)
    with h5py.File(path / "shard-00001.h5", "r+") as f:
        f["x"][0, 0, 1, 2] = np.nan  # sample 4
    store = SampleStore(path)
    read_batch(store, [0, 1, 5])
    with pytest.raises(SampleError, match=r"sample 4 \(shard-00001.h5, row 0\) holds NaN"):
        read_batch(store, [0, 4, 5])


def test_the_loader_reads_windows_of_blocks(tmp_path: Path, arrays) -> None:
    x, y = arrays
    store = SampleStore(write_store(tmp_path / "s", x, y, 8), verify_reads=False)
    starts = np.array([[0, 8, 3], [16, 16, 16]])
    item = BatchReader(store).read(WindowedBatch(np.array([5, 0]), starts, 16))
    assert isinstance(item, tuple)
    bx = item[0]
    for k, (i, s) in enumerate(zip((5, 0), starts, strict=True)):
        window = tuple(slice(int(a), int(a) + 16) for a in s)
        np.testing.assert_array_equal(np.asarray(bx[k]), store.read(i, window)[0])


def step_losses(run: Path) -> list[float]:
    import json

    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "step"]


def test_training_with_the_transform_on_the_device_gives_the_same_losses(
        cli, tiny_config, tmp_path: Path) -> None:
    """data.transform_on = "device" (the readers send uint16 counts, the training process
    normalises them after the copy), and data.verify_reads = "off" (direct chunk reads):
    the same losses as the default path, to float tolerance."""
    cfg = str(tiny_config(epochs=1, workers=1))
    runs = {}
    for name, sets in (("reader", []), ("device", ["--set", "data.transform_on=device",
                                                     "--set", "data.verify_reads=off"])):
        run = tmp_path / name
        r = cli(["train", cfg, "--run-dir", str(run), *sets])
        assert r.returncode == 0, r.stderr
        runs[name] = np.array(step_losses(run))
    assert len(runs["reader"]) == 9 and np.ptp(runs["reader"]) > 1e-3
    np.testing.assert_allclose(runs["device"], runs["reader"], rtol=1e-5)


def test_pyramid_levels_keep_the_blocks_and_pool_large_rows_in_slabs(
        tmp_path: Path, arrays, monkeypatch: pytest.MonkeyPatch) -> None:
    """A level of a blocked store is chunked in the halved blocks; rows larger than the
    slab budget are pooled slab by slab, to the same values."""
    from hpc_multires.data import pyramid

    x, y = arrays
    whole = write_store(tmp_path / "whole", x, y, 8)
    pyramid.build_pyramid(whole, 2)
    monkeypatch.setattr(pyramid, "SLAB_BYTES", 4 * 32 * 32 * 8 * C)  # 4 planes per step
    assert pyramid.slab_planes((C, S, S, S), 2) == 4
    slabs = write_store(tmp_path / "slabs", x, y, 8)
    pyramid.build_pyramid(slabs, 2)
    for level in (1, 2):
        a = SampleStore(whole, level=level, verify_reads=False)
        b = SampleStore(slabs, level=level)
        np.testing.assert_array_equal(a.mean, b.mean)
        np.testing.assert_allclose(a.std, b.std, rtol=1e-6)
        f = 2**level
        want = x[3].astype(np.float64).reshape(C, S // f, f, S // f, f, S // f, f)
        np.testing.assert_allclose(a.read_raw(3)[0], want.mean(axis=(2, 4, 6)), rtol=1e-6)
        np.testing.assert_array_equal(a.read_raw(3)[0], b.read_raw(3)[0])
        with h5py.File(whole / "shard-00000.h5", "r", locking=False) as h:
            assert h[f"levels/{level}/x"].chunks == (1, 1, *(8 >> level,) * 3)
