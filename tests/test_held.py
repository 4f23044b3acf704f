"""A coarse level held in memory (data.hold_mb, data/held.py): the batches it gives are the
readers' bit for bit, it is read once per stage, and it trains as the same level read
from its files."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_multires.data import held as held_module
from hpc_multires.data import loader as loader_module
from hpc_multires.data.held import HeldSamples, held_bytes, hold_splits
from hpc_multires.data.loader import BatchReader, WindowedBatch
from hpc_multires.data.store import SampleStore


def test_held_batches_equal_the_readers_batches(pyramid_data: Path) -> None:
    store = SampleStore(pyramid_data, level=1)
    held = HeldSamples(store, np.arange(10, 60))
    reader = BatchReader(store)
    batch = np.array([41, 10, 59, 23])
    x, y = held.read(batch)
    want_x, want_y = reader.read(batch)  # type: ignore[misc]
    assert x.shape == (4, *store.sample_shape)
    assert np.array_equal(x.numpy(), np.asarray(want_x)) and np.array_equal(y.numpy(), want_y)
    windows = WindowedBatch(batch, np.array([[0, 1, 2], [3, 0, 1], [4, 4, 4], [1, 2, 3]]), 4)
    wx, wy = held.read(windows)
    want_wx, want_wy = reader.read(windows)  # type: ignore[misc]
    assert wx.shape == (4, store.sample_shape[0], 4, 4, 4)
    assert np.array_equal(wx.numpy(), np.asarray(want_wx))
    assert np.array_equal(wy.numpy(), want_wy)
    with pytest.raises(ValueError, match="not all held"):
        held.read(np.array([5, 11]))


def test_hold_splits_leaves_level_0_on_its_files_and_keeps_to_the_budget(
        pyramid_data: Path) -> None:
    level0, level1, level2 = (SampleStore(pyramid_data, level=k) for k in (0, 1, 2))
    train, val = np.arange(72), np.arange(72, 96)
    one_mb = 2**20
    assert held_bytes(level1, 72) == 72 * int(np.prod(level1.sample_shape)) * 4
    # Budget for level 1's training samples and level 2's, not level 1's validation ones.
    budget = (held_bytes(level1, 72) + held_bytes(level2, 24) + held_bytes(level1, 12)) / one_mb
    got = hold_splits([(level0, train), (level1, train), (level1, val), (level2, val)], budget)
    assert got[0] is None  # level 0: read by the readers, whatever the budget
    assert got[1] is not None and len(got[1].indices) == 72
    assert got[2] is None  # what is left after level 1's training samples is too little
    assert got[3] is not None and got[3].nbytes >= held_bytes(level2, 24)
    assert hold_splits([(level1, train)], 0.0) == [None]


def _train(cli_in_process: Callable, config: Path, run: Path, *extra: str
           ) -> tuple[list[float], Counter[str]]:
    """Train in this process (1 rank, no reader processes); the losses of its step
    records and how many samples each path read from the files."""
    reads: Counter[str] = Counter()

    def counting(name: str, read: Callable) -> Callable:
        def wrapped(store: SampleStore, indices, *args, **kwargs):  # type: ignore[no-untyped-def]
            reads[f"level {store.level} {name}"] += len(indices)
            return read(store, indices, *args, **kwargs)
        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(held_module, "read_batch", counting("held", held_module.read_batch))
        mp.setattr(loader_module, "read_batch", counting("batch", loader_module.read_batch))
        r = cli_in_process(["train", config, "--run-dir", run, "--set", "data.level=1",
                            "--set", "train.epochs=3", *extra])
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [rec["loss"] for rec in records if rec["kind"] == "step"], reads


def test_a_held_level_is_read_once_and_trains_as_read_from_its_files(
        pyramid_data: Path, tiny_config: Callable[..., Path], tmp_path: Path,
        cli_in_process: Callable) -> None:
    config = tiny_config(data=pyramid_data)  # 96 samples: 72 to train, 24 to validate
    held_losses, held_reads = _train(cli_in_process, config, tmp_path / "held")
    file_losses, file_reads = _train(cli_in_process, config, tmp_path / "files",
                                     "--set", "data.hold_mb=0")
    assert held_losses == file_losses and len(held_losses) == 3 * 9
    # Held: each sample read once, at the stage's start, and no batch read from the files.
    assert held_reads == {"level 1 held": 96}, held_reads
    # From the files: every epoch's 9 batches of 8 and 3 validations of 24.
    assert file_reads == {"level 1 batch": 3 * 72 + 3 * 24}, file_reads
    start = json.loads((tmp_path / "held" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["held_mb"] == pytest.approx(held_bytes(SampleStore(pyramid_data, level=1), 96)
                                             / 2**20 + 96 * 4 * 4 / 2**20, rel=1e-3)


def test_a_negative_hold_budget_is_one_line(tiny_config: Callable[..., Path], tmp_path: Path,
                                            cli_in_process: Callable) -> None:
    r = cli_in_process(["train", tiny_config(), "--run-dir", tmp_path / "run",
                        "--set", "data.hold_mb=-1"])
    assert r.returncode == 2 and "data.hold_mb" in r.stderr and "MiB" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_held_clean_images_are_corrupted_as_the_readers_corrupt_them(tiny_images: Path
                                                                      ) -> None:
    """An image task's level held clean: each batch is (the corruption of the clean
    images, the clean images), what a reader with the same ReadCorruption gives."""
    from hpc_multires.data.corrupt import Corruption
    from hpc_multires.data.loader import ReadCorruption

    store = SampleStore(tiny_images, level=1)
    held = HeldSamples(store, np.arange(48), clean=True)
    spec = ReadCorruption(Corruption(task="denoise", t_range=(0.5, 1.0)), seed=5)
    batch = np.array([7, 30, 2])
    x, y = held.read(batch, spec)
    want_x, want_y = BatchReader(store, corruption=spec).read(batch)  # type: ignore[misc]
    assert x.shape == (3, 1, 16, 16) and not torch.equal(x, y)
    assert np.array_equal(x.numpy(), np.asarray(want_x))
    assert np.array_equal(y.numpy(), np.asarray(want_y))
    with pytest.raises(ValueError, match="held clean, read without a corruption"):
        held.read(batch)


def test_an_image_task_at_a_held_level_trains_as_from_its_files(
        images_config: Callable[..., Path], tmp_path: Path, cli_in_process: Callable) -> None:
    config = images_config(epochs=2)
    losses = {}
    for hold in ("256", "0"):
        run = tmp_path / f"hold-{hold}"
        r = cli_in_process(["train", config, "--run-dir", run, "--set", "data.level=1",
                            "--set", f"data.hold_mb={hold}"])
        assert r.returncode == 0, r.stderr
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert (records[0]["held_mb"] > 0) == (hold != "0")
        losses[hold] = [(rec["loss"], rec.get("val_psnr")) for rec in records
                        if rec["kind"] in ("step", "epoch")]
    assert losses["256"] == losses["0"] and len(losses["0"]) > 4


def test_a_resume_may_change_what_is_held(pyramid_data: Path, tiny_config: Callable[..., Path],
                                          tmp_path: Path, cli_in_process: Callable) -> None:
    """Holding a level changes no batch, so a resume may turn it off (or on)."""
    config, run = tiny_config(data=pyramid_data), tmp_path / "run"
    first = cli_in_process(["train", config, "--run-dir", run, "--set", "data.level=1",
                            "--set", "train.epochs=2", "--stop-after-epoch", "1"])
    assert first.returncode == 0, first.stderr
    again = cli_in_process(["train", config, "--run-dir", run, "--resume", "--set",
                            "data.level=1", "--set", "train.epochs=2", "--set",
                            "data.hold_mb=0"])
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr
