"""Several ranks under a real mpiexec: parity, parallel data generation, failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, end_tree, mpiexec_path, rank_processes, run_env, start_cli, stderr_of
from node_files import HYDRA_TOPOLOGY_PREFIX, MPICH_SEGMENT_PREFIX, job_files, remove_unused

pytestmark = pytest.mark.mpi


def step_losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "step"]


def test_parity_1_2_4_ranks(tiny_1_epoch) -> None:
    """Same seed and global batch: the same losses whatever the number of ranks.

    Every rank count sees the same samples in every global batch (the sampler's
    contract) and DDP averages equal-sized local mean gradients, which is the global
    mean gradient. What differs is only the order of float32 sums (per-rank partial
    sums, the allreduce). That rounding is ~1e-7 relative per step; Adam can amplify
    it a little over 9 steps, so 1e-4 relative is a bound with a wide margin that a
    wrong batch split (a different sample set) or a missing allreduce (ranks training
    on half the data each) would exceed by orders of magnitude.
    """
    losses = {n: np.array(step_losses(tiny_1_epoch.run(n))) for n in (1, 2, 4)}
    assert len(losses[1]) == 9
    assert np.ptp(losses[1]) > 1e-3  # the losses move, so equality is not trivial
    for n in (2, 4):
        np.testing.assert_allclose(losses[n], losses[1], rtol=1e-4, atol=0)


def inspect_checksum(cli, path: Path) -> str:
    r = cli(["data", "inspect", str(path)])
    assert r.returncode == 0, r.stdout + r.stderr
    return next(line for line in r.stdout.splitlines() if line.startswith("checksum"))


def test_synth_is_the_same_dataset_on_any_rank_count(cli, tmp_path: Path) -> None:
    args = ["data", "synth", "cosmoflow", "--samples", "20", "--size", "8",
            "--samples-per-shard", "4", "--seed", "11"]
    one = cli([*args, "--out", str(tmp_path / "one")])
    three = cli([*args, "--out", str(tmp_path / "three")], ranks=3)
    assert one.returncode == 0 and three.returncode == 0, three.stderr
    # The 3 ranks split the shards (rank 0 wrote 2 of the 5), rather than each running alone.
    assert "shard 2/2 on rank 0 of 3" in three.stderr, three.stderr
    assert inspect_checksum(cli, tmp_path / "one") == inspect_checksum(cli, tmp_path / "three")
    other = cli([*args[:-1], "12", "--out", str(tmp_path / "other")])
    assert other.returncode == 0
    assert inspect_checksum(cli, tmp_path / "other") != inspect_checksum(cli, tmp_path / "one")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "hpc-multires: error:" in line]


def test_config_error_on_all_ranks_gives_one_message(cli, tiny_config) -> None:
    t0 = time.monotonic()
    r = cli(["train", str(tiny_config()), "--set", "train.global_batch=6"], ranks=4)
    assert r.returncode != 0
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert "not divisible by the 4 ranks" in lines[0]
    assert time.monotonic() - t0 < 60


def test_an_error_before_the_ranks_have_talked_gives_one_message(cli, tiny_config) -> None:
    """A config typo is found before MPI has started (nothing has been communicated yet):
    rank 0 must still end the job with one message, not every rank with its own."""
    r = cli(["train", str(tiny_config()), "--set", "train.epochz=1"], ranks=2)
    assert r.returncode == 2
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "did you mean 'train.epochs'" in lines[0], r.stderr


def test_missing_data_under_mpiexec_gives_one_message(cli, tiny_config, tmp_path: Path) -> None:
    r = cli(["train", str(tiny_config()), "--set", f"data.path={tmp_path}/none"], ranks=2)
    assert r.returncode != 0
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "not found" in lines[0], r.stderr


def test_bad_sample_on_one_rank_ends_the_whole_job(cli, tiny_config, tiny_cosmo: Path,
                                                   tmp_path: Path) -> None:
    """One rank hits a corrupted chunk mid-training; mpiexec must not hang."""
    data = tmp_path / "data"
    data.mkdir()
    for shard in tiny_cosmo.glob("shard-*.h5"):
        (data / shard.name).write_bytes(shard.read_bytes())
    target = data / "shard-00001.h5"
    with h5py.File(target, "r") as f:
        offsets = [f["x"].id.get_chunk_info(i).byte_offset for i in range(f["x"].shape[0])]
    raw = bytearray(target.read_bytes())
    for off in offsets:  # every sample of the shard: whichever rank reads one, fails
        raw[off + 100] ^= 0xFF
    target.write_bytes(bytes(raw))
    t0 = time.monotonic()
    r = cli(["train", str(tiny_config(epochs=3, data=data)), "--run-dir", str(tmp_path / "run")],
            ranks=2, timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0
    assert "shard-00001.h5" in r.stderr and "corrupted" in r.stderr, r.stdout + r.stderr
    assert elapsed < 90


def test_killed_rank_ends_the_job_in_bounded_time(tiny_config, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg_path = tiny_config(epochs=50)
    proc = start_cli(["train", str(cfg_path), "--run-dir", str(run)], ranks=2,
                     stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        ckpt = run / "stages" / "main" / "checkpoints" / "epoch-0001.pt"
        while not ckpt.exists():
            assert proc.poll() is None, stderr_of(proc)
            assert time.monotonic() < deadline, "training did not reach epoch 1"
            time.sleep(0.2)
        ranks = rank_processes(proc.pid)
        assert len(ranks) == 2, [p.cmdline() for p in ranks]
        left = job_files(r.pid for r in ranks)  # what the abort will leave behind
        victim = ranks[1]
        t0 = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        end_tree(proc)
    assert proc.returncode != 0
    assert elapsed < 60
    # The job ended by an abort, so neither MPICH nor hydra reached its normal end: the
    # node's segment in /dev/shm and the topology file in /tmp are left for the job's
    # epilog, here for node_files, which removes them once no process holds them: none of
    # the job's may be left running.
    assert [f for f in left if f.startswith(MPICH_SEGMENT_PREFIX)], left
    assert [f for f in left if f.startswith(HYDRA_TOPOLOGY_PREFIX)], left
    remove_unused(left, wait_s=30)
    assert not [f for f in left if os.path.exists(f)], left
    import torch

    state = torch.load(ckpt, weights_only=False)  # the last checkpoint still loads
    assert state["epoch"] >= 1


def test_a_stalled_rank_ends_the_job_after_the_timeout_with_one_line(tiny_config,
                                                                     tmp_path: Path) -> None:
    """A rank that stops answering (stopped here; on a cluster, a node that hangs) makes
    the other's next collective time out after comm.timeout_s: one line that says what
    happened and what to change, not the communication library's C++ traceback."""
    run = tmp_path / "run"
    proc = start_cli(["train", str(tiny_config(epochs=50)), "--run-dir", str(run),
                      "--set", "comm.timeout_s=5"], ranks=2)
    try:
        deadline = time.monotonic() + 120
        while not (run / "stages" / "main" / "checkpoints" / "epoch-0001.pt").exists():
            assert proc.poll() is None, stderr_of(proc)
            assert time.monotonic() < deadline, "training did not reach epoch 1"
            time.sleep(0.1)
        ranks = rank_processes(proc.pid)
        assert len(ranks) == 2
        os.kill(ranks[1].pid, signal.SIGSTOP)
        _, err = proc.communicate(timeout=90)
    finally:
        end_tree(proc)
    assert proc.returncode not in (0, None), err
    lines = [ln for ln in err.splitlines() if ln.startswith("hpc-multires: error:")]
    assert len(lines) == 1 and "a collective across ranks failed" in lines[0], err
    assert "comm.timeout_s" in lines[0] and "Traceback" not in err


def _rank_1_with_its_own_mount(mount: str, args: list[str], timeout: float = 120, **env: str
                               ) -> subprocess.CompletedProcess[str]:
    """`hpc-multires ARGS` on 2 ranks, rank 1 in its own mount namespace where the shell
    command `mount` has run first: rank 1 sees the file system as another node would."""
    import shutil

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and util-linux unshare to give one rank its own mounts")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --mount is not allowed here: {probe.stderr.strip()}")
    cmd = [sys.executable, "-m", "mpi4py", "-m", "hpc_multires", *args]
    own = ["unshare", "--mount", "sh", "-c", f'{mount} && exec "$0" "$@"', *cmd]
    return subprocess.run([mpiexec_path(), "-n", "1", *cmd, ":", "-n", "1", *own],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=run_env(**env))


def test_a_run_dir_one_rank_cannot_see_is_refused_before_training(tiny_config,
                                                                   tmp_path: Path) -> None:
    """A node-local --run-dir on a two-node job: rank 1 runs in its own mount namespace
    with an empty tmpfs over the run directory's parent, as a second node sees its own
    $TMPDIR. The job must stop before training, with one line that names the rank.
    Rank 1 waits 1 s for the file rank 0 wrote instead of the 15 s given to a slow
    network file system: it can never appear on rank 1's tmpfs."""
    local = tmp_path / "node-local"
    local.mkdir()
    run = local / "run"
    result = _rank_1_with_its_own_mount(f'mount -t tmpfs tmpfs "{local}"',
                                        ["train", str(tiny_config()), "--run-dir", str(run)],
                                        HPC_MULTIRES_SHARED_WAIT_S="1")
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("hpc-multires: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "is not shared by all ranks: 1 of 2" in errors[0] and "rank 1 on" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (run / "stages").exists() and not (run / "metrics.jsonl").exists()
    assert not list(run.glob(".shared-check-*"))


def test_every_rank_resumes_from_the_checkpoint_the_stages_first_rank_chose(
        tiny_3_epochs, tmp_path: Path) -> None:
    """A 3-epoch run stopped after epoch 2 is resumed, rank 1 listing the checkpoints as a
    node with a stale view of the directory would: with an epoch-3 file that rank 0 does
    not see. Had each rank picked its own newest file, rank 1 would skip the last epoch and
    the ranks' collectives would no longer pair up; every rank must continue from the file
    rank 0 chose, and end as the uninterrupted run (both runs are the session's)."""
    import torch

    cfg = str(tiny_3_epochs.config)
    whole, run = tiny_3_epochs.run(2), tmp_path / "run"
    shutil.copytree(tiny_3_epochs.run(2, stop_after_epoch=2), run)
    ckpts = run / "stages" / "main" / "checkpoints"
    view = tmp_path / "stale-view"
    view.mkdir()
    for f in ckpts.glob("epoch-*.pt"):
        (view / f.name).write_bytes(f.read_bytes())
    stale = torch.load(ckpts / "epoch-0002.pt", weights_only=False)
    stale["epoch"] = 3  # a file rank 1's node still lists
    torch.save(stale, view / "epoch-0003.pt")
    result = _rank_1_with_its_own_mount(
        f'mount --bind "{view}" "{ckpts}"',
        ["train", cfg, "--run-dir", str(run), "--resume", "--set", "comm.timeout_s=30"])
    assert result.returncode == 0, result.stderr
    assert "resumed from epoch-0002.pt" in result.stderr

    def val(path: Path) -> list[float]:
        lines = (path / "metrics.jsonl").read_text().splitlines()
        return [r["val_mae"] for r in map(json.loads, lines) if r["kind"] == "epoch"]
    assert val(run) == pytest.approx(val(whole), abs=1e-6) and len(val(run)) == 3


# Installed in every Python process of a job (ranks, reader processes, the fork server):
# writes a line for each access to another process's /proc entries, and for each access of
# the product's own code to /proc or removal of a name in /dev/shm or of a hydra file.
AUDIT_HOOK = """
import os
import sys
import sysconfig

_log = os.open(os.environ["HPCMR_AUDIT_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
_stdlib = sysconfig.get_paths()["stdlib"]


def _caller():
    # The first frame outside the standard library (pathlib, os, importlib): whose access
    # this is, the product's own or a library's (torch reads /proc/self/maps on import).
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename.startswith((_stdlib, "<"))):
        f = f.f_back
    return "?" if f is None else f"{f.f_code.co_filename}:{f.f_lineno}"


def _other_process(path):
    parts = path.split("/")
    return len(parts) > 2 and parts[2].isdigit() and int(parts[2]) != os.getpid()


def _hook(event, args):
    if event not in ("open", "os.listdir", "os.scandir", "os.remove") or not args:
        return
    path = args[0]
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    if not isinstance(path, str):
        return
    path = os.path.abspath(path)
    caller = _caller()
    product = "/hpc_multires/" in caller
    proc = path.startswith("/proc/")
    unlink = event == "os.remove" and path.startswith(("/dev/shm/", "/tmp/hydra"))
    if (proc and (product or _other_process(path))) or (unlink and product):
        os.write(_log, f"{os.getpid()} {event} {path} from {caller}\\n".encode())


sys.addaudithook(_hook)
"""


def test_the_product_leaves_other_processes_and_mpichs_files_alone(cli, tiny_config,
                                                                   tmp_path: Path) -> None:
    """With default settings a 2-rank job (a data command, training with a reader process,
    an error's abort) reads no other process's /proc entries, touches /proc from none of
    its own code, and unlinks nothing in /dev/shm or of hydra's: MPICH's and hydra's files
    are the job epilog's (on this machine the test suite's, node_files.py)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK)
    log = tmp_path / "audit.log"
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "HPCMR_AUDIT_LOG": str(log)}
    data = tmp_path / "data"
    r = cli(["data", "synth", "neuron", "--out", str(data), "--samples", "8", "--bins", "64",
             "--samples-per-shard", "4"],
            ranks=2, **env)
    assert r.returncode == 0, r.stderr
    cfg = tiny_config(epochs=1, workers=1)
    r = cli(["train", str(cfg), "--run-dir", str(tmp_path / "run")], ranks=2, **env)
    assert r.returncode == 0, r.stderr
    r = cli(["train", str(cfg), "--set", "train.epoch=3"], ranks=2, **env)
    assert r.returncode == 2 and "unknown config key 'train.epoch'" in r.stderr, r.stderr
    assert log.exists(), "the audit hook was not installed"  # its own opening of the log
    assert not log.read_text(), log.read_text()
