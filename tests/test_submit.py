"""`hpc-multires submit`: rendered batch scripts against golden files, hostile paths."""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
from pathlib import Path

import pytest

from hpc_multires.cli.submit import JobSpec, check, render
from hpc_multires.errors import UserError

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
    # Domain decomposition: 2x2x2 sub-volumes, one local CNN per rank of 2 nodes x 4.
    "domain-2nodes": JobSpec(config=ROOT / "configs/cosmoflow-domain.toml",
                             run_dir=Path("/scratch/runs/domain"), root=ROOT, nodes=2,
                             ntasks_per_node=4, time="02:00:00", partition="cpu",
                             overrides=("data.path=/scratch/data/cosmoflow-blocks",)),
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
        pytest.skip(f"{path.name} regenerated: review its diff, then run without "
                    "HPC_MULTIRES_UPDATE_GOLDEN")
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


@pytest.mark.slow
def test_launch_starts_a_step_again_after_slurms_pmi2_garbled_the_start(tmp_path: Path) -> None:
    """Slurm's pmi2 plugin cuts PMI-1 requests longer than 1024 bytes, and the step dies in
    MPI_Init; hpcmr_launch starts it again, and the second step's result is the job's."""
    body = (f'if [ "$(wc -l < "$CALLS")" -eq 1 ]; then printf "{GARBLED}" >&2; exit 1; fi\n'
            'echo trained\n')
    out, calls = _launch(tmp_path, body)
    assert calls == 2 and out.stdout.splitlines() == ["trained", "rc=0"], out.stderr
    assert "garbled the MPI start-up (exit 1)" in out.stderr
    assert "value not properly terminated" in out.stderr  # the original error is still shown


@pytest.mark.slow
def test_launch_gives_up_after_the_retries(tmp_path: Path) -> None:
    out, calls = _launch(tmp_path, f'printf "{GARBLED}" >&2; exit 7\n', retries=2)
    assert calls == 3 and out.stdout.strip() == "rc=7", out.stderr


def test_launch_does_not_repeat_other_failures(tmp_path: Path) -> None:
    """A rank that fails for any other reason (bad data, a killed rank) ends the job once."""
    out, calls = _launch(tmp_path, 'echo "error: data path not found" >&2; exit 2\n')
    assert calls == 1 and out.stdout.strip() == "rc=2", out.stderr
    assert "garbled" not in out.stderr


@pytest.fixture
def cli(cli_in_process):  # type: ignore[no-untyped-def]
    """`submit --dry-run` ends before any job: run it in this process."""
    return cli_in_process


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


def test_domain_job_must_hold_its_grid(cli, tmp_path: Path) -> None:
    """2x2x2 sub-volumes need 8 ranks (or a multiple): a job of 2 x 2 is refused before it
    waits in the queue, one of 2 x 4 is rendered."""
    args = ["submit", "configs/cosmoflow-domain.toml", "--run-dir", str(tmp_path / "r"),
            "--dry-run", "--nodes", "2"]
    small = cli([*args, "--ntasks-per-node", "2"])
    assert small.returncode == 2 and "makes 8 sub-domains, more than the 4 rank(s)" in \
        small.stderr and "nothing submitted" in small.stderr
    uneven = cli([*args, "--ntasks-per-node", "6"])
    assert uneven.returncode == 2 and "12 ranks are not divisible by the 8" in uneven.stderr
    ok = cli([*args, "--ntasks-per-node", "4"])
    assert ok.returncode == 0 and "#SBATCH --ntasks-per-node=4" in ok.stdout, ok.stderr


@pytest.mark.parametrize(("field", "value", "flag"), [
    ("run_dir", Path("/tmp/r\nrm -rf ~"), "--run-dir"),
    ("config", Path("/tmp/c\r.toml"), "config"),
    ("overrides", ("train.epochs=1", "data.path=/d\n; id"), "--set"),
    ("root", Path("/opt/repo\x1b[2J"), "the repository path"),
])
def test_control_characters_are_refused(field: str, value: object, flag: str) -> None:
    """A newline would end the script's `# Submitted as:` comment line, and the rest of the
    value would run as a command; quoting cannot help there, so such values are refused."""
    job = dataclasses.replace(CASES["cpu-1node"], **{field: value})
    with pytest.raises(UserError, match="contains the control character") as err:
        check(job)
    assert str(err.value).startswith(f"{flag} ") and "\n" not in str(err.value)


def test_control_characters_through_the_cli(cli, tmp_path: Path) -> None:
    r = cli(["submit", "configs/cosmoflow-demo.toml", "--run-dir", f"{tmp_path}/r\nid",
             "--dry-run"])
    assert r.returncode == 2 and r.stdout == "", r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith("hpc-multires: error: --run-dir ") and "\\n" in line


# What slurm/gpu.sbatch computes from --cpus-per-task: all CPUs of the task but one, at least 1.
GPU_READERS = {1: 1, 2: 1, 8: 7}


@pytest.mark.parametrize("cpus", sorted(GPU_READERS))
def test_submit_on_gpus_launches_what_gpu_sbatch_launches(tmp_path: Path, cpus: int) -> None:
    """docs/slurm.md gives `sbatch slurm/gpu.sbatch` and `submit --gpus-per-node` as the same
    job: both scripts run with srun stubbed start the same command line, with
    data.num_workers from the task's CPUs (a user's --set after it wins), and srun is told
    the task's CPUs (srun 22.05 to 23.05 does not read SLURM_CPUS_PER_TASK)."""
    env = _stub_srun(tmp_path, 'echo "SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-unset}"\n'
                               'for a in "$@"; do printf "%s\\n" "$a"; done\n')
    env.update(SLURM_CPUS_PER_TASK=str(cpus), SLURM_JOB_ID="1")
    run = tmp_path / "run"
    job = JobSpec(config=Path("c.toml"), run_dir=run, root=REPO, ntasks_per_node=4,
                  cpus_per_task=cpus, gpus_per_node=4, overrides=("train.epochs=1",))
    (tmp_path / "job.sbatch").write_text(render(job))
    launched = {}
    for name, cmd in [("gpu.sbatch", [str(REPO / "slurm" / "gpu.sbatch"), "c.toml", str(run),
                                      "--set", "train.epochs=1"]),
                      ("submit", [str(tmp_path / "job.sbatch")])]:
        out = subprocess.run(["bash", *cmd], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=30)
        assert out.returncode == 0, out.stderr
        launched[name] = out.stdout.splitlines()
    assert launched["submit"] == launched["gpu.sbatch"]
    assert launched["submit"][0] == f"SRUN_CPUS_PER_TASK={cpus}"
    args = launched["submit"]
    sets = [value for flag, value in itertools.pairwise(args) if flag == "--set"]
    assert sets == [f"data.num_workers={GPU_READERS[cpus]}", "train.epochs=1"]


def test_cpu_jobs_keep_the_configs_readers_and_srun_its_default(tmp_path: Path) -> None:
    """On CPU nodes the config's data.num_workers stands; without --cpus-per-task (as in an
    allocation that did not ask) srun's own default is left alone."""
    assert "num_workers" not in render(CASES["cpu-2nodes"])
    env = _stub_srun(tmp_path, 'echo "SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-unset}"\n')
    out = subprocess.run(["bash", "-c", 'set -u; source "$HPCMR_ROOT/slurm/env.sh"; '
                          "hpcmr_launch train c.toml"], capture_output=True, text=True,
                         env=env, timeout=30)
    assert out.stdout == "SRUN_CPUS_PER_TASK=unset\n", out.stderr


def test_a_plan_the_jobs_ranks_cannot_run_is_refused_before_the_queue(cli) -> None:
    """The shipped MRMF plan's global batch of 16 does not split over 32 ranks: the job
    would queue for hours and then fail at start. `submit` runs the plan's checks for the
    job's rank count first."""
    cfg = str(REPO / "configs" / "cosmoflow-mrmf.toml")
    r = cli(["submit", cfg, "--nodes", "4", "--ntasks-per-node", "8", "--dry-run"])
    assert r.returncode == 2, r.stderr
    assert "not divisible by the 32 ranks" in r.stderr and "nothing submitted" in r.stderr
    assert "#SBATCH" not in r.stdout
    ok = cli(["submit", cfg, "--nodes", "2", "--ntasks-per-node", "8", "--dry-run"])
    assert ok.returncode == 0 and "#SBATCH --nodes=2" in ok.stdout, ok.stderr
    more = cli(["submit", cfg, "--nodes", "4", "--ntasks-per-node", "8", "--dry-run",
                "--set", "train.global_batch=64"])
    assert more.returncode == 0, more.stderr
