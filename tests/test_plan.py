"""Stage plans: resolution for a world size, waves, and clear errors for bad plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_multires.errors import ConfigError
from hpc_multires.plan.cost import parse_level_costs, plan_cost
from hpc_multires.plan.load import config_from_dict, config_to_toml, load_config
from hpc_multires.plan.stages import describe_plan, group_ranks, resolve

ROOT = Path(__file__).resolve().parents[1]


def plan(*stages: dict, groups: dict | None = None, **train: object) -> dict:
    return {"train": {"global_batch": 8, **train}, "groups": groups or {},
            "stages": list(stages)}


def test_method_configs_resolve() -> None:
    mrmf = resolve(load_config(ROOT / "configs" / "cosmoflow-mrmf.toml"), 4)
    assert [(s.name, s.level, s.ranks, s.wave) for s in mrmf] == [
        ("coarse2", 2, (0, 1), 0), ("coarse1", 1, (2, 3), 0), ("fine", 0, (0, 1, 2, 3), 1)]
    assert mrmf[2].train.epochs == 8 and mrmf[2].train.global_batch == 16  # inherited
    mrt = resolve(load_config(ROOT / "configs" / "cosmoflow-mrt.toml"), 4)
    assert [s.wave for s in mrt] == [0, 1]
    baseline = resolve(load_config(ROOT / "configs" / "cosmoflow-baseline.toml"), 2)
    assert [(s.name, s.ranks) for s in baseline] == [("main", (0, 1))]
    # The fine stages run the last epochs of the baseline's own schedule and end where it
    # ends: the coarse stages stand in for the baseline's first epochs.
    base = baseline[0].train
    for fine in (mrmf[-1].train, mrt[-1].train):
        assert fine.schedule_epochs == base.epochs
        assert fine.schedule_offset + fine.epochs == base.epochs
        assert (fine.lr, fine.warmup_epochs) == (base.lr, 0)
    # The printed plan says where on the shared schedule each stage runs.
    lines = describe_plan(mrmf).splitlines()
    assert lines[-1].endswith("8 epochs (lr schedule epochs 5-12 of 12), average(coarse1, coarse2)")
    assert "lr schedule" not in lines[0]


def test_a_stage_sized_in_steps_says_only_where_its_schedule_starts() -> None:
    """How many schedule epochs 40 steps cover depends on the data's size: the printed plan
    gives the start, not an end computed from the unused `epochs`."""
    cfg = config_from_dict(plan({"name": "fine", "train": {
        "steps": 40, "epochs": 3, "schedule_epochs": 12, "schedule_offset": 4}}))
    line = describe_plan(resolve(cfg, 1)).splitlines()[-1]
    assert "40 steps (lr schedule from epoch 5 of 12)" in line, line


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_resolves(path: Path) -> None:
    cfg = load_config(path)
    # 4 ranks, or one per sub-domain for domain decomposition (2x2x2 needs 8)
    assert resolve(cfg, max(4, cfg.domain.count if cfg.domain.on else 0))


def test_level_consistent_method_shares_its_baselines_network_and_one_schedule() -> None:
    for method in sorted((ROOT / "configs").glob("*-level.toml")):
        app = method.name.split("-")[0]
        base = load_config(ROOT / "configs" / f"{app}-baseline-level.toml")
        cfg = load_config(method)
        assert cfg.model == base.model and cfg.model.kernel_level > 0
        stages = {s.name: s for s in resolve(cfg, 4)}
        assert len({s.train.schedule_epochs for s in stages.values()}) == 1
        # A fused stage goes on where the stage it continues (its first source) ended.
        for s in stages.values():
            if s.config.init == "fuse":
                src = stages[s.config.fuse_from[0]].train
                assert s.train.schedule_offset == src.schedule_offset + src.epochs


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


@pytest.mark.parametrize("spec", ["-1:2", "-2:-1", "0:-1", "-3:end", "-1/2:1/2"])
def test_negative_group_bounds_are_refused(spec: str) -> None:
    # range() takes negative bounds, and (-1, 0, 1) would reach the collectives as ranks.
    with pytest.raises(ConfigError, match=f"groups.g = '{spec}': .* is negative"):
        group_ranks("g", spec, 4)


def test_every_accepted_group_lies_inside_the_world() -> None:
    bounds = ["0", "1", "2", "3", "4", "5", "1/4", "1/3", "1/2", "0.75", "1", "end"]
    accepted = 0
    for world in (1, 2, 3, 4, 5):
        for start in bounds:
            for end in bounds:
                try:
                    ranks = group_ranks("g", f"{start}:{end}", world)
                except ConfigError:
                    continue
                accepted += 1
                assert ranks and all(0 <= r < world for r in ranks), (start, end, world)
    assert accepted > 100  # the walk covered real groups, not only refusals


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
    (plan({"name": "a", "train": {"epochs": 0}}), r"stages\.a\.train\.epochs = 0"),
    (plan({"name": "a"}, {"name": "b", "init": "fuse", "fuse_from": ["a"],
                          "fusion_keep": 1.5}), "fusion_keep = 1.5; use a value between 0"),
    (plan({"name": "a"}, groups={"g": "-1:2"}), "'-1' is negative; ranks count from 0"),
    (plan({"name": "a"}, groups={"g": "-2:-1"}), "'-2' is negative"),
    (plan({"name": "a"}, groups={"g": "0:-1"}), "'-1' is negative"),
    (plan({"name": "a"}, groups={"g": "-1/2:end"}), "'-1/2' is negative"),
    (plan({"name": "a"}, groups={"g": "1/0:end"}), "'1/0' is neither a rank count"),
    # Fusion settings that only the consuming stage would trip over, after the earlier
    # stages have trained: refused when the config is loaded.
    *[(plan({"name": "a"}, {"name": "b"},
            {"name": "c", "init": "fuse", "fuse_from": ["a", "b"], "fusion": "average",
             "fusion_weights": weights}),
       r"stage 'c': fusion_weights = .*finite weight >= 0.*not all 0")
      for weights in ([1, -1], [0, 0], [float("nan"), 1], [float("inf"), 1])],
    (plan({"name": "fine"}, {"name": "coarse", "level": 1, "init": "fuse",
                             "fuse_from": ["fine"], "fusion": "prolong"}),
     "fusion 'prolong' moves a model to a finer level, but 'fine' is on level 0"),
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


def _mrmf_neuron() -> list:
    return resolve(load_config(ROOT / "configs" / "neuron-mrmf.toml"), 4)


def test_plan_cost_in_level0_epochs() -> None:
    # coarse2 (level 2) and coarse1 (level 1) each on half of 4 ranks, 6 epochs, side by
    # side; fused1 1 epoch at level 1 on all; fine 6 epochs at level 0 on all.
    costs, waves = plan_cost(_mrmf_neuron(), 4, spatial_dims=1)
    assert [(c.name, c.per_epoch) for c in costs] == [
        ("coarse2", 0.5), ("coarse1", 1.0), ("fused1", 0.5), ("fine", 1.0)]
    assert waves == {0: 6.0, 1: 0.5, 2: 6.0}  # a wave lasts as long as its longest stage
    _, waves3d = plan_cost(_mrmf_neuron(), 4, spatial_dims=3)  # 8x less work per level
    assert waves3d == {0: 1.5, 1: 0.125, 2: 6.0}
    # Measured epoch-time ratios replace the ideal 2^-d per level.
    _, measured = plan_cost(_mrmf_neuron(), 4, 1, {1: 0.73, 2: 0.6})
    assert sum(measured.values()) == pytest.approx(6 * 0.73 * 2 + 0.73 + 6)
    # Ranks on the same cores: concurrent stages add up, whatever their group sizes.
    _, shared = plan_cost(_mrmf_neuron(), 4, 1, shared=True)
    assert shared == {0: 6 * 0.25 + 6 * 0.5, 1: 0.5, 2: 6.0}
    baseline = resolve(load_config(ROOT / "configs" / "neuron-baseline.toml"), 4)
    assert sum(plan_cost(baseline, 4, 1)[1].values()) == 10.0


def test_plan_cost_scales_with_the_group_and_marks_time_budgets() -> None:
    cfg = config_from_dict(plan(
        {"name": "a", "level": 1, "group": "one", "train": {"epochs": 2, "global_batch": 8}},
        {"name": "b", "after": ["a"], "train": {"epochs": 3, "time_budget_s": 60}},
        groups={"one": "0:1"}))
    costs, waves = plan_cost(resolve(cfg, 4), 4, spatial_dims=2)
    # A level-1 2D epoch is a quarter of the work, on a quarter of the ranks.
    assert (costs[0].per_epoch, costs[0].capped) == (1.0, False)
    assert (costs[1].total, costs[1].capped) == (3.0, True)
    assert waves == {0: 2.0, 1: 3.0}


@pytest.mark.parametrize("text", ["1", "0=0.5", "1=-2", "a=b", "1=0.5,2"])
def test_level_cost_option_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="LEVEL=COST pairs"):
        parse_level_costs(text)
    assert parse_level_costs("1=0.73, 2=0.6") == {1: 0.73, 2: 0.6}


@pytest.mark.parametrize("text", ["1=inf", "1=1e400", "1=nan", "1=0.3,1=0.9"])
def test_level_cost_refuses_infinite_and_repeated(text: str) -> None:
    with pytest.raises(ConfigError, match="--level-cost"):
        parse_level_costs(text)
