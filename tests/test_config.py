"""Config: TOML -> typed dataclasses, overrides, and errors that name the key and the fix."""

from __future__ import annotations

import ast
import inspect
import itertools
import textwrap
from pathlib import Path

import pytest

from hpc_multires.errors import ConfigError
from hpc_multires.plan.config import Config, DataConfig
from hpc_multires.plan.load import apply_overrides, config_from_dict, config_to_toml, load_config

ROOT = Path(__file__).resolve().parents[1]


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring (the string literal under the field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


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
    # numpy refuses a negative seed, but only at the first epoch: refuse it at load.
    ({"run": {"seed": -1}}, "run.seed = -1: use 0 or a positive integer"),
    ({"run": {"seed": 1.5}}, "run.seed = 1.5: expected an integer"),
    ({"data": {"read_timeout_s": -1.0}}, "data.read_timeout_s = -1.0: use 0 (wait forever)"),
    ({"data": {"read_timeout_s": float("nan")}}, "data.read_timeout_s = nan"),
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


MRT = ROOT / "configs" / "cosmoflow-mrt.toml"  # stages coarse1 (10 epochs) and fine (8)


def epochs(cfg: Config) -> dict[str, int]:
    return {s.name: s.train.epochs for s in cfg.stages}


def test_set_addresses_a_stage_by_name() -> None:
    assert epochs(load_config(MRT)) == {"coarse1": 10, "fine": 8}
    cfg = load_config(MRT, ["stages.fine.train.epochs=3", "stages.coarse1.level=2",
                            "stages.coarse1.train.lr=0.5"])
    assert epochs(cfg) == {"coarse1": 10, "fine": 3}
    assert [s.level for s in cfg.stages] == [2, 0]
    assert [s.train.lr for s in cfg.stages] == [0.5, 0.002]  # fine still inherits [train]
    # The same on a resolved config (e.g. a run's saved config.toml).
    again = apply_overrides(load_config(MRT), ["stages.fine.train.epochs=3",
                                               "stages.coarse1.level=2",
                                               "stages.coarse1.train.lr=0.5"])
    assert again == cfg


def test_set_on_an_unknown_stage_names_the_stages() -> None:
    with pytest.raises(ConfigError, match=r"no stage named 'fien' \(stages: coarse1, fine\); "
                                          r"did you mean 'fine'\?"):
        load_config(MRT, ["stages.fien.train.epochs=3"])
    with pytest.raises(ConfigError, match="name a key of stage 'fine'"):
        load_config(MRT, ["stages.fine=3"])
    with pytest.raises(ConfigError, match=r"the config has no \[\[stages\]\]"):
        apply_overrides(Config(), ["stages.main.train.epochs=3"])


def test_set_of_a_run_train_key_that_every_stage_sets_is_an_error() -> None:
    # Both stages set epochs in [stages.train]: train.epochs=3 would change nothing.
    message = (r"--set 'train.epochs=3' changes nothing: every stage sets its own "
               r"train.epochs \(coarse1, fine\); set it per stage, e.g. --set "
               r"stages.coarse1.train.epochs=3")
    with pytest.raises(ConfigError, match=message):
        load_config(MRT, ["train.epochs=3"])
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_config(MRT), ["train.epochs=3"])
    # A key the stages inherit reaches every stage.
    cfg = load_config(MRT, ["train.lr=0.5"])
    assert [s.train.lr for s in cfg.stages] == [0.5, 0.5]
    assert apply_overrides(load_config(MRT), ["train.lr=0.5"]) == cfg


def test_set_of_a_run_train_key_reaches_the_stages_that_inherit_it(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[train]\nepochs = 4\n\n[[stages]]\nname = "a"\nlevel = 1\n'
                    '[stages.train]\nepochs = 2\n\n[[stages]]\nname = "b"\nafter = ["a"]\n')
    cfg = load_config(path, ["train.epochs=6"])
    assert epochs(cfg) == {"a": 2, "b": 6}
    assert apply_overrides(load_config(path), ["train.epochs=6"]) == cfg


def test_data_level_beside_stages_is_refused() -> None:
    # Stages carry their own level: a data.level beside them would change nothing.
    with pytest.raises(ConfigError, match="each stage's own level"):
        config_from_dict({"data": {"level": 1}, "stages": [{"name": "a", "level": 0}]})
    assert config_from_dict({"data": {"level": 1}}).plan()[0].level == 1


@pytest.mark.parametrize("path", ['/data/a "quoted" dir', "/data/new\nline", "/données/体积 ü",
                                  "C:\\back\\slash", "/tab\there", "/ctrl\x01char"])
def test_any_path_round_trips_through_the_written_toml(tmp_path: Path, path: str) -> None:
    cfg = Config(data=DataConfig(path=path, val_path=path + "-val"))
    saved = tmp_path / "config.toml"
    saved.write_text(config_to_toml(cfg), encoding="utf-8")
    assert load_config(saved) == cfg


def test_level_corruption_with_mge_is_refused_and_a_bad_value_named() -> None:
    """MGE's coarse terms must see the restricted fine corruption to be unbiased."""
    images = {"model": {"name": "unet"}, "train": {"estimator": "mge"}}
    with pytest.raises(ConfigError, match='set task.coarse_corruption = "restricted"'):
        config_from_dict({**images, "task": {"kind": "denoise", "coarse_corruption": "level"}})
    config_from_dict({**images, "task": {"kind": "denoise"}})  # the default is accepted
    config_from_dict({"model": {"name": "unet"},
                      "task": {"kind": "denoise", "coarse_corruption": "level"}})
    with pytest.raises(ConfigError, match="task.coarse_corruption = 'pooled'"):
        config_from_dict({"model": {"name": "unet"},
                          "task": {"kind": "noise", "coarse_corruption": "pooled"}})
