"""Full-Multiscale as a stage plan: coarsest level first, each finer level hot-started from
the previous one's weights (and optimizer), fewer steps per finer level, one learning-rate
schedule across the stages; a stage sized in steps."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hpc_multires.errors import ConfigError
from hpc_multires.plan.load import load_config

FMS = """
[[stages]]
name = "l2"
level = 2
[stages.train]
epochs = 2
schedule_epochs = 5

[[stages]]
name = "l1"
level = 1
init = "fuse"
fuse_from = ["l2"]
fusion = "transfer"
carry_optimizer = true
[stages.train]
epochs = 2
schedule_epochs = 5
schedule_offset = 2

[[stages]]
name = "l0"
level = 0
init = "fuse"
fuse_from = ["l1"]
fusion = "transfer"
carry_optimizer = true
[stages.train]
steps = 5
schedule_epochs = 5
schedule_offset = 4
"""


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_each_finer_stage_starts_from_the_coarser_ones_weights(cli, images_config,
                                                                tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = cli(["train", str(images_config(extra=FMS)), "--run-dir", str(run)])
    assert r.returncode == 0, r.stderr
    assert "l0           level 0  ranks 0       (all) batch 8 5 steps" in r.stderr
    stages = run / "stages"

    def load(*parts: str) -> dict:
        return torch.load(stages.joinpath(*parts), weights_only=False)

    # Hot start: a fused stage's initial weights are the previous stage's final ones.
    for coarse, fine in (("l2", "l1"), ("l1", "l0")):
        init, final = load(fine, "init.pt")["model"], load(coarse, "final.pt")["model"]
        assert init.keys() == final.keys()
        for k in init:
            assert torch.equal(init[k], final[k]), (fine, k)
    recs = records(run)
    starts = {r["stage"]: r for r in recs if r["kind"] == "start"}
    assert starts["l1"]["sample_shape"] == [1, 16, 16] and "start_val_psnr" in starts["l1"]
    # The optimizer runs on through the stages: AdamW's step count continues (4 steps per
    # epoch: 8 at level 2, 8 at level 1, then 5 at level 0).
    steps = {name: [r for r in recs if r["kind"] == "step" and r["stage"] == name]
             for name in ("l2", "l1", "l0")}
    assert [len(s) for s in steps.values()] == [8, 8, 5]
    adam = load("l0", "final.pt")["optimizer"]["state"][0]["step"]
    assert float(adam) == 21
    # One cosine schedule across the stages: the rate only falls, from the peak on.
    rates = [s["lr"] for name in ("l2", "l1", "l0") for s in steps[name]]
    assert rates[0] == pytest.approx(3e-3, rel=1e-3)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(rates))
    # A stage sized in steps: 5 steps of 4 per epoch, validated after its last one.
    epochs = [(r["epoch"], r["step"]) for r in recs if r["kind"] == "epoch"
              and r["stage"] == "l0"]
    assert epochs == [(1, 4), (2, 5)]


def test_carry_optimizer_needs_one_source_of_the_same_optimizer(images_config) -> None:
    cfg = images_config(extra=FMS)
    with pytest.raises(ConfigError, match="uses|same optimizer"):
        load_config(cfg, ["stages.l2.train.optimizer=sgd"])
    with pytest.raises(ConfigError, match="set init = \"fuse\""):
        load_config(images_config(extra='[[stages]]\nname = "a"\ncarry_optimizer = true\n'))


def test_the_shipped_image_plans() -> None:
    """The image configs train the baseline's network; the Full-Multiscale plan goes from the
    coarsest level to level 0, each stage a transfer from the one before with its optimizer,
    fewer epochs per finer level, at a lower cost than the
    baseline, on one learning-rate schedule."""
    from hpc_multires.plan.cost import plan_cost
    from hpc_multires.plan.stages import resolve

    root = Path(__file__).resolve().parents[1] / "configs"
    base = load_config(root / "images-baseline.toml")
    fms = load_config(root / "images-fullmultiscale.toml")
    mge = load_config(root / "images-mge.toml")
    assert base.model == fms.model == mge.model and base.model.name == "unet"
    # The same task, but Full-Multiscale corrupts each level with level 0's strength (the
    # hot start needs it) and the baseline and MGE keep the restricted corruption (MGE's
    # unbiasedness needs it; at level 0 alone the two are the same).
    assert fms.task.coarse_corruption == "level"
    assert base.task.coarse_corruption == mge.task.coarse_corruption == "restricted"
    assert base.task == replace(fms.task, coarse_corruption="restricted") == mge.task
    assert base.task.kind == "denoise"
    assert mge.train.estimator == "mge" and mge.train.mge_levels == 3
    stages = resolve(fms, 2)
    assert [s.level for s in stages] == [2, 1, 0]
    for coarse, fine in itertools.pairwise(stages):
        assert fine.config.fuse_from == (coarse.name,) and fine.config.fusion == "transfer"
        assert fine.config.carry_optimizer and fine.train.epochs < coarse.train.epochs
        assert fine.train.schedule_offset == coarse.train.schedule_offset + coarse.train.epochs
    assert stages[-1].train.schedule_offset + stages[-1].train.epochs \
        == stages[-1].train.schedule_epochs
    _, waves = plan_cost(stages, 2, 2)
    assert sum(waves.values()) < base.train.epochs
