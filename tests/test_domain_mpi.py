"""Domain decomposition under a real mpiexec: each rank reads only its sub-domain (the
bytes it read, counted through a file object) and trains its own local CNN; the coherent
model's gradients equal a one-process run's; a run resumed in the local phase or in the
coherent phase ends equal to a straight one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch
from conftest import (
    ROOT,
    end_tree,
    mpiexec_path,
    rank_processes,
    run_cli,
    run_env,
    start_cli,
    stderr_of,
    steps,
)

from hpc_multires.train.preempt import PREEMPTED_EXIT

pytestmark = pytest.mark.mpi

HERE = Path(__file__).resolve().parent

CONFIG = """
[run]
name = "domain"
[data]
path = "{data}"
val_fraction = 0.25
num_workers = 0
verify_reads = "on"
[model]
name = "cosmoflow"
width = 0.125
depth = 2
head = "gap"
fc_sizes = [16]
[train]
epochs = 2
global_batch = 4
lr = 2e-3
[domain]
grid = {grid}
aggregator_epochs = 3
coherent_epochs = 2
coherent_lr = 1e-3
[log]
every_steps = 3
"""


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def launch(script: Path | None, args: list[str], ranks: int, timeout: float = 420
           ) -> subprocess.CompletedProcess[str]:
    """`python -m mpi4py SCRIPT ARGS` on `ranks` ranks (oversubscribed), with a timeout."""
    cmd = [mpiexec_path(), "-n", str(ranks), sys.executable, "-m", "mpi4py", str(script),
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=run_env(PYTHONPATH=f"{ROOT}:{HERE}"))


@pytest.fixture(scope="module")
def blocks16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 CosmoFlow-style samples of 16^3 x 4 stored in blocks of 8^3 (one channel each):
    the 2x2x2 sub-domains are exactly the chunks."""
    out = tmp_path_factory.mktemp("domain-data") / "cosmo16-blocks"
    r = run_cli(["data", "synth", "cosmoflow", "--out", str(out), "--samples", "48",
                 "--size", "16", "--chunk", "8", "--samples-per-shard", "16", "--seed", "5"])
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def counted_3d(blocks16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2x2x2 run on 8 oversubscribed ranks, every HDF5 read recorded per rank."""
    where = tmp_path_factory.mktemp("domain-3d")
    (where / "c.toml").write_text(CONFIG.format(data=blocks16, grid="[2, 2, 2]"))
    (where / "reads").mkdir()
    r = launch(HERE / "domain_reads.py", [str(where / "reads"), "train", str(where / "c.toml"),
                                           "--run-dir", str(where / "run")], ranks=8)
    assert r.returncode == 0, r.stderr[-3000:]
    return where


def chunk_table(store: Path) -> dict[str, list[tuple[int, int, tuple[int, ...]]]]:
    """Each shard's /x chunks: (byte offset, bytes, chunk offset (n, c, *spatial))."""
    table = {}
    for shard in sorted(store.glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            ds = f["x"]
            infos = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
            table[shard.name] = [(i.byte_offset, i.size, tuple(i.chunk_offset)) for i in infos]
    return table


def blocks_read(reads_file: Path, chunks: dict[str, list[tuple[int, int, tuple[int, ...]]]],
                edge: int) -> tuple[set[tuple[int, ...]], int]:
    """Which spatial blocks (chunk origin // edge) one rank's logged reads touched, and how
    many bytes of /x's chunks they read."""
    blocks, read = set(), 0
    for shard, log in json.loads(reads_file.read_text()).items():
        for offset, n in log:
            for at, size, origin in chunks.get(shard, []):
                if offset < at + size and at < offset + n:
                    blocks.add(tuple(o // edge for o in origin[2:]))
                    read += min(offset + n, at + size) - max(offset, at)
    return blocks, read


def test_each_rank_reads_only_its_subvolume(counted_3d: Path, blocks16: Path) -> None:
    chunks = chunk_table(blocks16)
    x_bytes = sum(size for table in chunks.values() for _, size, _ in table)
    for rank in range(8):
        blocks, data = blocks_read(counted_3d / "reads" / f"reads-{rank}.json", chunks, 8)
        # Rank d holds sub-volume d (grid order, the last axis fastest): its block only.
        mine = (rank // 4, rank // 2 % 2, rank % 2)
        assert blocks == {mine}, f"rank {rank} read blocks {sorted(blocks)}"
        # ... every sample's block of every channel, once (HDF5's chunk cache keeps them):
        # an eighth of /x, where whole-sample reads would read all of it.
        assert data == x_bytes // 8, (rank, data, x_bytes)


def test_each_rank_trains_its_own_local_cnn(counted_3d: Path) -> None:
    run = counted_3d / "run"
    starts = {r["stage"]: r for r in records(run) if r["kind"] == "start"}
    for d in range(8):
        s = starts[f"local-{d}"]
        assert s["ranks"] == [d] and s["region_shape"] == [8, 8, 8]
    assert len({tuple(starts[f"local-{d}"]["region_start"]) for d in range(8)}) == 8
    finals = [torch.load(run / "stages" / f"local-{d}" / "final.pt", weights_only=False)
              for d in range(8)]
    first = finals[0]["model"]
    assert all(not torch.equal(f["model"][k], first[k]) for f in finals[1:]
               for k in list(first)[:1])
    # The aggregator evaluated every alternative; the coherent model trained after it.
    agg = starts["aggregator"]
    assert len(agg["local"]) == 8 and "val_mae" in agg["mean"]
    epochs = [r for r in records(run) if r["kind"] == "epoch"]
    assert {r["stage"] for r in epochs} >= {"local-0", "aggregator", "coherent-0"}
    # Peak memory of every rank, per epoch.
    assert all(len(r["peak_rss_mb_ranks"]) == (8 if r["stage"] == "aggregator" else 1)
               and r["peak_rss_mb"] > 50 for r in epochs)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_mae"] > 0


CLASSIFY = """
[run]
name = "domain-2d"
[data]
path = "{data}"
val_fraction = 0.25
num_workers = 0
verify_reads = "on"
[task]
kind = "classify"
[model]
name = "convnet2d"
width = 0.5
depth = 2
head = "gap"
fc_sizes = [16]
[train]
epochs = 2
global_batch = 8
lr = 5e-3
[domain]
grid = [2, 2]
aggregate = "vote"
aggregator_epochs = 3
[log]
every_steps = 4
"""


@pytest.fixture(scope="module")
def counted_2d(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """2x2 sub-images of 32x32 classification images (stored in blocks of 16x16) on 4
    ranks, every HDF5 read recorded per rank: (the data, the work folder)."""
    where = tmp_path_factory.mktemp("domain-2d")
    data = where / "classes32-blocks"
    r = run_cli(["data", "synth", "classes", "--out", str(data), "--samples", "64", "--size",
                 "32", "--classes", "4", "--chunk", "16", "--samples-per-shard", "32"])
    assert r.returncode == 0, r.stderr
    (where / "c.toml").write_text(CLASSIFY.format(data=data))
    (where / "reads").mkdir()
    r = launch(HERE / "domain_reads.py", [str(where / "reads"), "train", str(where / "c.toml"),
                                           "--run-dir", str(where / "run")], ranks=4)
    assert r.returncode == 0, r.stderr[-3000:]
    return data, where


def test_2d_each_rank_reads_only_its_subimage_and_trains_its_cnn(counted_2d) -> None:
    data, where = counted_2d
    chunks = chunk_table(data)
    x_bytes = sum(size for table in chunks.values() for _, size, _ in table)
    for rank in range(4):
        blocks, read = blocks_read(where / "reads" / f"reads-{rank}.json", chunks, 16)
        assert blocks == {(rank // 2, rank % 2)}, f"rank {rank} read blocks {sorted(blocks)}"
        assert read == x_bytes // 4, (rank, read, x_bytes)
    run = where / "run"
    starts = {r["stage"]: r for r in records(run) if r["kind"] == "start"}
    assert [starts[f"local-{d}"]["ranks"] for d in range(4)] == [[0], [1], [2], [3]]
    assert [starts[f"local-{d}"]["region_start"] for d in range(4)] == [
        [0, 0], [0, 16], [16, 0], [16, 16]]
    # Classification: the vote is evaluated (and is the reported aggregate here), beside
    # the mean and the aggregator network.
    agg = starts["aggregator"]
    assert {"local", "mean", "vote"} <= agg.keys() and "val_acc" in agg["vote"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["aggregate"] == "vote" and summary["val_acc"] == agg["vote"]["val_acc"]


@pytest.mark.parametrize("grid", ["2,2,1", "2,1,1"])
def test_coherent_gradients_equal_one_process(grid: str) -> None:
    """4 ranks: 4 sub-domains x 1 replica, and 2 sub-domains x 2 replicas."""
    r = launch(HERE / "domain_gradients.py", [grid], ranks=4, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    # Each rank prints one line; the launcher may run two ranks' lines together.
    assert sorted(re.findall(r"OK rank (\d+) checked", r.stdout)) == ["0", "1", "2", "3"], \
        r.stdout


@pytest.fixture(scope="module")
def replicas_config(blocks16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 sub-domains x 2 replicas on 4 ranks."""
    config = tmp_path_factory.mktemp("domain-replicas") / "c.toml"
    config.write_text(CONFIG.format(data=blocks16, grid="[2, 1, 1]"))
    return config


@pytest.fixture(scope="module")
def straight(replicas_config: Path) -> Path:
    run = replicas_config.parent / "straight"
    r = run_cli(["train", str(replicas_config), "--run-dir", str(run)], ranks=4, timeout=420)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def assert_same_end(a: Path, b: Path) -> None:
    for d in range(2):
        fa, fb = (torch.load(run / "stages" / f"coherent-{d}" / "final.pt",
                             weights_only=False) for run in (a, b))
        for k, v in fa["model"].items():
            assert torch.equal(v, fb["model"][k]), f"coherent-{d} {k}"
    ends = [json.loads((run / "summary.json").read_text()) for run in (a, b)]
    assert ends[0]["val_mae"] == ends[1]["val_mae"]
    # The resumed log holds each record once: the same epochs as the straight run's.
    keys = [sorted((r["stage"], r["epoch"]) for r in records(run) if r["kind"] == "epoch")
            for run in (a, b)]
    assert keys[0] == keys[1]


@pytest.mark.parametrize(("stop", "phase"), [
    (["--stop-after-epoch", "1"], "local"),
    (["--stop-stage", "coherent-1", "--stop-after-epoch", "1"], "coherent"),
])
def test_resume_in_a_phase_equals_straight_run(replicas_config: Path, straight: Path,
                                               tmp_path: Path, stop: list[str],
                                               phase: str) -> None:
    run = tmp_path / "run"
    r = run_cli(["train", str(replicas_config), "--run-dir", str(run), *stop], ranks=4,
                timeout=420)
    assert r.returncode == 0, r.stderr[-3000:]
    # Stopped inside the phase: a checkpoint after epoch 1 of its stages, no final model.
    for d in range(2):
        stage = run / "stages" / f"{phase}-{d}"
        assert (stage / "checkpoints" / "epoch-0001.pt").exists()
        assert not (stage / "final.pt").exists()
    r = run_cli(["train", str(replicas_config), "--run-dir", str(run), "--resume"],
                ranks=4, timeout=420)
    assert r.returncode == 0, r.stderr[-3000:]
    # It continued from the checkpoints (a fresh start would end the same way too).
    assert f"stage {phase}-0: resumed from epoch-0001.pt" in r.stderr
    assert_same_end(straight, run)


def test_signal_to_one_part_stops_every_part_of_the_coherent_model(
        replicas_config: Path, tmp_path: Path) -> None:
    """2 sub-domains x 2 replicas; in the coherent phase only rank 3 (a replica of part 1)
    is signalled. Every part must stop at the same step (their forward passes gather over
    each other), each part's first rank writing its checkpoint there, and the resumed run
    must end where a straight one ends."""
    config = tmp_path / "c.toml"
    config.write_text(replicas_config.read_text().replace("coherent_epochs = 2",
                                                          "coherent_epochs = 8"))
    straight = tmp_path / "straight"
    r = run_cli(["train", str(config), "--run-dir", str(straight)], ranks=4, timeout=420)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    proc = start_cli(["train", str(config), "--run-dir", str(run), "--auto-resume"], ranks=4)
    try:
        deadline = time.monotonic() + 300
        while not any(r["stage"] == "coherent-0" and r["step"] >= 3 for r in steps(run)):
            assert proc.poll() is None, stderr_of(proc)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        by_rank = {int(p.environ().get("PMI_RANK", "-1")): p
                   for p in rank_processes(proc.pid)}
        os.kill(by_rank[3].pid, signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        end_tree(proc)
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    mids = [sorted(p.name for p in (run / "stages" / f"coherent-{d}" / "checkpoints")
                   .glob("*-step-*.pt")) for d in range(2)]
    assert mids[0] and mids[0] == mids[1], mids  # the same step in both parts
    again = run_cli(["train", str(config), "--run-dir", str(run), "--auto-resume"], ranks=4,
                    timeout=420)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage coherent-0: resumed from epoch-" in again.stderr
    for d in range(2):
        fa, fb = (torch.load(x / "stages" / f"coherent-{d}" / "final.pt",
                             weights_only=False)["model"] for x in (straight, run))
        for k in fa:
            torch.testing.assert_close(fb[k], fa[k], rtol=1e-5, atol=1e-6)
