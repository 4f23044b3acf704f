"""Imports point down the layer map of docs/design.md: a layer that reached up would
depend on what it serves (the trainer on the plan it is one stage of). What a lower layer
no longer checks for lack of the plan, the driver checks."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "hpc_multires"

# layer folder -> the layers it must not import
FORBIDDEN = {
    "train": ("plan", "driver"),
    "models": ("plan", "train", "driver"),
}


def imported_modules(path: Path) -> list[str]:
    """Every module a file imports, at any depth (inside functions and TYPE_CHECKING too),
    as absolute names."""
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                package = path.relative_to(ROOT).parent.parts
                base = ".".join(package[:len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out.append(module)
            out += [f"{module}.{alias.name}" for alias in node.names]  # from pkg import mod
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_does_not_import_the_layers_above_it(layer: str) -> None:
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    above = tuple(f"hpc_multires.{name}" for name in FORBIDDEN[layer])
    found = [f"{path.relative_to(ROOT)} imports {module}"
             for path in files for module in imported_modules(path)
             if any(module == a or module.startswith(a + ".") for a in above)]
    assert found == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The check itself: each form of import of the plan is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("from hpc_multires.plan.config import Config\n"
                     "from hpc_multires import driver\n"
                     "def f():\n    import hpc_multires.plan.compat\n")
    modules = imported_modules(probe)
    assert "hpc_multires.plan.config" in modules
    assert "hpc_multires.driver" in modules
    assert "hpc_multires.plan.compat" in modules


@pytest.mark.slow
def test_the_driver_refuses_a_checkpoint_of_another_config(cli, tiny_config,
                                                           tmp_path: Path) -> None:
    """Where the run's config.toml does not read, the stage's checkpoint still holds the
    config it was trained with, and the driver compares it (the trainer does not)."""
    cfg = str(tiny_config(epochs=2))
    run = tmp_path / "run"
    assert cli(["train", cfg, "--run-dir", str(run), "--stop-after-epoch", "1"]).returncode == 0
    (run / "config.toml").write_text("not [toml")
    r = cli(["train", cfg, "--run-dir", str(run), "--resume", "--set", "train.lr=0.5"])
    assert "comparing the config with the stages' checkpoints only" in r.stderr, r.stderr
    ckpt = run / "stages" / "main" / "checkpoints" / "epoch-0001.pt"
    assert r.returncode == 2, r.stderr
    assert f"the config differs from the one {ckpt} was trained with, in ['train.lr']" \
        in r.stderr, r.stderr
    assert not (run / "stages" / "main" / "checkpoints" / "epoch-0002.pt").exists()


def test_the_design_pages_layer_map_names_every_module() -> None:
    """docs/design.md's layer map is how a newcomer finds a file: each module of the
    package is named there (by file name, under its folder's line)."""
    design = (ROOT / "docs" / "design.md").read_text()
    start = design.index("```\ncli/")
    layer_map = design[start:design.index("```", start + 4)]
    modules = [p for p in (ROOT / "hpc_multires").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")]
    assert len(modules) > 40
    missing = [str(p.relative_to(ROOT)) for p in modules
               if not re.search(rf"\b{re.escape(p.stem)}\b", layer_map)]
    assert not missing, f"docs/design.md's layer map does not name {missing}"
