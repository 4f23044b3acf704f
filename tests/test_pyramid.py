"""The data pyramid: equals direct average pooling, parallel, idempotent, interrupt-safe."""

from __future__ import annotations

import errno
import hashlib
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, read_line, run_env, write_arrays_store

import hpc_multires.data.pyramid as pyramid
from hpc_multires.data.pyramid import TMP_SUFFIX, average_pool, build_pyramid, build_shard
from hpc_multires.data.store import SampleStore, checksum_shard
from hpc_multires.errors import DataError

# A build of one shard that stops after writing its first level until FILE exists.
PAUSED_BUILD = """\
import os, sys, time
from pathlib import Path
import hpc_multires.data.pyramid as p
orig = p._add_level
def paused(f, level, t):
    orig(f, level, t)
    print("written", flush=True)
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
p._add_level = paused
p.build_shard(Path(sys.argv[1]), [1, 2], "log1p")
"""


@pytest.fixture
def store3d(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.poisson(30.0, size=(12, 2, 8, 8, 8)).astype(np.uint16)
    return write_arrays_store(tmp_path / "s", x, rng.uniform(-1, 1, (12, 2)).astype(np.float32),
                              per_shard=4, transform="log1p")


def test_levels_equal_direct_average_pooling(store3d: Path) -> None:
    build_pyramid(store3d, 2)
    base = SampleStore(store3d)
    for level in (1, 2):
        coarse = SampleStore(store3d, level=level)
        assert coarse.sample_shape == (2, 8 >> level, 8 >> level, 8 >> level)
        for i in (0, 5, 11):
            raw = torch.from_numpy(base.read_raw(i)[0].astype(np.float64))[None]
            want = torch.nn.functional.avg_pool3d(raw, 2**level)[0].numpy()
            got, y = coarse.read_raw(i)
            np.testing.assert_allclose(got, want, rtol=1e-6)
            np.testing.assert_array_equal(y, base.read_raw(i)[1])  # labels unchanged
        # Its own normalisation: log1p of averaged counts has a smaller spread.
        assert (coarse.std < base.std).all()
        x, _ = coarse.read(3)
        assert x.shape == coarse.sample_shape and np.isfinite(x).all()


def test_1d_and_2d_pooling() -> None:
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    np.testing.assert_array_equal(average_pool(x, 4)[0], [1.5, 5.5, 9.5, 13.5])
    img = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    np.testing.assert_array_equal(average_pool(img, 2)[0], [[2.5, 4.5], [10.5, 12.5]])


def test_idempotent_and_leaves_level_0_untouched(store3d: Path) -> None:
    before = [checksum_shard(p)["x_sha256"] for p in sorted(store3d.glob("shard-*.h5"))]
    assert build_pyramid(store3d, 1) == {"built": 3, "skipped": 0, "shards": 3}
    stamps = {p: p.stat().st_mtime_ns for p in store3d.glob("shard-*.h5")}
    assert build_pyramid(store3d, 1) == {"built": 0, "skipped": 3, "shards": 3}
    assert stamps == {p: p.stat().st_mtime_ns for p in store3d.glob("shard-*.h5")}
    # Asking for one more level builds only that level.
    assert build_pyramid(store3d, 2)["built"] == 3
    after = [checksum_shard(p) for p in sorted(store3d.glob("shard-*.h5"))]
    assert [a["x_sha256"] for a in after] == before and all(a["ok"] for a in after)
    assert all(a["levels"] == [1, 2] for a in after)


def test_incomplete_level_is_detected_and_rebuilt(store3d: Path) -> None:
    shard = store3d / "shard-00001.h5"
    with h5py.File(shard, "r+") as f:  # what a writer that died half way leaves
        f.create_group("levels/1").create_dataset("x", data=np.zeros((4, 2, 4, 4, 4), "f4"))
    with pytest.raises(DataError, match="no complete pyramid level 1"):
        SampleStore(store3d, level=1)
    assert build_pyramid(store3d, 1)["built"] == 3
    x, _ = SampleStore(store3d, level=1).read_raw(5)
    assert x.max() > 0  # real averages, not the zeros left behind


def test_killed_build_leaves_shards_intact_and_is_redone(store3d: Path, tmp_path: Path) -> None:
    # Kill a build while it writes its temporary copy; then build again.
    shard = store3d / "shard-00000.h5"
    never = tmp_path / "never"
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_BUILD, str(shard), str(never)],
                            stdout=subprocess.PIPE, text=True, env=run_env(), cwd=ROOT)
    try:
        assert read_line(proc, timeout=60).strip() == "written"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert list(store3d.glob(f"shard-00000.h5*{TMP_SUFFIX}"))  # the half-made copy
    with h5py.File(shard, "r") as f:
        assert "levels" not in f  # the original was never touched
    assert build_pyramid(store3d, 1)["built"] == 3
    assert sorted(p.name for p in store3d.iterdir()) == [  # no copy, no lock file left
        "shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert len(SampleStore(store3d, level=1)) == 12


@pytest.mark.slow
def test_two_builds_of_one_shard_at_once(store3d: Path, tmp_path: Path) -> None:
    """Two jobs building the same directory (one with --levels 2, one with --levels 2 but
    level 1 done): the second must not write into the first one's copy, which the first
    then renames over the shard. Without a per-shard lock the shard ends with a level that
    fails its checksum on read, and the first job crashes."""
    shard = store3d / "shard-00000.h5"
    go = tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", PAUSED_BUILD, str(shard), str(go)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=run_env(), cwd=ROOT)
    second = None
    try:
        assert read_line(first, timeout=60).strip() == "written"
        second = subprocess.Popen(
            [sys.executable, "-c", "import sys\nfrom pathlib import Path\n"
             "import hpc_multires.data.pyramid as p\n"
             "print(p.build_shard(Path(sys.argv[1]), [2], 'log1p'))", str(shard)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env(), cwd=ROOT)
        time.sleep(3)  # the second starts and reaches the shard while the first holds it
        go.touch()
        _, err1 = first.communicate(timeout=60)
        out2, err2 = second.communicate(timeout=60)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert first.returncode == 0, err1
    assert second.returncode == 0 and out2.strip() == "[]", err2  # found level 2 built
    with h5py.File(shard, "r") as f:
        for level in (1, 2):
            want = np.stack([average_pool(f["x"][i], 2**level) for i in range(len(f["x"]))])
            np.testing.assert_allclose(f[f"levels/{level}/x"][...], want, rtol=1e-6)
    assert sorted(p.name for p in store3d.iterdir()) == [
        "shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]


def test_disk_full_mid_write_leaves_the_shard_and_says_so(
        store3d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shard = store3d / "shard-00000.h5"  # the first one built
    before = hashlib.sha256(shard.read_bytes()).hexdigest()
    orig = pyramid._add_level

    def fills_the_disk(f: h5py.File, level: int, x_transform: str) -> None:
        orig(f, level, x_transform)  # level 1 written into the copy, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pyramid, "_add_level", fills_the_disk)
    with pytest.raises(DataError, match="no space for the pyramid of shard-00000.h5") as e:
        build_pyramid(store3d, 2)
    assert "\n" not in str(e.value) and not e.value.all_ranks
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in store3d.iterdir()) == [
        "shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    with pytest.raises(DataError, match="no complete pyramid level 1"):
        SampleStore(store3d, level=1)  # nothing half made is taken for a level
    monkeypatch.undo()
    assert build_pyramid(store3d, 2)["built"] == 3


def test_memory_is_bounded_by_one_sample(tmp_path: Path) -> None:
    x = np.ones((64, 1, 32, 32, 32), np.float32)  # 8 MiB in one shard
    path = write_arrays_store(tmp_path / "big", x, np.zeros((64, 1), np.float32), per_shard=64)
    tracemalloc.start()
    build_shard(path / "shard-00000.h5", [1, 2], "none")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_levels_beyond_the_sample_size(store3d: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--levels <= 3"):
        build_pyramid(store3d, 4)
    odd = write_arrays_store(tmp_path / "odd", np.ones((2, 1, 6, 7), np.float32),
                             np.zeros((2, 1), np.float32))
    with pytest.raises(DataError, match=r"\(6, 7\) cannot be halved 1 times evenly; a pyramid "
                                        "level halves every axis, so crop or pad"):
        build_pyramid(odd, 1)
    assert [p.name for p in odd.iterdir()] == ["shard-00000.h5"]  # nothing written


@pytest.mark.mpi
def test_parallel_build_matches_serial(cli, tmp_path: Path) -> None:
    args = ["data", "synth", "cosmoflow", "--samples", "24", "--size", "8",
            "--samples-per-shard", "4"]
    for name in ("serial", "parallel"):
        assert cli([*args, "--out", str(tmp_path / name)]).returncode == 0
    assert cli(["data", "pyramid", str(tmp_path / "serial"), "--levels", "2"]).returncode == 0
    t0 = time.monotonic()
    r = cli(["data", "pyramid", str(tmp_path / "parallel"), "--levels", "2"], ranks=3)
    assert r.returncode == 0, r.stderr
    assert "6 shard(s) built" in r.stdout and time.monotonic() - t0 < 120
    # Split over the 3 ranks: rank 0 built 2 of the 6 shards.
    assert "shard 2/2 on rank 0 of 3" in r.stderr, r.stderr
    a, b = SampleStore(tmp_path / "serial", 2), SampleStore(tmp_path / "parallel", 2)
    for i in range(24):
        np.testing.assert_array_equal(a.read(i)[0], b.read(i)[0])


def test_complete_store_needs_no_lock(store3d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store whose levels are all built is only read: `data pyramid` on it works in a
    read-only directory (a shared data set), where no lock file can be created."""
    build_pyramid(store3d, 1)

    def read_only(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path) + pyramid.LOCK_SUFFIX)

    monkeypatch.setattr(pyramid, "_shard_lock", read_only)
    assert build_pyramid(store3d, 1) == {"built": 0, "skipped": 3, "shards": 3}
