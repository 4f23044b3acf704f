"""Node-local staging: copy a dataset's shards to each node's local disk once, read there.

`[data] stage_to = "$TMPDIR"` (any path; environment variables are expanded on the node):
on every node, local rank 0 copies the shards into
`<stage_to>/hpc-multires-<job>-node<k>/<i>-<dataset name>/` (i = 0 for data.path, 1 for
data.val_path), verifies each copy against the SHA-256 stored in the shard, and the
node's other ranks wait on a node-local communicator. What an earlier attempt of the same
job left in that folder is removed before the free-space check. Training then reads the
local copy; the directory is removed at the end, on a preemption and on an error every rank
meets. After a crash or one rank's error (its node's other ranks may still read the copy)
the job's next attempt clears it (`stage_root`).

With `data.stage = "partition"` each node copies only the shard files named for it
(`data/partition.py`: its share of the training shards, and those holding validation
samples); the copy is then a part of the dataset, read through the store opened at its
source (`SampleStore.relocate`).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from hpc_multires.comm.dist import Comm
from hpc_multires.comm.ranks import node_barrier
from hpc_multires.data.store import INCOMPLETE, checksum_shard, store_file
from hpc_multires.errors import DataError


def stage_root(stage_to: str, comm: Comm) -> Path:
    base = Path(os.path.expandvars(os.path.expanduser(stage_to)))
    if "$" in str(base):
        raise DataError(f"data.stage_to = {stage_to!r}: an environment variable in it is not "
                        "set on this node; use a path or a variable the job defines")
    job = os.environ.get("SLURM_JOB_ID") or f"pid{os.getppid()}"
    return base / f"hpc-multires-{job}-node{comm.info.node_index}"


def _node_barrier(comm: Comm) -> None:
    """Barrier among the ranks of this node, else (MPI does not connect them) the world's."""
    if not node_barrier(comm.info):
        comm.barrier()


def copy_verified(src: Path, dst: Path, only: set[str] | None = None) -> None:
    """Copy the dataset `src` (or of its files, those named in `only`) into `dst`."""
    # The folder is this job's own: what is in it was left by an earlier attempt of the
    # same job on this node (killed before its clean-up) and is copied again anyway, so it
    # goes first rather than counting against the free space.
    if (src / INCOMPLETE).exists():
        raise DataError(f"dataset {str(src)!r} is incomplete: the command that wrote it "
                        "failed or was interrupted; run it again with --overwrite")
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True, exist_ok=True)
    shards = sorted(p for p in src.iterdir() if store_file(p.name)
                    and (only is None or p.name in only))
    free = shutil.disk_usage(dst).free
    need = sum(p.stat().st_size for p in shards)
    print(f"staging {len(shards)} shard(s), {need / 2**30:.2f} GiB, from {src} to {dst}",
          file=sys.stderr, flush=True)
    if need > free:
        raise DataError(f"staging {src} needs {need / 2**30:.1f} GiB, {dst} has "
                        f"{free / 2**30:.1f} GiB free; point data.stage_to at a larger "
                        "local disk or leave it empty to read from the shared file system")
    for shard in shards:
        tmp = dst / (shard.name + ".tmp")
        shutil.copyfile(shard, tmp)
        if not checksum_shard(tmp)["ok"]:
            tmp.unlink()
            raise DataError(f"the copy of {shard} in {dst} does not match its checksums; "
                            "the local disk or the source is damaged")
        os.replace(tmp, dst / shard.name)


def stage(paths: list[str], stage_to: str, comm: Comm,
          only: list[set[str] | None] | None = None) -> tuple[list[str], Path]:
    """Stage each dataset path (of each, the files named in `only`, None: all of them);
    returns the local paths (same order) and the staging root."""
    root = stage_root(stage_to, comm)
    local = [str(root / f"{i}-{Path(p).name}") if p else "" for i, p in enumerate(paths)]
    if comm.info.local_rank == 0:
        for i, (src, dst) in enumerate(zip(paths, local, strict=True)):
            if src:
                copy_verified(Path(src), Path(dst), None if only is None else only[i])
        print(f"staged {sum(map(bool, paths))} dataset(s) to {root} on node "
              f"{comm.info.node_index}", file=sys.stderr, flush=True)
    _node_barrier(comm)
    return local, root


def cleanup(root: Path, comm: Comm) -> None:
    _node_barrier(comm)  # nobody on the node is still reading
    if comm.info.local_rank == 0:
        shutil.rmtree(root, ignore_errors=True)
