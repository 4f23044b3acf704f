"""Node-local staging: each node's copy exists during the run, verified, gone after."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import end_tree, start_cli, stderr_of

from hpc_multires.data.store import checksum_shard

pytestmark = pytest.mark.mpi


def test_staged_copy_is_verified_used_and_removed(tiny_config, tiny_cosmo: Path,
                                                  tmp_path: Path) -> None:
    local = tmp_path / "node-local"
    cfg = tiny_config(epochs=6)
    cfg.write_text(cfg.read_text().replace("[data]", f'[data]\nstage_to = "{local}"'))
    proc = start_cli(["train", str(cfg), "--run-dir", str(tmp_path / "run")], ranks=2)
    seen: list[Path] = []
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists():  # training has started
            assert proc.poll() is None, stderr_of(proc)
            assert time.monotonic() < deadline
            time.sleep(0.05)
        seen = sorted(local.glob("hpc-multires-*-node0/0-cosmo16/shard-*.h5"))
        assert [p.name for p in seen] == sorted(p.name for p in tiny_cosmo.glob("shard-*.h5"))
        assert all(checksum_shard(p)["ok"] for p in seen)  # verified copies, in use now
        _, err = proc.communicate(timeout=180)
    finally:
        end_tree(proc)
    assert proc.returncode == 0, err
    assert "staged 1 dataset(s)" in err
    # Training read the node's copy: the start-up line names it as the data.
    data_line = next(line for line in err.splitlines() if line.strip().startswith("data "))
    assert "/node-local/hpc-multires-" in data_line and "/0-cosmo16" in data_line, data_line
    assert not any(local.iterdir())  # cleaned up at the end
    saved = (tmp_path / "run" / "config.toml").read_text()
    assert str(tiny_cosmo) in saved  # the run records the shared path, not the copy


def test_unset_variable_in_stage_to(cli, tiny_config) -> None:
    cfg = tiny_config()
    cfg.write_text(cfg.read_text().replace("[data]", '[data]\nstage_to = "$NO_SUCH_VAR/x"'))
    r = cli(["train", str(cfg)])
    assert r.returncode == 2 and "not set on this node" in r.stderr, r.stderr


def test_a_stale_copy_of_an_earlier_attempt_is_replaced(tiny_cosmo: Path, tmp_path: Path) -> None:
    """A requeued job on the same node finds its staging folder as a killed attempt left it:
    half-copied and stale files go, and do not count against the free space."""
    from hpc_multires.data.staging import copy_verified

    dst = tmp_path / "stage" / "0-cosmo16"
    dst.mkdir(parents=True)
    shards = sorted(p.name for p in tiny_cosmo.glob("*.h5"))
    (dst / (shards[0] + ".tmp")).write_bytes(b"half a copy")
    (dst / shards[1]).write_bytes(b"a damaged earlier copy")
    copy_verified(tiny_cosmo, dst)
    assert sorted(p.name for p in dst.iterdir()) == shards
    for name in shards:
        assert (dst / name).read_bytes() == (tiny_cosmo / name).read_bytes()


def test_the_copy_is_removed_when_the_run_fails_after_staging(tiny_config, tmp_path: Path,
                                                              cli) -> None:
    """An error found after the copy (here: a pyramid level the data does not have) ends
    the job with an MPI abort; the nodes' local disks must not keep the copy."""
    local = tmp_path / "node-local"
    cfg = tiny_config()
    cfg.write_text(cfg.read_text().replace("[data]", f'[data]\nstage_to = "{local}"'))
    r = cli(["train", str(cfg), "--run-dir", str(tmp_path / "run"), "--set", "data.level=3"],
            ranks=2)
    assert r.returncode == 2 and "no complete pyramid level 3" in r.stderr, r.stderr
    assert "staged 1 dataset(s)" in r.stderr  # the copy was made, then the run failed
    assert local.is_dir() and not any(local.iterdir()), list(local.rglob("*"))[:5]
