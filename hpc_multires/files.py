"""Files that are never half-written, and locks between the processes that share them.

A file is written to a temporary name in its own directory, fsynced, renamed over its
final name and the directory fsynced, so a crash at any moment leaves the old file or
the new one, and the rename survives a power cut. Locks are `fcntl` locks on an open
file: `flock` by default (it belongs to the open file, so a second open in the same
process is refused too), POSIX record locks with `posix=True` (one per process and
file). Either kind reaches every NFS client. A file system without locks (Lustre
mounted without `flock`) refuses both; each caller decides whether to go on unguarded.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def fsync_dir(directory: Path) -> None:
    """Make the renames in `directory` durable (a rename lives in the directory's entry)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomic(tmp: Path, path: Path) -> None:
    """Put the finished file `tmp` in the place of `path`: its data on disk first, then
    the rename, then the directory entry."""
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: Path, tmp: Path | None = None) -> Iterator[Path]:
    """A temporary path beside `path` (by default `.NAME.tmp-PID`) to write in the block;
    when the block ends without an error it replaces `path` (`replace_atomic`). Either
    way the temporary file is gone afterwards, and an error leaves `path` as it was."""
    tmp = tmp or path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        replace_atomic(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes) -> None:
    """`path` holds `data` or what it held before, never a part."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)


def lock(f: int | IO[Any], *, wait: bool = True, posix: bool = False) -> None:
    """Take an exclusive lock on the open file `f`; it goes when the file is closed,
    however the process ends. Without `wait`: BlockingIOError while another holds it.
    OSError (ENOLCK, EINVAL, ENOSYS) where the file system has no locks."""
    try:
        (fcntl.lockf if posix else fcntl.flock)(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except PermissionError as e:  # lockf's "held by another", as flock's EWOULDBLOCK
        raise BlockingIOError(e.errno, e.strerror) from None


def unlock(f: int | IO[Any], *, posix: bool = False) -> None:
    (fcntl.lockf if posix else fcntl.flock)(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def locked(f: int | IO[Any], *, posix: bool = False) -> Iterator[bool]:
    """Hold the lock on `f` for the block (True), or yield False where the file system has
    no locks: the caller goes ahead unguarded."""
    try:
        lock(f, posix=posix)
    except OSError:
        held = False
    else:
        held = True
    try:
        yield held
    finally:
        if held:
            unlock(f, posix=posix)
