"""The project's own batch scripts under a real Slurm (two nodes on this machine)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from conftest import ROOT, TINY_CONFIG, run_cli, steps
from slurm_cluster import cluster, wait_gone

from hpc_multires.data.store import checksum_shard

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    env_iter = cluster(tmp_path_factory.mktemp("slurm"))
    env = next(env_iter)
    env.update(HPCMR_PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    yield env
    for _ in env_iter:
        pass


def sbatch(env: dict[str, str], run: Path, config: Path, nodes: int = 2, tasks: int = 2,
           script: str = "slurm/cpu.sbatch") -> str:
    run.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["sbatch", "--parsable", f"--nodes={nodes}",
                        f"--ntasks-per-node={tasks}", f"--output={run}/slurm-%j.out", script,
                        str(config), str(run)], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def output(run: Path, job: str) -> str:
    return (run / f"slurm-{job}.out").read_text()


def wait_training_started(run: Path, timeout: float = 240) -> None:
    """Until the job's training has written its first metrics record into `run`."""
    deadline = time.monotonic() + timeout
    while not (run / "metrics.jsonl").exists():
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def uninterrupted(slurm, tiny_cosmo: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[Path, Path, str]:
    """The tiny config for 6 epochs (54 steps) run to its end by slurm/cpu.sbatch on 2 nodes
    of 2 tasks, once per module: (config, run directory, job id). test_two_nodes_... looks
    at where its ranks ran; it is the uninterrupted run a preempted one must equal. A job
    costs ~14 s of start and end here, an epoch ~0.4 s: one job serves both."""
    base = tmp_path_factory.mktemp("uninterrupted")
    config = base / "tiny.toml"
    config.write_text(TINY_CONFIG.format(data=tiny_cosmo, epochs=6, workers=0))
    run = base / "run"
    job = sbatch(slurm, run, config)
    wait_gone(job, slurm, timeout=240)
    return config, run, job


def test_two_nodes_two_tasks_see_their_place(uninterrupted) -> None:
    _, run, job = uninterrupted
    out = output(run, job)
    assert "done: val_mae" in out, out
    assert "4 rank(s) on 2 node(s) (slurm)" in out
    for rank in range(4):
        line = (run / "logs" / f"rank-{rank:04d}.log").read_text().splitlines()[0]
        assert f"local_rank={rank % 2}" in line and f"node={rank // 2}" in line, line


def test_preemption_requeues_and_resumes_without_losing_a_step(slurm, uninterrupted,
                                                               tmp_path: Path) -> None:
    # 54 steps: the signal, sent from step 10 on (in epoch 2, past the first epoch's
    # checkpoint), lands well before the end: it stopped the run 2 to 8 steps later where
    # 4 ranks share 2 cores.
    config, reference, _ = uninterrupted
    run = tmp_path / "run"
    job = sbatch(slurm, run, config)
    deadline = time.monotonic() + 240
    while not any(s["step"] >= 10 for s in steps(run)):
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    sig = subprocess.run(["scancel", "--signal=USR1", job], env=slurm, capture_output=True,
                         text=True, timeout=30)
    assert sig.returncode == 0, sig.stderr
    states = wait_gone(job, slurm, timeout=300, release_requeued=True)
    out = output(run, job)
    # It stopped inside the run (where exactly depends on timing: the signal is sent from
    # step 10 on) and the requeued job resumed from the checkpoint written at that step.
    stopped = re.search(r"stopped on SIGUSR1 at step (\d+)", out)
    assert stopped and 10 <= int(stopped.group(1)) < 54, out
    assert re.search(rf"resumed from epoch-\d{{4}}-step-{int(stopped.group(1)):08d}\.pt", out), out
    assert any(s.startswith("PENDING") for s in states), states  # it was requeued
    assert "done: val_mae" in out and not (run / "PREEMPTED").exists()
    got, want = steps(run), steps(reference)
    assert [s["step"] for s in got] == list(range(1, 55))  # none twice, none skipped
    # The same job on the same 4 ranks, uninterrupted: only float rounding may differ (see
    # test_parity).
    assert [s["loss"] for s in got] == pytest.approx([s["loss"] for s in want], rel=1e-4)


def test_killed_rank_ends_the_job_and_the_checkpoint_loads(slurm, tiny_config,
                                                           tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = sbatch(slurm, run, tiny_config(epochs=200))
    ckpt_dir = run / "stages" / "main" / "checkpoints"
    deadline = time.monotonic() + 240
    while not list(ckpt_dir.glob("epoch-*.pt")):
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.2)
    victims = [p for p in psutil.process_iter(["cmdline", "environ"])
               if "hpc_multires" in " ".join(p.info["cmdline"] or [])
               and (p.info["environ"] or {}).get("SLURM_JOB_ID") == job
               and (p.info["environ"] or {}).get("SLURM_PROCID") == "1"]
    assert victims, "rank 1 not found"
    t0 = time.monotonic()
    os.kill(victims[0].pid, signal.SIGKILL)
    wait_gone(job, slurm, timeout=120)
    assert time.monotonic() - t0 < 90
    assert "done: val_mae" not in output(run, job)
    latest = sorted(ckpt_dir.glob("epoch-*.pt"))[-1]
    state = torch.load(latest, weights_only=False)
    assert state["epoch"] >= 1 and "model" in state


def test_staging_on_each_node(slurm, tiny_config, tiny_cosmo: Path, tmp_path: Path) -> None:
    local = tmp_path / "local"  # both "nodes" share this disk; each gets its own copy
    cfg = tiny_config(epochs=6)
    cfg.write_text(cfg.read_text().replace("[data]", f'[data]\nstage_to = "{local}"'))
    run = tmp_path / "run"
    job = sbatch(slurm, run, cfg)
    wait_training_started(run)
    shards = sorted(p.name for p in tiny_cosmo.glob("shard-*.h5"))
    for node in (0, 1):
        copies = sorted(local.glob(f"hpc-multires-{job}-node{node}/0-cosmo16/shard-*.h5"))
        assert [p.name for p in copies] == shards, node
        assert all(checksum_shard(p)["ok"] for p in copies)
    wait_gone(job, slurm, timeout=240)
    assert "done: val_mae" in output(run, job)
    assert not any(local.iterdir())


def test_partitioned_staging_reads_every_sample_once_per_epoch(
        slurm, tmp_path: Path) -> None:
    """data.stage = "partition" on 2 nodes of 2 tasks: 5 shards of 16 samples, the last
    (val_fraction 0.2) the validation set. Each node holds 2 of the 4 training shards and
    the validation shard; each epoch every training sample is read once across the job,
    each by a rank of the node that holds its shard."""
    data = tmp_path / "data"
    r = run_cli(["data", "synth", "cosmoflow", "--out", str(data), "--samples", "80", "--size",
                 "16", "--samples-per-shard", "16", "--seed", "4"])
    assert r.returncode == 0, r.stderr
    local = tmp_path / "local"
    cfg = tmp_path / "partition.toml"
    cfg.write_text(TINY_CONFIG.format(data=data, epochs=4, workers=1)
                   .replace("val_fraction = 0.25", "val_fraction = 0.2")
                   .replace("[data]", f'[data]\nstage_to = "{local}"\nstage = "partition"')
                   .replace("[log]", "[log]\nsamples = true"))
    run = tmp_path / "run"
    job = sbatch(slurm, run, cfg)
    wait_training_started(run)
    held = {node: sorted(p.name for p in local.glob(
                f"hpc-multires-{job}-node{node}/0-data/shard-*.h5")) for node in (0, 1)}
    wait_gone(job, slurm, timeout=240)
    out = output(run, job)
    assert "done: val_mae" in out, out
    assert "training samples per node [32, 32], ranks per node [2, 2]" in out, out
    training = {f"shard-{i:05d}.h5" for i in range(4)}
    for node in (0, 1):  # half the training shards each, and the validation shard
        assert len(held[node]) == 3 and "shard-00004.h5" in held[node], held
    assert set(held[0]) & set(held[1]) & training == set()
    assert (set(held[0]) | set(held[1])) == training | {"shard-00004.h5"}
    start = next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "start")
    assert start["node_shares"] == [[2, 32], [2, 32]] and start["steps_per_epoch"] == 8
    reads: dict[int, list[int]] = {}
    for rank in range(4):  # ranks 0, 1 on node 0 and 2, 3 on node 1
        shards = {int(name[6:11]) for name in held[rank // 2]}
        for line in (run / "logs" / f"samples-rank-{rank:04d}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            assert all(i // 16 in shards for i in rec["indices"][0]), (rank, rec)
            reads.setdefault(rec["epoch"], []).extend(rec["indices"][0])
    assert sorted(reads) == [0, 1, 2, 3]
    for epoch, seen in reads.items():
        assert sorted(seen) == list(range(64)), epoch  # every training sample once
    assert reads[0] != reads[1]
    assert not any(local.iterdir())  # removed at the end


def test_submit_renders_submits_and_runs(slurm, tiny_config, tmp_path: Path) -> None:
    """`hpc-multires submit` through the real sbatch: prints the job id, the job runs the
    rendered script (a run directory with a space in its name) to the end."""
    run = tmp_path / "my runs" / "demo"
    r = subprocess.run([sys.executable, "-m", "hpc_multires", "submit", str(tiny_config()),
                        "--nodes", "2", "--ntasks-per-node", "2", "--time", "00:10:00",
                        "--run-dir", str(run), "--set", "train.epochs=1"],
                       capture_output=True, text=True, env=slurm, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.split()[2].rstrip(";")
    assert job.isdigit(), r.stdout
    wait_gone(job, slurm, timeout=240)
    out = output(run, job)
    assert "4 rank(s) on 2 node(s) (slurm)" in out and "done: val_mae" in out, out
    assert (run / "job.sbatch").read_text().startswith("#!/bin/bash")

