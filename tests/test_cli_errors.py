"""Bad input through the real command line: one clear line, exit status 2, nothing lost."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_arrays_store


@pytest.fixture
def cli(cli_in_process):  # type: ignore[no-untyped-def]
    """Every command here ends early: run it in this process (conftest.cli_in_process)."""
    return cli_in_process


def one_error(result) -> str:  # type: ignore[no-untyped-def]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("hpc-multires: error:")]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def copy_store(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for shard in src.glob("shard-*.h5"):
        (dst / shard.name).write_bytes(shard.read_bytes())
    return dst


def test_missing_dataset(cli, tiny_config, tmp_path: Path) -> None:
    line = one_error(cli(["train", str(tiny_config(data=tmp_path / "nowhere"))]))
    assert "not found" in line and "--set data.path=DIR" in line


def test_missing_config(cli, tmp_path: Path) -> None:
    assert "config file" in one_error(cli(["train", str(tmp_path / "c.toml")]))


def test_config_typo(cli, tiny_config) -> None:
    line = one_error(cli(["train", str(tiny_config()), "--set", "train.lr_rate=0.1"]))
    assert "unknown config key 'train.lr_rate'" in line


def test_truncated_shard(cli, tiny_config, tiny_cosmo: Path, tmp_path: Path) -> None:
    data = copy_store(tiny_cosmo, tmp_path / "d")
    shard = data / "shard-00002.h5"
    shard.write_bytes(shard.read_bytes()[:5000])
    line = one_error(cli(["train", str(tiny_config(data=data))]))
    assert "shard-00002.h5 is not a readable HDF5 file" in line and "truncated" in line


def test_wrong_sample_shape_for_the_model(cli, tiny_config, tmp_path: Path) -> None:
    data = write_arrays_store(tmp_path / "images", np.zeros((16, 1, 8, 8), np.float32),
                              np.zeros((16, 1), np.float32))
    assert "takes 3D samples" in one_error(cli(["train", str(tiny_config(data=data))]))


@pytest.mark.slow
def test_nan_in_a_sample(cli, tiny_config, tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(32, 1, 8, 8, 8)).astype(np.float32)
    data = write_arrays_store(tmp_path / "nan", x, np.zeros((32, 1), np.float32), per_shard=16)
    with h5py.File(data / "shard-00001.h5", "r+") as f:
        f["x"][3, 0, 0, 0, 0] = np.nan  # sample 19
    cfg = tiny_config(data=data)
    line = one_error(cli(["train", str(cfg), "--set", "model.depth=2", "--set",
                          "data.val_fraction=0.5"]))
    assert "sample 19 (shard-00001.h5, row 3) holds NaN" in line


def test_convert_reports_bad_arrays(cli, tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.zeros((4, 8)), y=np.zeros((4, 1)))  # no channel axis
    line = one_error(cli(["data", "convert", "--x", str(tmp_path / "a.npz"),
                          "--out", str(tmp_path / "o")]))
    assert "inputs must be (N, C, *spatial)" in line


def test_synth_refuses_to_overwrite(cli, tiny_cosmo: Path) -> None:
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tiny_cosmo.iterdir())
    line = one_error(cli(["data", "synth", "cosmoflow", "--out", str(tiny_cosmo),
                          "--samples", "8", "--size", "8"]))
    assert "--overwrite" in line
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tiny_cosmo.iterdir()) == before


def test_plan_needs_a_level_the_data_lacks(cli, tiny_config, tmp_path: Path) -> None:
    cfg = tmp_path / "plan.toml"
    cfg.write_text(tiny_config().read_text() + '\n[[stages]]\nname = "coarse"\nlevel = 2\n')
    line = one_error(cli(["train", str(cfg)]))
    assert "no complete pyramid level 2" in line and "data pyramid" in line and "--levels 2" in line


def test_missing_levels_name_the_highest(cli, tiny_config, tmp_path: Path) -> None:
    # Level 1 comes first in the plan; the fix offered must build level 2 as well.
    cfg = tmp_path / "plan.toml"
    cfg.write_text(tiny_config().read_text() + '\n[[stages]]\nname = "c1"\nlevel = 1\n'
                   '\n[[stages]]\nname = "c2"\nlevel = 2\nafter = ["c1"]\n')
    for command in (["train", str(cfg)], ["plan", str(cfg), "--ranks", "2"]):
        line = one_error(cli(command))
        assert "no complete pyramid level 2" in line and "--levels 2" in line, command


def test_plan_checks_without_running(cli, tiny_cosmo: Path, tiny_config,
                                     tmp_path: Path) -> None:
    data = copy_store(tiny_cosmo, tmp_path / "data")
    assert cli(["data", "pyramid", str(data), "--levels", "1"]).returncode == 0
    cfg = tmp_path / "plan.toml"
    text = tiny_config(data=data).read_text().replace("[train]", '[groups]\nhalf = "0:1/2"\n\n'
                                                      "[train]")
    cfg.write_text(text + '\n[[stages]]\nname = "coarse"\nlevel = 1\ngroup = "half"\n'
                   '\n[[stages]]\nname = "fine"\ninit = "fuse"\nfuse_from = ["coarse"]\n'
                   'fusion = "transfer"\n')
    before = sorted(tmp_path.iterdir())
    out = cli(["plan", str(cfg), "--ranks", "2"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    # 2 coarse epochs of 1/8 the work on half the ranks, then 2 fine epochs: 0.5 + 2.
    assert "coarse 2 x 0.25 = 0.50" in out.stdout and "total 2.50" in out.stdout
    assert sorted(tmp_path.iterdir()) == before  # nothing trained, no run directory
    line = one_error(cli(["plan", str(cfg), "--ranks", "3"]))
    assert "not divisible by the 3 ranks" in line
    line = one_error(cli(["plan", str(cfg), "--ranks", "2", "--set", "train.epochz=3"]))
    assert "did you mean 'train.epochs'" in line


def test_set_shadowed_by_every_stage(cli) -> None:
    # Both stages of the MRT config set their own epochs: train.epochs=3 would be ignored.
    line = one_error(cli(["plan", "configs/cosmoflow-mrt.toml", "--ranks", "1",
                          "--set", "train.epochs=3"]))
    assert "every stage sets its own train.epochs" in line
    assert "--set stages.coarse1.train.epochs=3" in line


def test_bad_group_and_fusion_weights_fail_before_anything_runs(cli, tiny_config,
                                                                tmp_path: Path) -> None:
    cfg = tmp_path / "plan.toml"
    cfg.write_text(tiny_config().read_text().replace("[train]", '[groups]\ng = "-1:2"\n\n[train]')
                   + '\n[[stages]]\nname = "a"\ngroup = "g"\n')
    assert "'-1' is negative" in one_error(cli(["plan", str(cfg), "--ranks", "2"]))
    cfg.write_text(tiny_config().read_text() + '\n[[stages]]\nname = "a"\n'
                   '\n[[stages]]\nname = "b"\nafter = ["a"]\n'
                   '\n[[stages]]\nname = "c"\ninit = "fuse"\nfuse_from = ["a", "b"]\n'
                   'fusion = "average"\nfusion_weights = [1, -1]\n')
    line = one_error(cli(["train", str(cfg), "--run-dir", str(tmp_path / "run")]))
    assert "stage 'c': fusion_weights = [1.0, -1.0]" in line
    assert not (tmp_path / "run").exists()


def test_bottom_layers_beyond_the_model_fail_before_anything_trains(cli, tiny_config,
                                                                    tmp_path: Path) -> None:
    cfg = tmp_path / "plan.toml"
    cfg.write_text(tiny_config().read_text() + '\n[[stages]]\nname = "a"\n'
                   '\n[[stages]]\nname = "b"\nafter = ["a"]\n'
                   '\n[[stages]]\nname = "c"\ninit = "fuse"\nfuse_from = ["a", "b"]\n'
                   'fusion = "bottom-top"\nbottom_layers = 99\n')
    line = one_error(cli(["plan", str(cfg), "--ranks", "1"]))
    assert "stage 'c': bottom_layers = 99" in line and "use 1 to" in line
    line = one_error(cli(["train", str(cfg), "--run-dir", str(tmp_path / "run")]))
    assert "stage 'c': bottom_layers = 99" in line
    assert not (tmp_path / "run").exists()  # stages a and b never trained
    # A run directory made beforehand (by a batch script, say) stays, as it was: empty.
    (tmp_path / "made").mkdir()
    line = one_error(cli(["train", str(cfg), "--run-dir", str(tmp_path / "made")]))
    assert "bottom_layers = 99" in line
    assert list((tmp_path / "made").iterdir()) == []


def test_plan_refuses_a_global_batch_larger_than_the_training_set(cli, tiny_config) -> None:
    # 96 samples, a quarter held out: 72 to train on.
    line = one_error(cli(["plan", str(tiny_config()), "--ranks", "1",
                          "--set", "train.global_batch=80"]))
    assert "the training set has 72 samples, fewer than its global batch 80" in line


def test_an_output_directory_that_cannot_be_made_is_one_line(cli, tiny_config,
                                                             tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = one_error(cli(["data", "synth", "cosmoflow", "--out", str(blocker / "data"),
                          "--samples", "8", "--size", "16"]))
    assert "cannot create --out" in line and "choose a directory you can write" in line
    line = one_error(cli(["train", str(tiny_config()), "--run-dir", str(blocker / "run")]))
    assert "cannot write to --run-dir" in line


def test_an_interrupted_dataset_write_is_named_as_such(cli, tmp_path: Path) -> None:
    """A `data synth` killed part way leaves shards; the directory says it is incomplete,
    so the next command does not take it for a finished dataset."""
    import subprocess
    import sys
    import time

    from conftest import ROOT, run_env

    out = tmp_path / "d"
    writer = subprocess.Popen([sys.executable, "-m", "hpc_multires", "data", "synth",
                               "cosmoflow", "--out", str(out), "--samples", "2000", "--size",
                               "32", "--samples-per-shard", "4"], cwd=ROOT, env=run_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "shard-00001.h5").exists():
            assert writer.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert 2 <= len(list(out.glob("shard-*.h5"))) < 500  # part of the dataset
    line = one_error(cli(["data", "inspect", str(out)]))
    assert "is incomplete" in line and "--overwrite" in line
    line = one_error(cli(["data", "synth", "cosmoflow", "--out", str(out), "--samples", "16",
                          "--size", "16"]))
    assert "holds an incomplete dataset" in line
    assert cli(["data", "synth", "cosmoflow", "--out", str(out), "--samples", "16", "--size",
                "16", "--overwrite"]).returncode == 0
    assert cli(["data", "inspect", str(out)]).returncode == 0


def test_a_lost_peer_is_told_in_one_line_whichever_way_gloo_reports_it() -> None:
    """A gloo timeout closes every pair, so the collective that fails may report the
    closure rather than its own timeout; both are a stalled or dead rank, not a bug."""
    from hpc_multires.cli.main import _lost_peer

    for text in ("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms "
                 "for recv operation to complete",
                 "Application timeout caused pair closure",
                 "[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]"):
        line = _lost_peer(RuntimeError(text))
        assert line is not None and line.startswith("a collective across ranks failed"), text
        assert "comm.timeout_s" in line and "gloo/transport" not in line
    assert _lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert _lost_peer(ValueError("Timed out waiting")) is None
