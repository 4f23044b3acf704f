"""`hpc-multires submit`: rendered batch scripts against golden files, hostile paths."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hpc_multires.cli.submit import JobSpec, render

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path("/opt/hpc-multires")

CASES = {
    "cpu-1node": JobSpec(config=ROOT / "configs/cosmoflow-demo.toml",
                         run_dir=Path("/scratch/runs/demo"), root=ROOT, ntasks_per_node=2),
    "cpu-2nodes": JobSpec(config=ROOT / "configs/cosmoflow-mrmf.toml",
                          run_dir=Path("/scratch/runs/mrmf"), root=ROOT, nodes=2,
                          ntasks_per_node=2, time="04:00:00", partition="cpu",
                          overrides=("data.path=/scratch/data/cosmoflow",)),
    "gpu-4nodes": JobSpec(config=ROOT / "configs/cosmoflow-baseline.toml",
                          run_dir=Path("/scratch/runs/gpu"), root=ROOT, nodes=4,
                          ntasks_per_node=4, cpus_per_task=8, gpus_per_node=4,
                          time="12:00:00", account="proj42", partition="gpu"),
    "hostile": JobSpec(config=Path("/home/a b/it's \"mine\"/c.toml"),
                       run_dir=Path("/tmp/x; echo pwned/run $HOME"), root=Path("/opt/my repo"),
                       job_name="a'b", overrides=("data.path=/d; rm -rf ~", "run.name=`id`")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_scripts_match_golden_files(name: str) -> None:
    text = render(CASES[name])
    path = GOLDEN / f"{name}.sbatch"
    if os.environ.get("HPC_MULTIRES_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), "regenerate with HPC_MULTIRES_UPDATE_GOLDEN=1 if intended"


def test_hostile_values_stay_literal(tmp_path: Path) -> None:
    """Run the srun line of the hostile script through bash with srun and python stubbed:
    the arguments arrive exactly as given, and nothing in them is executed."""
    job = CASES["hostile"]
    script = render(job)
    srun_line = script[script.index("srun "):script.index("rc=$?")]
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text('#!/bin/bash\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    (stub / "srun").chmod(0o755)
    out = subprocess.run(["bash", "-c", srun_line], capture_output=True, text=True,
                         env={"PATH": f"{stub}:/usr/bin:/bin", "HPCMR_SRUN_MPI": "pmi2",
                              "HPCMR_PYTHON": "python", "HOME": "/home/u"}, timeout=10)
    args = out.stdout.splitlines()
    assert "pwned" not in out.stderr and out.returncode == 0, out.stderr
    assert str(job.config) in args and str(job.run_dir) in args
    assert "data.path=/d; rm -rf ~" in args and "run.name=`id`" in args


def test_dry_run_cli_prints_the_script(cli, tmp_path: Path) -> None:
    r = cli(["submit", "configs/cosmoflow-demo.toml", "--nodes", "2", "--ntasks-per-node", "2",
             "--run-dir", str(tmp_path / "r"), "--dry-run", "--set", "train.epochs=3"])
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=2" in r.stdout and "--set train.epochs=3" in r.stdout
    assert "#SBATCH --signal=USR1@120" in r.stdout and "#SBATCH --requeue" in r.stdout
    missing = cli(["submit", "nope.toml", "--dry-run"])
    assert missing.returncode == 2 and "nope.toml' not found" in missing.stderr
    bad = cli(["submit", "configs/cosmoflow-demo.toml", "--time", "1h; rm", "--dry-run"])
    assert bad.returncode == 2 and "--time" in bad.stderr
