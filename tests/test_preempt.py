"""Preemption: a signal mid-training stops every rank at one step with a checkpoint, the
job exits with the requeue code, and --auto-resume finishes as if nothing happened."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    end_tree,
    rank_processes,
    start_cli,
    stderr_of,
    steps,
)

from hpc_multires.train.preempt import PREEMPTED_EXIT

pytestmark = pytest.mark.mpi


def test_signal_checkpoint_requeue_code_and_resume(cli, tiny_3_epochs, tmp_path: Path) -> None:
    cfg = str(tiny_3_epochs.config)  # 3 epochs of 9 steps
    straight = tiny_3_epochs.run(2)  # the session's uninterrupted run

    run = tmp_path / "run"
    proc = start_cli(["train", cfg, "--run-dir", str(run), "--auto-resume"], ranks=2)
    try:
        deadline = time.monotonic() + 120
        while not any(r["step"] >= 12 for r in steps(run)):  # inside epoch 2
            assert proc.poll() is None, stderr_of(proc)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ranks = rank_processes(proc.pid)
        assert len(ranks) == 2
        for p in ranks:  # what srun does with --signal=USR1@...: every task gets it
            os.kill(p.pid, signal.SIGUSR1)
        _, err = proc.communicate(timeout=60)
    finally:
        end_tree(proc)
    assert proc.returncode == PREEMPTED_EXIT, err
    assert "stopped on SIGUSR1" in err
    ckpts = sorted(p.name for p in (run / "stages" / "main" / "checkpoints").iterdir())
    mid = [c for c in ckpts if "-step-" in c]
    assert mid, ckpts  # a checkpoint inside an epoch, where the signal stopped it
    stopped_at = max(r["step"] for r in steps(run))
    assert 12 <= stopped_at < 27

    again = cli(["train", cfg, "--run-dir", str(run), "--auto-resume"], ranks=2)
    assert again.returncode == 0, again.stderr
    assert "resumed from epoch-0002-step-" in again.stderr
    a, b = steps(straight), steps(run)
    assert [r["step"] for r in b] == list(range(1, 28))  # none twice, none skipped
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6)
    fa = torch.load(straight / "stages" / "main" / "final.pt", weights_only=False)["model"]
    fb = torch.load(run / "stages" / "main" / "final.pt", weights_only=False)["model"]
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_to_every_process_of_the_step_still_checkpoints(
        tiny_config, tmp_path: Path, sig: signal.Signals) -> None:
    """Slurm signals every process of a job step, not only the ranks: scancel and a
    preemption send SIGTERM, --signal=USR1@T sends USR1, to the reader processes, their
    fork server and Python's resource tracker too. Those must not die of it: a reader
    killed mid-batch left its rank waiting forever for the rest of the batch, and a dead
    fork server crashed the next epoch's start, both without a checkpoint."""
    run = tmp_path / "run"
    proc = start_cli(["train", str(tiny_config(epochs=40, workers=1)), "--run-dir", str(run)],
                     ranks=2)
    try:
        deadline = time.monotonic() + 120
        while not any(r["step"] >= 12 for r in steps(run)):  # inside epoch 2: readers up
            assert proc.poll() is None, stderr_of(proc)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ranks = rank_processes(proc.pid)
        assert len(ranks) == 2
        helpers = [c for p in ranks for c in p.children(recursive=True)]
        assert len(helpers) >= 4, helpers  # per rank: fork server, reader(s), tracker
        for p in ranks:  # each rank leads its own process group, with its helpers in it
            assert os.getpgid(p.pid) == p.pid
            os.killpg(p.pid, sig)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still runs 60 s after {sig.name} to every process")
    finally:
        end_tree(proc)
    assert proc.returncode == PREEMPTED_EXIT, err
    assert f"stopped on {sig.name}" in err and "Traceback" not in err
    assert (run / "PREEMPTED").exists()
    assert any("-step-" in c.name for c in (run / "stages" / "main" / "checkpoints").iterdir())


CONCURRENT = """
[run]
seed = 1
[data]
path = "{data}"
val_fraction = 0.25
num_workers = 0
[model]
width = 0.125
depth = 3
head = "gap"
fc_sizes = [16]
[train]
epochs = 400
global_batch = 8
lr = 1e-3
[log]
every_steps = 1
[groups]
first = "0:1/2"
second = "1/2:end"
[[stages]]
name = "slow"
level = 0
group = "first"
[[stages]]
name = "fast"
level = 2
group = "second"
[[stages]]
name = "fine"
level = 0
init = "fuse"
fuse_from = ["slow", "fast"]
fusion = "average"
[stages.train]
epochs = 1
"""


def test_signal_to_one_group_stops_the_concurrent_one_with_a_checkpoint(
        pyramid_data: Path, tmp_path: Path) -> None:
    """Two stages train at the same time on rank 0 and rank 1, and only rank 1 (not the
    root) is signalled. The job must still stop both stages with a checkpoint each, write
    the requeue marker (rank 0's job) and exit with the requeue code; without waiting for
    each other, rank 1's exit ends the job while rank 0 trains on."""
    cfg = tmp_path / "concurrent.toml"
    cfg.write_text(CONCURRENT.format(data=pyramid_data))
    run = tmp_path / "run"
    proc = start_cli(["train", str(cfg), "--run-dir", str(run), "--auto-resume"], ranks=2)
    try:
        deadline = time.monotonic() + 120
        # Both stages past their first epoch (so each has an epoch checkpoint to compare).
        while {r["stage"] for r in steps(run) if r["epoch"] >= 1} != {"slow", "fast"}:
            assert proc.poll() is None, stderr_of(proc)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ranks = rank_processes(proc.pid)
        assert len(ranks) == 2
        by_rank = {int(p.environ().get("PMI_RANK", "-1")): p for p in ranks}
        os.kill(by_rank[1].pid, signal.SIGUSR1)
        _, err = proc.communicate(timeout=90)
    finally:
        end_tree(proc)
    assert proc.returncode == PREEMPTED_EXIT, err
    assert (run / "PREEMPTED").is_file(), err
    for stage in ("slow", "fast"):
        mid = list((run / "stages" / stage / "checkpoints").glob("*-step-*.pt"))
        assert mid, (stage, err)  # each stopped inside an epoch, where it was
        assert not list((run / "stages" / stage / "checkpoints").glob("*.tmp*"))
    assert not (run / "stages" / "fine").exists()
