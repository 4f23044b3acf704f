"""Checkpoints written atomically and loaded with fallback.

A checkpoint is written to a temporary file in the same directory, flushed to disk and
renamed over its final name, so a crash at any moment leaves either the old file or the
new one, never a half-written one. Loading tries the newest checkpoint first and falls
back to older ones when a file does not load; the newer files that did not load are then
renamed to `<name>.unreadable`, so that they no longer count as the newest: pruning would
otherwise keep them and delete what the resumed run writes.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from hpc_multires.errors import UserError
from hpc_multires.files import atomic_path

# epoch-0003.pt: the end of epoch 3; epoch-0004-step-00000123.pt: inside epoch 4.
NAME = re.compile(r"epoch-(\d{4,})(?:-step-(\d{8,}))?\.pt")
TMP = re.compile(r"\.epoch-.*\.pt\.tmp-(\d+)")  # save_atomic's temporary file


def checkpoint_path(directory: Path, epoch: int, mid_epoch_step: int | None = None) -> Path:
    """Where the checkpoint at the end of `epoch`, or at `mid_epoch_step` inside it, goes."""
    if mid_epoch_step is None:
        return directory / f"epoch-{epoch:04d}.pt"
    return directory / f"epoch-{epoch:04d}-step-{mid_epoch_step:08d}.pt"


def _order(path: Path) -> tuple[int, float]:
    m = NAME.fullmatch(path.name)
    assert m is not None
    return int(m.group(1)), float(m.group(2)) if m.group(2) else math.inf


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files are ignored)."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if NAME.fullmatch(p.name)), key=_order)


def save_atomic(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def prune(directory: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; remove the temporary files of writes that died
    (only the stage's root writes here, one save at a time, so any other one is dead)."""
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    for p in directory.iterdir():
        m = TMP.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid():
            p.unlink(missing_ok=True)


def _set_aside(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):  # another rank set it aside first
            os.replace(path, path.with_name(path.name + ".unreadable"))


def _reason(e: Exception) -> str:
    """The first sentence of a load error: a damaged file can fail in many ways inside
    the unpickler, with long messages."""
    return (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0]


def load_chosen(path: Path) -> dict[str, Any]:
    """The checkpoint that the stage's first rank chose with `load_latest`, loaded on
    another rank of the stage."""
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        error = UserError(f"cannot load {path}, the checkpoint the stage resumes from, on "
                          f"this node ({_reason(e)}); every rank must read the run "
                          "directory: check that its file system is mounted and answering")
        error.all_ranks = False  # the stage's first rank loaded it
        raise error from None
    return state


def load_latest(directory: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint that loads, skipping (and reporting) unreadable ones, which
    are set aside once an older one has loaded. One rank of a stage chooses this way; the
    others load what it chose (`load_chosen`)."""
    candidates = list_checkpoints(directory)
    if not candidates:
        raise UserError(f"no checkpoint in {directory}; run without --resume to start "
                        "training, or pass the --run-dir of the run to continue")
    skipped: list[Path] = []
    for path in reversed(candidates):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            print(f"hpc-multires: warning: checkpoint {path} does not load ({_reason(e)}); "
                  "trying the previous one", file=sys.stderr)
            skipped.append(path)
            continue
        if isinstance(state, dict) and "model" in state and "epoch" in state:
            if skipped:
                _set_aside(skipped)
                print(f"hpc-multires: warning: resuming from {path.name}; set aside "
                      f"{', '.join(p.name for p in skipped)} as *.unreadable",
                      file=sys.stderr)
            return path, state
        print(f"hpc-multires: warning: {path} is not a training checkpoint; skipped",
              file=sys.stderr)
        skipped.append(path)
    raise UserError(f"none of the {len(candidates)} checkpoints in {directory} loads; "
                    "start a new run (choose another --run-dir)")
