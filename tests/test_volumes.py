"""Large arrays as a store: `data convert` of ExaLearn universes, MRT/MRMF maps and .npy
arrays, sub-volumes on a grid, levels of the whole arrays, the errors a user can make,
and training on them equal to training on the same samples as shards."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_arrays_store

from hpc_multires.data.batch import read_batch
from hpc_multires.data.inspect import inspect_store
from hpc_multires.data.staging import copy_verified
from hpc_multires.data.store import SampleStore, checksum_shard, open_store
from hpc_multires.data.volumes import Grid, VolumeStore
from hpc_multires.errors import DataError

E, C = 64, 4  # universes of 64^3 x 4 (ExaLearn's are 512^3 x 4)


def universe(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    full = rng.poisson(3.0, size=(E, E, E, C)).astype(np.int16)  # (D, H, W, C)
    return full, rng.uniform(0.1, 0.9, size=4)


def exalearn_files(directory: Path, count: int = 2) -> list[Path]:
    """ExaLearn's layout: one universe per file, `full` (D, H, W, C) int16, `unitPar`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        full, par = universe(k)
        path = directory / f"univ_{k}.h5"
        with h5py.File(path, "w") as f:
            f["full"] = full
            f["unitPar"] = par
        paths.append(path)
    return paths


def channels_first(full: np.ndarray) -> np.ndarray:
    return np.moveaxis(full, -1, 0)  # (C, D, H, W)


def test_exalearn_universes_become_sub_volumes(tmp_path: Path, cli) -> None:
    files = exalearn_files(tmp_path / "in")
    out = tmp_path / "vol"
    r = cli(["data", "convert", "--x", *map(str, files), "--out", str(out),
             "--subvolume", "16", "--transform", "log1p"])
    assert r.returncode == 0, r.stderr
    assert "2 array(s) of (4, 64, 64, 64) in 2 volume file(s), 128 sub-volumes of 16^3" \
        in r.stdout
    store = open_store(out)
    assert isinstance(store, VolumeStore)
    assert len(store) == 128 and store.sample_shape == (4, 16, 16, 16)
    assert store.schema.x_dtype == "int16" and store.grid.counts == (4, 4, 4)
    with h5py.File(out / "volume-00000.h5", "r") as f:
        assert f["x"].chunks == (1, 1, 16, 16, 16) and f["x"].fletcher32
        assert f["x"].shape == (1, 4, 64, 64, 64)
    fulls = [channels_first(universe(k)[0]) for k in range(2)]
    pars = np.stack([universe(k)[1] for k in range(2)])
    for i in (0, 5, 63, 64, 100, 127):
        v, cell = divmod(i, 64)
        d, h, w = np.unravel_index(cell, (4, 4, 4))
        want = fulls[v][:, 16 * d:16 * d + 16, 16 * h:16 * h + 16, 16 * w:16 * w + 16]
        for verify in (True, False):
            np.testing.assert_array_equal(
                open_store(out, verify_reads=verify).read_raw(i)[0], want)
    # Labels: each sample its universe's unitPar, mapped to [-1, 1] over the universes.
    scaled = 2 * (pars - pars.min(0)) / (pars.max(0) - pars.min(0)) - 1
    np.testing.assert_allclose(store.labels(), np.repeat(scaled, 64, axis=0), rtol=1e-6)
    # Normalisation over the whole arrays; a window inside a sub-volume; a batch.
    t = np.log1p(np.stack(fulls).astype(np.float64))
    np.testing.assert_allclose(store.mean, t.mean(axis=(0, 2, 3, 4)), rtol=1e-5)
    window = (slice(4, 12), slice(0, 8), slice(8, 16))
    np.testing.assert_array_equal(store.read_raw(70, window)[0],
                                  store.read_raw(70)[0][(slice(None), *window)])
    x, y = read_batch(store, [70, 3, 127])
    np.testing.assert_array_equal(y[2], store.labels()[127])
    np.testing.assert_array_equal(x[0], store.read(70)[0])
    text, ok = inspect_store(out)
    assert ok and "arrays    2 of (4, 64, 64, 64) in 2 volume file(s), cut in a grid of " \
        "4x4x4 sub-volumes every 16x16x16 points" in text, text


def test_levels_of_the_whole_arrays(tmp_path: Path, cli) -> None:
    out = tmp_path / "vol"
    cli(["data", "convert", "--x", *map(str, exalearn_files(tmp_path / "in", 1)), "--out",
         str(out), "--subvolume", "16", "--stride", "8"])
    r = cli(["data", "pyramid", str(out), "--levels", "2"], ranks=2)
    assert r.returncode == 0, r.stderr
    full = channels_first(universe(0)[0]).astype(np.float64)
    for level in (1, 2):
        f = 2**level
        store = open_store(out, level=level, verify_reads=False)
        assert store.sample_shape == (4, 16 // f, 16 // f, 16 // f)
        assert len(store) == 7**3  # (64 - 16) / 8 + 1 per axis, overlapping
        i = 7 * 7 * 3 + 7 * 2 + 5  # cell (3, 2, 5): starts at (24, 16, 40) at level 0
        crop = full[:, 24:40, 16:32, 40:56].reshape(C, 16 // f, f, 16 // f, f, 16 // f, f)
        np.testing.assert_allclose(store.read_raw(i)[0], crop.mean(axis=(2, 4, 6)),
                                   rtol=1e-6)
    r = cli(["data", "pyramid", str(out), "--levels", "4"])
    assert r.returncode == 2
    assert "arrays, sub-volumes and strides of (64, 64, 64, 16, 16, 16, 8, 8, 8) cannot be " \
        "halved 4 times evenly; use --levels <= 3" in r.stderr


def test_mrt_maps_become_shards_or_sub_volumes(tmp_path: Path, cli) -> None:
    rng = np.random.default_rng(2)
    maps = rng.poisson(2.0, size=(6, 16, 16, 16, C)).astype(np.float32)  # (N, S, S, S, C)
    par = rng.uniform(size=(6, 4))
    path = tmp_path / "maps.h5"
    with h5py.File(path, "w") as f:
        f["3Dmap"], f["unitPar"] = maps, par
    r = cli(["data", "convert", "--x", str(path), "--out", str(tmp_path / "shards"),
             "--samples-per-shard", "4"])
    assert r.returncode == 0, r.stderr
    shards = open_store(tmp_path / "shards")
    assert type(shards) is SampleStore and len(shards) == 6 and len(shards.shards) == 2
    np.testing.assert_array_equal(shards.read_raw(4)[0], np.moveaxis(maps[4], -1, 0))
    r = cli(["data", "convert", "--x", str(path), "--out", str(tmp_path / "vol"),
             "--subvolume", "8", "--volumes-per-file", "4"])
    assert r.returncode == 0, r.stderr
    vol = open_store(tmp_path / "vol")
    assert isinstance(vol, VolumeStore) and len(vol) == 48 and len(vol.shards) == 2
    np.testing.assert_array_equal(vol.read_raw(8 * 5 + 7)[0],
                                  np.moveaxis(maps[5], -1, 0)[:, 8:, 8:, 8:])
    np.testing.assert_array_equal(vol.labels()[8 * 5], shards.labels()[5])


def test_npy_arrays_with_overlap_and_staging(tmp_path: Path) -> None:
    from hpc_multires.data.convert import convert_inputs

    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 2, 32, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", rng.normal(size=(3, 2)))
    convert_inputs([tmp_path / "x.npy"], tmp_path / "y.npy", tmp_path / "vol", subvolume=16,
                   stride=8, chunk=8)
    store = open_store(tmp_path / "vol")
    assert len(store) == 3 * 27
    np.testing.assert_array_equal(store.read_raw(27 + 9 + 3 + 2)[0],
                                  x[1, :, 8:24, 8:24, 16:32])
    assert all(checksum_shard(s.path)["ok"] for s in store.shards)
    copy_verified(tmp_path / "vol", tmp_path / "staged")  # SHA-256 checked on the copy
    staged = open_store(tmp_path / "staged", verify_reads=False)
    np.testing.assert_array_equal(staged.read(40)[0], store.read(40)[0])


def test_a_grid_that_does_not_tile(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"sub-volumes of 24x24x24 every 24x24x24 points do "
                                        r"not tile the arrays' 64x64x64 points.*--subvolume 16"):
        Grid((64, 64, 64), (24,) * 3, (24,) * 3).check()
    Grid((64, 64, 64), (24,) * 3, (20,) * 3).check()  # 64 = 24 + 2 * 20


@pytest.mark.parametrize(("args", "message"), [
    (["--subvolume", "24"], "sub-volumes of 24x24x24 every 24x24x24 points do not tile the "
                            "arrays' 64x64x64 points"),
    (["--subvolume", "16", "--chunk", "128"], "--chunk 128 is larger than the arrays' "
                                              "64x64x64 points"),
    (["--subvolume", "128"], "--subvolume 128 is larger than the arrays' 64x64x64 points"),
    ([], "ExaLearn universes are cut into sub-volumes: pass --subvolume"),
])
def test_bad_grids_are_one_line(tmp_path: Path, cli, args: list[str], message: str) -> None:
    files = exalearn_files(tmp_path / "in", 1)
    r = cli(["data", "convert", "--x", str(files[0]), "--out", str(tmp_path / "o"), *args])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("hpc-multires: error")]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.h5"))


def test_truncated_large_arrays_are_one_line(tmp_path: Path, cli) -> None:
    files = exalearn_files(tmp_path / "in", 1)
    data = files[0].read_bytes()
    files[0].write_bytes(data[:len(data) // 2])
    r = cli(["data", "convert", "--x", str(files[0]), "--out", str(tmp_path / "o"),
             "--subvolume", "16"])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("hpc-multires: error")]
    assert r.returncode == 2 and len(lines) == 1 and "truncated" in lines[0], r.stderr
    x = np.zeros((1, 4, 32, 32, 32), np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.zeros((1, 2)))
    raw = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(raw[:-1000])
    r = cli(["data", "convert", "--x", str(tmp_path / "x.npy"), "--y", str(tmp_path / "y.npy"),
             "--out", str(tmp_path / "o2"), "--subvolume", "16"])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("hpc-multires: error")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "x.npy holds" in lines[0] and "the file is truncated" in lines[0]


def test_a_volume_file_cut_short_is_named_at_read(tmp_path: Path) -> None:
    from hpc_multires.data.convert import convert_inputs

    x = np.ones((2, 1, 16, 16, 16), np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(4.0).reshape(2, 2))
    convert_inputs([tmp_path / "x.npy"], tmp_path / "y.npy", tmp_path / "vol", subvolume=8,
                   volumes_per_file=2)
    path = tmp_path / "vol" / "volume-00000.h5"
    with h5py.File(path, "r") as f:
        end = max(f["x"].id.get_chunk_info(i).byte_offset for i in range(16))
    store = open_store(tmp_path / "vol", verify_reads=False)
    store.read(0)
    with open(path, "r+b") as f:
        f.truncate(end + 10)
    with pytest.raises(DataError, match="volume-00000.h5.*truncated"):
        read_batch(store, list(range(16)))


def shards_of(store: VolumeStore, out: Path) -> Path:
    """The same samples, in the same order, as per-sample shards."""
    x = np.stack([store.read_raw(i)[0] for i in range(len(store))])
    path = write_arrays_store(out, x, store.labels(), per_shard=16, transform="log1p")
    with h5py.File(path / "shard-00000.h5", "r+") as f:
        f.attrs["label_names"] = json.dumps(list(store.schema.label_names))
    return path


@pytest.mark.mpi
def test_training_on_sub_volumes_equals_training_on_shards(tmp_path: Path, cli,
                                                           tiny_config) -> None:
    """One 4 x 64^3 array cut into 64 samples of 4 x 16^3, and the same samples as shards:
    the same statistics, and the same losses on 2 ranks."""
    rng = np.random.default_rng(7)
    x = rng.poisson(3.0, size=(1, C, E, E, E)).astype(np.uint16)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.array([[0.3, -0.2, 0.5]]))
    r = cli(["data", "convert", "--x", str(tmp_path / "x.npy"), "--y",
             str(tmp_path / "y.npy"), "--out", str(tmp_path / "vol"), "--subvolume", "16",
             "--transform", "log1p", "--no-scale-labels"])
    assert r.returncode == 0, r.stderr
    volumes = open_store(tmp_path / "vol")
    assert isinstance(volumes, VolumeStore) and len(volumes) == 64
    shards = shards_of(volumes, tmp_path / "shards")
    np.testing.assert_allclose(SampleStore(shards).mean, volumes.mean, rtol=1e-6)
    losses = {}
    for name, data in (("volumes", tmp_path / "vol"), ("shards", shards)):
        run = tmp_path / f"run-{name}"
        r = cli(["train", str(tiny_config(epochs=1, workers=1, data=data)), "--run-dir",
                 str(run)], ranks=2, timeout=240)
        assert r.returncode == 0, r.stderr
        lines = (run / "metrics.jsonl").read_text().splitlines()
        losses[name] = np.array([rec["loss"] for rec in map(json.loads, lines)
                                 if rec["kind"] == "step"])
    assert len(losses["shards"]) == 6 and np.ptp(losses["shards"]) > 1e-4
    np.testing.assert_allclose(losses["volumes"], losses["shards"], rtol=1e-5)
