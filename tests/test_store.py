"""The HDF5 store: round trip, normalisation, lazy read-only access, and every bad shard."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_arrays_store

from hpc_multires.data.inspect import inspect_store
from hpc_multires.data.store import SampleStore, checksum_shard
from hpc_multires.errors import DataError, SampleError


@pytest.fixture
def arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.poisson(5.0, size=(20, 2, 4, 4, 4)).astype(np.uint16)  # (N, C, D, H, W)
    y = rng.uniform(-1, 1, size=(20, 3)).astype(np.float32)
    return x, y


def test_round_trip_with_transform_and_normalisation(tmp_path: Path, arrays) -> None:
    x, y = arrays
    store = SampleStore(write_arrays_store(tmp_path / "s", x, y, per_shard=8, transform="log1p"))
    assert len(store) == 20 and len(store.shards) == 3
    assert store.schema.sample_shape == (2, 4, 4, 4) and store.schema.x_dtype == "uint16"
    t = np.log1p(x.astype(np.float64))
    mean = t.mean(axis=(0, 2, 3, 4))
    std = t.std(axis=(0, 2, 3, 4))
    np.testing.assert_allclose(store.mean, mean, rtol=1e-5)
    np.testing.assert_allclose(store.std, std, rtol=1e-4)
    for i in (0, 7, 8, 19):  # across shard boundaries
        xi, yi = store.read(i)
        want = (t[i] - mean[:, None, None, None]) / std[:, None, None, None]
        np.testing.assert_allclose(xi, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(yi, y[i])
    np.testing.assert_array_equal(store.labels(), y)


def test_one_chunk_per_sample_checksums_and_readonly_lazy_handles(tmp_path: Path, arrays) -> None:
    x, y = arrays
    store = SampleStore(write_arrays_store(tmp_path / "s", x, y))
    with h5py.File(store.shards[0].path, "r") as f:
        assert f["x"].chunks == (1, 2, 4, 4, 4)
        assert f["x"].fletcher32
    assert store._files == {}  # nothing is open until a sample is read
    store.read(9)
    assert list(store._files) == [1] and store._files[1].mode == "r"
    clone = pickle.loads(pickle.dumps(store))  # what a reader process receives
    assert clone._files == {} and np.array_equal(clone.read(9)[0], store.read(9)[0])
    assert all(checksum_shard(s.path)["ok"] for s in store.shards)


def test_no_half_written_shard_is_visible(tmp_path: Path, arrays) -> None:
    from hpc_multires.data.store import ShardWriter, provenance

    x, y = arrays
    out = tmp_path / "s"
    out.mkdir()
    with pytest.raises(RuntimeError), ShardWriter(
            out, 0, num_shards=1, first_sample=0, total_samples=4, num_samples=4,
            sample_shape=x.shape[1:], x_dtype=x.dtype, label_names=["a", "b", "c"],
            x_transform="none", prov=provenance("test")) as w:
        w.write(x[0], y[0])
        raise RuntimeError("killed half way")
    assert list(out.iterdir()) == []


def test_missing_and_wrong_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found.*data synth"):
        SampleStore(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no shard-"):
        SampleStore(tmp_path / "empty")


def test_truncated_shard(tmp_path: Path, arrays) -> None:
    path = write_arrays_store(tmp_path / "s", *arrays)
    shard = path / "shard-00001.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataError, match="shard-00001.h5 is not a readable HDF5 file.*truncated"):
        SampleStore(path)


def test_corrupted_chunk_is_caught_at_read_and_by_inspect(tmp_path: Path, arrays) -> None:
    path = write_arrays_store(tmp_path / "s", *arrays)
    shard = path / "shard-00000.h5"
    with h5py.File(shard, "r") as f:
        offset = f["x"].id.get_chunk_info(3).byte_offset
    raw = bytearray(shard.read_bytes())
    raw[offset + 10] ^= 0xFF  # one flipped byte inside sample 3's chunk
    shard.write_bytes(bytes(raw))
    store = SampleStore(path)  # headers are intact
    store.read(2)
    with pytest.raises(SampleError, match=r"sample 3 \(shard-00000.h5, row 3\).*corrupted"):
        store.read(3)
    text, ok = inspect_store(path)
    assert not ok and "shard-00000.h5" in text and "UNREADABLE" in text


def test_missing_shard_and_schema_mismatch(tmp_path: Path, arrays) -> None:
    path = write_arrays_store(tmp_path / "s", *arrays)
    (path / "shard-00001.h5").unlink()
    with pytest.raises(DataError, match=r"shard-00001.h5'\] of 3 are missing"):
        SampleStore(path)
    path = write_arrays_store(tmp_path / "t", *arrays)
    with h5py.File(path / "shard-00002.h5", "r+") as f:
        f.attrs["label_names"] = '["a", "b", "z"]'
    with pytest.raises(DataError, match="disagrees with shard-00000.h5 on the schema"):
        SampleStore(path)
    with h5py.File(path / "shard-00002.h5", "r+") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(DataError, match="data convert"):
        SampleStore(path)


def test_wrong_dataset_shape(tmp_path: Path, arrays) -> None:
    path = write_arrays_store(tmp_path / "s", *arrays)
    with h5py.File(path / "shard-00000.h5", "r+") as f:
        del f["y"]
        f["y"] = np.zeros((8, 2), np.float32)
    with pytest.raises(DataError, match=r"/y has shape \(8, 2\), the attributes say \(8, 3\)"):
        SampleStore(path)


def test_nan_sample_is_named(tmp_path: Path) -> None:
    x = np.ones((8, 1, 4, 4, 4), np.float32)
    path = write_arrays_store(tmp_path / "s", x, np.zeros((8, 1), np.float32))
    with h5py.File(path / "shard-00000.h5", "r+") as f:
        f["x"][5, 0, 1, 1, 1] = np.nan  # written behind the writer's back
    with pytest.raises(SampleError, match=r"sample 5 .*NaN"):
        SampleStore(path).read(5)
    assert not inspect_store(path)[1]


def test_missing_level_names_the_pyramid_command(tmp_path: Path, arrays) -> None:
    path = write_arrays_store(tmp_path / "s", *arrays)
    with pytest.raises(DataError, match="data pyramid .* --levels 1"):
        SampleStore(path, level=1)


def test_reader_workers_come_from_the_fork_server_and_read_the_same(tmp_path: Path,
                                                                    arrays) -> None:
    """Workers are never forked from the training process (a fork there can inherit a lock
    held by one of its threads and hang): they are children of the fork server. Checked on
    the process tree while a loader runs, and the batches equal in-process reading."""
    import psutil

    from hpc_multires.data.loader import iterate_batches

    x, y = arrays
    store = SampleStore(write_arrays_store(tmp_path / "s", x, y))
    batches = [np.array([3, 1, 7]), np.array([0, 2]), np.array([5, 4, 6])]
    me = psutil.Process()
    seen = []
    for (bx, by), batch in zip(iterate_batches(store, batches, num_workers=2, prefetch=1),
                               batches, strict=True):
        direct = me.children()
        workers = [p for p in me.children(recursive=True) if p not in direct]
        seen.append((len(workers), [" ".join(p.cmdline()) for p in direct]))
        want = [store.read(int(i)) for i in batch]
        np.testing.assert_array_equal(bx.numpy(), np.stack([w[0] for w in want]))
        np.testing.assert_array_equal(by.numpy(), np.stack([w[1] for w in want]))
    workers, direct = seen[0]
    assert workers == 2, seen
    # The direct children are the fork server and its resource tracker, both fresh
    # interpreters; with plain fork the workers themselves would be here.
    assert any("forkserver" in cmd for cmd in direct), direct
    assert all("from multiprocessing." in cmd for cmd in direct), direct


def test_inspect_lists_only_complete_levels(tmp_path: Path, arrays) -> None:
    """A level whose group never got `complete = 1` (a pyramid build killed half way) is
    one training refuses; inspect must not list it as present."""
    from hpc_multires.data.pyramid import build_pyramid

    path = write_arrays_store(tmp_path / "s", *arrays)
    build_pyramid(path, 2)
    with h5py.File(path / "shard-00001.h5", "r+") as f:
        f["levels/2"].attrs["complete"] = 0
    r = checksum_shard(path / "shard-00001.h5")
    assert r["ok"] and r["levels"] == [1] and r["incomplete_levels"] == [2]
    assert checksum_shard(path / "shard-00000.h5")["levels"] == [1, 2]
    with pytest.raises(DataError, match="no complete pyramid level 2"):
        SampleStore(path, level=2)  # what training says
    text, ok = inspect_store(path)
    assert ok  # the samples themselves verify
    lines = text.splitlines()
    assert "levels 1,2 " in next(ln for ln in lines if "shard-00000.h5" in ln)
    assert "levels 1 (2 incomplete) " in next(ln for ln in lines if "shard-00001.h5" in ln)
    assert (f"level(s) 2 incomplete in the shards marked above, so training cannot use them: "
            f"rebuild with `hpc-multires data pyramid {path} --levels 2`") in text
    # The command it names repairs the level.
    assert build_pyramid(path, 2)["built"] == 1
    assert "incomplete" not in inspect_store(path)[0]
    assert len(SampleStore(path, level=2)) == 20


def test_inspect_checks_the_layout_the_format_asks_for(tmp_path: Path, arrays) -> None:
    """A store written by other code: it reads, but inspect says where it departs from
    docs/data-format.md; an x_dtype that is not /x's dtype is an error when opened."""
    x, _ = arrays
    y = np.linspace(-3, 3, 60, dtype=np.float32).reshape(20, 3)  # beyond the output's reach
    path = write_arrays_store(tmp_path / "s", x, y)
    text, ok = inspect_store(path)
    assert ok and "layout    " not in text
    assert "labels    " in text and "outside [-1, 1]" in text
    shard = path / "shard-00000.h5"
    with h5py.File(shard, "r+") as f:  # same bytes, contiguous, no checksum filter
        data = f["x"][...]
        del f["x"]
        f.create_dataset("x", data=data)
    text, ok = inspect_store(path)
    assert ok  # the bytes still match their SHA-256
    assert "layout    /x is stored contiguous, not one sample per chunk" in text
    assert "layout    /x has no Fletcher-32 filter" in text
    with h5py.File(shard, "r+") as f:
        f.attrs["x_dtype"] = "float32"  # /x holds uint16
    with pytest.raises(DataError, match=r"/x holds uint16, but the attribute x_dtype says "
                                        r"'float32'"):
        SampleStore(path)
    with h5py.File(shard, "r+") as f:
        f.attrs["x_dtype"] = "uint17"
    with pytest.raises(DataError, match="'uint17' is not a numpy dtype name"):
        SampleStore(path)
