"""`hpc-multires submit`: rendered batch scripts against golden files, hostile paths."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hpc_multires.cli.submit import JobSpec, render

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parent.parent
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


def _stub_srun(tmp_path: Path, body: str) -> dict[str, str]:
    """An `srun` on PATH that runs `body` (bash); the environment for env.sh around it."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "srun").write_text("#!/bin/bash\n" + body)
    (stub / "srun").chmod(0o755)
    return {"PATH": f"{stub}:/usr/bin:/bin", "HPCMR_ROOT": str(REPO), "HPCMR_PYTHON": "python",
            "HOME": "/home/u", "TMPDIR": str(tmp_path), "CALLS": str(tmp_path / "calls")}


def test_hostile_values_stay_literal(tmp_path: Path) -> None:
    """Run the launch line of the hostile script through bash with srun stubbed: the
    arguments arrive exactly as given, and nothing in them is executed."""
    job = CASES["hostile"]
    script = render(job)
    launch = script[script.index("hpcmr_launch "):script.index("rc=$?")]
    env = _stub_srun(tmp_path, 'for a in "$@"; do printf "%s\\n" "$a"; done\n')
    out = subprocess.run(["bash", "-c", f'source "$HPCMR_ROOT/slurm/env.sh"\n{launch}'],
                         capture_output=True, text=True, env=env, timeout=10)
    args = out.stdout.splitlines()
    assert "pwned" not in out.stderr and out.returncode == 0, out.stderr
    assert str(job.config) in args and str(job.run_dir) in args
    assert "data.path=/d; rm -rf ~" in args and "run.name=`id`" in args
    assert args[:2] == ["--kill-on-bad-exit=1", "--mpi=pmi2"]


GARBLED = ("slurmstepd: error: mpi/pmi2: value not properly terminated in client request\n"
           "slurmstepd: error: mpi/pmi2: request not begin with 'cmd='\n")


def _launch(tmp_path: Path, body: str,
            retries: int = 2) -> tuple[subprocess.CompletedProcess[str], int]:
    env = _stub_srun(tmp_path, 'echo x >> "$CALLS"\n' + body)
    env["HPCMR_START_RETRIES"] = str(retries)
    out = subprocess.run(["bash", "-c", 'set -u; source "$HPCMR_ROOT/slurm/env.sh"; '
                          'hpcmr_launch train c.toml; echo "rc=$?"'],
                         capture_output=True, text=True, env=env, timeout=30)
    calls = len((tmp_path / "calls").read_text().splitlines())
    assert not list(tmp_path.glob("hpcmr-srun.*")), "the stderr copy is left behind"
    return out, calls


def test_launch_starts_a_step_again_after_slurms_pmi2_garbled_the_start(tmp_path: Path) -> None:
    """Slurm's pmi2 plugin cuts PMI-1 requests longer than 1024 bytes, and the step dies in
    MPI_Init; hpcmr_launch starts it again, and the second step's result is the job's."""
    body = (f'if [ "$(wc -l < "$CALLS")" -eq 1 ]; then printf "{GARBLED}" >&2; exit 1; fi\n'
            'echo trained\n')
    out, calls = _launch(tmp_path, body)
    assert calls == 2 and out.stdout.splitlines() == ["trained", "rc=0"], out.stderr
    assert "garbled the MPI start-up (exit 1)" in out.stderr
    assert "value not properly terminated" in out.stderr  # the original error is still shown


def test_launch_gives_up_after_the_retries(tmp_path: Path) -> None:
    out, calls = _launch(tmp_path, f'printf "{GARBLED}" >&2; exit 7\n', retries=2)
    assert calls == 3 and out.stdout.strip() == "rc=7", out.stderr


def test_launch_does_not_repeat_other_failures(tmp_path: Path) -> None:
    """A rank that fails for any other reason (bad data, a killed rank) ends the job once."""
    out, calls = _launch(tmp_path, 'echo "error: data path not found" >&2; exit 2\n')
    assert calls == 1 and out.stdout.strip() == "rc=2", out.stderr
    assert "garbled" not in out.stderr


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
