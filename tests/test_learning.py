"""It learns: arrays made outside hpc-multires, converted, trained on 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.mpi


def test_converted_arrays_train_below_half_the_mean_predictor(cli, tmp_path: Path) -> None:
    # Arrays "from elsewhere": smooth 3D fields whose mean level and contrast are the
    # two targets, in their own units (the converter maps them to [-1, 1]).
    rng = np.random.default_rng(5)
    n, s = 192, 16
    level = rng.uniform(2.0, 6.0, n)
    contrast = rng.uniform(0.5, 2.0, n)
    noise = rng.normal(size=(n, 1, s, s, s))
    noise = (noise + np.roll(noise, 1, axis=2) + np.roll(noise, 1, axis=3)) / np.sqrt(3)
    x = (level[:, None, None, None, None] + contrast[:, None, None, None, None] * noise)
    np.savez_compressed(tmp_path / "arrays.npz", x=x.astype(np.float32),
                        y=np.stack([level, contrast], axis=1))
    data = tmp_path / "store"
    conv = cli(["data", "convert", "--x", str(tmp_path / "arrays.npz"), "--out", str(data),
                "--label-names", "level,contrast", "--samples-per-shard", "48"], ranks=2)
    assert conv.returncode == 0, conv.stderr

    config = tmp_path / "c.toml"
    config.write_text(f"""
[data]
path = "{data}"
val_fraction = 0.25
num_workers = 0
[model]
width = 0.125
depth = 2
head = "gap"
fc_sizes = [16]
[train]
epochs = 12
global_batch = 8
lr = 5e-3
""")
    run = tmp_path / "run"
    r = cli(["train", str(config), "--run-dir", str(run)], ranks=2, timeout=300)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    baseline = recs[0]["val_mae_mean_predictor"]
    final = [r for r in recs if r["kind"] == "epoch"][-1]["val_mae"]
    assert final < 0.5 * baseline, (final, baseline)
