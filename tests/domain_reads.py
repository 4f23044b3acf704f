"""Run under mpiexec by tests/test_domain_mpi.py: `hpc-multires train ARGS` with every
HDF5 shard opened through a file object that records each read (offset, bytes), so the
test can say which of /x's chunks each rank read. Readers must run in the rank
(data.num_workers = 0) and through HDF5 (data.verify_reads = "on"), so that every byte
goes through the file object. argv: OUT_DIR, then the CLI's arguments; writes
OUT_DIR/reads-RANK.json: {shard file name: [[offset, bytes], ...]}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import h5py
from counting_file import CountingFile

from hpc_multires.data import store

READS: dict[str, list[tuple[int, int]]] = {}


def counted_open(path: Path) -> h5py.File:
    return h5py.File(CountingFile(path, READS.setdefault(Path(path).name, [])), "r")


def main() -> int:
    out = Path(sys.argv[1])
    store._open = counted_open  # every shard the stores open, opened through the counter
    from hpc_multires.cli.main import main as cli

    try:
        code = cli(sys.argv[2:])
    finally:
        rank = os.environ.get("PMI_RANK", "0")
        (out / f"reads-{rank}.json").write_text(json.dumps(READS))
    return code


if __name__ == "__main__":
    sys.exit(main())
