"""Checkpoints: atomic writes, and a damaged newest checkpoint falls back to the previous."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpc_multires.errors import UserError
from hpc_multires.train.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    load_latest,
    prune,
    save_atomic,
)


def state(epoch: int) -> dict:
    return {"model": {"w": torch.full((4,), float(epoch))}, "epoch": epoch, "step": 10 * epoch}


def test_order_and_mid_epoch_names(tmp_path: Path) -> None:
    for epoch, mid in ((1, None), (2, 15), (2, None), (10, None)):
        save_atomic(state(epoch), checkpoint_path(tmp_path, epoch, mid))
    (tmp_path / ".epoch-0011.pt.tmp-123").write_bytes(b"half")  # a write that died
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "epoch-0001.pt", "epoch-0002-step-00000015.pt", "epoch-0002.pt", "epoch-0010.pt"]
    prune(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0002.pt", "epoch-0010.pt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_newest_falls_back(tmp_path: Path, damage: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    save_atomic(state(1), checkpoint_path(tmp_path, 1))
    save_atomic(state(2), checkpoint_path(tmp_path, 2))
    newest = checkpoint_path(tmp_path, 2)
    data = newest.read_bytes()
    newest.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00" * 100,
                        "empty": b""}[damage])
    path, loaded = load_latest(tmp_path)
    assert path.name == "epoch-0001.pt" and loaded["epoch"] == 1
    assert torch.equal(loaded["model"]["w"], torch.full((4,), 1.0))
    assert "does not load" in capsys.readouterr().err


def test_nothing_loads(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no checkpoint"):
        load_latest(tmp_path)
    checkpoint_path(tmp_path, 1).write_bytes(b"junk")
    with pytest.raises(UserError, match="none of the 1 checkpoints"):
        load_latest(tmp_path)


def test_write_that_dies_leaves_the_previous_file(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash in the middle of a write leaves the checkpoint that was there, whole."""
    path = checkpoint_path(tmp_path, 3)
    save_atomic(state(1), path)

    def dies_half_way(obj: object, f) -> None:  # type: ignore[no-untyped-def]
        f.write(b"PK\x03\x04 half of a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space"):
        save_atomic(state(2), path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-0003.pt"]  # no temporary left
    loaded = torch.load(path, weights_only=False)
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["w"], torch.full((4,), 1.0))


def test_resume_past_a_damaged_newest_keeps_what_it_writes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """checkpoint_keep = 1, the newest file damaged: the run resumes from the previous one
    and saves again. Pruning must keep the new checkpoint, not the damaged file that sorts
    after it (else the next resume finds nothing that loads)."""
    for epoch in (4, 5):
        save_atomic(state(epoch), checkpoint_path(tmp_path, epoch))
    damaged = checkpoint_path(tmp_path, 5)
    damaged.write_bytes(damaged.read_bytes()[:100])
    path, loaded = load_latest(tmp_path)
    assert path.name == "epoch-0004.pt" and loaded["epoch"] == 4
    err = capsys.readouterr().err
    assert "does not load" in err and "set aside epoch-0005.pt" in err
    # What Trainer.save does next, inside epoch 5.
    written = checkpoint_path(tmp_path, 5, 57)
    save_atomic(state(4), written)
    prune(tmp_path, keep=1)
    assert list_checkpoints(tmp_path) == [written]
    assert load_latest(tmp_path)[0] == written
    assert (tmp_path / "epoch-0005.pt.unreadable").exists()  # kept for a look, not loaded


def test_nothing_is_set_aside_when_nothing_loads(tmp_path: Path) -> None:
    for epoch in (1, 2):
        checkpoint_path(tmp_path, epoch).write_bytes(b"junk")
    with pytest.raises(UserError, match="none of the 2 checkpoints"):
        load_latest(tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0001.pt", "epoch-0002.pt"]


def test_prune_removes_temporary_files_of_dead_writes(tmp_path: Path) -> None:
    save_atomic(state(1), checkpoint_path(tmp_path, 1))
    (tmp_path / ".epoch-0002.pt.tmp-999999999").write_bytes(b"half of a checkpoint")
    save_atomic(state(2), checkpoint_path(tmp_path, 2))
    prune(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001.pt", "epoch-0002.pt"]
