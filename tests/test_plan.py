"""Stage plans: resolution for a world size, waves, and clear errors for bad plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_multires.errors import ConfigError
from hpc_multires.plan.config import config_from_dict, config_to_toml, load_config
from hpc_multires.plan.stages import group_ranks, resolve

ROOT = Path(__file__).resolve().parents[1]


def plan(*stages: dict, groups: dict | None = None, **train: object) -> dict:
    return {"train": {"global_batch": 8, **train}, "groups": groups or {},
            "stages": list(stages)}


def test_method_configs_resolve() -> None:
    mrmf = resolve(load_config(ROOT / "configs" / "cosmoflow-mrmf.toml"), 4)
    assert [(s.name, s.level, s.ranks, s.wave) for s in mrmf] == [
        ("coarse2", 2, (0, 1), 0), ("coarse1", 1, (2, 3), 0), ("fine", 0, (0, 1, 2, 3), 1)]
    assert mrmf[2].train.epochs == 6 and mrmf[2].train.global_batch == 16  # inherited
    mrt = resolve(load_config(ROOT / "configs" / "cosmoflow-mrt.toml"), 4)
    assert [s.wave for s in mrt] == [0, 1]
    baseline = resolve(load_config(ROOT / "configs" / "cosmoflow-baseline.toml"), 2)
    assert [(s.name, s.ranks) for s in baseline] == [("main", (0, 1))]


def test_stage_train_overrides_and_round_trip(tmp_path: Path) -> None:
    cfg = config_from_dict(plan({"name": "a", "train": {"lr": 0.5}}, {"name": "b",
                                 "after": ["a"]}, lr=0.1, epochs=3))
    assert cfg.stages[0].train.lr == 0.5 and cfg.stages[0].train.epochs == 3
    assert cfg.stages[1].train.lr == 0.1
    (tmp_path / "c.toml").write_text(config_to_toml(cfg))
    assert load_config(tmp_path / "c.toml") == cfg


@pytest.mark.parametrize(("spec", "world", "ranks"), [
    ("0:1/2", 4, (0, 1)), ("1/2:end", 4, (2, 3)), ("0.25:0.75", 4, (1, 2)), ("2:4", 8, (2, 3)),
    ("0:1/2", 5, (0, 1)), ("1/2:end", 5, (2, 3, 4)),
])
def test_group_specs(spec: str, world: int, ranks: tuple[int, ...]) -> None:
    assert group_ranks("g", spec, world) == ranks


@pytest.mark.parametrize(("table", "message"), [
    (plan({"name": "a", "init": "fuse", "fuse_from": ["nope"]}),
     "depends on 'nope', which does not exist"),
    (plan({"name": "a", "init": "fuse", "fuse_from": ["b"]}, {"name": "b"}),
     "depends on 'b', which comes later in the plan"),
    (plan({"name": "a"}, {"name": "a"}), "used twice"),
    (plan({"name": "a", "group": "g"}), "group 'g' is not defined"),
    (plan({"name": "a", "init": "fuse"}), "needs fuse_from"),
    (plan({"name": "a"}, {"name": "b", "init": "fuse", "fuse_from": ["a"],
                          "fusion": "bottom-top"}), "takes two stages"),
    (plan({"name": "a"}, groups={"g": "half"}), "write START:END"),
    (plan({"name": "a"}, groups={"g": "x:2"}), "'x' is neither a rank count"),
    (plan({"name": "a", "train": {"epochs": 0}}), r"stages\[0\]\.train\.epochs = 0"),
    (plan({"name": "a"}, {"name": "b", "init": "fuse", "fuse_from": ["a"],
                          "fusion_keep": 1.5}), "fusion_keep = 1.5; use a value between 0"),
])
def test_bad_plans_fail_at_load(table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(table)


def test_overlapping_concurrent_groups() -> None:
    cfg = config_from_dict(plan({"name": "a", "group": "g1"}, {"name": "b", "group": "g2"},
                                groups={"g1": "0:3", "g2": "2:4"}, global_batch=6))
    with pytest.raises(ConfigError, match=r"'a' and 'b' both use ranks \[2\].*after = \['a'\]"):
        resolve(cfg, 4)
    # The same groups one after the other are fine.
    cfg = config_from_dict(plan({"name": "a", "group": "g1"},
                                {"name": "b", "group": "g2", "after": ["a"]},
                                groups={"g1": "0:3", "g2": "2:4"}, global_batch=6))
    assert [s.wave for s in resolve(cfg, 4)] == [0, 1]


def test_group_larger_than_the_world() -> None:
    cfg = config_from_dict(plan({"name": "a", "group": "g"}, groups={"g": "0:8"}))
    with pytest.raises(ConfigError, match="needs ranks up to 7, but the job has 4 ranks"):
        resolve(cfg, 4)
    cfg = config_from_dict(plan({"name": "a", "group": "g"}, groups={"g": "0:1/2"}))
    with pytest.raises(ConfigError, match="holds no rank on 1 ranks"):
        resolve(cfg, 1)


def test_batch_must_divide_by_the_stage_group() -> None:
    cfg = config_from_dict(plan({"name": "a", "group": "g", "train": {"global_batch": 9}},
                                groups={"g": "0:1/2"}))
    with pytest.raises(ConfigError, match="stage 'a': train.global_batch = 9 is not divisible "
                                          "by the 2 ranks"):
        resolve(cfg, 4)
