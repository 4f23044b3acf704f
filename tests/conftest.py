"""Shared fixtures: tiny datasets, and running the real CLI under a real mpiexec."""

from __future__ import annotations

import contextlib
import io
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from node_files import leftover_candidates, remove_unused

from hpc_multires.data.store import ShardWriter, provenance

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def mpiexec_path() -> str:
    exe = BIN / "mpiexec"
    if exe.exists():
        return str(exe)
    found = shutil.which("mpiexec")
    if found is None:
        pytest.fail("mpiexec not found: install the MPI extra (pip install -e '.[mpi]'), "
                    "which brings the mpich wheel")
    return found


def run_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # Oversubscribed ranks on a small machine: one thread each, and MPICH must not spin.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPIR_CVAR_CH4_PROGRESS_THROTTLE="1",
               PYTHONUNBUFFERED="1", HPC_MULTIRES_ABORT_GRACE_S="3")
    for key in [k for k in env if k.startswith(("PMI_", "OMPI_", "SLURM_", "MASTER_"))]:
        del env[key]
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def cli_command(args: list[str], ranks: int = 1) -> list[str]:
    """The command line of `hpc-multires ARGS`: one process, or `ranks` under mpiexec."""
    if ranks > 1:
        return [mpiexec_path(), "-n", str(ranks), sys.executable, "-m", "mpi4py",
                "-m", "hpc_multires", *args]
    return [sys.executable, "-m", "hpc_multires", *args]


def run_cli(args: list[str], ranks: int = 1, timeout: float = 180,
            cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`hpc-multires ARGS`, on `ranks` ranks under mpiexec when ranks > 1, with a timeout."""
    return subprocess.run(cli_command(args, ranks), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env=run_env(**env))


def start_cli(args: list[str], ranks: int = 1, stderr: int = subprocess.PIPE
              ) -> subprocess.Popen[str]:
    """`hpc-multires ARGS` started in the background in a session of its own (so that
    `end_tree` can end it and everything it started), stdout and stderr piped
    (`stderr=subprocess.STDOUT` merges them)."""
    return subprocess.Popen(cli_command(args, ranks), cwd=ROOT, env=run_env(),
                            stdout=subprocess.PIPE, stderr=stderr, text=True,
                            start_new_session=True)


def synth_on_one_and_two_ranks(tmp_path: Path, args: list[str], samples: int) -> list:
    """`hpc-multires data synth ARGS` on 1 and on 2 ranks: the two SampleStores,
    asserted to hold the same `samples` inputs bit for bit."""
    from hpc_multires.data.store import SampleStore

    stores = []
    for ranks in (1, 2):
        out = tmp_path / f"r{ranks}"
        r = run_cli([*args, "--out", str(out)], ranks=ranks, timeout=120)
        assert r.returncode == 0, r.stderr
        stores.append(SampleStore(out))
    for i in range(samples):
        np.testing.assert_array_equal(stores[0].read_raw(i)[0], stores[1].read_raw(i)[0])
    return stores


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The child's next stdout line, or "" if none comes within `timeout` (no hang)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        return proc.stdout.readline() if sel.select(timeout) else ""


def stderr_of(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    """What an exited child wrote to stderr, for an assertion message. Bounded: a rank that
    outlived its launcher could hold the pipe open."""
    try:
        out, err = proc.communicate(timeout=timeout)
        return err or out or ""  # stdout when stderr was sent there
    except subprocess.TimeoutExpired:
        return "(its output pipes are still open after it exited)"


def end_tree(proc: subprocess.Popen[str]) -> None:
    """Kill a child started with start_new_session=True and everything in its session
    (mpiexec's ranks too), and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def rank_processes(launcher_pid: int) -> list[psutil.Process]:
    """The ranks of an mpiexec job: the processes its hydra proxy started."""
    return [p for p in psutil.Process(launcher_pid).children(recursive=True)
            if "hpc_multires" in " ".join(p.cmdline()) and p.parent() is not None
            and "hydra_pmi_proxy" in p.parent().name()]


def steps(run: Path) -> list[dict]:
    """The step records of a run's metrics.jsonl, as far as it has been written."""
    if not (run / "metrics.jsonl").exists():
        return []
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "step"]


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli


@pytest.fixture
def cli_in_process(monkeypatch: pytest.MonkeyPatch
                   ) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`hpc-multires ARGS` as `main(ARGS)` in this process, one rank: the same exit status,
    stdout and stderr as `run_cli` without starting Python and importing torch each time.
    For commands that end early (bad input, plan, submit --dry-run, report); a training run
    or anything under mpiexec goes through `run_cli`."""
    from hpc_multires.cli.main import main

    for key in [k for k in os.environ if k.startswith(("PMI_", "OMPI_", "SLURM_", "MASTER_"))]:
        monkeypatch.delenv(key)
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)

    def run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        out, err = io.StringIO(), io.StringIO()
        handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
        monkeypatch.chdir(cwd or ROOT)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main([str(a) for a in args])
                except SystemExit as e:  # argparse's usage errors
                    code = e.code if isinstance(e.code, int) else 2
        finally:
            for s, h in handlers.items():  # `train` installs the preemption handlers
                signal.signal(s, h)
        return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    return run


def write_arrays_store(out: Path, x: np.ndarray, y: np.ndarray, per_shard: int = 8,
                       transform: str = "none") -> Path:
    """A store written straight from arrays (bypassing the CLI), for hand-made cases."""
    out.mkdir(parents=True, exist_ok=True)
    n = len(x)
    shards = -(-n // per_shard)
    for s in range(shards):
        first = s * per_shard
        count = min(per_shard, n - first)
        with ShardWriter(out, s, num_shards=shards, first_sample=first, total_samples=n,
                         num_samples=count, sample_shape=x.shape[1:], x_dtype=x.dtype,
                         label_names=[f"y{i}" for i in range(y.shape[1])], x_transform=transform,
                         prov=provenance("test")) as w:
            for i in range(first, first + count):
                w.write(x[i], y[i])
    return out


@pytest.fixture(scope="session")
def tiny_cosmo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 CosmoFlow-style samples of 16^3 x 4, made by the real generator (one process)."""
    out = tmp_path_factory.mktemp("data") / "cosmo16"
    result = run_cli(["data", "synth", "cosmoflow", "--out", str(out), "--samples", "96",
                      "--size", "16", "--samples-per-shard", "32", "--seed", "3"])
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def pyramid_data(tiny_cosmo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_cosmo with pyramid levels 1 and 2, built under mpiexec."""
    data = tmp_path_factory.mktemp("pyr") / "data"
    shutil.copytree(tiny_cosmo, data)
    r = run_cli(["data", "pyramid", str(data), "--levels", "2"], ranks=2)
    assert r.returncode == 0, r.stderr
    return data


TINY_CONFIG = """
[run]
name = "tiny"
seed = 1

[data]
path = "{data}"
val_fraction = 0.25
num_workers = {workers}

[model]
width = 0.125
depth = 3
fc_sizes = [32]

[train]
epochs = {epochs}
global_batch = 8
lr = 2e-3

[log]
every_steps = 1
"""


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_cosmo: Path) -> Callable[..., Path]:
    def make(epochs: int = 2, workers: int = 0, data: Path | None = None) -> Path:
        p = tmp_path / f"tiny-{epochs}-{workers}.toml"
        p.write_text(TINY_CONFIG.format(data=data or tiny_cosmo, epochs=epochs, workers=workers))
        return p
    return make


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 synthetic grey images of 32x32 in [0, 1] with pyramid levels 1 and 2."""
    out = tmp_path_factory.mktemp("images") / "img32"
    r = run_cli(["data", "synth", "images", "--out", str(out), "--samples", "48", "--size",
                 "32", "--samples-per-shard", "16", "--seed", "4"])
    assert r.returncode == 0, r.stderr
    r = run_cli(["data", "pyramid", str(out), "--levels", "2"])
    assert r.returncode == 0, r.stderr
    return out


IMAGES_CONFIG = """
[run]
name = "images"
seed = 1

[data]
path = "{data}"
val_fraction = 0.25
num_workers = {workers}

[task]
kind = "denoise"
t_range = [0.5, 1.0]

[model]
name = "unet"
unet_base_channels = 4
unet_multipliers = [1, 2]

[train]
epochs = {epochs}
global_batch = 8
lr = 3e-3

[log]
every_steps = 1
"""


@pytest.fixture
def images_config(tmp_path: Path, tiny_images: Path) -> Callable[..., Path]:
    """A denoising run on tiny_images with a small UNet; `extra` is appended (stages)."""
    def make(epochs: int = 2, workers: int = 0, extra: str = "") -> Path:
        p = tmp_path / f"images-{epochs}-{workers}-{abs(hash(extra))}.toml"
        p.write_text(IMAGES_CONFIG.format(data=tiny_images, epochs=epochs, workers=workers)
                     + extra)
        return p
    return make



@pytest.fixture(scope="session")
def trained_runs(tiny_cosmo: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> dict[str, Path]:
    """Trained once per session for the tests that start from a trained run: the tiny
    2-epoch config ("config"), a run of it stopped after epoch 1 ("stopped") and the same
    run resumed to its end ("done"). Use them through `stopped_run`/`done_run`, which copy
    them: a test may change its copy."""
    base = tmp_path_factory.mktemp("trained")
    cfg = base / "tiny.toml"
    cfg.write_text(TINY_CONFIG.format(data=tiny_cosmo, epochs=2, workers=0))
    stopped, done = base / "stopped", base / "done"
    r = run_cli(["train", str(cfg), "--run-dir", str(stopped), "--stop-after-epoch", "1"])
    assert r.returncode == 0, r.stderr
    shutil.copytree(stopped, done)
    r = run_cli(["train", str(cfg), "--run-dir", str(done), "--resume"])
    assert r.returncode == 0, r.stderr
    return {"config": cfg, "stopped": stopped, "done": done}


class TrainedOnce:
    """One config's training runs (under mpiexec from 2 ranks on), each trained the first
    time a test asks for it and kept for the rest of the session: the uninterrupted runs that
    several multi-rank tests compare against, and the stopped runs they resume. Each launch
    costs every rank a Python start and a torch import, on a machine whose ranks share few
    cores; a run several tests need is trained once. Tests read these runs; one that trains
    on in a run trains in its own copy."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self._runs: dict[tuple[int, int | None], Path] = {}

    def run(self, ranks: int, stop_after_epoch: int | None = None) -> Path:
        """The config trained on `ranks` ranks: to its end, or stopped after that epoch."""
        key = (ranks, stop_after_epoch)
        if key not in self._runs:
            run = self.config.parent / (f"ranks-{ranks}" if stop_after_epoch is None
                                        else f"ranks-{ranks}-stopped-{stop_after_epoch}")
            args = ["train", str(self.config), "--run-dir", str(run)]
            if stop_after_epoch is not None:
                args += ["--stop-after-epoch", str(stop_after_epoch)]
            r = run_cli(args, ranks=ranks, timeout=300)
            assert r.returncode == 0, r.stderr
            self._runs[key] = run
        return self._runs[key]


@pytest.fixture(scope="session")
def tiny_1_epoch(tiny_cosmo: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedOnce:
    """The tiny config for 1 epoch (9 steps), on DDP: the same losses on 1, 2 and 4 ranks
    (test_parity_1_2_4_ranks), and the runs Horovod must match on 2 and 4."""
    config = tmp_path_factory.mktemp("tiny-1-epoch") / "tiny.toml"
    config.write_text(TINY_CONFIG.format(data=tiny_cosmo, epochs=1, workers=0))
    return TrainedOnce(config)


@pytest.fixture(scope="session")
def tiny_3_epochs(tiny_cosmo: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedOnce:
    """The tiny config for 3 epochs (27 steps), on 2 ranks: the uninterrupted run that a run
    stopped by a signal, one stopped after epoch 2 and one resumed from a stale view of its
    checkpoints must each end equal to, and the run stopped after epoch 2 (copied) that
    the latter two resume."""
    config = tmp_path_factory.mktemp("tiny-3-epochs") / "tiny.toml"
    config.write_text(TINY_CONFIG.format(data=tiny_cosmo, epochs=3, workers=0))
    return TrainedOnce(config)


MRMF = """
[run]
seed = 2
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
epochs = 2
global_batch = 8
lr = 2e-3
[log]
every_steps = 1
[groups]
half_a = "0:1/2"
half_b = "1/2:end"
[[stages]]
name = "coarse2"
level = 2
group = "half_a"
[stages.train]
epochs = 3
[[stages]]
name = "coarse1"
level = 1
group = "half_b"
[[stages]]
name = "fine"
level = 0
init = "fuse"
fuse_from = ["coarse1", "coarse2"]
fusion = "average"
"""


@pytest.fixture(scope="session")
def mrmf_4_ranks(pyramid_data: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> TrainedOnce:
    """MRMF's plan on pyramid_data: two coarse stages at once on ranks {0,1} and {2,3},
    fused into the fine stage on all four. Its 4-rank DDP run is examined stage by stage
    (test_stages_mpi), and it is what a resumed run and Horovod must end equal to."""
    config = tmp_path_factory.mktemp("mrmf") / "mrmf.toml"
    config.write_text(MRMF.format(data=pyramid_data))
    return TrainedOnce(config)


@pytest.fixture
def stopped_run(trained_runs: dict[str, Path], tmp_path: Path) -> tuple[Path, str]:
    """A copy of the tiny run stopped after epoch 1 of 2 (its checkpoint epoch-0001.pt),
    and the config it was trained with."""
    run = tmp_path / "stopped"
    shutil.copytree(trained_runs["stopped"], run)
    return run, str(trained_runs["config"])


@pytest.fixture
def done_run(trained_runs: dict[str, Path], tmp_path: Path) -> tuple[Path, str]:
    """A copy of the tiny run trained to its end (2 epochs), and its config."""
    run = tmp_path / "done"
    shutil.copytree(trained_runs["done"], run)
    return run, str(trained_runs["config"])


@pytest.fixture(scope="session", autouse=True)
def node_files_left_by_aborted_jobs() -> Iterator[None]:
    """Remove what the suite's aborted MPI jobs leave in /dev/shm and /tmp (node_files.py):
    MPICH's node segments, hydra's topology files, multiprocessing's semaphores.
    An MPI abort kills every rank with SIGKILL, with no clean-up; many tests end a job that
    way on purpose, and on a machine that runs the suite again and again these would fill
    /dev/shm (the machine's memory). Only names that appeared during this session and that
    no live process still uses are removed, waiting a few seconds for those in use (a
    killed rank can outlive its launcher by a moment; another job keeps its own)."""
    before = leftover_candidates()
    yield
    remove_unused(leftover_candidates() - before, wait_s=10)
