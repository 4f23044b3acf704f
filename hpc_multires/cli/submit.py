"""`hpc-multires submit`: render a batch script from a config and submit it with sbatch.

The script is data: `render` is a pure function of its arguments, compared to golden
files in the tests. Every value that comes from the user (paths, `--set` overrides,
names) is shell-quoted, so spaces, quotes and `; rm -rf` in them stay literal; control
characters are refused, since a newline would end the script's `# Submitted as:` comment
and run the rest of the line as a command.

The script asks Slurm for USR1 two minutes before the time limit (five on GPU nodes, as
slurm/gpu.sbatch does: larger models take longer to checkpoint) and is requeueable;
the trainer checkpoints on USR1/TERM, writes RUN_DIR/PREEMPTED and exits with 75; the
script requeues itself when it finds that file (srun's exit code cannot say it), and
every start runs with --auto-resume, so the requeued job continues. The script sources
the repository's slurm/env.sh: `submit` needs a checkout, not an installed package.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from hpc_multires.driver.run_dir import JOB_SCRIPT, PREEMPTED, RunDir
from hpc_multires.errors import UserError
from hpc_multires.train.preempt import PREEMPTED_EXIT


@dataclass(frozen=True)
class JobSpec:
    """What the batch script asks of Slurm and what it runs."""

    config: Path
    run_dir: Path
    root: Path
    nodes: int = 1
    ntasks_per_node: int = 1
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    time: str = "01:00:00"
    job_name: str = "hpc-multires"
    partition: str = ""
    account: str = ""
    overrides: tuple[str, ...] = field(default=())
    warning_s: int = 0
    """Seconds of warning (USR1) before the time limit; 0: 120, or 300 with GPUs."""


def _directive_safe(text: str) -> str:
    """A job name sbatch takes as is: #SBATCH lines are not parsed by a shell."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text) or "hpc-multires"


def reader_workers(cpus_per_task: int) -> int:
    """Reader processes per rank on GPU nodes: the task's CPUs but the one that feeds the
    GPU, and at least one (what slurm/gpu.sbatch passes as data.num_workers)."""
    return max(cpus_per_task - 1, 1)


def render(job: JobSpec) -> str:
    q = shlex.quote
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={_directive_safe(job.job_name)}",
             f"#SBATCH --nodes={job.nodes}",
             f"#SBATCH --ntasks-per-node={job.ntasks_per_node}",
             f"#SBATCH --cpus-per-task={job.cpus_per_task}"]
    if job.gpus_per_node:
        # One rank per GPU: each task sees the GPU its local rank picks.
        lines.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    lines += [f"#SBATCH --time={job.time}",
              f"#SBATCH --signal=USR1@{job.warning_s or (300 if job.gpus_per_node else 120)}",
              "#SBATCH --requeue",
              "#SBATCH --open-mode=append"]
    if job.partition:
        lines.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        lines.append(f"#SBATCH --account={job.account}")
    overrides = job.overrides
    if job.gpus_per_node:
        # Before the user's --set, so that theirs wins (later overrides earlier).
        overrides = (f"data.num_workers={reader_workers(job.cpus_per_task)}", *overrides)
    sets = "".join(f" \\\n    --set {q(s)}" for s in overrides)
    marker = RunDir(job.run_dir).preempted
    lines += [
        "",
        "# Written by `hpc-multires submit`; the environment is in slurm/env.sh.",
        f"# Submitted as: {' '.join(q(a) for a in sbatch_args(job, Path(JOB_SCRIPT)))}",
        "set -u",
        f"export HPCMR_ROOT={q(str(job.root))}",
        'source "$HPCMR_ROOT/slurm/env.sh"',
        f"mkdir -p {q(str(job.run_dir))}",
        f"rm -f {q(str(marker))}  # only a signal during this run may requeue it",
        "",
        "# USR1 (time limit near) goes to the ranks through srun; the trainer checkpoints,",
        f"# writes RUN_DIR/{PREEMPTED} and exits with {PREEMPTED_EXIT}. A requeued job resumes.",
        f"hpcmr_launch train {q(str(job.config))} \\",
        f"    --run-dir {q(str(job.run_dir))} --auto-resume{sets}",
        "rc=$?",
        f"if [ -f {q(str(marker))} ]; then",
        '    echo "hpc-multires: checkpointed before the time limit; requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        "exit $rc",
        ""]
    return "\n".join(lines)


def sbatch_args(job: JobSpec, script: Path) -> list[str]:
    """The sbatch command line. The output path goes here, as one argv entry, rather
    than in an #SBATCH line, whose parsing of quotes and spaces is Slurm's, not a shell's."""
    return ["sbatch", "--parsable", f"--output={RunDir(job.run_dir).slurm_output()}",
            str(script)]


def _check_no_control_characters(job: JobSpec) -> None:
    values = [("config", str(job.config)), ("--run-dir", str(job.run_dir)),
              ("the repository path", str(job.root)),
              *(("--set", s) for s in job.overrides)]
    for name, value in values:
        found = re.search(r"[\x00-\x1f\x7f-\x9f]", value)
        if found:
            raise UserError(f"{name} {value!r} contains the control character "
                            f"{found.group()!r}; remove it (newlines and tabs included)")


def check(job: JobSpec) -> None:
    _check_no_control_characters(job)
    if not job.config.is_file():
        raise UserError(f"config {str(job.config)!r} not found; pass the path of a TOML config")
    for name in ("nodes", "ntasks_per_node", "cpus_per_task"):
        if getattr(job, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(job, name)}: use 1 or more")
    if job.gpus_per_node < 0:
        raise UserError("--gpus-per-node: use 0 (CPU) or more")
    if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", job.time):
        raise UserError(f"--time {job.time!r}: use Slurm's format, e.g. 04:00:00 or 1-12:00:00")
    for name in ("partition", "account"):
        value = getattr(job, name)
        if value and not re.fullmatch(r"[\w.,-]+", value):
            raise UserError(f"--{name} {value!r}: letters, digits, '.', ',', '-' and '_' only")


def submit(job: JobSpec, dry_run: bool) -> str:
    """The rendered script (dry run), or sbatch's job id."""
    check(job)
    script = render(job)
    if dry_run:
        return script
    job.run_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(job.run_dir).job_script
    path.write_text(script)
    try:
        out = subprocess.run(sbatch_args(job, path), capture_output=True, text=True,
                             timeout=60)
    except FileNotFoundError:
        raise UserError("sbatch not found: run this on a Slurm login node, or use --dry-run "
                        f"to print the script (written to {path})") from None
    if out.returncode != 0:
        raise UserError(f"sbatch refused {path}: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]
