"""files.py: atomic writes that fsync and leave the old file on failure; fcntl locks."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_line

from hpc_multires import files


def test_a_write_that_dies_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("old\n")
    with pytest.raises(OSError, match="No space"), files.atomic_path(path) as tmp:
        tmp.write_text("half of the ne")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]


def test_a_given_temporary_name_is_used_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "shard.h5"
    given = tmp_path / "shard.h5.123-abcd.pyramid-tmp"
    with files.atomic_path(path, given) as tmp:
        assert tmp == given
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and not given.exists()


def test_write_atomic_fsyncs_the_file_and_then_its_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    path = tmp_path / "metrics.jsonl"
    files.write_atomic(path, "{}\n")
    # The temporary file before the rename, the directory after it.
    assert [Path(p).parent for p in synced] == [tmp_path, tmp_path.parent]
    assert Path(synced[0]).name.startswith(".metrics.jsonl.tmp-")
    assert path.read_text() == "{}\n"


def test_a_held_flock_refuses_a_second_open_of_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    with open(path, "w") as first, open(path, "w") as second:
        files.lock(first, wait=False)
        with pytest.raises(BlockingIOError):
            files.lock(second, wait=False)
        files.unlock(first)
        files.lock(second, wait=False)  # free again


def test_a_posix_lock_held_by_another_process_is_reported_as_held(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, time\n"
         f"f = open({str(path)!r}, 'a'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
         "print('locked', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert read_line(holder, 30).strip() == "locked"
        with open(path, "a") as f, pytest.raises(BlockingIOError):
            files.lock(f, wait=False, posix=True)
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_locked_goes_ahead_unguarded_where_the_file_system_has_no_locks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_locks(f: object, how: int) -> None:
        if how != fcntl.LOCK_UN:
            raise OSError(errno.ENOLCK, "No locks available")
        raise AssertionError("unlocking a lock that was never taken")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with open(tmp_path / "log", "a") as f, files.locked(f, posix=True) as held:
        assert held is False
        f.write("written all the same\n")
    assert (tmp_path / "log").read_text() == "written all the same\n"


def test_locked_releases_the_lock_at_the_end_of_the_block(tmp_path: Path) -> None:
    path = tmp_path / "shard.h5.pyramid-lock"
    with open(path, "w") as f, open(path, "w") as other:
        with files.locked(f) as held:
            assert held
            with pytest.raises(BlockingIOError):
                files.lock(other, wait=False)
        files.lock(other, wait=False)  # `f` is still open: the block's end let go
