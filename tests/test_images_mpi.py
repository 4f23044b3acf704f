"""The image application under a real mpiexec: 2 and 4 ranks train as 1 rank does, with
the single-level estimator and with MGE (every level's batch split over the ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.mpi


def step_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "step"]


@pytest.mark.parametrize("estimator", [
    [],
    ["--set", "train.estimator=mge", "--set", "train.mge_levels=3"],
    ["--set", "train.estimator=mge", "--set", "train.restriction=bilinear"],
], ids=["single", "mge-avg", "mge-bilinear"])
def test_two_and_four_ranks_give_the_losses_of_one(cli, images_config, tmp_path: Path,
                                          estimator: list[str]) -> None:
    """Same seed and global batches: each level's global batch is the same samples on any
    rank count (its own sampler, rank r its r-th slice), every sample's corruption follows
    from its index, and GroupNorm normalises each image alone; DDP's mean of equal-sized
    local means is the global mean. What differs is the order of float sums, so 1e-4
    relative over 9 steps is a bound a wrong split or a missing allreduce would exceed by
    orders of magnitude (the losses move by far more than that)."""
    cfg = str(images_config(epochs=1))
    opts = ["--set", "train.global_batch=4", *estimator]
    runs = {}
    for ranks in (1, 2, 4):  # at 4 ranks the finest level's batch is one image per rank
        run = tmp_path / f"r{ranks}"
        r = cli(["train", cfg, "--run-dir", str(run), *opts], ranks=ranks, timeout=300)
        assert r.returncode == 0, r.stderr
        runs[ranks] = step_records(run)
    assert len(runs[1]) == 9  # 36 training samples, 4 per step at the finest level
    losses = {n: np.array([s["loss"] for s in recs]) for n, recs in runs.items()}
    assert np.ptp(losses[1]) > 1e-3
    for ranks in (2, 4):
        np.testing.assert_allclose(losses[ranks], losses[1], rtol=1e-4, atol=0)
        for name in [k for k in runs[1][0] if k.startswith("mge_term")]:
            np.testing.assert_allclose([s[name] for s in runs[ranks]],
                                       [s[name] for s in runs[1]], rtol=1e-3, atol=1e-6)
