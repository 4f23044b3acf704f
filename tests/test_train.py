"""The training loop end to end through the CLI: metrics, checkpoints, resume, report."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_arrays_store

from hpc_multires.plan.compat import config_changes
from hpc_multires.plan.load import config_to_dict, load_config


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.slow
def test_train_writes_metrics_config_and_checkpoints(cli, tiny_config, tmp_path: Path) -> None:
    cfg_path = tiny_config(epochs=2, workers=1)
    run = tmp_path / "run"
    r = cli(["train", str(cfg_path), "--run-dir", str(run)])
    assert r.returncode == 0, r.stderr
    start = records(run, "start")[0]
    assert start["train_samples"] == 72 and start["local_batch"] == 8
    steps, epochs = records(run, "step"), records(run, "epoch")
    assert [s["step"] for s in steps] == list(range(1, 19))  # every_steps = 1, 9 per epoch
    # The time each step waited for its batch: the first step of each epoch waits for the
    # reader processes to start; its batch is the first they read.
    intervals = [b["wall_s"] - a["wall_s"] for a, b in itertools.pairwise(steps)]
    assert all(s["data_wait_s"] >= 0 for s in steps)
    assert all(s["data_wait_s"] <= t + 1e-6 for s, t in zip(steps[1:], intervals, strict=True))
    assert steps[0]["data_wait_s"] > 0
    assert [e["epoch"] for e in epochs] == [1, 2]
    for rec in epochs:
        assert {"epoch", "step", "wall_s", "samples_per_s", "loss", "val_mae"} <= rec.keys()
        assert rec["samples_per_s"] > 0 and 0 < rec["val_mae"] < 2
    assert epochs[1]["wall_s"] > epochs[0]["wall_s"]
    assert load_config(run / "config.toml") == load_config(cfg_path)
    ckpts = run / "stages" / "main" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "epoch-0001.pt", "epoch-0002.pt"]

    rep = cli(["report", str(run)])
    assert rep.returncode == 0, rep.stderr
    assert "val_mae" in rep.stdout and (run / "report.png").stat().st_size > 1000
    assert f"{epochs[-1]['val_mae']:.4f}" in rep.stdout  # the run's own final figure


@pytest.mark.slow
def test_same_run_dir_is_not_overwritten(cli_in_process, stopped_run) -> None:
    cli = cli_in_process  # every command here is refused before it trains
    run, cfg_path = stopped_run
    before = (run / "stages" / "main" / "checkpoints" / "epoch-0001.pt").read_bytes()
    again = cli(["train", cfg_path, "--run-dir", str(run)])
    assert again.returncode == 2 and "pass --resume" in again.stderr
    assert (run / "stages" / "main" / "checkpoints" / "epoch-0001.pt").read_bytes() == before
    changed = cli(["train", cfg_path, "--run-dir", str(run), "--resume",
                   "--set", "train.lr=0.1", "--set", "train.epochs=3"])
    assert changed.returncode == 2 and "['train.lr']" in changed.stderr, changed.stderr


@pytest.mark.slow
def test_a_refused_resume_changes_nothing_and_its_advice_works(cli, cli_in_process, stopped_run,
                                                              tmp_path: Path) -> None:
    """A resume refused for a changed config must leave config.toml as the run wrote it
    (the message tells the user to resume with that file); a resume with another plan is
    refused too, instead of starting its stages beside the old ones."""
    run, cfg = stopped_run
    saved = (run / "config.toml").read_text()
    log = (run / "metrics.jsonl").read_text()
    bad = cli_in_process(["train", cfg, "--run-dir", str(run), "--resume", "--set", "train.lr=0.5"])
    assert bad.returncode == 2 and "in ['train.lr']" in bad.stderr, bad.stderr
    assert f"train {run / 'config.toml'} --resume" in bad.stderr
    assert (run / "config.toml").read_text() == saved
    plan = tmp_path / "plan.toml"
    plan.write_text(Path(cfg).read_text() + '''
[[stages]]
name = "other"
level = 0
''')
    other = cli_in_process(["train", str(plan), "--run-dir", str(run), "--resume"])
    assert other.returncode == 2 and "stages" in other.stderr, other.stderr
    assert (run / "metrics.jsonl").read_text() == log and not (run / "stages" / "other").exists()
    ok = cli(["train", str(run / "config.toml"), "--run-dir", str(run), "--resume"])
    assert ok.returncode == 0 and "resumed from epoch-0001.pt" in ok.stderr, ok.stderr


@pytest.mark.slow
def test_resume_on_data_of_another_shape_is_one_line(cli_in_process, stopped_run,
                                                     tmp_path: Path) -> None:
    """data.path may change on resume (the data moved), but not to samples of another
    shape: the checkpoint's weights do not fit the model built for them."""
    cli = cli_in_process
    run, cfg = stopped_run
    rng = np.random.default_rng(0)
    other = write_arrays_store(tmp_path / "two-channels",
                               rng.normal(size=(32, 2, 16, 16, 16)).astype(np.float32),
                               rng.uniform(-1, 1, size=(32, 3)).astype(np.float32))
    r = cli(["train", cfg, "--run-dir", str(run), "--resume", "--set", f"data.path={other}"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "does not fit the one built for the data at data.path" in r.stderr


@pytest.mark.mpi
def test_resume_equals_an_uninterrupted_run(cli, tiny_3_epochs, tmp_path: Path) -> None:
    """3 epochs straight == 2 epochs, stop, --resume for the third (2 ranks, exact). The
    straight run and the stopped one are the session's; the resume reads through a reader
    process (data.num_workers = 1, which a resume may change), the straight run in the
    ranks themselves: the same batches, so the same numbers, bit for bit."""
    import shutil

    cfg_path = str(tiny_3_epochs.config)
    straight, resumed = tiny_3_epochs.run(2), tmp_path / "resumed"
    shutil.copytree(tiny_3_epochs.run(2, stop_after_epoch=2), resumed)
    assert not (resumed / "stages" / "main" / "checkpoints" / "epoch-0003.pt").exists()
    b2 = cli(["train", cfg_path, "--run-dir", str(resumed), "--resume",
              "--set", "data.num_workers=1"], ranks=2)
    assert b2.returncode == 0, b2.stderr
    assert "resumed from" in b2.stderr

    def load(run: Path, epoch: int) -> dict:
        path = run / "stages" / "main" / "checkpoints" / f"epoch-{epoch:04d}.pt"
        return torch.load(path, weights_only=False)

    final_a, final_b = load(straight, 3), load(resumed, 3)
    assert final_b["step"] == final_a["step"] == 27
    for name, tensor in final_a["model"].items():
        assert torch.equal(tensor, final_b["model"][name]), name
    # The last two epochs' checkpoints differ: training did something between them.
    before = load(resumed, 2)["model"]
    assert any(not torch.equal(before[k], final_b["model"][k]) for k in before)
    # The metrics log of the resumed run has every step once, with the same losses.
    sa, sb = records(straight, "step"), records(resumed, "step")
    assert [r["step"] for r in sb] == list(range(1, 28))
    assert [r["loss"] for r in sa] == [r["loss"] for r in sb]
    assert records(resumed, "epoch")[2]["wall_s"] > records(resumed, "epoch")[1]["wall_s"]


@pytest.mark.mpi
def test_time_budget_stops_every_rank_at_the_same_step(cli, tiny_config, tmp_path: Path) -> None:
    """A budget already spent after the first step: the vote taken then is counted after the
    second step, so both ranks stop there, write the epoch's checkpoint and end the stage."""
    run = tmp_path / "run"
    r = cli(["train", str(tiny_config(epochs=3, workers=1)), "--run-dir", str(run),
             "--set", "train.time_budget_s=1e-6"], ranks=2)
    assert r.returncode == 0, r.stderr
    assert [s["step"] for s in records(run, "step")] == [1, 2]
    epochs = records(run, "epoch")
    assert [(e["epoch"], e["step"]) for e in epochs] == [(1, 2)]
    assert "time budget reached" in r.stdout + r.stderr
    ckpts = run / "stages" / "main" / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["epoch-0001.pt"]


def test_a_config_saved_before_a_key_existed_is_not_a_change(tiny_config) -> None:
    """Resuming a run whose checkpoint predates a new config key: the key counts as its
    default; a real change is still reported."""
    current = config_to_dict(load_config(tiny_config(epochs=2)))
    saved = json.loads(json.dumps(current))
    del saved["train"]["time_budget_s"]
    assert config_changes(saved, current) == []
    saved["train"]["lr"] = current["train"]["lr"] * 2
    assert config_changes(saved, current) == ["train.lr"]


COUNT_LOADS = """
import collections, sys, torch
from hpc_multires.cli.main import main
loads = collections.Counter()
real = torch.load
def counted(path, *args, **kwargs):
    loads[str(path)] += 1
    return real(path, *args, **kwargs)
torch.load = counted
rc = main(sys.argv[1:])
print(dict(loads))
sys.exit(rc)
"""


@pytest.mark.slow
def test_resume_loads_the_checkpoint_once(stopped_run) -> None:
    """Trimming the metrics log and resuming the stage read the same checkpoint: once."""
    import ast
    import subprocess
    import sys

    from conftest import ROOT, run_env
    run, cfg_path = stopped_run
    r = subprocess.run([sys.executable, "-c", COUNT_LOADS, "train", cfg_path, "--run-dir",
                        str(run), "--resume"], capture_output=True, text=True, timeout=180,
                       cwd=ROOT, env=run_env())
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    loads = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    ckpt = str(run / "stages" / "main" / "checkpoints" / "epoch-0001.pt")
    assert loads.get(ckpt) == 1, loads


@pytest.mark.slow
def test_resume_inside_an_epoch_with_dropout_is_exact(cli, tiny_config, tmp_path: Path) -> None:
    """A run that lost everything after a checkpoint inside an epoch resumes from it and
    ends as the straight run does, dropout masks included (they follow the step)."""
    import shutil
    cfg = str(tiny_config(epochs=1))  # 9 steps
    opts = ["--set", "model.dropout=0.5", "--set", "train.checkpoint_every_steps=4"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    a = cli(["train", cfg, "--run-dir", str(straight), *opts])
    assert a.returncode == 0, a.stderr
    shutil.copytree(straight, crashed)
    ckpts = crashed / "stages" / "main" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "epoch-0001-step-00000004.pt", "epoch-0001-step-00000008.pt", "epoch-0001.pt"]
    for name in ("epoch-0001-step-00000008.pt", "epoch-0001.pt"):  # what the crash lost
        (ckpts / name).unlink()
    (crashed / "stages" / "main" / "final.pt").unlink()
    b = cli(["train", cfg, "--run-dir", str(crashed), "--resume", *opts])
    assert b.returncode == 0, b.stderr
    assert "resumed from epoch-0001-step-00000004.pt" in b.stderr
    sa, sb = records(straight, "step"), records(crashed, "step")
    assert [r["step"] for r in sb] == list(range(1, 10))
    assert [r["loss"] for r in sb] == [r["loss"] for r in sa]
    fa = torch.load(straight / "stages" / "main" / "final.pt", weights_only=False)["model"]
    fb = torch.load(crashed / "stages" / "main" / "final.pt", weights_only=False)["model"]
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k


@pytest.mark.slow
def test_a_stage_ended_on_its_time_budget_stays_ended_on_resume(cli, tiny_config,
                                                              tmp_path: Path) -> None:
    """--resume of a stage that ended on its budget trains no further, whether its final.pt
    was written or not (a crash between the last epoch's checkpoint and final.pt)."""
    cfg = str(tiny_config(epochs=3))
    run = tmp_path / "run"
    budget = ["--set", "train.time_budget_s=1e-6"]
    assert cli(["train", cfg, "--run-dir", str(run), *budget]).returncode == 0
    stage = run / "stages" / "main"
    final = (stage / "final.pt").read_bytes()
    again = cli(["train", cfg, "--run-dir", str(run), "--resume", *budget])
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stderr
    assert (stage / "final.pt").read_bytes() == final
    (stage / "final.pt").unlink()
    third = cli(["train", cfg, "--run-dir", str(run), "--resume", *budget])
    assert third.returncode == 0, third.stderr
    assert [s["step"] for s in records(run, "step")] == [1, 2]  # no step past the budget
    assert sorted(p.name for p in (stage / "checkpoints").iterdir()) == ["epoch-0001.pt"]
    result = torch.load(stage / "final.pt", weights_only=False)["result"]
    assert (result["epoch"], result["step"], result["budget_reached"]) == (1, 2, True)
    assert result["val_mae"] == pytest.approx(records(run, "epoch")[0]["val_mae"])
    assert "done: val_mae" in third.stdout


def test_resume_needs_a_checkpoint_and_stop_stage_a_stage(cli_in_process, tiny_config,
                                                         tmp_path: Path) -> None:
    cli = cli_in_process  # every command here is refused before it trains
    cfg = str(tiny_config(epochs=1))
    r = cli(["train", cfg, "--run-dir", str(tmp_path / "typo"), "--resume"])
    assert r.returncode == 2 and "holds no checkpoint" in r.stderr, r.stderr
    assert not (tmp_path / "typo" / "stages").exists()
    r = cli(["train", cfg, "--run-dir", str(tmp_path / "a"), "--stop-after-epoch", "1",
             "--stop-stage", "mian"])
    assert r.returncode == 2 and "'mian' is not a stage" in r.stderr, r.stderr
    r = cli(["train", cfg, "--run-dir", str(tmp_path / "b"), "--stop-stage", "main"])
    assert r.returncode == 2 and "--stop-after-epoch" in r.stderr, r.stderr
    r = cli(["train", cfg, "--run-dir", str(tmp_path / "c"), "--stop-after-epoch", "0"])
    assert r.returncode == 2 and "--stop-after-epoch 0: use 1 or more" in r.stderr, r.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_torn_metrics_line_does_not_block_resume(cli, stopped_run) -> None:
    run, cfg = stopped_run
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "stage": "ma')  # a write cut short
    r = cli(["train", cfg, "--run-dir", str(run), "--resume"])
    assert r.returncode == 0, r.stderr
    assert "not a whole record" in r.stderr
    assert [s["step"] for s in records(run, "step")] == list(range(1, 19))


@pytest.mark.slow
def test_paths_with_a_newline_a_quote_and_non_ascii_round_trip_through_resume(
        cli, tiny_config, tiny_cosmo: Path, tmp_path: Path) -> None:
    """config.toml holds data.path and is read back on resume: a path with a newline, quotes
    or non-ASCII characters (each legal in a POSIX file name) must survive the trip."""
    import shutil

    odd = 'd"a\'ta \u00fc\u4f53\n2'
    data = tmp_path / f"data {odd}"
    shutil.copytree(tiny_cosmo, data)
    run = tmp_path / f"run {odd}"
    first = cli(["train", str(tiny_config(epochs=2)), "--run-dir", str(run), "--set",
                 f"data.path={data}", "--stop-after-epoch", "1"])
    assert first.returncode == 0, first.stderr
    assert load_config(run / "config.toml").data.path == str(data)
    again = cli(["train", str(run / "config.toml"), "--run-dir", str(run), "--resume"])
    assert again.returncode == 0, again.stderr
    assert "resumed from epoch-0001.pt" in again.stderr
    assert [e["epoch"] for e in records(run, "epoch")] == [1, 2]


@pytest.mark.slow
def test_a_new_run_sets_an_earlier_attempts_log_aside(cli, tiny_config, tmp_path: Path) -> None:
    """An attempt that failed before its first checkpoint left a log: the next run starts
    its own and keeps the old one beside it."""
    run = tmp_path / "run"
    run.mkdir()
    old = '{"kind": "start", "stage": "main", "step": 0, "wall_s": 0.0}\n'
    (run / "metrics.jsonl").write_text(old)
    assert cli(["train", str(tiny_config(epochs=1)), "--run-dir", str(run)]).returncode == 0
    assert (run / "metrics.jsonl.prev").read_text() == old
    assert len(records(run, "start")) == 1
    assert [s["step"] for s in records(run, "step")] == list(range(1, 10))


def test_metrics_appends_wait_for_a_writer_holding_the_lock(tmp_path: Path) -> None:
    """Concurrent stages' roots append to one log, possibly from other nodes: each append
    takes the file's POSIX lock, so it waits while another process holds it."""
    import subprocess
    import sys
    import threading
    import time

    from conftest import read_line

    from hpc_multires.train.metrics import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         f"f = open({str(path)!r}, 'a'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
         "print('locked', flush=True); time.sleep(1.0)"], stdout=subprocess.PIPE, text=True)
    try:
        assert read_line(holder, 30).strip() == "locked"
        writer = threading.Thread(target=MetricsLog(path, enabled=True).write,
                                  args=({"kind": "step", "step": 1},))
        t0 = time.monotonic()
        writer.start()
        writer.join(timeout=0.4)
        assert writer.is_alive() and path.read_text() == ""  # waiting for the lock
        writer.join(timeout=10)
        assert not writer.is_alive() and time.monotonic() - t0 >= 0.5
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert read_metrics(path) == [{"kind": "step", "step": 1}]


@pytest.mark.slow
def test_a_second_training_into_a_busy_run_dir_is_refused(tiny_config, tmp_path: Path,
                                                          cli) -> None:
    """A requeued job and a manual resubmission, or a double submission: the second must
    not interleave its metrics with the first's or overwrite its checkpoints."""
    import time

    from conftest import end_tree, start_cli, stderr_of, steps

    run = tmp_path / "run"
    cfg = str(tiny_config(epochs=200))
    first = start_cli(["train", cfg, "--run-dir", str(run)])
    try:
        deadline = time.monotonic() + 120
        while not steps(run):
            assert first.poll() is None, stderr_of(first)
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = cli(["train", cfg, "--run-dir", str(run), "--auto-resume"])  # as sbatch
        assert second.returncode == 2, second.stderr
        assert "another training is writing to" in second.stderr
        assert f"pid {first.pid} on" in second.stderr
        assert not (run / "metrics.jsonl.prev").exists()  # the first's log left alone
        assert first.poll() is None  # and the first goes on
        n = len(steps(run))
        time.sleep(1.0)
        assert len(steps(run)) > n
    finally:
        end_tree(first)
    # Once the first has ended, however it ended, the directory is free again.
    again = cli(["train", cfg, "--run-dir", str(run), "--resume", "--set", "train.epochs=1"])
    assert "another training" not in again.stderr, again.stderr
