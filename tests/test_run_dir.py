"""RunDir: the run directory's layout, its lock, resume checks and the metrics trimmed on
resume."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from hpc_multires.driver.run_dir import RunDir
from hpc_multires.errors import UserError
from hpc_multires.plan.config import Config
from hpc_multires.plan.load import apply_overrides, config_to_dict
from hpc_multires.train.checkpoint import checkpoint_path, save_atomic
from hpc_multires.train.metrics import read_metrics


def stage(name: str, ranks: tuple[int, ...] = (0,), epochs: int = 2) -> Any:
    return SimpleNamespace(name=name, ranks=ranks, train=SimpleNamespace(epochs=epochs))


def save_checkpoint(run: RunDir, name: str, epoch: int, step: int,
                    cfg: Config | None = None) -> Path:
    path = checkpoint_path(run.checkpoint_dir(name), epoch)
    save_atomic({"model": {"w": torch.zeros(2)}, "epoch": epoch, "step": step,
                 "config": config_to_dict(cfg or Config())}, path)
    return path


class OneRank:
    """The one-rank stage communicator resume_point talks to."""

    is_root = True

    def broadcast_object(self, value: Any) -> Any:
        return value


ONE_RANK: Any = OneRank()


def test_the_layout(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert run.metrics == tmp_path / "run" / "metrics.jsonl"
    assert run.config == tmp_path / "run" / "config.toml"
    assert run.checkpoint_dir("coarse") == tmp_path / "run" / "stages" / "coarse" / "checkpoints"
    assert run.final("coarse") == tmp_path / "run" / "stages" / "coarse" / "final.pt"
    assert run.init("fine") == tmp_path / "run" / "stages" / "fine" / "init.pt"
    assert run.rank_log(3) == tmp_path / "run" / "logs" / "rank-0003.log"
    assert run.preempted == tmp_path / "run" / "PREEMPTED"
    assert run.slurm_output() == tmp_path / "run" / "slurm-%j.out"
    assert run.slurm_output("42") == tmp_path / "run" / "slurm-42.out"


def test_a_second_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first, second = RunDir(tmp_path / "run"), RunDir(tmp_path / "run")
    first.lock()
    with pytest.raises(UserError, match=rf"another training is writing to .*\(pid "
                                        rf"{os.getpid()} on "):
        second.lock()
    first.release()
    second.lock()  # free once the first lets go
    second.release()


def test_a_refused_run_leaves_no_directory_where_there_was_none(tmp_path: Path) -> None:
    new = RunDir(tmp_path / "new")
    new.lock()
    assert new.lock_file.exists()
    new.release()
    assert not new.path.exists()
    # An existing, empty directory stays; one the run wrote into keeps what it wrote.
    (tmp_path / "old").mkdir()
    old = RunDir(tmp_path / "old")
    old.lock()
    old.release()
    assert old.path.is_dir() and not old.lock_file.exists()
    used = RunDir(tmp_path / "used")
    used.lock()
    used.metrics.write_text("{}\n")
    used.release()
    assert sorted(p.name for p in used.path.iterdir()) == [".lock", "metrics.jsonl"]


def test_without_locks_the_run_goes_ahead_with_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def no_locks(fd: int, how: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run = RunDir(tmp_path / "run")
    run.lock()
    assert "cannot lock" in capsys.readouterr().err
    RunDir(tmp_path / "run").lock()  # nothing stops a second one


def test_a_file_is_not_a_run_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file; choose a directory"):
        RunDir(tmp_path / "file").lock()


def test_checkpoints_need_resume_and_the_same_config(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    cfg = Config()
    save_checkpoint(run, "main", 1, 4)
    with pytest.raises(UserError, match=r"already holds checkpoints \(stages/main/checkpoints/"
                                        r"epoch-0001.pt\); pass --resume"):
        run.check_resume(False, cfg)
    run.begin(cfg, True, [stage("main")], rank=0)
    saved = run.config.read_text()
    run.check_resume(True, apply_overrides(cfg, ["train.epochs=5"]))  # epochs may grow
    with pytest.raises(UserError, match=r"config differs .* in \['train.lr'\]"):
        run.check_resume(True, apply_overrides(cfg, ["train.lr=0.5"]))
    assert run.config.read_text() == saved


def test_resume_trims_the_metrics_to_what_the_checkpoints_cover(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    save_checkpoint(run, "coarse", 1, 3)
    save_checkpoint(run, "coarse", 2, 6)  # the newest: records up to step 6 stay
    run.save_final("done", {"result": {"epoch": 2}})
    run.metrics.write_text("".join(
        json.dumps({"stage": name, "step": step, "wall_s": float(wall)}) + "\n"
        for name, step, wall in [("coarse", 5, 5), ("done", 9, 9), ("coarse", 6, 6),
                                 ("coarse", 7, 7), ("fine", 1, 8), ("done", 10, 10)]))
    stages = [stage("done"), stage("coarse"), stage("fine")]
    offset = run.begin(Config(), True, stages, rank=0)
    kept = [(r["stage"], r["step"]) for r in read_metrics(run.metrics)]
    assert kept == [("coarse", 5), ("done", 9), ("coarse", 6), ("done", 10)]
    assert offset == 10.0
    # The checkpoint loaded to trim is the one the stage resumes from.
    kind, path, loaded = run.resume_point(stages[1], ONE_RANK, Config())
    assert (kind, path.name, loaded["step"]) == ("checkpoint", "epoch-0002.pt", 6)
    assert run.resume_point(stages[2], ONE_RANK, Config())[:2] == ("fresh", None)


def test_a_new_run_sets_an_earlier_log_aside(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.metrics.write_text('{"step": 1}\n')
    run.preempted.write_text("stopped\n")
    assert run.begin(Config(), False, [stage("main")], rank=0) == 0.0
    assert not run.metrics.exists() and not run.preempted.exists()
    assert (run.path / "metrics.jsonl.prev").read_text() == '{"step": 1}\n'
    assert "[train]" in run.config.read_text()


def test_a_finished_stage_is_skipped_and_one_given_more_epochs_continues(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    cfg = Config()
    save_checkpoint(run, "main", 2, 8)
    run.save_final("main", {"result": {"epoch": 2, "val_mae": 0.1},
                            "config": config_to_dict(cfg)})
    assert run.resume_point(stage("main", epochs=2), ONE_RANK, cfg)[:2] == (
        "final", {"epoch": 2, "val_mae": 0.1})
    kind, path, _ = run.resume_point(stage("main", epochs=3), ONE_RANK, cfg)
    assert (kind, path) == ("checkpoint", run.checkpoint_dir("main") / "epoch-0002.pt")


def test_status(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.status() == "unfinished"
    run.write_summary({"stopped": False})
    assert run.status() == "done"
    run.write_summary({"stopped": True})
    assert run.status() == "stopped"
    run.mark_preempted("stopped on SIGUSR1")
    assert run.status() == "preempted"
