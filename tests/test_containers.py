"""Apptainer definitions: sections, bases, and the same set-up the README uses.

Apptainer cannot be installed on this machine; these checks are what can be verified
without building: the files parse into the expected sections, and the set-up line of
each runs the Makefile target behind the README's commands with variables the Makefile
really has (a dry run of make shows what would be installed).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sections(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    header: dict[str, str] = {}
    body: dict[str, str] = {}
    current = None
    for line in path.read_text().splitlines():
        m = re.match(r"^%(\w+)\s*$", line)
        if m:
            current = m.group(1)
            body[current] = ""
        elif current is None and line.startswith("#"):
            continue  # Apptainer skips comment lines in the header
        elif current is None and ":" in line:
            k, v = line.split(":", 1)
            header[k.strip()] = v.strip()
        elif current is not None:
            body[current] += line + "\n"
    return header, body


def files_entries(files: str) -> list[tuple[str, str]]:
    """The (source, destination) pairs of a %files section, comment lines skipped."""
    lines = [ln.split() for ln in files.splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    assert all(len(ln) == 2 for ln in lines), files
    return [(src, dst) for src, dst in lines]


def make_setup_line(post: str) -> list[str]:
    lines = [ln.strip() for ln in post.splitlines() if ln.strip().startswith("make setup")]
    assert len(lines) == 1, post
    return shlex.split(lines[0])


def test_readme_commands_run_make_setup() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert blocks[0].strip() == "make demo" and blocks[1].strip() == "make test"
    # -B: as on a fresh machine, whatever is installed here.
    for target in ("demo", "test"):
        plan = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert ".venv/bin/python -m pip install --quiet -e '.[mpi,dev]'" in plan.stdout, target


@pytest.mark.parametrize(("name", "base", "torch_installed"), [
    ("cpu.def", "python:3.11", True), ("gpu.def", "nvcr.io/nvidia/pytorch", False)])
def test_definitions(name: str, base: str, torch_installed: bool, tmp_path: Path) -> None:
    header, body = sections(ROOT / "containers" / name)
    assert header["Bootstrap"] == "docker" and header["From"].startswith(base)
    assert {"help", "labels", "files", "post", "environment", "runscript", "test"} <= set(body)
    assert files_entries(body["files"]) == [(src, f"/opt/hpc-multires/{src}") for src in COPIED]
    assert "-m hpc_multires" in body["runscript"]
    args = make_setup_line(body["post"])
    assert "VENV=/opt/venv" in args
    # What that line would do, with this repository's Makefile (a dry run into tmp_path).
    venv = tmp_path / "venv"
    make_args = [a.replace("/opt/venv", str(venv)) for a in args[1:]]
    plan = subprocess.run(["make", "-n", "-B", *make_args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert f"{venv}/bin/python -m pip install --quiet -e '.[mpi,dev]'" in plan.stdout
    assert ("'torch==2.13.0'" in plan.stdout) == torch_installed
    if not torch_installed:
        assert "--system-site-packages" in plan.stdout  # the image's torch stays


def test_run_wrapper_passes_arguments_through(tmp_path: Path) -> None:
    stub = tmp_path / "apptainer"
    stub.write_text('#!/bin/bash\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    stub.chmod(0o755)
    r = subprocess.run([str(ROOT / "containers" / "run.sh"), "-m", "hpc_multires", "a b"],
                       capture_output=True, text=True, timeout=10, cwd=tmp_path,
                       env={"PATH": f"{tmp_path}:/usr/bin:/bin", "HPCMR_IMAGE": "img.sif",
                            "HPCMR_NV": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["exec", "--nv", "--bind", str(tmp_path), "img.sif",
                                     "/opt/venv/bin/python", "-m", "hpc_multires", "a b"]


# What the images copy from the repository (%files): what `make setup` reads and what jobs
# use from the image; never the working tree's .venv, runs/, demo-data/ or .git.
COPIED = ["Makefile", "pyproject.toml", "README.md", "hpc_multires", "configs", "slurm"]


def test_copied_files_are_enough_to_build_the_package(tmp_path: Path) -> None:
    """A copy of just COPIED (as %files makes it, cp -L) builds the project's wheel, with
    the README its metadata names, and the Makefile's set-up line is intact in it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["readme"] in COPIED
    copy = tmp_path / "opt-hpc-multires"
    copy.mkdir()
    for src in COPIED:
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, copy / src, symlinks=False,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / src, copy / src)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                            "--no-build-isolation", "-w", str(tmp_path / "wheel"), "."],
                           cwd=copy, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    assert "cannot be found" not in built.stderr, built.stderr
    wheels = [p.name for p in (tmp_path / "wheel").iterdir()]
    assert wheels == ["hpc_multires-0.1.0-py3-none-any.whl"]
    plan = subprocess.run(["make", "-n", "-B", "setup", f"VENV={tmp_path / 'venv'}"], cwd=copy,
                          capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert "pip install --quiet -e '.[mpi,dev]'" in plan.stdout


def ngc_pytorch_python(tag: str) -> tuple[int, int]:
    """The Python of NVIDIA's PyTorch image YY.MM-py3 (its release notes): 3.10 on Ubuntu
    22.04 in 24.xx, 3.12 on Ubuntu 24.04 from 25.01."""
    m = re.fullmatch(r"(\d\d)\.(\d\d)-py3", tag)
    assert m, tag
    release = (int(m.group(1)), int(m.group(2)))
    assert release >= (24, 1), f"{tag}: older than this table"
    return (3, 12) if release >= (25, 1) else (3, 10)


@pytest.mark.parametrize("name", ["cpu.def", "gpu.def"])
def test_base_image_python_meets_requires_python(name: str) -> None:
    """The image's Python must satisfy pyproject's requires-python (tomllib needs 3.11):
    24.10 of NVIDIA's image shipped 3.10, and `make setup` failed inside it."""
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    m = re.fullmatch(r">=(\d+)\.(\d+)", spec)
    assert m, f"requires-python {spec!r}: this test reads only '>=X.Y'"
    required = (int(m.group(1)), int(m.group(2)))
    header, _ = sections(ROOT / "containers" / name)
    image, _, tag = header["From"].partition(":")
    if image == "python":
        m = re.match(r"(\d+)\.(\d+)", tag)
        assert m, tag
        python = (int(m.group(1)), int(m.group(2)))
    else:
        assert image == "nvcr.io/nvidia/pytorch", image
        python = ngc_pytorch_python(tag)
    assert python >= required, f"{name}: {header['From']} has Python {python}, needs {spec}"
    assert ngc_pytorch_python("24.10-py3") < required  # the check would have caught it


def test_setup_installs_the_pinned_torch_first_and_the_package_keeps_it() -> None:
    """`make setup` installs torch==2.13.0 before the package, and the package's torch
    range admits that version: pip then keeps it rather than download a newer torch."""
    from packaging.requirements import Requirement

    plan = subprocess.run(["make", "-n", "-B", "setup"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60).stdout.splitlines()
    torch_at = [i for i, ln in enumerate(plan) if "pip install --quiet 'torch==2.13.0'" in ln]
    package_at = [i for i, ln in enumerate(plan) if "pip install --quiet -e '.[mpi,dev]'" in ln]
    assert len(torch_at) == 1 and len(package_at) == 1 and torch_at[0] < package_at[0], plan
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_spec,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert torch_spec.specifier.contains("2.13.0"), torch_spec
