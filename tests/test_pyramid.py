"""The data pyramid: equals direct average pooling, parallel, idempotent, interrupt-safe."""

from __future__ import annotations

import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, run_env, write_arrays_store

from hpc_multires.data.pyramid import TMP_SUFFIX, average_pool, build_pyramid, build_shard
from hpc_multires.data.store import SampleStore, checksum_shard
from hpc_multires.errors import DataError


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
    script = (
        "import sys, time, h5py\n"
        "from pathlib import Path\n"
        "import hpc_multires.data.pyramid as p\n"
        "orig = p._add_level\n"
        "def slow(f, level, t):\n"
        "    orig(f, level, t); print('written', flush=True); time.sleep(60)\n"
        "p._add_level = slow\n"
        f"p.build_shard(Path({str(store3d / 'shard-00000.h5')!r}), [1], 'log1p')\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=run_env(), cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
    proc.kill()
    proc.wait(timeout=30)
    assert (store3d / f"shard-00000.h5{TMP_SUFFIX}").exists()  # the half-made copy
    with h5py.File(store3d / "shard-00000.h5", "r") as f:
        assert "levels" not in f  # the original was never touched
    assert build_pyramid(store3d, 1)["built"] == 3
    assert not list(store3d.glob(f"*{TMP_SUFFIX}"))
    assert len(SampleStore(store3d, level=1)) == 12


def test_memory_is_bounded_by_one_sample(tmp_path: Path) -> None:
    x = np.ones((64, 1, 32, 32, 32), np.float32)  # 8 MiB in one shard
    path = write_arrays_store(tmp_path / "big", x, np.zeros((64, 1), np.float32), per_shard=64)
    tracemalloc.start()
    build_shard(path / "shard-00000.h5", [1, 2], "none")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_levels_beyond_the_sample_size(store3d: Path) -> None:
    with pytest.raises(DataError, match="--levels <= 3"):
        build_pyramid(store3d, 4)


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
