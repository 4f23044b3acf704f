"""Per-level batch and learning-rate rules (train.batch_scale, batch_cap, lr_scale,
lr_scale_warmup_steps) and validation that costs what it tells (train.eval_every,
eval_samples, eval_s): the rules as pure functions, their checks, `plan`'s table, and a
two-rank plan whose coarse stage trains on a scaled batch, resumed inside that stage."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from hpc_multires.errors import ConfigError
from hpc_multires.plan.compat import config_changes
from hpc_multires.plan.load import config_from_dict, config_to_dict, load_config
from hpc_multires.plan.stages import apply_level_rules, resolve
from hpc_multires.report import summarize, table
from hpc_multires.train.config import TrainConfig
from hpc_multires.train.optim import learning_rate
from hpc_multires.train.scaling import data_factor, level_scale, warmup_factor

ROOT = Path(__file__).resolve().parents[1]


def one_error(result) -> str:  # type: ignore[no-untyped-def]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("hpc-multires: error:")]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# ---------------------------------------------------------------- the rules


def test_data_rule_keeps_the_points_per_step_up_to_the_cap() -> None:
    assert data_factor(32**3, 8**3) == 64 and data_factor(1600, 800) == 2  # 3D level 2, 1D
    base = TrainConfig(global_batch=16, lr=1e-3)
    assert level_scale(base, 64).batch == 16  # batch_scale = "none": today's behaviour
    data = TrainConfig(global_batch=16, lr=1e-3, batch_scale="data")
    s = level_scale(data, 8)
    assert (s.batch, s.lr, s.batch_factor, s.capped) == (128, 1e-3, 8.0, False)
    assert level_scale(data, 1).batch == 16  # level 0 is never scaled
    capped = TrainConfig(global_batch=16, lr=1e-3, batch_scale="data", batch_cap=64,
                         lr_scale="sqrt")
    s = level_scale(capped, 64)
    assert (s.batch, s.batch_factor, s.capped) == (64, 4.0, True)
    assert s.lr == pytest.approx(2e-3) and s.lr_factor == pytest.approx(2.0)
    linear = TrainConfig(global_batch=16, lr=1e-3, batch_scale="data", lr_scale="linear")
    assert level_scale(linear, 8).lr == pytest.approx(8e-3)


def test_scaled_rate_warms_up_from_the_unscaled_one() -> None:
    t = TrainConfig(global_batch=16, lr=4e-3, schedule="constant", batch_scale="data",
                    lr_scale="linear", lr_scale_warmup_steps=10)
    rates = [learning_rate(t, step, 100, 10, lr_factor=4.0) for step in range(12)]
    assert rates[0] == pytest.approx(1e-3)  # the configured (unscaled) rate
    assert rates[5] == pytest.approx(1e-3 + 0.5 * 3e-3)
    assert rates[10] == rates[11] == pytest.approx(4e-3)
    assert all(a < b for a, b in itertools.pairwise(rates[:11]))
    # An unscaled stage, or one without warm-up, follows its schedule alone.
    assert warmup_factor(t, 1.0, 0) == 1.0
    no_warmup = TrainConfig(lr=4e-3, schedule="constant", batch_scale="data", lr_scale="sqrt")
    assert learning_rate(no_warmup, 0, 100, 10, lr_factor=2.0) == pytest.approx(4e-3)


@pytest.mark.parametrize(("train", "fix"), [
    ({"batch_scale": "data", "batch_cap": 8}, "batch_cap = 8: use 0 (no cap) or a batch of "
                                              "at least global_batch = 16"),
    ({"batch_cap": 64}, "set batch_scale = \"data\" or leave batch_cap at 0"),
    ({"lr_scale": "sqrt"}, "set batch_scale = \"data\" or lr_scale = \"none\""),
    ({"batch_scale": "data", "lr_scale": "linear", "lr_scale_warmup_steps": -1},
     "lr_scale_warmup_steps = -1: use 0"),
    ({"eval_every": 0}, "eval_every = 0: use 1 (validate every epoch)"),
    ({"eval_samples": -5}, "eval_samples = -5: use 0 (the whole validation set)"),
    ({"batch_scale": "pixels"}, "is not one of 'none' | 'data'"),
])
def test_bad_rules_are_one_error_naming_the_fix(train: dict, fix: str) -> None:
    with pytest.raises(ConfigError, match=None) as e:
        config_from_dict({"train": {"global_batch": 16, **train}})
    assert fix in str(e.value) and "\n" not in str(e.value)


def staged(**train: object) -> list:
    cfg = config_from_dict({"model": {"head": "gap"},
                            "train": {"global_batch": 8, "batch_scale": "data", **train},
                            "stages": [{"name": "coarse", "level": 2},
                                       {"name": "fine", "level": 0, "init": "fuse",
                                        "fuse_from": ["coarse"]}]})
    return [cfg, resolve(cfg, 4)]


def test_a_scaled_batch_must_fit_the_ranks_and_the_training_set() -> None:
    def spatial(level: int) -> tuple[int, ...]:
        return (16 >> level,) * 3

    cfg, stages = staged(batch_cap=64)
    coarse, fine = apply_level_rules(cfg, stages, spatial, 1000)
    assert (coarse.train.global_batch, fine.train.global_batch) == (64, 8)
    assert coarse.config.train.global_batch == 64 and cfg.stages[0].train.global_batch == 8
    cfg, stages = staged(batch_cap=30)  # binds, and 4 ranks do not divide it
    with pytest.raises(ConfigError) as e:
        apply_level_rules(cfg, stages, spatial, 1000)
    assert "stages.coarse.train.batch_cap = 30" in str(e.value)
    assert "multiple of 4 (e.g. 28 or 32)" in str(e.value)
    cfg, stages = staged()  # 8 x 64 = 512 > 300 training samples
    with pytest.raises(ConfigError) as e:
        apply_level_rules(cfg, stages, spatial, 300)
    assert "gives a global batch of 512 at level 2 (8 x 64), more than the 300" in str(e.value)
    assert "--set stages.coarse.train.batch_cap=300" in str(e.value)


def test_resume_may_change_the_validation_but_not_the_rules() -> None:
    cfg, _ = staged(batch_cap=64)
    saved = config_to_dict(cfg)
    for key, value in (("eval_every", 4), ("eval_samples", 100)):
        other = config_to_dict(cfg)
        other["stages"][0]["train"][key] = value
        assert config_changes(saved, other) == []
    for key, value in (("batch_cap", 32), ("lr_scale", "sqrt"), ("batch_scale", "none")):
        other = config_to_dict(cfg)
        other["stages"][0]["train"][key] = value
        assert config_changes(saved, other) == [f"stages.0.train.{key}"]


def test_report_shows_the_validation_time(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    records = [{"kind": "start", "stage": "main", "wall_s": 0.5, "world_size": 1},
               {"kind": "epoch", "stage": "main", "level": 0, "epoch": 1, "wall_s": 2.0,
                "train_s": 1.5, "eval_s": 0.0},
               {"kind": "epoch", "stage": "main", "level": 0, "epoch": 2, "wall_s": 4.0,
                "train_s": 3.0, "eval_s": 0.25, "val_mae": 0.1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row = summarize(run)
    assert row["eval_s"] == 0.25 and row["final"] == 0.1
    header, line = table([row]).splitlines()
    assert header.split()[6] == "eval_s" and line.split()[6] == "0.25"


# ---------------------------------------------------------------- the shipped plans


def test_three_level_mrt_plans() -> None:
    cfg = load_config(ROOT / "configs" / "cosmoflow-mrt3.toml")
    stages = resolve(cfg, 4)
    assert [(s.level, s.train.epochs) for s in stages] == [(2, 16), (1, 8), (0, 5)]
    base = load_config(ROOT / "configs" / "cosmoflow-baseline.toml")
    assert cfg.model == base.model and cfg.train.global_batch == base.train.global_batch
    coarse2, coarse1, fine = apply_level_rules(cfg, stages, lambda k: (32 >> k,) * 3, 896)
    # Coarse epochs take fewer, fuller steps; the fine stage is the baseline's.
    assert coarse2.train.global_batch == coarse1.train.global_batch == 64  # both capped
    assert coarse2.scale is not None and coarse2.scale.capped and coarse2.lr_factor == 2.0
    assert fine.train.global_batch == 16 and fine.train.lr == base.train.lr
    assert fine.config.init == "fuse" and fine.config.fuse_from == ("coarse1",)
    # The Neuron Inverter's (1D, flatten head: each stage prolonged to the next level).
    neuron = load_config(ROOT / "configs" / "neuron-mrt3.toml")
    coarse2, coarse1, fine = apply_level_rules(neuron, resolve(neuron, 4),
                                               lambda k: (1600 >> k,), 3584)
    assert [(s.level, s.train.global_batch) for s in (coarse2, coarse1, fine)] == [
        (2, 128), (1, 64), (0, 32)]
    assert {s.config.fusion for s in (coarse1, fine)} == {"prolong"}


# ---------------------------------------------------------------- through the CLI

PLAN = """
[run]
name = "levels"
seed = 1

[data]
path = "{data}"
val_fraction = 0.25
num_workers = 0

[model]
width = 0.125
depth = 2
head = "gap"
fc_sizes = [32]

[train]
epochs = 2
global_batch = 8
lr = 2e-3
batch_scale = "data"
batch_cap = 24
lr_scale = "sqrt"
lr_scale_warmup_steps = 2
checkpoint_every_steps = 2
checkpoint_keep = 10

[log]
every_steps = 1

[[stages]]
name = "coarse"
level = 1
[stages.train]
epochs = 3
eval_every = 2
eval_samples = 10

[[stages]]
name = "fine"
level = 0
init = "fuse"
fuse_from = ["coarse"]
"""


@pytest.fixture
def plan_config(pyramid_data: Path, tmp_path: Path) -> Path:
    path = tmp_path / "levels.toml"
    path.write_text(PLAN.format(data=pyramid_data))
    return path


def test_plan_shows_each_stage_as_it_trains(cli_in_process, plan_config: Path) -> None:
    out = cli_in_process(["plan", plan_config, "--ranks", "2"])
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()
            if line.startswith("    coarse ") or line.startswith("    fine ")}
    # 72 training samples. Level 1 of 16^3 samples: 8 x 8 = 64, capped at 24, 3 steps per
    # epoch, the rate x sqrt(3); level 0 as configured, 9 steps. Cost: 3 x 1/8, 2 x 1.
    assert " ".join(rows["coarse"]) == ("coarse 1 0-1 24 (x3, capped) 0.00346 (sqrt x1.73, "
                                        "warm-up 2 steps) 3 3 0.38")
    assert " ".join(rows["fine"]) == "fine 0 0-1 8 0.002 9 2 2.00"
    line = one_error(cli_in_process(["plan", plan_config, "--ranks", "2", "--set",
                                     "train.batch_cap=0", "--set", "stages.coarse.level=2"]))
    assert "gives a global batch of 512 at level 2 (8 x 64), more than the 72 training " \
        "samples; set stages.coarse.train.batch_cap to at most 72" in line


def records(run: Path, kind: str, stage: str | None = None) -> list[dict]:
    out = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in out if r["kind"] == kind and stage in (None, r["stage"])]


@pytest.mark.slow
@pytest.mark.mpi
def test_a_scaled_stage_trains_validates_and_resumes_exactly(cli, plan_config: Path,
                                                             tmp_path: Path) -> None:
    """Two ranks. The coarse stage trains on the scaled batch and rate; it validates at
    epochs 2 (subset) and 3 (its last: whole), not 1, its validation timed apart. A run
    that lost everything after the checkpoint at step 4 of that stage resumes from it and
    ends as the straight run does, bit for bit."""
    cfg = str(plan_config)
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    a = cli(["train", cfg, "--run-dir", str(straight)], ranks=2, timeout=240)
    assert a.returncode == 0, a.stderr

    start = records(straight, "start", "coarse")[0]
    assert (start["global_batch"], start["local_batch"], start["steps_per_epoch"]) == (24, 12, 3)
    lrs = [r["lr"] for r in records(straight, "step", "coarse")]
    assert lrs[0] == pytest.approx(2e-3)  # warm-up starts at the configured rate
    # Past the warm-up: the cosine schedule of 9 steps on 2e-3 x sqrt(3) (at step 2 of 9).
    assert lrs[2] == pytest.approx(2e-3 * math.sqrt(3)
                                   * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert records(straight, "start", "fine")[0]["global_batch"] == 8

    epochs = records(straight, "epoch", "coarse")
    assert "val_mae" not in epochs[0] and epochs[0]["eval_s"] == 0.0
    assert [e.get("val_samples") for e in epochs] == [None, 10, 24]
    assert all(e["eval_s"] > 0 for e in epochs[1:])
    spent = 0.0
    for e in epochs:  # train_s leaves the validation out, and samples/s is counted on it
        spent += e["eval_s"]
        assert e["train_s"] > 0 and e["train_s"] + spent <= e["wall_s"] - start["wall_s"]
        assert e["samples_per_s"] == pytest.approx(e["step"] * 24 / e["train_s"])
    fine = records(straight, "epoch", "fine")
    assert all("val_mae" in e for e in fine)  # eval_every is the coarse stage's alone
    assert records(straight, "start", "fine")[0]["start_eval_s"] > 0

    shutil.copytree(straight, crashed)
    coarse = crashed / "stages" / "coarse"
    kept = "epoch-0002-step-00000004.pt"
    assert kept in {p.name for p in (coarse / "checkpoints").iterdir()}
    for p in (coarse / "checkpoints").iterdir():
        if p.name != kept:
            p.unlink()
    (coarse / "final.pt").unlink()
    shutil.rmtree(crashed / "stages" / "fine")
    # A resume that changes a rule is refused, naming the key; the validation may change.
    bad = cli(["train", cfg, "--run-dir", str(crashed), "--resume", "--set",
               "train.batch_cap=16"])
    assert one_error(bad) and "train.batch_cap" in bad.stderr
    b = cli(["train", cfg, "--run-dir", str(crashed), "--resume", "--set",
             "stages.coarse.train.eval_samples=12"], ranks=2, timeout=240)
    assert b.returncode == 0, b.stderr
    assert f"resumed from {kept}" in b.stderr
    sa, sb = records(straight, "step"), records(crashed, "step")
    assert [(r["stage"], r["step"]) for r in sb] == [(r["stage"], r["step"]) for r in sa]
    assert [r["loss"] for r in sb] == [r["loss"] for r in sa]
    assert [r["lr"] for r in sb] == [r["lr"] for r in sa]
    # The checkpoint kept the validation time of the epochs before it.
    assert records(crashed, "epoch", "coarse")[-1]["train_s"] > 0
    for stage in ("coarse", "fine"):
        fa = torch.load(straight / "stages" / stage / "final.pt", weights_only=False)["model"]
        fb = torch.load(crashed / "stages" / stage / "final.pt", weights_only=False)["model"]
        for k in fa:
            assert torch.equal(fa[k], fb[k]), (stage, k)
    assert math.isfinite(records(crashed, "epoch", "fine")[-1]["val_mae"])
