"""It learns: arrays made outside hpc-multires, converted, trained on 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_multires.data.store import SampleStore
from hpc_multires.models import build_model
from hpc_multires.plan.load import load_config

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
    final = [r for r in recs if r["kind"] == "epoch"][-1]["val_mae"]

    # Both sides of the comparison computed here, not taken from the run's own log: the
    # held-out tail (the last quarter) scored by the mean of the training labels, and by
    # the trained model.
    store = SampleStore(data)
    n_val = round(len(store) * 0.25)
    labels = store.labels()  # (N, 2), in [-1, 1]
    train_y, val_y = labels[:-n_val], labels[-n_val:]
    baseline = float(np.abs(val_y - train_y.mean(axis=0)).mean())
    assert recs[0]["val_mae_mean_predictor"] == pytest.approx(baseline, rel=1e-5)
    model = build_model(load_config(config).model, store.sample_shape, 2)
    model.load_state_dict(torch.load(run / "stages" / "main" / "final.pt",
                                     weights_only=False)["model"])
    model.eval()
    xs = np.stack([store.read(i)[0] for i in range(len(store) - n_val, len(store))])
    with torch.no_grad():
        mae = float((model(torch.from_numpy(xs)) - torch.from_numpy(val_y)).abs().mean())
    assert final == pytest.approx(mae, rel=1e-4)
    assert mae < 0.5 * baseline, (mae, baseline)
