"""A read-only file object for h5py's file-object driver that counts what HDF5 reads.

`bytes_read` totals the bytes; `log`, when given, receives (offset, bytes) per read. Used by
tests/test_batch_read.py (bytes of one sub-domain read) and tests/domain_reads.py (which
chunks each rank of a domain-decomposition run read)."""

from __future__ import annotations

import io
from pathlib import Path


class CountingFile(io.RawIOBase):
    def __init__(self, path: Path, log: list[tuple[int, int]] | None = None) -> None:
        self.f = open(path, "rb")  # noqa: SIM115 (closed with the wrapper)
        self.bytes_read = 0
        self.log = log

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def,override]
        at = self.f.tell()
        n = self.f.readinto(buffer)
        self.bytes_read += n
        if self.log is not None:
            self.log.append((at, n))
        return n

    def close(self) -> None:
        self.f.close()
        super().close()
