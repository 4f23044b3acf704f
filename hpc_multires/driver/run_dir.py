"""RUN_DIR: the layout of a run directory, and everything a run does to it.

    RUN_DIR/
      .lock                     rank 0 holds it for the whole run (pid and host inside)
      config.toml               the run's config, compared with the config of a resume
      metrics.jsonl             every stage's records; .prev: an earlier attempt's log
      summary.json              the last stage's result: the run's last write
      PREEMPTED                 a signal stopped the run: the batch script requeues it
      logs/rank-NNNN.log        when each rank started and ended which stage
      logs/samples-rank-NNNN.jsonl  with log.samples: the samples of each of its steps
      stages/NAME/checkpoints/  the stage's checkpoints (train/checkpoint.py names them)
      stages/NAME/init.pt       a fused stage's start
      stages/NAME/final.pt      the stage's model once done
      job.sbatch, slurm-JOB.out `hpc-multires submit`'s script and Slurm's output

No other module spells these names: they ask a `RunDir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_multires import files
from hpc_multires.errors import UserError
from hpc_multires.plan.compat import config_changes
from hpc_multires.plan.load import config_to_dict, config_to_toml
from hpc_multires.train.metrics import MetricsLog, read_metrics

if TYPE_CHECKING:
    from hpc_multires.comm.dist import Comm
    from hpc_multires.plan.config import Config
    from hpc_multires.plan.stages import Stage

# torch and the trainer are imported by the methods that load or compare checkpoints:
# `submit` and `report` only need the layout.

FINAL = "final.pt"
INIT = "init.pt"
PREEMPTED = "PREEMPTED"  # the batch scripts look for it by this name
JOB_SCRIPT = "job.sbatch"
ResumePoint = tuple[str, Any, dict[str, Any] | None]


class RunDir:
    """One run directory: where each file goes, and the run's steps that touch them."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock: int | None = None  # the descriptor that holds .lock, on rank 0
        self._made_dir = self._made_lock = False
        # Checkpoints rank 0 loaded to trim the log, for the stages it resumes itself.
        self._loaded: dict[str, tuple[Path, dict[str, Any]]] = {}

    def __str__(self) -> str:
        return str(self.path)

    # ---------------------------------------------------------------- layout

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def preempted(self) -> Path:
        return self.path / PREEMPTED

    @property
    def job_script(self) -> Path:
        return self.path / JOB_SCRIPT

    @property
    def report_plot(self) -> Path:
        return self.path / "report.png"

    def slurm_output(self, job_id: str = "%j") -> Path:
        """Slurm's output file of a job (`%j`: sbatch's pattern for the job id)."""
        return self.path / f"slurm-{job_id}.out"

    def rank_log(self, rank: int) -> Path:
        return self.path / "logs" / f"rank-{rank:04d}.log"

    def sample_log(self, rank: int) -> Path:
        return self.path / "logs" / f"samples-rank-{rank:04d}.jsonl"

    def stage_dir(self, stage: str) -> Path:
        return self.path / "stages" / stage

    def checkpoint_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "checkpoints"

    def final(self, stage: str) -> Path:
        return self.stage_dir(stage) / FINAL

    def init(self, stage: str) -> Path:
        return self.stage_dir(stage) / INIT

    def stage_names(self) -> list[str]:
        """The stages that have written anything."""
        stages = self.path / "stages"
        return sorted(p.name for p in stages.iterdir()) if stages.is_dir() else []

    def checkpoints(self) -> list[Path]:
        """The epoch checkpoints of every stage."""
        return sorted(self.path.glob("stages/*/checkpoints/epoch-*.pt"))

    # ---------------------------------------------------------------- before the run

    def _check_not_a_file(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--run-dir {self.path} is a file; choose a directory")

    def lock(self) -> None:
        """Hold RUN_DIR/.lock for as long as this process runs (the lock goes with it,
        however it ends): a second training into the same directory, say a requeued job
        and a manual resubmission, would otherwise interleave the metrics and overwrite the
        checkpoints of the first. Where the file system has no locks: a warning, and the
        run goes ahead unguarded."""
        self._made_dir = not self.path.exists()
        self._made_lock = not self.lock_file.exists()
        self._check_not_a_file()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write to --run-dir {self.path} ({e.strerror}); choose a "
                            "directory you can write to") from None
        try:
            files.lock(fd, wait=False)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"another training is writing to {self.path} now ({holder}); "
                            "wait for it to end or stop it, or choose another --run-dir (a "
                            "lock held over NFS by a node that failed is freed once the "
                            "server notices, within a few minutes)") from None
        except OSError as e:
            os.close(fd)
            print(f"hpc-multires: warning: cannot lock {self.lock_file} ({e.strerror}); "
                  "nothing stops a second training into this directory", file=sys.stderr)
            return
        self._lock = fd
        with contextlib.suppress(OSError):  # who holds it, for the message above; optional
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

    def release(self) -> None:
        """Let go of the lock (after summary.json: the run's last write). A run refused
        before it wrote anything (a bad plan, say) leaves the directory as it was, and no
        directory where there was none."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        if self._made_lock and self.path.is_dir():
            with contextlib.suppress(OSError):
                if [p.name for p in self.path.iterdir()] == [self.lock_file.name]:
                    self.lock_file.unlink()
                    if self._made_dir:
                        self.path.rmdir()

    def check_resume(self, resume: bool, cfg: Config) -> None:
        """Refuse to overwrite a run's checkpoints unless resuming it, and to resume it with
        a config that computes something else. Runs on every rank, before anything is
        written: a refused resume must leave the run's config.toml as it was."""
        self._check_not_a_file()
        existing = self.checkpoints()
        if existing and not resume:
            raise UserError(
                f"{self.path} already holds checkpoints ({existing[-1].relative_to(self.path)});"
                " pass --resume to continue that run, or choose another --run-dir")
        saved = self.config
        if resume and saved.is_file():
            # The whole config, plan included: a resume with another plan would otherwise
            # start its stages fresh beside the old ones and trim the old ones' metrics away.
            try:
                table: dict[str, Any] | None = tomllib.loads(saved.read_text())
            except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                # Each stage's checkpoints hold the config too, and are compared on resume.
                print(f"hpc-multires: warning: {saved} does not read ({e}); comparing the "
                      "config with the stages' checkpoints only", file=sys.stderr)
                table = None
            changed = config_changes(table, config_to_dict(cfg)) if table else []
            if changed:
                raise UserError(
                    f"--resume: the config differs from the one {self.path} was trained with "
                    f"(its config.toml) in {changed}; resume with `train {saved} --resume` "
                    "(a resume may change epochs, data paths, readers, timeouts and logging), "
                    "or start a new --run-dir")

    def check_shared(self, comm: Comm) -> None:
        """Every rank must see the run directory rank 0 writes: stage roots on other nodes
        write checkpoints and metrics there, fusion reads other stages' models from it, and
        every rank resumes from it. A node-local --run-dir ($TMPDIR) would train, then
        fail at the first fusion or diverge on resume; refuse it before anything trains."""
        if not comm.distributed:
            return
        token = None
        if comm.is_root:
            token = f".shared-check-{os.getpid()}-{time.time_ns()}"
            try:
                (self.path / token).touch()
            except OSError as e:
                raise UserError(f"cannot write to --run-dir {self.path} ({e.strerror}); "
                                "free space or choose another directory") from None
        token = comm.broadcast_object(token)
        seen = (self.path / token).exists()
        # 15 s for another node to see the file (HPC_MULTIRES_SHARED_WAIT_S: a test of the
        # refusal, whose rank can never see it, waits less).
        deadline = time.monotonic() + float(os.environ.get("HPC_MULTIRES_SHARED_WAIT_S", "15"))
        while not seen and time.monotonic() < deadline:
            # An NFS client may have cached "no such file" from an earlier look: listing
            # the directory makes it ask the server again.
            with contextlib.suppress(OSError):
                os.listdir(self.path)
            time.sleep(0.5)
            seen = (self.path / token).exists()
        blind = comm.gather_object(None if seen else
                                   f"rank {comm.rank} on {socket.gethostname()}")
        if comm.is_root:
            (self.path / token).unlink(missing_ok=True)
        missing = [who for who in blind if who is not None]
        if missing:
            raise UserError(
                f"--run-dir {self.path} is not shared by all ranks: {len(missing)} of "
                f"{comm.world_size} do not see the file rank 0 wrote there ("
                f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); put the run "
                "directory on a file system every node mounts (not node-local scratch such "
                "as $TMPDIR; node-local copies of the data are what data.stage_to is for)")

    def begin(self, cfg: Config, resume: bool, stages: list[Stage], rank: int) -> float:
        """Rank 0's writes before any stage runs; returns the run's clock so far (0 for a
        new run, where the resumed run's last kept record left it)."""
        self.preempted.unlink(missing_ok=True)
        self.summary.unlink(missing_ok=True)  # until this run ends
        files.write_atomic(self.config, config_to_toml(cfg))  # read back on resume
        if resume:
            return self.trim_metrics(stages, rank)
        self.set_aside_metrics()
        return 0.0

    def trim_metrics(self, stages: list[Stage], rank: int) -> float:
        """On resume: drop records written after each stage's checkpoint; returns the wall
        time of the last kept record, where the run's clock resumes."""
        from hpc_multires.train import checkpoint

        keep_until: dict[str, float] = {}
        for s in stages:
            if self.final(s.name).exists():
                keep_until[s.name] = float("inf")
            elif checkpoint.list_checkpoints(self.checkpoint_dir(s.name)):
                path, state = checkpoint.load_latest(self.checkpoint_dir(s.name))
                keep_until[s.name] = state["step"]
                if s.ranks[0] == rank:  # this rank resumes it: keep, not reload
                    self._loaded[s.name] = (path, state)
        kept = [r for r in read_metrics(self.metrics)
                if r.get("step", 0) <= keep_until.get(r.get("stage", ""), -1)]
        MetricsLog(self.metrics, enabled=True).rewrite(kept)
        return max((r.get("wall_s") or 0.0 for r in kept), default=0.0)

    def set_aside_metrics(self) -> None:
        """A new run in a directory whose earlier attempt left a log but no checkpoint (it
        failed early): that log is kept as metrics.jsonl.prev, not appended to."""
        path = self.metrics
        if path.exists():
            prev = path.with_name(path.name + ".prev")
            path.replace(prev)
            print(f"hpc-multires: {path} of an earlier attempt kept as {prev.name}",
                  file=sys.stderr)

    # ---------------------------------------------------------------- during the run

    def log_rank(self, comm: Comm, wall_s: float, event: str, stage: Stage) -> None:
        """One line per stage start/end in the rank's log: who ran what, when."""
        path = self.rank_log(comm.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"{wall_s:.3f} {event} stage={stage.name} level={stage.level} "
                    f"group={stage.group} ranks={','.join(map(str, stage.ranks))} "
                    f"host={socket.gethostname()} local_rank={comm.info.local_rank} "
                    f"node={comm.info.node_index}\n")

    def resume_point(self, stage: Stage, comm: Comm, cfg: Config) -> ResumePoint:
        """Where `stage` of a resumed run starts: ("fresh", None), ("checkpoint", its path)
        or ("final", its result) for a stage the run skips. The stage's first rank looks
        and tells the others, so that every rank of the stage continues from the same file
        (ranks that each listed the directory could see different files: a node's stale
        cache of it). The third item: the checkpoint the first rank has loaded, or None."""
        answer: tuple[str, Any] = ("fresh", None)
        loaded: dict[str, Any] | None = None
        if comm.is_root:
            try:
                answer, loaded = self._find_resume_point(stage, cfg)
            except UserError as e:  # every rank of the stage raises it, not this one alone
                answer = ("error", str(e))
        kind, value = comm.broadcast_object(answer)
        if kind == "error":
            raise UserError(value)
        if kind == "checkpoint":
            value = self.checkpoint_dir(stage.name) / value
        return kind, value, loaded

    def _find_resume_point(self, stage: Stage, cfg: Config
                           ) -> tuple[tuple[str, Any], dict[str, Any] | None]:
        from hpc_multires.train import checkpoint

        if self.final(stage.name).exists():
            done = self.load_final(stage.name)
            _same_computation(done["config"], cfg, f"stage {stage.name!r}")
            result = done["result"]
            if result["epoch"] >= stage.train.epochs or result.get("budget_reached"):
                return ("final", result), None
            # More epochs asked for than were run: continue from its last checkpoint.
        ckpts = self.checkpoint_dir(stage.name)
        if checkpoint.list_checkpoints(ckpts):
            kept = self._loaded.pop(stage.name, None)
            path, state = kept or checkpoint.load_latest(ckpts)
            # The one check for every rank of the stage: the others load this same file.
            _same_computation(state["config"], cfg, str(path))
            return ("checkpoint", path.name), state
        return ("fresh", None), None

    def save_init(self, stage: str, state: dict[str, Any]) -> None:
        """What a fused stage started from, kept beside its checkpoints."""
        from hpc_multires.train import checkpoint

        checkpoint.save_atomic(state, self.init(stage))

    def save_final(self, stage: str, state: dict[str, Any]) -> None:
        from hpc_multires.train import checkpoint

        checkpoint.save_atomic(state, self.final(stage))

    def load_final(self, stage: str) -> dict[str, Any]:
        import torch

        state: dict[str, Any] = torch.load(self.final(stage), map_location="cpu",
                                           weights_only=False)
        return state

    # ---------------------------------------------------------------- at the end

    def mark_preempted(self, message: str) -> None:
        """The batch script requeues the job when it finds this (srun's exit code alone
        cannot say it: --kill-on-bad-exit turns the others' 75 into kills)."""
        self.preempted.write_text(f"{message}\n")

    def write_summary(self, result: dict[str, Any]) -> None:
        self.summary.write_text(json.dumps(result, indent=2) + "\n")

    def status(self) -> str:
        """done, stopped (as asked, with a checkpoint), preempted (requeue it), or
        unfinished: still running, or ended by an error or a kill (its last checkpoint
        resumes it)."""
        if self.preempted.exists():
            return "preempted"
        if self.summary.exists():
            try:
                return "stopped" if json.loads(self.summary.read_text()).get("stopped") \
                    else "done"
            except (OSError, ValueError):
                return "unfinished"
        return "unfinished"


def _same_computation(saved: dict[str, Any], cfg: Config, what: str) -> None:
    """Refuse to continue from a model trained with a config that computes something else
    (plan/compat.py says which keys a resume may change)."""
    changed = config_changes(saved, config_to_dict(cfg))
    if changed:
        raise UserError(
            f"the config differs from the one {what} was trained with, in {changed}; resume "
            "with the run's own config (RUN_DIR/config.toml) or start a new --run-dir")
