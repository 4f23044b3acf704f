"""Apptainer definitions: sections, bases, and the same set-up the README uses.

Apptainer cannot be installed on this machine; these checks are what can be verified
without building: the files parse into the expected sections, and the set-up line of
each runs the Makefile target behind the README's commands with variables the Makefile
really has (a dry run of make shows what would be installed).
"""

from __future__ import annotations

import re
import shlex
import subprocess
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
        elif current is None and ":" in line:
            k, v = line.split(":", 1)
            header[k.strip()] = v.strip()
        elif current is not None:
            body[current] += line + "\n"
    return header, body


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
    assert body["files"].split() == [".", "/opt/hpc-multires"]
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
