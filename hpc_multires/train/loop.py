"""The training loop of one stage: read it top to bottom.

Per step: read the batches the stage's objective asks for (prefetched in the background;
one per request, each from its own sampler and its level's training split), its loss
(`objective.py`), backward (DDP allreduces gradients among the stage's ranks during it),
optimizer step, and the stop vote (`stop.py`). A stage lasts `train.epochs` epochs, or
`train.steps` steps when set (its last epoch then partial). Every `log.every_steps` the
mean loss over the stage's ranks is logged; every epoch a checkpoint is written (and
every `train.checkpoint_every_steps` in between), and every `train.eval_every`-th epoch
and the stage's last the objective's validation metrics are computed (each rank takes a
disjoint share; on `train.eval_samples` of the validation set, the last on all of it),
their time logged apart from the training's.

A stage may read a fixed block of every sample instead of the whole (`StageSpec.region_*`,
a sub-domain of domain decomposition): it trains and validates on that block, and only its
chunks are read. A model that reduces its own gradients (`reduces_gradients`, the coherent
CNN-DNN whose ranks hold different parameters) is not wrapped in DDP; the loop calls its
`reduce_gradients()` after backward.

The trainer is given its stage and the run's settings (`spec.py`); it never reads the
plan. Whether a checkpoint's config allows resuming from it is the driver's question.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from hpc_multires.comm.dist import Comm
from hpc_multires.comm.horovod import HorovodGroups
from hpc_multires.comm.mpi_allreduce import GradientReducer, MpiGroups
from hpc_multires.data.crop import window_rng, window_starts
from hpc_multires.data.held import HeldSamples, hold_splits
from hpc_multires.data.loader import WindowedBatch, iterate_batches, iterate_steps
from hpc_multires.data.sampler import GlobalBatchSampler, Shares, shard_evenly
from hpc_multires.data.store import SampleStore
from hpc_multires.errors import UserError
from hpc_multires.train import checkpoint, preempt
from hpc_multires.train.metrics import MetricsLog, Progress
from hpc_multires.train.objective import (
    Batch,
    Objective,
    Regression,
    StepLoss,
    check_requests,
)
from hpc_multires.train.optim import build_optimizer, learning_rate, set_learning_rate
from hpc_multires.train.spec import RunSettings, StageSpec
from hpc_multires.train.step_parts import StepParts
from hpc_multires.train.stop import StopAt, StopVote, Vote

__all__ = ["Position", "Split", "StopAt", "Trainer", "step_seed"]


@dataclass
class Split:
    """Samples of a store used for one purpose (training or validation)."""

    store: SampleStore
    indices: np.ndarray
    shares: Shares | None = None
    """A training set partitioned across nodes (data.stage = "partition"): each node's
    samples; the sampler draws each rank's batches from its node's."""


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (the kernel's high-water mark,
    which getrusage brings up to the current resident set; psutil reports only the
    current one on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_memory(comm: Comm) -> dict[str, Any]:
    """The epoch record's memory: this rank's peak (`peak_rss_mb`, the root's where one
    rank writes) and every rank's of the stage, in rank order (a gather)."""
    mine = peak_rss_mb()
    every = [float(v) for v in comm.gather_object(mine)]
    return {"peak_rss_mb": mine, "peak_rss_mb_ranks": every}


def step_seed(seed: int, stage: str, step: int, rank: int) -> int:
    """The torch seed of one training step (its dropout masks), fixed by the run's seed, the
    stage, the step and the rank: a stage resumed inside an epoch draws the masks it would
    have drawn, with no random state in the checkpoint."""
    key = [seed, step, rank, *stage.encode()]
    return int(np.random.SeedSequence(key).generate_state(1)[0])


@dataclass
class Position:
    """Where the stage's training is: what a checkpoint records of the loop."""

    epoch: int = 0
    """Epochs completed."""
    step: int = 0
    """Optimizer steps taken in the stage."""
    epoch_step: int = 0
    """Steps taken into the current epoch."""
    loss_carry: float = 0.0
    """The current epoch's summed loss before this process took it up (a mid-epoch
    checkpoint's)."""
    elapsed_s: float = 0.0
    """Seconds the stage trained before this process took it up."""
    eval_s: float = 0.0
    """Of those and the ones since, seconds spent validating."""


class Trainer:
    """Trains one stage's model on its ranks; state lives in its checkpoints only."""

    def __init__(self, stage: StageSpec, run: RunSettings, comm: Comm, model: nn.Module,
                 train: Split | Mapping[int, Split], val: Split, ckpt_dir: Path,
                 log: MetricsLog,
                 progress: Progress, clock: Callable[[], float],
                 horovod: HorovodGroups | None = None,
                 objective: Objective | None = None,
                 optimizer_state: dict[str, Any] | None = None,
                 vote_comm: Comm | None = None,
                 sample_log: Path | None = None,
                 mpi: MpiGroups | None = None) -> None:
        """`train`: the stage level's training split, or every level's the objective reads;
        `optimizer_state`: an earlier stage's optimizer to start from (a resumed stage's
        checkpoint replaces it); `horovod`, `mpi`: the gradient backend when not DDP;
        `vote_comm`: the ranks that must stop at the same step (default: the stage's; the
        coherent model of domain decomposition, whose forward gathers over other stages'
        ranks too, votes over the job); `sample_log`: a file to append this rank's samples
        of each step to (log.samples)."""
        self.stage = stage
        self.run = run
        self.tcfg = stage.train
        self.comm = comm
        self.model = model.to(comm.device)
        # The training split of every level the objective reads (a Split: the stage's own).
        self.train_levels = dict(train) if isinstance(train, Mapping) else {stage.level: train}
        self.train = self.train_levels[stage.level]
        self.val = val
        self.ckpt_dir = ckpt_dir
        self.log = log
        self.progress = progress
        self.clock = clock
        self.horovod = horovod
        self.mpi = mpi
        self.reducer: GradientReducer | None = None  # the mpi backend's, once distributed
        self.parts = StepParts(run.log.step_parts)  # where a step's time goes (off: free)
        self.objective = objective if objective is not None else Regression()
        self.requests = self.objective.requests(stage.level, self.tcfg.global_batch)
        check_requests(self.requests, stage.level, self.tcfg.global_batch,
                       list(self.train_levels), comm.world_size)
        self.optimizer = build_optimizer(self.tcfg, list(self.model.parameters()))
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        # One sampler per request, each its own draw (stream); the first sets the epoch. At
        # least one step per epoch: driver.run.open_levels checked the training set against
        # the global batch before any stage ran.
        # A partitioned training set: each rank's batches come from its node's share.
        self.samplers = [GlobalBatchSampler(self.train_levels[r.level].indices, r.global_batch,
                                            comm.rank, comm.world_size, run.seed, stream=i,
                                            shares=self.train_levels[r.level].shares,
                                            ranks=comm.global_ranks)
                         for i, r in enumerate(self.requests)]
        self.sample_log = sample_log
        if sample_log is not None:
            sample_log.parent.mkdir(parents=True, exist_ok=True)
        self.data_wait_s = 0.0  # seconds this process waited for batches (`read`)
        self.sampler = self.samplers[0]
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = self.tcfg.steps or self.tcfg.epochs * self.steps_per_epoch
        self.num_epochs = -(-self.total_steps // self.steps_per_epoch)
        self.step_samples = sum(r.global_batch for r in self.requests)  # over the ranks
        self.crop = stage.crop  # 0: whole samples
        self.vote_comm = vote_comm if vote_comm is not None else comm
        # data.transform_on = "device": the readers send stored values, transformed here.
        self.transform_device = comm.device if run.data.transform_on == "device" else None
        self.eval_s = 0.0  # seconds the stage's validations took (kept in its checkpoints)
        # A coarse level's samples held in memory (`hold`, at the start of `fit`): the
        # training ones per level, the validation ones; batches then come from there.
        self.held: dict[int, HeldSamples] = {}
        self.held_val: HeldSamples | None = None

    def tag(self) -> dict[str, Any]:
        """What every metrics record of this stage carries."""
        return {"stage": self.stage.name, "level": self.stage.level, "group": self.stage.group}

    # ------------------------------------------------------------------ data

    def epoch_steps(self, epoch: int) -> int:
        """Steps of epoch `epoch`: all of it, or what is left of train.steps."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def batches(self, epoch: int, start_step: int, request: int = 0
                ) -> list[np.ndarray] | list[WindowedBatch]:
        """This rank's batches of `request` in `epoch` from `start_step` on; for a stage on
        windows, each with its windows' places, drawn per step (a resumed epoch draws the
        same ones)."""
        batches = self.samplers[request].batches(epoch, start_step, self.epoch_steps(epoch))
        if self.stage.region_shape:
            return [self.in_region(b) for b in batches]
        if not self.crop:
            return batches
        spatial = self.train.store.sample_shape[1:]
        return [WindowedBatch(b, window_starts(spatial, self.crop, len(b), window_rng(
                    self.run.seed, self.stage.name, epoch, start_step + k, self.comm.rank)),
                              self.crop)
                for k, b in enumerate(batches)]

    def in_region(self, indices: np.ndarray) -> WindowedBatch:
        """The stage's fixed block (its sub-domain) of samples `indices`: only it is read."""
        start = np.asarray(self.stage.region_start, dtype=np.int64)
        return WindowedBatch(indices, np.tile(start, (len(indices), 1)),
                             self.stage.region_shape)

    def read(self, epoch: int, start_step: int) -> Iterator[list[Batch]]:
        """Each step's batches of `epoch` from `start_step` on, on the device: one per
        request of the objective, in its order."""
        data, device = self.run.data, self.comm.device
        per_request = [self.batches(epoch, start_step, i) for i in range(len(self.requests))]
        steps: list[tuple[np.ndarray | WindowedBatch, ...]] = list(zip(*per_request,
                                                                       strict=True))
        corruption = self.objective.corruption(epoch)
        held = [self.held[r.level] for r in self.requests if r.level in self.held]
        loaded: Iterator[list[tuple[torch.Tensor, torch.Tensor]]]
        if len(held) == len(self.requests):  # all from memory
            loaded = ([h.read(task, corruption) for h, task in zip(held, step, strict=True)]
                      for step in steps)
        else:
            loaded = iterate_steps([self.train_levels[r.level].store for r in self.requests],
                                   steps, data.num_workers, data.prefetch,
                                   data.read_timeout_s, [corruption] * len(self.requests),
                                   self.transform_device)
        # The loader first in zip: once done, it ends its reader processes at once. The time
        # from asking for a step's batches to having them on the device is the data wait.
        asked = time.perf_counter()
        for arrays, items in zip(loaded, steps, strict=True):
            self.parts.lap("fetch")
            batches = [Batch(r.level,
                             x.to(device, non_blocking=True),  # (b, C, *spatial)
                             y.to(device, non_blocking=True),  # (b, P) or clean (b, C, *sp.)
                             b.indices if isinstance(b, WindowedBatch) else b)  # (b,)
                       for r, (x, y), b in zip(self.requests, arrays, items, strict=True)]
            self.data_wait_s += time.perf_counter() - asked
            self.parts.lap("h2d")
            yield batches
            asked = time.perf_counter()

    def hold(self) -> float:
        """Read the stage's coarse-level samples into this process where data.hold_mb
        allows (data/held.py): each level's training samples this rank draws, then the
        validation set; returns the MiB held, and says so on the progress stream. Where the
        objective corrupts its reads (the image tasks), the clean samples, corrupted per
        batch here."""
        self.held, self.held_val = {}, None
        if not self.run.data.hold_mb:
            return 0.0
        began = time.perf_counter()
        clean = self.objective.corruption(None) is not None
        levels = list(dict.fromkeys(r.level for r in self.requests))
        drawn = {level: np.concatenate([s.share for s, r in zip(self.samplers, self.requests,
                                                                strict=True)
                                        if r.level == level]) for level in levels}
        got = hold_splits([(self.train_levels[level].store, drawn[level]) for level in levels]
                          + [(self.val.store, self.val.indices)], self.run.data.hold_mb,
                          clean)
        self.held = {level: h for level, h in zip(levels, got[:-1], strict=True)
                     if h is not None}
        self.held_val = got[-1]
        held_mb = sum(h.nbytes for h in got if h is not None) / 2**20
        if held_mb:
            self.progress.line(f"stage {self.stage.name}: level {self.stage.level} held in "
                               f"memory ({held_mb:.1f} MiB per rank, read in "
                               f"{time.perf_counter() - began:.1f} s)")
        return held_mb

    # ------------------------------------------------------------------ state

    def state(self, epoch: int, step: int, epoch_step: int, loss_sum: float,
              elapsed: float) -> dict[str, Any]:
        return {"format": 1, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "stage": self.stage.name,
                "epoch": epoch, "step": step, "epoch_step": epoch_step, "loss_sum": loss_sum,
                "stage_elapsed_s": elapsed, "stage_eval_s": self.eval_s, "wall_s": self.clock(),
                "world_size": self.comm.world_size, "config": self.run.config_record,
                "data_layout": self.sampler.layout}

    def restore(self, state: dict[str, Any], path: Path) -> None:
        """Load a checkpoint's model and optimizer. Its config was checked by the driver
        (the stage's first rank, before the stage started)."""
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
        saved = state.get("data_layout", [])
        if saved != self.sampler.layout and state.get("epoch_step", 0):
            raise UserError(
                f"{path} was written inside an epoch of a training set partitioned across "
                f"nodes as (ranks, samples) per node {saved}; here it is {self.sampler.layout}, "
                "and the rest of that epoch would read other samples: resume on the same "
                "nodes and ranks per node, or from a checkpoint at an epoch's end")

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
        tcfg = self.tcfg
        at, start = self.begin(resume_from, loaded)
        held_mb = self.hold()
        ddp = self.distribute(broadcast=not (resume_from is not None and at.step > 0))
        if start:
            start["held_mb"] = round(held_mb, 3)
            if self.stage.fused:
                start.update(self.fused_start())  # after distribute: every rank has the weights
            self.log.write(start)
        stage_start = self.clock() - at.elapsed_s
        vote = StopVote(self.vote_comm, self.clock, stage_start)
        last_val: dict[str, float] = {}
        # A stage that ended on its time budget and is resumed from its last epoch (its
        # final.pt was not written) stays ended: no step past the budget.
        out_of_time = (bool(tcfg.time_budget_s) and at.epoch_step == 0
                       and at.elapsed_s >= tcfg.time_budget_s)
        while at.epoch < self.num_epochs and not out_of_time:
            asked = stop is not None and stop.applies(self.stage.name, at.epoch)
            if asked and at.epoch_step == 0:
                return {"done": False, "epoch": at.epoch, "step": at.step, **last_val}
            loss_sum, out_of_time = self.train_epoch(ddp, at, vote, stage_start)
            last_val = self.end_epoch(at, loss_sum, stage_start, out_of_time)
        if self.reducer is not None:
            self.reducer.close()
        if not last_val:  # resumed from the stage's last checkpoint: report where it ended
            last_val = self.evaluate(whole=True)
        return {"done": True, "epoch": at.epoch, "step": at.step, "wall_s": self.clock(),
                "budget_reached": out_of_time, "headline": self.objective.headline,
                **last_val}

    def begin(self, resume_from: Path | None, loaded: dict[str, Any] | None
              ) -> tuple[Position, dict[str, Any]]:
        """Where the stage starts, and its start record (empty for a resumed stage)."""
        if resume_from is None:
            return Position(), {"kind": "start", **self.tag(), "step": 0,
                                "wall_s": self.clock(), **self._start_record()}
        state = loaded if loaded is not None else checkpoint.load_chosen(resume_from)
        self.restore(state, resume_from)
        at = Position(state["epoch"], state["step"], state["epoch_step"], state["loss_sum"],
                      state["stage_elapsed_s"], state.get("stage_eval_s", 0.0))
        self.eval_s = at.eval_s
        self.progress.line(f"stage {self.stage.name}: resumed from {resume_from.name} "
                           f"(epoch {at.epoch}, step {at.step})")
        return at, {}

    def train_epoch(self, ddp: nn.Module, at: Position, vote: StopVote,
                    stage_start: float) -> tuple[torch.Tensor, bool]:
        """Train the rest of epoch `at.epoch`, advancing `at`; returns the epoch's summed
        loss on this rank (on the device) and whether the time budget ended it."""
        tcfg, comm = self.tcfg, self.comm
        spe = self.steps_per_epoch
        this_epoch = self.epoch_steps(at.epoch)
        ddp.train()
        loss_sum = torch.tensor(at.loss_carry, dtype=torch.float64, device=comm.device)
        # The last log step: for samples/s and the data wait since then.
        mark = (self.clock(), at.step, self.data_wait_s)
        out_of_time = False
        self.parts.restart()
        for batches in self.read(at.epoch, at.epoch_step):
            lr = learning_rate(tcfg, at.step, self.total_steps, spe, self.stage.lr_factor)
            step_loss = self.step(ddp, batches, at.step, lr)
            loss_sum += step_loss.loss.detach()  # no sync: stays on the device until epoch end
            at.step += 1
            at.epoch_step += 1
            if self.sample_log is not None:
                self.log_samples(at, batches)
            # .item() is a device sync point; only pay it on log steps.
            if at.step % self.run.log.every_steps == 0 or at.epoch_step == this_epoch:
                mark = self.log_step(at, step_loss, lr, mark)
            every = tcfg.checkpoint_every_steps
            if every and at.step % every == 0 and at.epoch_step < this_epoch:
                self.save(self.state(at.epoch, at.step, at.epoch_step, float(loss_sum),
                                     self.clock() - stage_start), at.epoch + 1, at.step)
            self.parts.lap("log")
            if self.act_on(vote.cast(), at, loss_sum, stage_start):
                out_of_time = True
                break
            self.parts.lap("vote")
        if self.act_on(vote.close(), at, loss_sum, stage_start):  # the last step's vote
            out_of_time = True
        return loss_sum, out_of_time

    def step(self, ddp: nn.Module, batches: list[Batch], step: int, lr: float) -> StepLoss:
        """One optimizer step of the objective's loss on this rank's `batches`."""
        set_learning_rate(self.optimizer, lr)
        if self.run.dropout:  # masks fixed by the step: a resumed step draws the same
            torch.manual_seed(step_seed(self.run.seed, self.stage.name, step, self.comm.rank))
        out = self.objective.loss(ddp, batches, step)
        self.parts.lap("forward")
        if self.reducer is None:
            self.optimizer.zero_grad()  # set_to_none, torch's default
            out.loss.backward()  # DDP allreduces the gradients here
            if getattr(ddp, "reduces_gradients", False):  # a model that reduces its own
                ddp.reduce_gradients()  # type: ignore[operator]
        else:  # mpi: the gradients are views of its buckets, which it sums over the ranks
            self.reducer.zero_grad()
            (out.loss * self.reducer.scale).backward()  # so the sum is the mean
        self.parts.lap("backward")
        if self.reducer is not None:
            self.reducer.wait()  # the last buckets: every .grad is the mean over the ranks
            self.parts.lap("allreduce")
        self.optimizer.step()
        self.parts.lap("optimizer")
        return out

    def log_samples(self, at: Position, batches: list[Batch]) -> None:
        """This rank's samples of the step just taken, one line of the sample log."""
        assert self.sample_log is not None
        line = json.dumps({"stage": self.stage.name, "epoch": at.epoch, "step": at.step,
                           "rank": self.comm.global_ranks[self.comm.rank],
                           "indices": [np.asarray(b.indices).tolist() for b in batches]})
        with open(self.sample_log, "a") as f:
            f.write(line + "\n")

    def log_step(self, at: Position, step_loss: StepLoss, lr: float,
                 mark: tuple[float, int, float]) -> tuple[float, int, float]:
        """The step record: the loss and the objective's scalars, averaged over ranks, the
        samples per second since `mark` (the last log step's time, step and data wait), and
        the seconds waited for data since then (`data_wait_s`, the mean over ranks: set
        beside the time since that record, the fraction of the steps spent waiting for
        their batches); returns this step's mark."""
        comm = self.comm
        names = list(step_loss.logged)
        means = [v / comm.world_size for v in comm.sum(
            [self.data_wait_s - mark[2], step_loss.loss.item(),
             *(step_loss.logged[n].item() for n in names)])]
        waited, means = means[0], means[1:]
        mean_loss = means[0]
        if not math.isfinite(mean_loss):
            raise UserError(
                f"stage {self.stage.name!r}: the loss became {mean_loss} at step "
                f"{at.step}; lower its learning rate (now {self.tcfg.lr}) or check the "
                "data for extreme values")
        now = self.clock()
        samples_per_s = (at.step - mark[1]) * self.step_samples / max(now - mark[0], 1e-9)
        parts = self.parts.take(at.step - mark[1])  # {} unless log.step_parts
        self.log.write({"kind": "step", **self.tag(), "epoch": at.epoch, "step": at.step,
                        "wall_s": now, "samples_per_s": samples_per_s, "data_wait_s": waited,
                        "loss": mean_loss, "lr": lr, **dict(zip(names, means[1:], strict=True)),
                        **({"parts_ms": parts} if parts else {})})
        self.progress.update(at.step, at.epoch + 1, f"{self.stage.name} loss "
                             f"{mean_loss:.4f} {samples_per_s:.1f} samples/s")
        return now, at.step, self.data_wait_s

    def act_on(self, vote: Vote | None, at: Position, loss_sum: torch.Tensor,
               stage_start: float) -> bool:
        """Act on a counted stop vote: on preemption, checkpoint and raise `Preempted`;
        True: the time budget is spent."""
        if vote is None:
            return False
        if vote.preempted:
            self.save(self.state(at.epoch, at.step, at.epoch_step, float(loss_sum),
                                 self.clock() - stage_start), at.epoch + 1, at.step)
            self.comm.barrier()  # the checkpoint is complete before anyone leaves
            self.comm.flag("preempted", "1")
            raise preempt.Preempted(
                f"stopped on {preempt.reason() or 'a signal'} at step {at.step} of stage "
                f"{self.stage.name!r} (epoch {at.epoch + 1}), checkpoint written; "
                "continue with --resume (the Slurm scripts requeue themselves)")
        return bool(self.tcfg.time_budget_s) and vote.elapsed_s >= self.tcfg.time_budget_s

    def validates(self, epoch: int, last: bool) -> bool:
        """Whether epoch `epoch` (1-based, just ended) is validated: every
        train.eval_every-th, and the stage's last (its metrics are the stage's result)."""
        return last or epoch % self.tcfg.eval_every == 0

    def end_epoch(self, at: Position, loss_sum: torch.Tensor, stage_start: float,
                  out_of_time: bool) -> dict[str, float]:
        """Close the epoch: its record, with the validation metrics when it is validated
        (its time apart: `eval_s`, and `train_s`, the stage's time without it), its
        checkpoint. Returns the metrics (empty for an epoch not validated)."""
        comm = self.comm
        at.epoch += 1
        epoch_loss = comm.sum([float(loss_sum)])[0] / (comm.world_size * max(at.epoch_step, 1))
        at.epoch_step = 0
        at.loss_carry = 0.0
        last = out_of_time or at.epoch >= self.num_epochs
        val: dict[str, float] = {}
        eval_s = 0.0
        if self.validates(at.epoch, last):
            began = self.clock()
            val = self.evaluate(whole=last)
            eval_s = self.clock() - began
            self.eval_s += eval_s
        wall = self.clock()
        train_s = wall - stage_start - self.eval_s
        self.log.write({"kind": "epoch", **self.tag(), "epoch": at.epoch, "step": at.step,
                        "wall_s": wall,
                        "samples_per_s": at.step * self.step_samples / max(train_s, 1e-9),
                        "train_s": train_s, "eval_s": eval_s,
                        "loss": epoch_loss, **val,
                        "rss_mb": psutil.Process().memory_info().rss / 2**20,
                        **peak_memory(comm)})
        headline = self.objective.headline
        shown = f" {headline} {val[headline]:.4f}" if val else ""
        self.progress.line(
            f"{self.stage.name} epoch {at.epoch}/{self.num_epochs} step {at.step} loss "
            f"{epoch_loss:.4f}{shown} wall {wall:.1f}s"
            + (" (time budget reached)" if out_of_time else ""))
        self.save(self.state(at.epoch, at.step, 0, 0.0, wall - stage_start), at.epoch, None)
        comm.barrier()  # nobody reads a checkpoint before it is complete
        return val

    def distribute(self, broadcast: bool) -> nn.Module:
        """The model as trained, with gradient averaging over the stage's ranks.

        DDP: a wrapper that allreduces during backward and broadcasts the group root's
        weights when built. mpi: the model itself, the root's weights broadcast, and hooks
        that start each bucket's allreduce during backward (`self.reducer`). Horovod: the
        optimizer is wrapped instead (its `step` waits for the averaged gradients) and the
        root's weights and optimizer state are broadcast once, unless they came from a
        checkpoint every rank loaded.
        """
        if getattr(self.model, "reduces_gradients", False):
            # Its ranks do not all hold the same parameters (the coherent model of domain
            # decomposition): it averages its gradients itself, after backward.
            return self.model
        if self.mpi is not None:
            self.reducer = self.mpi.reducer(self.model, self.stage.ranks)
            return self.model
        if self.horovod is None:
            return self.comm.wrap(self.model)
        self.optimizer = self.horovod.distribute(
            self.model, self.optimizer, self.stage.ranks, self.run.comm.compression, broadcast)
        return self.model

    def _start_record(self) -> dict[str, Any]:
        train_y = self.train.store.labels()[self.train.indices]  # (N, P)
        val_y = self.val.store.labels()[self.val.indices]  # (M, P)
        dims = len(self.train.store.sample_shape) - 1
        return {"world_size": self.comm.world_size, "ranks": list(self.stage.ranks),
                "global_batch": self.tcfg.global_batch,
                "local_batch": self.sampler.local_batch,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                # data.stage = "partition": (the stage's ranks, training samples) per node
                **({"node_shares": self.sampler.layout} if self.sampler.layout else {}),
                "level_batches": [[r.level, r.global_batch] for r in self.requests],
                "headline": self.objective.headline,
                "higher_is_better": self.objective.higher_is_better,
                # Level-0 samples' worth of forward passes per step (the benchmarks' work).
                "step_work": self.objective.step_work(self.requests, dims),
                "train_samples": len(self.train.indices), "val_samples": len(self.val.indices),
                "sample_shape": list(self.train.store.sample_shape),
                **({"region_start": list(self.stage.region_start),
                    "region_shape": list(self.stage.region_shape)}
                   if self.stage.region_shape else {}),
                "parameters": sum(p.numel() for p in self.model.parameters()),
                **self.objective.reference(train_y, val_y)}

    # ------------------------------------------------------------------ evaluation

    def fused_start(self) -> dict[str, float]:
        """What the fusion kept: the fused model's validation metrics before any training
        at this stage's level, as `start_*` keys of the start record."""
        began = self.clock()
        metrics = {f"start_{k}": v for k, v in self.evaluate().items()}
        metrics["start_eval_s"] = self.clock() - began
        headline = self.objective.headline
        self.progress.line(f"stage {self.stage.name}: fused start, {headline} "
                           f"{metrics[f'start_{headline}']:.4f}")
        return metrics

    def val_indices(self, whole: bool) -> np.ndarray:
        """The validation samples an evaluation takes: all of them, or train.eval_samples
        spread evenly over the set (the same ones every time)."""
        indices, k = self.val.indices, self.tcfg.eval_samples
        if whole or not k or k >= len(indices):
            return indices
        return indices[(np.arange(k) * len(indices)) // k]

    @torch.no_grad()
    def evaluate(self, whole: bool = False) -> dict[str, float]:
        """The objective's validation metrics over the validation set (`whole`, or the
        train.eval_samples subset), exact over the stage's ranks (each takes a disjoint
        share, the sums are added up); `val_samples` says how many it took."""
        self.model.eval()
        chosen = self.val_indices(whole)
        mine = chosen[shard_evenly(len(chosen), self.comm.rank, self.comm.world_size)]
        size = self.sampler.local_batch
        items = [mine[i:i + size] for i in range(0, len(mine), size)]
        metrics = self.objective.validation(self.val.store.schema.label_names, self.crop)
        data, device = self.run.data, self.comm.device
        tasks = [self.in_region(i) for i in items] if self.stage.region_shape else items
        corruption = self.objective.corruption(None)
        loaded: Iterator[tuple[torch.Tensor, torch.Tensor]]
        if self.held_val is not None:
            loaded = (self.held_val.read(task, corruption) for task in tasks)
        else:
            loaded = iterate_batches(self.val.store, tasks, data.num_workers, data.prefetch,
                                     data.read_timeout_s, corruption, self.transform_device)
        for (x, y), indices in zip(loaded, items, strict=True):
            metrics.add(self.model, Batch(self.stage.level, x.to(device), y.to(device),
                                          indices))
        return {**metrics.result(self.comm.sum(metrics.sums())), "val_samples": len(chosen)}
