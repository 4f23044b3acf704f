"""Horovod as the second allreduce backend: parity with DDP, process sets per stage group.

Needs Horovod (`make horovod`). `make test` builds it first and sets
HPC_MULTIRES_REQUIRE_HOROVOD=1, so in CI a missing Horovod fails instead of skipping.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.mpi

HAVE_HOROVOD = importlib.util.find_spec("horovod") is not None
needs_horovod = pytest.mark.skipif(
    not HAVE_HOROVOD and not os.environ.get("HPC_MULTIRES_REQUIRE_HOROVOD"),
    reason="Horovod is not installed here: run `make horovod` (make test does)")


def step_losses(run: Path) -> np.ndarray:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in recs if r["kind"] == "step"])


@needs_horovod
@pytest.mark.parametrize("ranks", [2, 4])
def test_horovod_matches_ddp(cli, tiny_1_epoch, tmp_path: Path, ranks: int) -> None:
    """Same seed, global batch and data order: the same losses with either backend.

    Both average the same per-rank gradients; they differ only in the order of the
    float32 sums inside the allreduce (gloo ring vs MPI), ~1e-7 relative per step,
    amplified a little by Adam over 9 steps. 1e-4 relative is far below what a missing
    average (ranks drifting apart), a wrong scaling (sum instead of mean) or a broadcast
    from the wrong rank would give. The DDP run is the session's one (DDP is the default
    backend), which test_parity_1_2_4_ranks compares too.
    """
    run = tmp_path / "horovod"
    r = cli(["train", str(tiny_1_epoch.config), "--run-dir", str(run), "--set",
             "comm.backend=horovod"], ranks=ranks, timeout=240)
    assert r.returncode == 0, r.stderr
    losses = {"ddp": step_losses(tiny_1_epoch.run(ranks)), "horovod": step_losses(run)}
    assert len(losses["ddp"]) == 9 and np.ptp(losses["ddp"]) > 1e-3
    np.testing.assert_allclose(losses["horovod"], losses["ddp"], rtol=1e-4, atol=0)


@needs_horovod
def test_concurrent_stages_reduce_within_their_groups(cli, mrmf_4_ranks, tmp_path: Path
                                                      ) -> None:
    """MRMF's two coarse stages on ranks {0,1} and {2,3} at once, on Horovod.

    Each group has its own process set; if gradients were averaged over all four ranks,
    each coarse model would be trained on the other's gradients too (a different model
    at a different resolution) and would not match the same plan run on DDP, whose
    groups are separate torch process groups. The DDP run is the session's, which
    test_stages_mpi examines.
    """
    horovod = tmp_path / "horovod"
    r = cli(["train", str(mrmf_4_ranks.config), "--run-dir", str(horovod), "--set",
             "comm.backend=horovod"], ranks=4, timeout=300)
    assert r.returncode == 0, r.stderr
    runs = {"ddp": mrmf_4_ranks.run(4), "horovod": horovod}
    finals = {backend: {s: torch.load(run / "stages" / s / "final.pt",
                                      weights_only=False)["model"]
                        for s in ("coarse1", "coarse2", "fine")}
              for backend, run in runs.items()}
    for stage in ("coarse1", "coarse2", "fine"):
        for k, v in finals["ddp"][stage].items():
            torch.testing.assert_close(finals["horovod"][stage][k], v, rtol=1e-4, atol=1e-5,
                                       msg=f"{stage} {k}")


def test_missing_horovod_names_the_fix(cli, tiny_config, tmp_path: Path) -> None:
    # A horovod package that cannot be imported, first on the path: what a user without
    # Horovod sees (whether or not this machine has it).
    fake = tmp_path / "fake" / "horovod"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no Horovod here')\n")
    r = cli(["train", str(tiny_config()), "--run-dir", str(tmp_path / "run"), "--set",
             "comm.backend=horovod"], ranks=2, PYTHONPATH=str(tmp_path / "fake"))
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if "hpc-multires: error:" in ln]
    assert len(lines) == 1 and "make horovod" in lines[0], r.stderr
