"""Reading a config: TOML -> the typed dataclasses of `plan/config.py`, `--set`
overrides, and writing a resolved config back as TOML.

Unknown keys, wrong types and bad values raise `ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import difflib
import tomllib
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import tomli_w

from hpc_multires.errors import ConfigError
from hpc_multires.plan.config import Config


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """`value` as type `tp`, or a ConfigError naming `key` and what it expects."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key} = {value!r} is not one of {_type_name(tp)}{hint}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            example = '["coarse1", "coarse2"]' if key.endswith("fuse_from") else "[128, 64]"
            raise ConfigError(f"{key} = {value!r}: expected a list, e.g. {example}")
        (inner, *_) = typing.get_args(tp)
        if is_dataclass(inner):
            return tuple(_build(inner, v, f"{key}[{i}]")  # type: ignore[arg-type]
                         for i, v in enumerate(value))
        return tuple(_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table, got {value!r}")
        _, inner = typing.get_args(tp)
        return {str(k): _coerce(f"{key}.{k}", inner, v) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported union type for {key}")  # config fields are never unions
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string (quote it in TOML)")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{prefix}] must be a table of keys, got {table!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close \
                else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        tp = hints[key]
        if is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(full, tp, value)
    return cls(**kwargs)


def config_from_dict(table: dict[str, Any]) -> Config:
    stages = table.get("stages")
    if isinstance(stages, list):
        # Each stage's [stages.train] overrides the run's [train] key by key, sub-tables
        # ([stages.train.downsample]) too.
        base = table.get("train", {})
        table = {**table, "stages": [
            {**st, "train": _merged(base, st.get("train", {}))} if isinstance(st, dict) else st
            for st in stages]}
    return typing.cast(Config, _build(Config, table, ""))


def _merged(base: Any, own: Any) -> Any:
    """`own` over `base`, key by key, into sub-tables (what is not a table: `own`)."""
    if not isinstance(base, dict) or not isinstance(own, dict):
        return own
    return {**base, **{k: _merged(base[k], v) if k in base else v for k, v in own.items()}}


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a TOML config, apply `--set` overrides (section.key=value, or for one stage
    stages.NAME.key=value and stages.NAME.train.key=value), validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; pass the path of a TOML config "
                          "such as configs/cosmoflow-demo.toml")
    try:
        table = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e}); fix the syntax at that line") from None
    for item in overrides or []:
        _set(table, item)
    return config_from_dict(table)


def _set(table: dict[str, Any], item: str, resolved: bool = False) -> None:
    """Apply one `--set KEY=VALUE` to a TOML table. KEY is section.key, stages.NAME.key or
    stages.NAME.train.key. `resolved`: every stage's train table is complete (a table from
    `config_to_dict`), so a stage inherits a run's train key when its value equals the
    run's; otherwise a stage sets a key itself when its [stages.train] holds it."""
    key, eq, raw = item.partition("=")
    key = key.strip()
    if not eq or not key or "." not in key:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. "
                          "--set train.epochs=8 or --set data.path=/scratch/data")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as a path
    *parents, leaf = key.split(".")
    node = table
    if parents[0] == "stages":
        node, parents, leaf = _stage_table(table, item, key)
    elif parents[0] == "train" and isinstance(table.get("stages"), list) and table["stages"]:
        _set_run_train(table, item, [*parents[1:], leaf], value, raw.strip(), resolved)
        return
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
    node[leaf] = value


def _stage_table(table: dict[str, Any], item: str,
                 key: str) -> tuple[dict[str, Any], list[str], str]:
    """For KEY = stages.NAME.rest: the stage named NAME, and rest as (parents, leaf)."""
    stages = [st for st in table.get("stages") or [] if isinstance(st, dict)]
    names = [str(st.get("name", "")) for st in stages]
    if not stages:
        raise ConfigError(f"--set {item!r}: the config has no [[stages]]; set the run's own "
                          "keys instead, e.g. --set train.epochs=8")
    rest = key.removeprefix("stages.")
    # The longest name that fits: a stage name may itself hold a dot.
    fits = [i for i, name in enumerate(names) if rest.startswith(name + ".")]
    if not fits and rest in names:
        raise ConfigError(f"--set {item!r}: name a key of stage {rest!r}, e.g. --set "
                          f"stages.{rest}.train.epochs=3 or --set stages.{rest}.level=1")
    if not fits:
        wanted = rest.split(".", 1)[0]
        close = difflib.get_close_matches(wanted, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"--set {item!r}: no stage named {wanted!r} (stages: "
                          f"{', '.join(names)}); {hint}address a stage by its name, e.g. "
                          f"--set stages.{(close or names)[0]}.train.epochs=3")
    i = max(fits, key=lambda j: len(names[j]))
    *parents, leaf = rest[len(names[i]) + 1:].split(".")
    return stages[i], parents, leaf


def _set_run_train(table: dict[str, Any], item: str, path: list[str], value: Any, raw: str,
                   resolved: bool) -> None:
    """`--set train.KEY=VALUE` on a staged config (KEY a `path` such as ["epochs"] or
    ["downsample", "fraction"]): the run's [train], which each stage inherits unless it
    sets KEY itself; an error when every stage does, since the override would then change
    nothing."""
    base = table.setdefault("train", {})
    if not isinstance(base, dict):
        raise ConfigError(f"--set {item!r}: 'train' is not a section")
    stages = [st for st in table["stages"] if isinstance(st, dict)]
    missing = object()
    old = _get(base, path, missing)
    dotted = ".".join(path)

    def sets_own(stage: dict[str, Any]) -> bool:
        own = _get(stage.get("train"), path, missing)
        if own is missing:
            return False
        return not resolved or own != old

    shadowed = [sets_own(st) for st in stages]
    if stages and all(shadowed):
        names = [str(st.get("name", "")) for st in stages]
        raise ConfigError(
            f"--set {item!r} changes nothing: every stage sets its own train.{dotted} "
            f"({', '.join(names)}); set it per stage, e.g. --set stages.{names[0]}.train."
            f"{dotted}={raw}")
    _put(base, path, value, item)
    if resolved:  # inheriting stages hold a copy of the old value: update it
        for st, own in zip(stages, shadowed, strict=True):
            if not own and _get(st.get("train"), path, missing) is not missing:
                _put(st["train"], path, value, item)


def _get(table: Any, path: list[str], default: Any) -> Any:
    """table[path[0]][path[1]]..., or `default` where a step is missing or not a table."""
    for part in path:
        if not isinstance(table, dict) or part not in table:
            return default
        table = table[part]
    return table


def _put(table: dict[str, Any], path: list[str], value: Any, item: str) -> None:
    *parents, leaf = path
    for part in parents:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
    table[leaf] = value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A new config with `section.key=value` overrides applied and validated. A stage whose
    train value equals the run's counts as inheriting it (the resolved config cannot tell)."""
    table = config_to_dict(cfg)
    for item in overrides:
        _set(table, item, resolved=True)
    return config_from_dict(table)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out[f.name] = config_to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = [config_to_dict(v) if is_dataclass(v) else v for v in value]
        elif isinstance(value, dict):
            out[f.name] = dict(value)
        else:
            out[f.name] = value
    return out


def config_to_toml(cfg: Config) -> str:
    """The resolved config as TOML, every field written out (defaults included). Written
    by tomli-w, so any string (a path with a newline, a quote or non-ASCII characters)
    reads back as it was."""
    return tomli_w.dumps(config_to_dict(cfg))
