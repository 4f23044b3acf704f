"""The training component's settings: optimisation of a stage, and what it logs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hpc_multires.errors import require


@dataclass(frozen=True, kw_only=True)
class DownsampleConfig:
    """Dynamic downsampling: a share of a stage's steps train on inputs averaged down by
    `factor` per axis, through kernels pooled from the full-size ones, so every step
    updates the same weights (docs/methods.md, "Dynamic downsampling"). Which steps is a
    function of (run seed, step) alone. Needs model.head = "gap" (the image networks take
    any size as they are; an image task's clean target is averaged down with its input);
    not with train.estimator = "mge"."""

    fraction: float = 0.0
    """Share of the stage's steps that train on downsampled inputs, in [0, 1] (0: off)."""
    factor: int = 2
    """Points averaged per axis on a downsampled step (2: the next pyramid level's grid);
    it must divide the samples' axes at the stage's level (its crop, for windows)."""
    schedule: Literal["random", "every", "decay"] = "random"
    """Which steps: random (each with probability fraction, drawn from the seed and the
    step), every (every n-th step, n = every or round(1/fraction)), decay (the share falls
    linearly over the stage from min(1, 2 fraction), averaging fraction: coarse steps
    first)."""
    kernel_pool: Literal["avg", "bilinear"] = "avg"
    """How a kernel is pooled onto the coarse grid: avg (each coarse tap sums the fine taps
    of its cell) or bilinear (hat weights; also keeps the first moment). The same for
    factor 2."""
    every: int = 0
    """For schedule = "every": the period n (0: round(1/fraction))."""

    def check(self, prefix: str = "train.downsample") -> None:
        """Raise ConfigError naming the key (under `prefix`) and the fix."""
        d = self
        require(0.0 <= d.fraction <= 1.0, f"{prefix}.fraction", d.fraction,
                "use a number in [0, 1], the share of steps that train on downsampled inputs "
                "(0: off)")
        require(d.factor >= 1, f"{prefix}.factor", d.factor,
                "use an integer >= 1, the points averaged per axis on a downsampled step "
                "(2: one pyramid level)")
        require(d.every >= 0, f"{prefix}.every", d.every,
                "use 0 (every round(1/fraction)-th step) or a period of 1 or more steps")

    @property
    def on(self) -> bool:
        """Some steps are downsampled (factor 1 would change nothing)."""
        return self.fraction > 0 and self.factor > 1


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The optimisation: global batch, optimizer, schedule, epochs."""

    epochs: int = 4
    """Number of passes over the training set."""
    global_batch: int = 16
    """Samples per optimizer step over the stage's ranks; each reads global_batch / ranks.
    At most the training set's size (checked before training, and by `plan`)."""
    optimizer: Literal["sgd", "adam"] = "adam"
    """sgd (with momentum) or adam (AdamW)."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warm-up."""
    momentum: float = 0.9
    """SGD momentum (ignored by adam)."""
    weight_decay: float = 0.0
    """Weight decay: decoupled for adam (AdamW), L2 added to the gradient for sgd."""
    warmup_epochs: float = 0.0
    """Linear warm-up from lr/10 to lr over this many epochs."""
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    """Decay after warm-up, down to lr * min_lr_ratio at the last step."""
    min_lr_ratio: float = 0.01
    """Final learning rate as a fraction of lr."""
    schedule_epochs: float = 0.0
    """Lay the warm-up and decay over this many epochs instead of the stage's own (0: the
    stage's epochs). With schedule_offset, consecutive stages can share one curve: a
    coarse stage with epochs = 10, schedule_epochs = 13 and the fine stage after it with
    epochs = 3, schedule_epochs = 13, schedule_offset = 10 follow one 13-epoch schedule,
    so the fine stage goes on at the rate the coarse one stopped at, with no second
    warm-up."""
    schedule_offset: float = 0.0
    """Epochs of the schedule already run by earlier stages (with schedule_epochs)."""
    checkpoint_keep: int = 3
    """Checkpoints kept per stage, the newest, counting epoch-end and mid-epoch ones alike
    (older ones are deleted)."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every this many steps inside an epoch (0: at epoch ends only)."""
    time_budget_s: float = 0.0
    """Stop the stage after this many seconds of training (0: run all epochs). A stage that
    reaches it is done: --resume skips it rather than training on."""
    steps: int = 0
    """Size the stage in optimizer steps instead of epochs (0: `epochs` decides). The last
    epoch may be partial: the stage validates and checkpoints after its last step. The
    learning-rate schedule spans these steps (with schedule_epochs, epochs of the stage's
    steps per epoch, as before)."""
    estimator: Literal["single", "mge"] = "single"
    """The stage's gradient estimator. single: the loss of one global batch at the stage's
    level. mge: the multiscale gradient estimator (methods/mge.py; Ahamed et al., arXiv
    2501.12739): the gradient of the coarsest of `mge_levels` levels plus the corrections
    (fine - coarse) of the finer ones, each on its own draw of samples, the batch growing by
    `mge_growth` per coarser level (global_batch is the finest level's). Needs a model
    that takes every level's size (a fully convolutional one, or head = "gap")."""
    mge_levels: int = 2
    """mge: the number of levels, the stage's own level the finest (2: one correction)."""
    mge_growth: float = 2.0
    """mge: each coarser level's batch is this many times the next finer one's (rounded)."""
    restriction: Literal["avg", "nearest", "bilinear"] = "avg"
    """mge: how a batch is restricted to the next coarser level for its correction. avg:
    block means, what the pyramid holds, so each level's batch is read from the pyramid;
    nearest or bilinear (antialiased, images only): every batch is read at the stage's
    level and restricted on the fly, so the coarse terms see the same restriction."""
    batch_scale: Literal["none", "data"] = "none"
    """How a stage's global batch follows its pyramid level. none: global_batch at every
    level. data: global_batch times the points of a level-0 sample over those of the
    stage's input (2^(d k) for samples of d axes at level k; for a stage on windows, a
    level-0 sample over a window), so a step holds the same number of points at every
    level and a coarse epoch takes fewer, fuller steps; at most batch_cap, and at most the
    training set."""
    batch_cap: int = 0
    """With batch_scale = "data": the largest global batch a stage scales to (0: no cap
    but the training set's size). At least global_batch; a cap that binds must be
    divisible by the stage's ranks."""
    lr_scale: Literal["none", "sqrt", "linear"] = "none"
    """How the learning rate follows a batch that batch_scale made larger: none (lr as
    given), sqrt (lr x sqrt(batch / global_batch)) or linear (lr x batch / global_batch).
    The rate rules keep the noise of a step (sqrt) or the distance per sample (linear)."""
    lr_scale_warmup_steps: int = 0
    """In a stage whose rate lr_scale raised: over its first this many steps the rate rises
    linearly from the unscaled rate to the scaled one, on top of the schedule (0: the
    scaled rate from the first step)."""
    eval_every: int = 1
    """Validate every this many epochs; the stage's last epoch is always validated (its
    metrics are the stage's result). Skipped epochs have no validation metrics."""
    eval_samples: int = 0
    """Validate on this many samples of the validation set, spread evenly over it (0: all
    of them). The stage's last epoch always takes the whole set."""
    downsample: DownsampleConfig = field(default_factory=DownsampleConfig)
    """Dynamic downsampling ([train.downsample]; a stage's [stages.train.downsample]
    overrides it key by key): fraction, factor, schedule, kernel_pool, every."""

    def check(self, prefix: str = "train") -> None:
        """Raise ConfigError naming the key (under `prefix`: "train" or a stage's
        "stages.NAME.train") and the fix for a value that cannot work."""
        t = self
        require(t.epochs >= 1, f"{prefix}.epochs", t.epochs, "use 1 or more")
        require(t.global_batch >= 1, f"{prefix}.global_batch", t.global_batch, "use 1 or more")
        require(t.lr > 0, f"{prefix}.lr", t.lr, "use a positive learning rate")
        require(0.0 <= t.momentum < 1.0, f"{prefix}.momentum", t.momentum,
                "use a value in [0, 1)")
        require(t.weight_decay >= 0, f"{prefix}.weight_decay", t.weight_decay, "use 0 or more")
        span = t.schedule_epochs or t.epochs
        require(0 <= t.warmup_epochs <= span, f"{prefix}.warmup_epochs", t.warmup_epochs,
                f"use a value between 0 and {span} (the epochs its schedule spans)")
        require(t.schedule_epochs >= 0, f"{prefix}.schedule_epochs", t.schedule_epochs,
                "use 0 (the stage's own epochs) or the epochs of the shared schedule")
        require(t.schedule_offset >= 0 and (t.schedule_epochs > 0 or t.schedule_offset == 0),
                f"{prefix}.schedule_offset", t.schedule_offset,
                f"use 0, or set {prefix}.schedule_epochs to the schedule this offset is into")
        require(t.schedule_epochs == 0 or t.steps > 0  # steps: epochs known once data is
                or t.schedule_offset + t.epochs <= t.schedule_epochs + 1e-9,
                f"{prefix}.schedule_epochs", t.schedule_epochs,
                f"use at least schedule_offset + epochs = {t.schedule_offset + t.epochs}")
        require(0 < t.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", t.min_lr_ratio,
                "use a value in (0, 1]")
        require(t.checkpoint_keep >= 1, f"{prefix}.checkpoint_keep", t.checkpoint_keep,
                "keep at least 1")
        require(t.checkpoint_every_steps >= 0, f"{prefix}.checkpoint_every_steps",
                t.checkpoint_every_steps, "use 0 (epoch ends only) or a number of steps")
        require(t.time_budget_s >= 0, f"{prefix}.time_budget_s", t.time_budget_s,
                "use 0 (no budget) or a positive number of seconds")
        require(t.steps >= 0, f"{prefix}.steps", t.steps,
                "use 0 (the stage runs `epochs` epochs) or a number of optimizer steps")
        require(t.mge_levels >= 1, f"{prefix}.mge_levels", t.mge_levels,
                "use 2 or more levels (1 is the plain single-level gradient)")
        require(t.mge_growth >= 1.0, f"{prefix}.mge_growth", t.mge_growth,
                "use a factor >= 1 (coarser levels are cheaper, so they take batches at "
                "least as large)")
        require(t.batch_cap == 0 or t.batch_cap >= t.global_batch, f"{prefix}.batch_cap",
                t.batch_cap, f"use 0 (no cap) or a batch of at least global_batch = "
                f"{t.global_batch} (a coarse stage's batch only grows)")
        require(t.batch_cap == 0 or t.batch_scale == "data", f"{prefix}.batch_cap",
                t.batch_cap, f"it caps the batch that {prefix}.batch_scale = \"data\" scales; "
                "set batch_scale = \"data\" or leave batch_cap at 0")
        require(t.lr_scale == "none" or t.batch_scale == "data", f"{prefix}.lr_scale",
                t.lr_scale, f"it scales the rate with the batch that {prefix}.batch_scale "
                "= \"data\" scales; set batch_scale = \"data\" or lr_scale = \"none\"")
        require(t.lr_scale_warmup_steps >= 0, f"{prefix}.lr_scale_warmup_steps",
                t.lr_scale_warmup_steps, "use 0 (the scaled rate at once) or a number of steps")
        require(t.eval_every >= 1, f"{prefix}.eval_every", t.eval_every,
                "use 1 (validate every epoch) or more (every n-th epoch and the last)")
        require(t.eval_samples >= 0, f"{prefix}.eval_samples", t.eval_samples,
                "use 0 (the whole validation set) or a number of samples")
        t.downsample.check(f"{prefix}.downsample")


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    """What is written to RUN_DIR/metrics.jsonl and the console."""

    every_steps: int = 10
    """Log the global mean loss every this many steps (an allreduce each time)."""
    progress_s: float = 30.0
    """Seconds between plain progress lines when stderr is not a terminal (batch logs)."""
    samples: bool = False
    """Each rank also writes the training samples of each of its steps to
    RUN_DIR/logs/samples-rank-NNNN.jsonl (one line per step: stage, epoch, step, indices
    per request), to check what a run, a partitioned one say, reads."""
    step_parts: bool = False
    """Time the parts of each step (batch fetch, forward, backward, allreduce, optimizer,
    stop vote, logging, ...) and write their mean milliseconds per step since the last
    record as `parts_ms` in each step record (`benchmarks/step_cost.py` turns it on)."""

    def check(self) -> None:
        """Raise ConfigError naming the key and the fix for a value that cannot work."""
        require(self.every_steps >= 1, "log.every_steps", self.every_steps, "use 1 or more")
        require(self.progress_s > 0, "log.progress_s", self.progress_s,
                "use a positive number of seconds")
