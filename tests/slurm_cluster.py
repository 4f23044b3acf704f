"""A real Slurm on this machine for the tests: slurmctld and two slurmd (nodes n1, n2).

Installs `slurm-wlm` and `munge` from Debian's packages when absent (CI machines start
without them), starts munged, writes a slurm.conf into a temporary directory (ports
picked free, so it never collides with another cluster), starts the daemons, waits for
both nodes to be idle, and stops them at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

CONF = """\
ClusterName=hpcmrtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmUser=root
SlurmdUser=root
# When srun ends a step (a rank died, or a rank exited with the requeue code and mpi4py
# aborted the job), the other ranks get SIGTERM and, KillWait later, SIGKILL. In the tests
# they have nothing left to do by then: after a rank died they end by their own MPI abort
# within a second or two, and a preempted run's ranks leave only once every checkpoint and
# the requeue marker are written. No test relies on SIGTERM handling under Slurm (the
# preemption test signals USR1).
KillWait=3
MinJobAge=600
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1_port} CPUs=2 RealMemory=1000
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2_port} CPUs=2 RealMemory=1000
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
"""


def _run(cmd: list[str], timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def ensure_installed() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0:
        raise RuntimeError("Slurm is not installed and installing it needs root: "
                           "apt-get install slurm-wlm munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        r = _run(cmd, timeout=900, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")


def ensure_munge() -> None:
    sock = Path("/run/munge/munge.socket.2")
    if sock.exists() and _run(["munge", "-n"]).returncode == 0:
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        _run(["mungekey", "--create"])
        shutil.chown(key, "munge", "munge")
    r = _run(["munged", "--force"])
    if r.returncode != 0:
        raise RuntimeError(f"munged did not start: {r.stderr}")
    for _ in range(50):
        if _run(["munge", "-n"]).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("munged is not answering")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cluster(workdir: Path) -> Iterator[dict[str, str]]:
    """Start the cluster; yields the environment for sbatch/squeue; stops it after."""
    ensure_installed()
    ensure_munge()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "state").mkdir(exist_ok=True)
    ctld, n1, n2 = _free_ports(3)
    conf = workdir / "slurm.conf"
    conf.write_text(CONF.format(host=socket.gethostname(), ctld_port=ctld, n1_port=n1,
                                n2_port=n2, d=workdir))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started = []
    try:
        for cmd in (["slurmctld", "-f", str(conf), "-c", "-i"],
                    ["slurmd", "-f", str(conf), "-N", "n1"],
                    ["slurmd", "-f", str(conf), "-N", "n2"]):
            r = _run(cmd, env=env)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr}")
            started.append(cmd)
            if cmd[0] == "slurmctld":
                time.sleep(1)
        deadline = time.monotonic() + 90
        while True:
            r = _run(["sinfo", "-h", "-o", "%T %D"], env=env)
            if r.returncode == 0 and r.stdout.split() == ["idle", "2"]:
                break
            if time.monotonic() > deadline:
                log = (workdir / "slurmctld.log").read_text()[-3000:]
                raise RuntimeError(f"nodes not idle: {r.stdout}{r.stderr}\n{log}")
            time.sleep(0.5)
        yield env
    finally:
        for pid_file in ("slurmd-n1.pid", "slurmd-n2.pid", "slurmctld.pid"):
            p = workdir / pid_file
            if p.exists():
                with contextlib.suppress(ValueError, ProcessLookupError):
                    os.kill(int(p.read_text().strip()), signal.SIGTERM)


# Seconds between a requeued job's first sight as pending and its release (wait_gone): two
# whole seconds past its credential's revocation, with a second to spare.
REQUEUE_MARGIN_S = 3.0


def job_processes(job: str, env: dict[str, str]) -> list[psutil.Process]:
    """The processes of this cluster's job `job` still on the machine: its batch script,
    srun and the ranks, which all carry the job's id and this cluster's SLURM_CONF (another
    cluster on the machine numbers its jobs alike)."""
    found = []
    for p in psutil.process_iter(["environ"]):
        job_env = p.info["environ"] or {}
        if (job_env.get("SLURM_JOB_ID") == job
                and job_env.get("SLURM_CONF") == env["SLURM_CONF"]):
            found.append(p)
    return found


def wait_gone(job: str, env: dict[str, str], timeout: float,
              release_requeued: bool = False) -> list[str]:
    """Poll squeue until the job has left the queue; returns the states it was seen in.

    With `release_requeued`, a requeued job held by Slurm's requeue delay (BeginTime) is
    released, so that the test does not wait the whole delay out, once no process of its
    earlier run is left and `REQUEUE_MARGIN_S` after it was first seen pending: a slurmd
    refuses ("Job credential revoked") a job credential issued in the same second as, or
    before, the one in which the earlier run's was revoked (Slurm compares whole seconds),
    and the revocation comes with the requeue.
    """
    seen: list[str] = []
    pending_since: float | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = _run(["squeue", "-h", "-j", job, "-o", "%T %r"], env=env)
        state = r.stdout.strip()
        if not state:
            return seen
        if not seen or seen[-1] != state:
            seen.append(state)
        if release_requeued and state.startswith("PENDING") and "BeginTime" in state:
            pending_since = pending_since or time.monotonic()
            if (time.monotonic() - pending_since > REQUEUE_MARGIN_S
                    and not job_processes(job, env)):
                _run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env)
        else:
            pending_since = None
        time.sleep(0.5)
    raise TimeoutError(f"job {job} still queued after {timeout} s (states {seen})")
