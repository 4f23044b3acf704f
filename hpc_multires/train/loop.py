"""The training loop of one stage: read it top to bottom.

Per step: read a batch (prefetched in the background), forward, MSE loss, backward
(DDP allreduces gradients among the stage's ranks during it), optimizer step. Every
`log.every_steps` the mean loss over the stage's ranks is logged; every epoch the
validation MAE is computed over the whole validation set (each rank takes a disjoint
share) and a checkpoint is written, and every `train.checkpoint_every_steps` in between.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from hpc_multires.comm.dist import Comm
from hpc_multires.comm.horovod import HorovodGroups
from hpc_multires.data.crop import tiles, window_rng, window_starts
from hpc_multires.data.loader import WindowedBatch, iterate_batches
from hpc_multires.data.sampler import GlobalBatchSampler, shard_evenly
from hpc_multires.data.store import SampleStore
from hpc_multires.errors import UserError
from hpc_multires.plan.compat import config_changes
from hpc_multires.plan.config import Config
from hpc_multires.plan.load import config_to_dict
from hpc_multires.plan.stages import Stage
from hpc_multires.train import checkpoint, preempt
from hpc_multires.train.metrics import MetricsLog, Progress
from hpc_multires.train.optim import build_optimizer, learning_rate, set_learning_rate


@dataclass
class Split:
    """Samples of a store used for one purpose (training or validation)."""

    store: SampleStore
    indices: np.ndarray


def step_seed(seed: int, stage: str, step: int, rank: int) -> int:
    """The torch seed of one training step (its dropout masks), fixed by the run's seed, the
    stage, the step and the rank: a stage resumed inside an epoch draws the masks it would
    have drawn, with no random state in the checkpoint."""
    key = [seed, step, rank, *stage.encode()]
    return int(np.random.SeedSequence(key).generate_state(1)[0])


@dataclass
class StopAt:
    """Stop (with a checkpoint) once `epoch` epochs of `stage` (None: any stage) are done."""

    epoch: int
    stage: str | None = None

    def applies(self, stage: str, epoch: int) -> bool:
        return (self.stage is None or self.stage == stage) and epoch >= self.epoch


class Trainer:
    """Trains one stage's model on its ranks; state lives in its checkpoints only."""

    def __init__(self, cfg: Config, stage: Stage, comm: Comm, model: nn.Module, train: Split,
                 val: Split, ckpt_dir: Path, log: MetricsLog, progress: Progress,
                 clock: Callable[[], float], horovod: HorovodGroups | None = None) -> None:
        self.cfg = cfg
        self.stage = stage
        self.tcfg = stage.train
        self.comm = comm
        self.model = model.to(comm.device)
        self.train = train
        self.val = val
        self.ckpt_dir = ckpt_dir
        self.log = log
        self.progress = progress
        self.clock = clock
        self.horovod = horovod
        self.optimizer = build_optimizer(self.tcfg, list(self.model.parameters()))
        # At least one step per epoch: driver.run.open_levels checked the training set
        # against the global batch before any stage ran.
        self.sampler = GlobalBatchSampler(train.indices, self.tcfg.global_batch, comm.rank,
                                          comm.world_size, cfg.run.seed)
        self._flag_polled = -math.inf  # when the job-wide preemption flag was last read
        self.crop = stage.config.crop  # 0: whole samples
        self.dropout = cfg.model.dropout > 0  # the only random layers of the models

    def batches(self, epoch: int, start_step: int) -> list[np.ndarray] | list[WindowedBatch]:
        """This rank's batches of `epoch` from `start_step` on; for a stage on windows, each
        with its windows' places, drawn per step (a resumed epoch draws the same ones)."""
        batches = self.sampler.batches(epoch, start_step)
        if not self.crop:
            return batches
        spatial = self.train.store.sample_shape[1:]
        return [WindowedBatch(b, window_starts(spatial, self.crop, len(b), window_rng(
                    self.cfg.run.seed, self.stage.name, epoch, start_step + k, self.comm.rank)),
                              self.crop)
                for k, b in enumerate(batches)]

    def tag(self) -> dict[str, Any]:
        """What every metrics record of this stage carries."""
        return {"stage": self.stage.name, "level": self.stage.level, "group": self.stage.group}

    # ------------------------------------------------------------------ state

    def state(self, epoch: int, step: int, epoch_step: int, loss_sum: float,
              elapsed: float) -> dict[str, Any]:
        return {"format": 1, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "stage": self.stage.name,
                "epoch": epoch, "step": step, "epoch_step": epoch_step, "loss_sum": loss_sum,
                "stage_elapsed_s": elapsed, "wall_s": self.clock(),
                "world_size": self.comm.world_size, "config": config_to_dict(self.cfg)}

    def restore(self, state: dict[str, Any], path: Path) -> None:
        changed = config_changes(state["config"], config_to_dict(self.cfg))
        if changed:
            raise UserError(
                f"the config differs from the one {path} was trained with, in {changed}; "
                "resume with the run's own config (RUN_DIR/config.toml) or start a new "
                "--run-dir")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:  # same config, other data: another sample shape or labels
            first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
            raise UserError(
                f"the model in {path} does not fit the one built for the data at data.path "
                f"({first}); data.path holds samples of another shape or another number of "
                "labels than the run was trained on: resume with the run's own data, or "
                "start a new --run-dir") from None
        self.optimizer.load_state_dict(state["optimizer"])

    def save(self, state: dict[str, Any], epoch: int, mid_epoch_step: int | None) -> None:
        if not self.comm.is_root:
            return
        checkpoint.save_atomic(state, checkpoint.checkpoint_path(self.ckpt_dir, epoch,
                                                                 mid_epoch_step))
        checkpoint.prune(self.ckpt_dir, self.tcfg.checkpoint_keep)

    # ------------------------------------------------------------------ loop

    def fit(self, resume_from: Path | None = None, stop: StopAt | None = None,
            loaded: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train the stage to its end (or its stop); returns the last metrics, `done`, and
        `budget_reached` when train.time_budget_s ended it (final.pt keeps it, so a resumed
        run skips the stage). A signal to any rank of the job, in this stage or a concurrent
        one (the job-wide flag), raises `Preempted` after a checkpoint at an agreed step.

        `resume_from`: the checkpoint to continue from, the same file on every rank of the
        stage (chosen by its first rank); `loaded`: its contents, where already loaded."""
        cfg, tcfg, comm = self.cfg, self.tcfg, self.comm
        spe = self.sampler.steps_per_epoch
        total_steps = tcfg.epochs * spe
        epoch = step = epoch_step = 0  # epochs completed, optimizer steps, steps into epoch
        loss_carry, elapsed_before = 0.0, 0.0
        start: dict[str, Any] = {}  # the start record, for a stage that starts now
        if resume_from is not None:
            path = resume_from
            state = loaded if loaded is not None else checkpoint.load_chosen(path)
            self.restore(state, path)
            epoch, step, epoch_step = state["epoch"], state["step"], state["epoch_step"]
            loss_carry, elapsed_before = state["loss_sum"], state["stage_elapsed_s"]
            self.progress.line(f"stage {self.stage.name}: resumed from {path.name} "
                               f"(epoch {epoch}, step {step})")
        else:
            start = {"kind": "start", **self.tag(), "step": 0, "wall_s": self.clock(),
                     **self._start_record()}
        ddp = self.distribute(broadcast=not (resume_from is not None and step > 0))
        if start and self.stage.config.init == "fuse":
            # What the fusion kept: the fused model's validation metrics before any training
            # at this stage's level. After distribute, so every rank holds the fused weights.
            start.update({f"start_{k}": v for k, v in self.evaluate().items()})
            self.progress.line(f"stage {self.stage.name}: fused start, val MAE "
                               f"{start['start_val_mae']:.4f}")
        if start:
            self.log.write(start)
        stage_start = self.clock() - elapsed_before
        last_val: dict[str, float] = {}
        # A stage that ended on its time budget and is resumed from its last epoch (its
        # final.pt was not written) stays ended: no step past the budget.
        out_of_time = (bool(tcfg.time_budget_s) and epoch_step == 0
                       and elapsed_before >= tcfg.time_budget_s)
        while epoch < tcfg.epochs and not out_of_time:
            if stop is not None and epoch_step == 0 and stop.applies(self.stage.name, epoch):
                return {"done": False, "epoch": epoch, "step": step, **last_val}
            ddp.train()
            loss_sum = torch.tensor(loss_carry, dtype=torch.float64, device=comm.device)
            mark_t, mark_step = self.clock(), step
            pending: Callable[[], list[float]] | None = None  # the previous step's stop vote
            for x, y in iterate_batches(self.train.store, self.batches(epoch, epoch_step),
                                        cfg.data.num_workers, cfg.data.prefetch,
                                        cfg.data.read_timeout_s):
                x = x.to(comm.device, non_blocking=True)  # (b, C, *spatial)
                y = y.to(comm.device, non_blocking=True)  # (b, P)
                lr = learning_rate(tcfg, step, total_steps, spe)
                set_learning_rate(self.optimizer, lr)
                if self.dropout:  # masks fixed by the step: a resumed step draws the same
                    torch.manual_seed(step_seed(cfg.run.seed, self.stage.name, step, comm.rank))
                loss = nn.functional.mse_loss(ddp(x), y)
                self.optimizer.zero_grad()  # set_to_none, torch's default
                loss.backward()  # DDP allreduces the gradients here
                self.optimizer.step()
                loss_sum += loss.detach()  # no sync: stays on the device until epoch end
                step += 1
                epoch_step += 1
                # .item() is a device sync point; only pay it on log steps.
                if step % cfg.log.every_steps == 0 or epoch_step == spe:
                    mean_loss = comm.sum([loss.item()])[0] / comm.world_size
                    if not math.isfinite(mean_loss):
                        raise UserError(
                            f"stage {self.stage.name!r}: the loss became {mean_loss} at step "
                            f"{step}; lower its learning rate (now {tcfg.lr}) or check the "
                            "data for extreme values")
                    now = self.clock()
                    sps = (step - mark_step) * tcfg.global_batch / max(now - mark_t, 1e-9)
                    mark_t, mark_step = now, step
                    self.log.write({"kind": "step", **self.tag(), "epoch": epoch, "step": step,
                                    "wall_s": now, "samples_per_s": sps, "loss": mean_loss,
                                    "lr": lr})
                    self.progress.update(step, epoch + 1, f"{self.stage.name} loss "
                                         f"{mean_loss:.4f} {sps:.1f} samples/s")
                every = tcfg.checkpoint_every_steps
                if every and step % every == 0 and epoch_step < spe:
                    self.save(self.state(epoch, step, epoch_step, float(loss_sum),
                                         self.clock() - stage_start), epoch + 1, step)
                # The stop vote (a preemption signal on any rank, the time budget), started
                # now and counted after the next step: every rank acts on the same vote at
                # the same step, and nobody waits for it.
                vote = comm.max_started([float(preempt.requested() or self._job_preempted()),
                                         self.clock() - stage_start])
                decided, pending = (pending() if pending else None), vote
                if decided and self._stop(decided, epoch, step, epoch_step, loss_sum,
                                          stage_start):
                    out_of_time = True
                    break
            if pending is not None and self._stop(pending(), epoch, step, epoch_step, loss_sum,
                                                  stage_start):  # the last step's vote
                out_of_time = True
            epoch += 1
            epoch_loss = comm.sum([float(loss_sum)])[0] / (comm.world_size * max(epoch_step, 1))
            epoch_step = 0
            loss_carry = 0.0
            last_val = self.evaluate()
            wall = self.clock()
            record = {"kind": "epoch", **self.tag(), "epoch": epoch, "step": step,
                      "wall_s": wall,
                      "samples_per_s": step * tcfg.global_batch / max(wall - stage_start, 1e-9),
                      "loss": epoch_loss, **last_val,
                      "rss_mb": psutil.Process().memory_info().rss / 2**20}
            self.log.write(record)
            self.progress.line(
                f"{self.stage.name} epoch {epoch}/{tcfg.epochs} step {step} loss "
                f"{epoch_loss:.4f} val_mae {last_val['val_mae']:.4f} wall {wall:.1f}s"
                + (" (time budget reached)" if out_of_time else ""))
            self.save(self.state(epoch, step, 0, 0.0, wall - stage_start), epoch, None)
            comm.barrier()  # nobody reads a checkpoint before it is complete
        if not last_val:  # resumed from the stage's last checkpoint: report where it ended
            last_val = self.evaluate()
        return {"done": True, "epoch": epoch, "step": step, "wall_s": self.clock(),
                "budget_reached": out_of_time, **last_val}

    def _job_preempted(self, every_s: float = 1.0) -> bool:
        """Whether a rank of another group stopped the job on a signal (polled at most once
        every `every_s`, by the stage's root: the vote carries it to the other ranks)."""
        now = self.clock()
        if not self.comm.is_root or now - self._flag_polled < every_s:
            return False
        self._flag_polled = now
        return self.comm.flag("preempted") is not None

    def _stop(self, vote: list[float], epoch: int, step: int, epoch_step: int,
              loss_sum: torch.Tensor, stage_start: float) -> bool:
        """Act on a stop vote: raise on preemption (after a checkpoint); True: out of time."""
        preempted, elapsed = vote
        if preempted > 0:
            self.save(self.state(epoch, step, epoch_step, float(loss_sum),
                                 self.clock() - stage_start), epoch + 1, step)
            self.comm.barrier()  # the checkpoint is complete before anyone leaves
            self.comm.flag("preempted", "1")
            raise preempt.Preempted(
                f"stopped on {preempt.reason() or 'a signal'} at step {step} of stage "
                f"{self.stage.name!r} (epoch {epoch + 1}), checkpoint written; "
                "continue with --resume (the Slurm scripts requeue themselves)")
        return bool(self.tcfg.time_budget_s) and elapsed >= self.tcfg.time_budget_s

    def distribute(self, broadcast: bool) -> nn.Module:
        """The model as trained, with gradient averaging over the stage's ranks.

        DDP: a wrapper that allreduces during backward and broadcasts the group root's
        weights when built. Horovod: the optimizer is wrapped instead (its `step` waits
        for the averaged gradients) and the root's weights and optimizer state are
        broadcast once, unless they came from a checkpoint every rank loaded.
        """
        if self.horovod is None:
            return self.comm.wrap(self.model)
        self.optimizer = self.horovod.distribute(
            self.model, self.optimizer, self.stage.ranks, self.cfg.comm.compression, broadcast)
        return self.model

    def _start_record(self) -> dict[str, Any]:
        train_y = self.train.store.labels()[self.train.indices]  # (N, P)
        val_y = self.val.store.labels()[self.val.indices]
        mean_mae = float(np.abs(val_y - train_y.mean(axis=0)).mean())
        return {"world_size": self.comm.world_size, "ranks": list(self.stage.ranks),
                "global_batch": self.tcfg.global_batch,
                "local_batch": self.sampler.local_batch,
                "steps_per_epoch": self.sampler.steps_per_epoch,
                "train_samples": len(self.train.indices), "val_samples": len(self.val.indices),
                "sample_shape": list(self.train.store.sample_shape),
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "val_mae_mean_predictor": mean_mae}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation MAE and MSE over the whole validation set, exact over the stage's ranks."""
        self.model.eval()
        mine = self.val.indices[shard_evenly(len(self.val.indices), self.comm.rank,
                                             self.comm.world_size)]
        size = self.sampler.local_batch
        batches = [mine[i:i + size] for i in range(0, len(mine), size)]
        names = self.val.store.schema.label_names
        abs_sum = np.zeros(len(names))  # (P,)
        sq_sum = rows = 0.0
        for x, y in iterate_batches(self.val.store, batches, self.cfg.data.num_workers,
                                    self.cfg.data.prefetch, self.cfg.data.read_timeout_s):
            x = x.to(self.comm.device)
            # A stage on windows: the mean prediction over the windows that tile a sample.
            out = self.model(x) if not self.crop else \
                torch.stack([self.model(t) for t in tiles(x, self.crop)]).mean(dim=0)
            err = out - y.to(self.comm.device)  # (b, P)
            abs_sum += err.abs().sum(dim=0).double().cpu().numpy()
            sq_sum += float(err.square().sum())
            rows += err.shape[0]
        *abs_total, sq_sum, rows = self.comm.sum([*abs_sum.tolist(), sq_sum, rows])
        rows = max(rows, 1)
        return {"val_mae": sum(abs_total) / (rows * len(names)),
                "val_mse": sq_sum / (rows * len(names)),
                **{f"val_mae/{n}": a / rows for n, a in zip(names, abs_total, strict=True)}}
