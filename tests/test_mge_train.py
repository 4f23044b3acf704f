"""MGE as a stage's gradient estimator, in real training steps: per-level batches, each its
own draw of its own size, the loss mge_loss builds, resume, and bad input."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_arrays_store
from torch import nn

from hpc_multires.comm.dist import Comm
from hpc_multires.comm.ranks import RankInfo
from hpc_multires.data.store import SampleStore
from hpc_multires.methods.mge import MultiscaleGradient, mge_loss, restrict
from hpc_multires.models import build_model
from hpc_multires.models.config import ModelConfig
from hpc_multires.train.config import TrainConfig
from hpc_multires.train.loop import Split, Trainer
from hpc_multires.train.metrics import MetricsLog, Progress
from hpc_multires.train.objective import Batch, StepLoss
from hpc_multires.train.restoration import Restoration
from hpc_multires.train.spec import RunSettings, StageSpec
from hpc_multires.train.task import TaskConfig


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


class Recording(MultiscaleGradient):
    """MGE that keeps what each step was given."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.seen: list[list[tuple[int, tuple[int, ...], tuple[int, ...], np.ndarray]]] = []
        self.losses: list[tuple[StepLoss, float]] = []

    def loss(self, model: nn.Module, batches: Sequence[Batch], step: int) -> StepLoss:
        self.seen.append([(b.level, tuple(b.x.shape), tuple(b.y.shape), b.indices.copy())
                          for b in batches])
        out = super().loss(model, batches, step)
        # The same loss straight from mge_loss on the batches as read.
        pairs = [(b.x, b.y) for b in batches]
        if batches[0].level == batches[1].level:  # read at the stage's level: restrict here
            pairs = [(restrict(x, self.restriction, k), restrict(y, self.restriction, k))
                     if k else (x, y) for k, (x, y) in enumerate(pairs)]
        direct = mge_loss(model, self.base.criterion, pairs, self.restriction).loss
        self.losses.append((out, float(direct.detach())))
        return out


def one_process() -> Comm:
    return Comm(RankInfo(rank=0, world_size=1, local_rank=0, local_size=1, node_index=0,
                         node_count=1, launcher="single"), torch.device("cpu"))


@pytest.mark.parametrize("restriction", ["avg", "nearest"])
def test_each_level_reads_its_own_draw_of_its_own_size(tiny_images: Path, tmp_path: Path,
                                                       restriction: str) -> None:
    """One epoch of a real Trainer with MGE over 3 levels, batch 4 at the finest, growth 2:
    each step gets a batch of 4 at level 0, 8 at level 1 and 16 at level 2 (avg: read from
    the pyramid at that size; nearest: read at level 0 and restricted in the step), clean
    targets of the same size, samples drawn per level (not the same samples), every
    level's batch from the training split only; the loss is mge_loss of those batches."""
    stores = {level: SampleStore(tiny_images, level) for level in range(3)}
    train = {level: Split(s, np.arange(36)) for level, s in stores.items()}
    task = TaskConfig(kind="denoise", t_range=(0.5, 1.0))
    objective = Recording(Restoration(task.corruption(), seed=0, val_seed=0), 3, 2.0,
                          restriction)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="unet", unet_base_channels=4,
                                    unet_multipliers=(1, 2)), (1, 32, 32), 5)
    trainer = Trainer(StageSpec(name="mge", level=0, group="all", ranks=(0,),
                                train=TrainConfig(epochs=1, global_batch=4, lr=1e-3)),
                      RunSettings(seed=3), one_process(), model, train,
                      Split(stores[0], np.arange(36, 48)), tmp_path,
                      MetricsLog(tmp_path / "metrics.jsonl", enabled=True),
                      Progress(9, enabled=False, interval_s=30.0), time.monotonic,
                      objective=objective)
    result = trainer.fit()
    assert result["done"] and len(objective.seen) == 9  # 36 samples / 4 per step
    read_levels = [0, 1, 2] if restriction == "avg" else [0, 0, 0]
    for step in objective.seen:
        assert [lv for lv, *_ in step] == read_levels
        for k, (level, xs, ys, idx) in enumerate(step):
            side = 32 >> level
            assert xs == ys == (4 * 2**k, 1, side, side)
            assert len(np.unique(idx)) == len(idx) and idx.max() < 36
        sets = [set(idx.tolist()) for *_, idx in step]
        assert sets[0] != sets[1] and not sets[0] <= sets[2]  # each level its own draw
    # Over the epoch the coarse levels do not replay the finest level's order.
    finest = np.concatenate([s[0][3] for s in objective.seen])
    level1 = np.concatenate([s[1][3] for s in objective.seen])
    assert not np.array_equal(finest[:len(level1) // 2], level1[:len(level1) // 2])
    for out, direct in objective.losses:
        assert float(out.loss.detach()) == pytest.approx(direct, rel=1e-5)
        assert float(out.loss.detach()) == pytest.approx(sum(float(v) for v in out.logged.values()),
                                                rel=1e-5)
    (start,) = records(tmp_path, "start")
    assert start["level_batches"] == [[lv, 4 * 2**k] for k, lv in enumerate(read_levels)]
    # 4 samples at levels 0 and 1, 8 at levels 1 and 2, 16 at level 2 (2D: 4x cheaper each).
    assert start["step_work"] == pytest.approx(4 * (1 + 1 / 4) + 8 * (1 / 4 + 1 / 16) + 16 / 16)


MGE_STAGE = """
[train]
estimator = "mge"
mge_levels = 2
checkpoint_every_steps = 2
"""


def test_an_mge_run_logs_its_terms_and_resumes_exactly(cli, images_config,
                                                       tmp_path: Path) -> None:
    """Through the CLI: step records carry each level's term; a run that lost everything
    after a checkpoint inside an epoch resumes from it and ends as the straight run does
    (every level's sampler restarts at the step it stopped)."""
    cfg = str(images_config(epochs=2))
    opts = ["--set", "train.estimator=mge", "--set", "train.checkpoint_every_steps=2"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    a = cli(["train", cfg, "--run-dir", str(straight), *opts])
    assert a.returncode == 0, a.stderr
    assert "mge over 2 levels (batch x2 per level, avg)" in a.stderr
    steps = records(straight, "step")
    assert len(steps) == 8  # 36 samples / 8 per step, 2 epochs
    for s in steps:
        assert s["loss"] == pytest.approx(s["mge_term0"] + s["mge_term1"], rel=1e-5)
    shutil.copytree(straight, crashed)
    ckpts = crashed / "stages" / "main" / "checkpoints"
    for p in ckpts.iterdir():  # keep the checkpoint in the middle of epoch 2 only
        if p.name != "epoch-0002-step-00000006.pt":
            p.unlink()
    (crashed / "stages" / "main" / "final.pt").unlink()
    b = cli(["train", cfg, "--run-dir", str(crashed), "--resume", *opts])
    assert b.returncode == 0, b.stderr
    assert "resumed from epoch-0002-step-00000006.pt" in b.stderr
    sa, sb = records(straight, "step"), records(crashed, "step")
    assert [r["step"] for r in sb] == list(range(1, 9))
    assert [r["loss"] for r in sb] == [r["loss"] for r in sa]
    fa = torch.load(straight / "stages" / "main" / "final.pt", weights_only=False)["model"]
    fb = torch.load(crashed / "stages" / "main" / "final.pt", weights_only=False)["model"]
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k


def one_error(result) -> str:  # type: ignore[no-untyped-def]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("hpc-multires: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_mge_levels_beyond_the_pyramid_are_one_line(cli, images_config) -> None:
    cfg = str(images_config())
    line = one_error(cli(["train", cfg, "--set", "train.estimator=mge", "--set",
                          "train.mge_levels=7"]))
    assert "train.mge_levels = 7 reaches level 6, beyond the pyramid of samples of 32x32" \
        in line and "use at most 6 levels" in line
    # Within what the images allow, but past the levels built: the pyramid command to run.
    line = one_error(cli(["train", cfg, "--set", "train.estimator=mge", "--set",
                          "train.mge_levels=4", "--set", "train.mge_growth=1", "--set",
                          "model.unet_multipliers=[1]"]))
    assert "no complete pyramid level 3" in line and "--levels 3" in line
    line = one_error(cli(["train", cfg, "--set", "train.estimator=mge", "--set",
                          "train.mge_levels=3", "--set", "train.global_batch=12"]))
    assert "level batches [12, 24, 48], the largest more than the 36 training samples" in line


def test_a_restriction_that_does_not_divide_the_images_is_one_line(cli, images_config,
                                                                   tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = write_arrays_store(tmp_path / "img24", rng.uniform(size=(16, 1, 24, 24))
                              .astype(np.float32), rng.uniform(-1, 1, (16, 2)).astype(np.float32))
    line = one_error(cli(["train", str(images_config()), "--set", f"data.path={data}",
                          "--set", "train.estimator=mge", "--set", "train.mge_levels=5",
                          "--set", "train.restriction=nearest", "--set",
                          "model.unet_multipliers=[1]"]))
    assert "restricts the samples of 24x24 at level 0 4 time(s) by 'nearest', but 16 does " \
        "not divide their sides" in line
