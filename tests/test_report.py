"""`hpc-multires report --out`: the path printed is the file written; bad paths are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpc_multires.errors import UserError
from hpc_multires.report import report


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run directory with the records `report` reads: a start and two epochs."""
    run = tmp_path / "run"
    run.mkdir()
    records = [{"kind": "start", "stage": "main", "wall_s": 0.5, "world_size": 2,
                "val_mae_mean_predictor": 0.3},
               {"kind": "epoch", "stage": "main", "level": 0, "epoch": 1, "wall_s": 2.0,
                "val_mae": 0.2, "samples_per_s": 100.0},
               {"kind": "epoch", "stage": "main", "level": 0, "epoch": 2, "wall_s": 4.0,
                "val_mae": 0.1, "samples_per_s": 110.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def plot_line(text: str) -> Path:
    return Path(text.splitlines()[-1].removeprefix("plot: "))


def test_default_and_explicit_paths_are_written(run: Path, tmp_path: Path) -> None:
    assert plot_line(report([run], None)) == run / "report.png"
    assert (run / "report.png").stat().st_size > 1000
    # A directory that does not exist yet is created; other formats matplotlib has work.
    out = tmp_path / "figures" / "compare.svg"
    assert plot_line(report([run], out)) == out and out.read_text().startswith("<?xml")


def test_a_path_without_suffix_prints_the_png_it_wrote(run: Path, tmp_path: Path) -> None:
    printed = plot_line(report([run], tmp_path / "compare"))
    assert printed == tmp_path / "compare.png" and printed.stat().st_size > 1000
    assert not (tmp_path / "compare").exists()


@pytest.mark.parametrize(("out", "fix"), [
    ("x.pnx", "end the path with .png"),
    (".", "pass a file path such as"),
    ("file/x.png", "pass a path in a directory you can write to"),  # `file` is a file
])
def test_bad_out_is_a_user_error(run: Path, tmp_path: Path, out: str, fix: str) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=fix) as err:
        report([run], tmp_path / out)
    assert "\n" not in str(err.value)


def test_bad_out_through_the_cli_is_one_line(cli_in_process, run: Path, tmp_path: Path) -> None:
    r = cli_in_process(["report", str(run), "--out", str(tmp_path / "x.pnx")])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"hpc-multires: error: --out '{tmp_path / 'x.pnx'}': '.pnx' is not")
    assert "end the path with .png" in line
    assert not (tmp_path / "x.pnx").exists()


@pytest.mark.slow
def test_the_table_says_which_runs_are_finished(cli, stopped_run, done_run, run: Path,
                                                tmp_path: Path) -> None:
    """A run stopped part way, or one that died, must not read like a finished one."""
    (done, cfg), (stopped, _) = done_run, stopped_run
    text = report([done, stopped, run], tmp_path / "r.png")
    status = {ln.split()[0]: ln.split()[1] for ln in text.splitlines()[1:-1]}
    assert status == {"done": "done", "stopped": "stopped", "run": "unfinished"}, text
    again = cli(["train", cfg, "--run-dir", str(stopped), "--resume"])
    assert again.returncode == 0
    assert "stopped  done" in report([stopped], tmp_path / "s.png")
    with pytest.raises(UserError, match="run directory .*nowhere not found"):
        report([tmp_path / "nowhere"], None)
