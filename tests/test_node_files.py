"""The test suite's clean-up of what aborted MPI jobs leave (node_files.py), and the
product's promise to leave that to the suite and to the job epilog."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from node_files import MPICH_SEGMENT_PREFIX, hydra_topology_files, mapped_files, remove_unused
from package_source import package_statements


def test_mapped_files_reads_names_named_or_unlinked(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f20 rw-s 00000000 00:1a 12 /dev/shm/mpich_shm_1c9557b2_0\n"
        "7f20-7f40 rw-s 00000000 00:1a 13 /dev/shm/mpich_shm_ff7ddfdf_0 (deleted)\n"
        "7f40-7f60 rw-s 00000000 00:1a 14 /dev/shm/sem.mp-0s98fbnz\n"
        "7f60-7f80 r-xp 00000000 08:01 15 /usr/lib/libmpi.so.12\n"
        "7f80-7fa0 rw-p 00000000 00:00 0 \n")
    assert mapped_files(maps) == ["/dev/shm/mpich_shm_1c9557b2_0",
                                  "/dev/shm/mpich_shm_ff7ddfdf_0"]
    assert mapped_files(maps, "/dev/shm/") == ["/dev/shm/mpich_shm_1c9557b2_0",
                                               "/dev/shm/mpich_shm_ff7ddfdf_0",
                                               "/dev/shm/sem.mp-0s98fbnz"]
    assert mapped_files(tmp_path / "gone") == []


def test_hydra_topology_files_come_from_the_proxy_that_started_the_rank(tmp_path: Path) -> None:
    """The rank's ancestors are searched for hydra's proxy (a wrapper shell in between is
    passed over), and only its topology files are taken from its open files."""
    def process(pid: int, comm: str, ppid: int, fds: dict[str, str] | None = None) -> None:
        d = tmp_path / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "comm").write_text(comm + "\n")
        (d / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1\n")
        for fd, target in (fds or {}).items():
            (d / "fd" / fd).symlink_to(target)

    process(40, "hydra_pmi_proxy", 30, {"3": "/dev/null", "11": "/tmp/hydra_hwloc_xmlfile_uRN87d",
                                        "12": "/tmp/other"})
    process(50, "sh (wrapper) x", 40)  # comm with spaces and parentheses
    process(100, "python", 50)
    process(200, "python", 60)
    process(60, "slurmstepd", 1)  # srun: no hydra proxy above the rank
    assert hydra_topology_files(100, tmp_path) == ["/tmp/hydra_hwloc_xmlfile_uRN87d"]
    assert hydra_topology_files(200, tmp_path) == []
    assert hydra_topology_files(999, tmp_path) == []  # no such process


def test_only_names_no_live_process_uses_are_removed(tmp_path: Path) -> None:
    """A job still running keeps its segment: one held open by a live process (here a
    child, as a rank holds MPICH's) stays, and goes once that process has ended."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here")
    held = f"{MPICH_SEGMENT_PREFIX}hpcmr_test_{os.getpid()}_held"
    free = f"{MPICH_SEGMENT_PREFIX}hpcmr_test_{os.getpid()}_free"
    for path in (held, free):
        Path(path).write_bytes(b"x")
    holder = subprocess.Popen([sys.executable, "-c", "import sys; f = open(sys.argv[1]); "
                               "print(flush=True); sys.stdin.read()", held],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "\n"  # it is open
        assert remove_unused([held, free, "/etc/hostname"]) == [free]  # and nothing else
        assert os.path.exists(held) and not os.path.exists(free)
    finally:
        holder.communicate("", timeout=30)
        assert remove_unused([held]) == [held]
        assert not os.path.exists(held)


def test_the_package_reads_no_process_table_and_no_launchers_files() -> None:
    """Clean-up of MPICH's and hydra's files lives in the tests: no code of the package
    names /proc, /dev/shm or hydra's files, or asks psutil about another process."""
    pattern = re.compile(r"/proc\b|/dev/shm|hydra|psutil \. Process \( [^)]")
    code = package_statements()
    found = [f"{path}:{n}: {text}" for path, n, text in code if pattern.search(text)]
    assert not found, found
    assert any("psutil . Process ( )" in text for _, _, text in code), "nothing read"
