"""Config: TOML -> typed dataclasses, overrides, and errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_multires.errors import ConfigError
from hpc_multires.plan.config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_to_toml,
    field_docs,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_loads_and_round_trips(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "cosmoflow-demo.toml")
    assert cfg.model.width == 0.25 and cfg.train.global_batch == 16
    saved = tmp_path / "resolved.toml"
    saved.write_text(config_to_toml(cfg))
    assert load_config(saved) == cfg


def test_overrides_parse_toml_values_and_bare_strings() -> None:
    cfg = apply_overrides(Config(), ["train.epochs=7", "data.path=/scratch/my data",
                                     "model.fc_sizes=[32, 16]", "train.lr=0.5"])
    assert cfg.train.epochs == 7
    assert cfg.data.path == "/scratch/my data"
    assert cfg.model.fc_sizes == (32, 16)
    assert cfg.train.lr == 0.5


@pytest.mark.parametrize(("table", "message"), [
    ({"train": {"epocs": 3}}, "unknown config key 'train.epocs'; did you mean 'train.epochs'"),
    ({"trian": {}}, "unknown config key 'trian'; did you mean 'train'"),
    ({"train": {"epochs": "3"}}, "train.epochs = '3': expected an integer"),
    ({"train": {"optimizer": "adma"}}, "did you mean 'adam'"),
    ({"train": {"lr": -1.0}}, "train.lr = -1.0: use a positive learning rate"),
    ({"model": {"pool": 0}}, "model.pool = 0: use a pooling factor"),
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction"),
    ({"model": {"fc_sizes": 5}}, "expected a list"),
])
def test_errors_name_key_and_fix(table: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(table)
    assert message in str(err.value)


def test_global_batch_must_divide_by_ranks() -> None:
    from hpc_multires.plan.stages import resolve

    cfg = config_from_dict({"train": {"global_batch": 10}})
    resolve(cfg, 5)
    with pytest.raises(ConfigError, match="not divisible by the 4 ranks.*global_batch=8 or 12"):
        resolve(cfg, 4)


def test_bad_set_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(Config(), ["epochs=3"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_every_field_is_documented() -> None:
    from dataclasses import fields, is_dataclass

    from hpc_multires.plan.config import StageConfig

    classes = [type(getattr(Config(), f.name)) for f in fields(Config)
               if is_dataclass(getattr(Config(), f.name))]
    for cls in [*classes, StageConfig]:
        docs = field_docs(cls)
        missing = [f.name for f in fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    top = field_docs(Config)
    assert top.get("groups") and top.get("stages")
