"""`hpc-multires train`: run a stage plan from a validated config into a run directory.

Every rank runs this. The checks that can fail on user input (config, plan, world size,
datasets and their pyramid levels, run directory, --resume without a checkpoint) come
first and raise the same error on every rank, so a bad input ends the job at once with
one message. Then the plan runs wave by wave: each rank trains the stage of the wave that
includes it, on that stage's process group, and waits for the rest of the wave.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hpc_multires.comm import dist as comm_dist
from hpc_multires.comm.dist import Comm
from hpc_multires.comm.horovod import HorovodGroups
from hpc_multires.comm.mpi_allreduce import MpiGroups
from hpc_multires.data.config import DataConfig
from hpc_multires.data.partition import LocalShare, Partition, plan_partition
from hpc_multires.data.sampler import GlobalBatchSampler
from hpc_multires.data.store import SampleStore, Schema, open_store
from hpc_multires.data.volumes import mpio_communicator
from hpc_multires.driver.domain import DomainPhases
from hpc_multires.driver.run_dir import ResumePoint, RunDir
from hpc_multires.errors import ConfigError, DataError, UserError
from hpc_multires.methods.domain import subdomains
from hpc_multires.methods.dynamic import Downsampling
from hpc_multires.methods.fusion import check_bottom_layers, fuse, shrink
from hpc_multires.methods.mge import MultiscaleGradient, level_batch_sizes
from hpc_multires.models import build_model
from hpc_multires.plan.config import Config
from hpc_multires.plan.load import config_to_dict
from hpc_multires.plan.stages import Stage, apply_level_rules, describe_plan, resolve
from hpc_multires.train import preempt
from hpc_multires.train.classification import Classification
from hpc_multires.train.loop import Split, StopAt, Trainer
from hpc_multires.train.metrics import MetricsLog, Progress
from hpc_multires.train.objective import Objective, Regression
from hpc_multires.train.restoration import Restoration
from hpc_multires.train.spec import RunSettings, StageSpec
from hpc_multires.train.task import TaskConfig


def open_splits(cfg: DataConfig, level: int, share: LocalShare | None = None
                ) -> tuple[Split, Split]:
    """Training and validation samples at `level`, from one store (held-out tail) or two.
    `share`: this node's share of a partitioned data.path (`cfg.path`, its source, gives
    the headers and statistics; the share's files are read from the node's copy)."""
    if not cfg.path:
        raise ConfigError("data.path is empty; set it in the config or pass "
                          "--set data.path=DIR (a directory made by `hpc-multires data`)")
    verify = cfg.verified_reads(staged=False)  # a staged copy's comes resolved
    # Volume stores only; not on a partition, whose files are not on every node.
    mpio = mpio_communicator(cfg.mpio, cfg.num_workers) if share is None else None
    store = open_store(cfg.path, level=level, verify_reads=verify, mpio=mpio)
    shares = None
    if share is not None:
        store.relocate(share.directory, share.files)
        shares = share.shares
    if cfg.val_path:
        val = open_store(cfg.val_path, level=level, verify_reads=verify, mpio=mpio)
        a, b = store.schema, val.schema
        if (a.sample_shape, a.label_names) != (b.sample_shape, b.label_names):
            raise DataError(
                f"data.val_path {cfg.val_path!r} holds samples {b.sample_shape} with labels "
                f"{b.label_names}, data.path holds {a.sample_shape} with {a.label_names}; "
                "use a validation set made the same way as the training set")
        if a.class_names != b.class_names:
            raise DataError(
                f"data.val_path {cfg.val_path!r} holds the classes {list(b.class_names)}, "
                f"data.path {list(a.class_names)}; use a validation set with the training "
                "set's classes (class sub-folders of the same names)")
        # Normalise validation inputs with the training set's statistics.
        val.mean, val.std = store.mean, store.std
        return (Split(store, np.arange(len(store)), shares), Split(val, np.arange(len(val))))
    n_train = train_count(cfg, len(store))
    return (Split(store, np.arange(n_train), shares),
            Split(store, np.arange(n_train, len(store))))


def train_count(cfg: DataConfig, num_samples: int) -> int:
    """How many of data.path's first samples are the training set (the rest, with no
    data.val_path, the held-out validation set)."""
    if cfg.val_path:
        return num_samples
    n_val = round(num_samples * cfg.val_fraction)
    if n_val == 0:
        raise ConfigError(
            f"no validation samples: {num_samples} samples x data.val_fraction = "
            f"{cfg.val_fraction} rounds to 0; raise data.val_fraction or set data.val_path")
    return num_samples - n_val


def partition_data(cfg: DataConfig, comm: Comm) -> Partition:
    """data.stage = "partition": which shards each node stages, from data.path's headers
    and the node of every rank (comm/ranks.py), the same on every rank."""
    rank_nodes = tuple(int(k) for k in comm.gather_object(comm.info.node_index))
    store = open_store(cfg.path, verify_reads=False)  # the headers only
    return plan_partition(store.shards, train_count(cfg, len(store)), rank_nodes,
                          repr(cfg.path))


def epoch_steps(split: Split, global_batch: int, ranks: tuple[int, ...]) -> int:
    """Full global batches per epoch of a stage on `ranks` (the sampler's count)."""
    return GlobalBatchSampler(split.indices, global_batch, 0, len(ranks), 0,
                              shares=split.shares, ranks=ranks).steps_per_epoch


def build_objective(cfg: Config, stage: Stage, train_samples: int = 0,
                    class_names: tuple[str, ...] = ()) -> Objective:
    """What the stage's steps compute: the task's objective (regression, classification of
    `class_names`, or an image task), under the stage's gradient estimator, with dynamic
    downsampling mixed in when its train.downsample is on (`train_samples`, the training
    split's size, sizes its schedule; 0 where only the objective's requests are asked
    for)."""
    task = cfg.task
    base: Objective
    if task.restoration:
        base = Restoration(task.corruption(), seed=cfg.run.seed, val_seed=task.val_seed,
                           ssim_weight=task.ssim_weight)
    elif task.classify:
        base = Classification(class_names, task.label_smoothing)
    else:
        base = Regression()
    t = stage.train
    if t.estimator == "mge":
        base = MultiscaleGradient(base, t.mge_levels, t.mge_growth, t.restriction)
    return stage_objective(stage, cfg.run.seed, train_samples, base)


def num_outputs(task: TaskConfig, schema: Schema) -> int:
    """What the model outputs: a logit per class (classify), else a value per label (the
    image-to-image networks ignore it)."""
    return schema.num_classes if task.classify else schema.num_labels


def check_labels(task: TaskConfig, schema: Schema, path: str) -> None:
    """A classification needs a store of classes, a regression one of labels in [-1, 1]."""
    if task.classify and not schema.class_names:
        raise DataError(
            f"task.kind = \"classify\" needs a store of class indices, but {path} holds "
            f"regression labels ({', '.join(schema.label_names)}); make one with `hpc-multires "
            "data synth classes` or `hpc-multires data convert --x FOLDER` of a folder with "
            "one sub-folder of images per class")
    if schema.class_names and not task.classify and not task.restoration:
        raise ConfigError(
            f"{path} holds the class of each sample ({len(schema.class_names)} classes: "
            f"{', '.join(schema.class_names[:4])}{', ...' if schema.num_classes > 4 else ''}), "
            f"not regression labels; set task.kind = \"classify\"")


def stage_levels(cfg: Config, stage: Stage) -> list[int]:
    """The pyramid levels a stage reads (its own first), and checks what the data must
    allow for its estimator (before any level is opened)."""
    return sorted({r.level for r in build_objective(cfg, stage).requests(
        stage.level, stage.train.global_batch)})


def model_levels(stage: Stage) -> list[int]:
    """The levels the stage's model runs on: its own, and the coarser ones of MGE."""
    t = stage.train
    return list(range(stage.level, stage.level + (t.mge_levels if t.estimator == "mge" else 1)))


def check_mge(stage: Stage, spatial: tuple[int, ...], n_train: int) -> None:
    """An MGE stage's levels against its level's samples (`spatial`) and training set."""
    t = stage.train
    if t.estimator != "mge":
        return
    where = f"stage {stage.name!r}: train.mge_levels = {t.mge_levels}"
    size = "x".join(map(str, spatial))
    halvings = t.mge_levels - 1
    if min(spatial) >> halvings < 1:
        raise ConfigError(
            f"{where} reaches level {stage.level + halvings}, beyond the pyramid of samples "
            f"of {size} at level {stage.level} (each level halves them): use at most "
            f"{min(spatial).bit_length()} levels")
    if any(n % 2**halvings for n in spatial):
        raise ConfigError(
            f"{where} restricts the samples of {size} at level {stage.level} {halvings} "
            f"time(s) by {t.restriction!r}, but {2**halvings} does not divide their sides; "
            "use fewer levels, or samples whose sides 2^(mge_levels - 1) divides")
    sizes = level_batch_sizes(t.global_batch, t.mge_levels, t.mge_growth)
    if max(sizes) > n_train:
        raise ConfigError(
            f"{where} with mge_growth = {t.mge_growth:g} gives level batches {sizes}, the "
            f"largest more than the {n_train} training samples; lower the global batch, "
            "mge_growth or mge_levels, or use more data")
    if any(n % len(stage.ranks) for n in sizes):
        raise ConfigError(
            f"{where} with mge_growth = {t.mge_growth:g} gives level batches {sizes}, not all "
            f"divisible by the stage's {len(stage.ranks)} ranks; choose a global batch and "
            "growth whose every level's batch they divide (e.g. growth 2 and a global batch "
            "divisible by the ranks)")


def stage_objective(stage: Stage, seed: int, train_samples: int,
                    inner: Objective | None = None) -> Objective:
    """`inner` (default: regression), with dynamic downsampling mixed in when the stage's
    train.downsample is on (decided from the run's seed and the step)."""
    objective: Objective = Regression() if inner is None else inner
    t = stage.train
    if t.downsample.on:
        # The trainer's steps: train.steps, or epochs of full global batches (data/sampler.py)
        steps = t.steps or t.epochs * (train_samples // t.global_batch)
        objective = Downsampling(objective, t.downsample, seed, steps)
    return objective


def open_levels(cfg: Config, data: DataConfig, stages: list[Stage],
                share: LocalShare | None = None
                ) -> tuple[list[Stage], dict[int, tuple[Split, Split]]]:
    """The stages with their per-level batch and rate rules applied (they need the
    samples' size), and every level they need, opened (and so checked) before anything
    runs, with a model built for each so that one unfit for a level fails now, and so that
    a bottom-top fusion asking for more layers than its models have fails before the stages
    it fuses from have trained; a stage whose global batch exceeds its training set fails
    here too, and an MGE stage whose levels the samples cannot take. `hpc-multires plan`
    runs the same checks. The highest level is opened first: if the pyramid is missing, its
    fix then builds every level needed. `share`: this node's share of a partitioned
    data.path."""
    base = open_splits(data, 0, share)  # the level-0 headers give every level's size
    schema, n_train = base[0].store.schema, len(base[0].indices)
    check_labels(cfg.task, schema, data.path)
    if cfg.domain.on:  # the grid against the samples, the local CNN against a sub-domain
        dom, level = cfg.domain, stages[0].level
        spatial = schema.spatial_at(level)
        part = subdomains(spatial, dom.grid, dom.overlap)[0]
        try:
            build_model(cfg.model, (schema.channels, *part.shape),
                        num_outputs(cfg.task, schema), level)
        except ConfigError as e:
            raise ConfigError(f"domain.grid = {list(dom.grid)}: the local CNNs take "
                              f"sub-domains of {'x'.join(map(str, part.shape))}, and {e}"
                              ) from None
    stages = apply_level_rules(cfg, stages, schema.spatial_at, n_train)
    for s in stages:
        check_mge(s, schema.spatial_at(s.level), n_train)
    levels = {level for s in stages for level in stage_levels(cfg, s)}
    splits = {level: base if level == 0 else open_splits(data, level, share)
              for level in sorted(levels, reverse=True)}
    models = {}
    for s in stages:
        for level in model_levels(s):
            if level in models:
                continue
            try:
                models[level] = build_model(cfg.model, (schema.channels,
                                                        *schema.spatial_at(level)),
                                            num_outputs(cfg.task, schema), level)
            except ConfigError as e:
                raise ConfigError(f"stage {s.name!r} at level {level}: {e}") from None
    by_name = {s.name: s for s in stages}
    for s in stages:
        n_train = len(splits[s.level][0].indices)
        if n_train < s.train.global_batch:
            raise ConfigError(
                f"stage {s.name!r}: the training set has {n_train} samples, fewer than its "
                f"global batch {s.train.global_batch}; lower the global batch or use more data")
        if share is not None:
            check_partition(cfg, s, splits[s.level][0])
        spatial = splits[s.level][0].store.sample_shape[1:]
        if cfg.task.kind == "sr" and any(n % 2 for n in spatial):
            raise ConfigError(
                f"stage {s.name!r}: task.kind = \"sr\" halves the images, but they are "
                f"{'x'.join(map(str, spatial))} at level {s.level}; train it on a level "
                "with even sides")
        if s.config.crop > min(spatial):
            raise ConfigError(
                f"stage {s.name!r}: crop = {s.config.crop} is larger than the samples at "
                f"level {s.level}, {'x'.join(map(str, spatial))}; use crop <= {min(spatial)}")
        check_downsample_fits(cfg, s, splits[s.level][0].store)
        if s.config.init == "fuse" and s.config.fusion == "bottom-top":
            bottom = by_name[s.config.fuse_from[0]]
            check_bottom_layers(models[bottom.level].state_dict(), models[s.level].state_dict(),
                                s.config.bottom_layers, stage=s.name)
    return stages, splits


def check_partition(cfg: Config, stage: Stage, train: Split) -> None:
    """A stage on a partitioned training set: ranks on every node (a node's share is read
    only there), and each node's share fills its part of every batch the stage reads."""
    assert train.shares is not None
    shares = train.shares
    groups = shares.groups(stage.ranks)
    missing = [k for k, g in enumerate(groups) if not g]
    if missing:
        raise ConfigError(
            f"stage {stage.name!r} has no rank on node(s) {missing}: with data.stage = "
            "'partition' each node holds only its share of the training set, so a stage "
            "needs ranks on every node to read all of it; give it a group with ranks on each "
            "node (ranks placed round-robin, srun --distribution=cyclic, put consecutive "
            "ranks on different nodes), or set data.stage = 'copy'")
    for r in build_objective(cfg, stage).requests(stage.level, stage.train.global_batch):
        local = r.global_batch // len(stage.ranks)
        for k, g in enumerate(groups):
            have = len(shares.indices[k])
            if have < len(g) * local:
                raise ConfigError(
                    f"stage {stage.name!r}: node {k}'s share of the training set, {have} "
                    f"samples, cannot fill its part of a global batch of {r.global_batch} "
                    f"at level {r.level} ({len(g)} rank(s) x {local}); lower the global "
                    "batch, run on fewer nodes, or set data.stage = 'copy'")


def check_downsample_fits(cfg: Config, stage: Stage, store: SampleStore) -> None:
    """A stage's downsampled steps need its inputs (whole samples at its level, or its
    windows) divisible by the factor, and a model that takes the smaller inputs."""
    down = stage.train.downsample
    if not down.on:
        return
    key = f"train.downsample.factor = {down.factor}"
    spatial = tuple(stage.config.crop for _ in store.sample_shape[1:]) if stage.config.crop \
        else store.sample_shape[1:]
    shape = "x".join(map(str, spatial))
    what = f"its windows, {shape}" if stage.config.crop else \
        f"the samples at level {stage.level}, {shape}"
    if any(n % down.factor for n in spatial):
        divisors = [f for f in range(2, min(spatial) + 1) if all(n % f == 0 for n in spatial)]
        raise ConfigError(
            f"stage {stage.name!r}: {key} does not divide {what}; use a factor that divides "
            f"them ({', '.join(map(str, divisors[:4])) or 'none does: set fraction = 0'})")
    coarse = (store.sample_shape[0], *(n // down.factor for n in spatial))
    try:
        build_model(cfg.model, coarse, num_outputs(cfg.task, store.schema), stage.level)
    except ConfigError as e:
        raise ConfigError(f"stage {stage.name!r}: {key} leaves inputs of "
                          f"{'x'.join(map(str, coarse[1:]))}, too small for the model ({e}); "
                          "use a smaller factor") from None


def _labels(schema: Schema) -> str:
    """The store's labels, or its classes, for the start message."""
    if schema.class_names:
        return f"{schema.num_classes} classes {', '.join(schema.class_names)}"
    return f"labels {', '.join(schema.label_names)}"


class PlanRunner:
    """Holds what the stages of one run share: config, job, data, groups, clock, log."""

    def __init__(self, cfg: Config, comm: Comm, run_dir: RunDir, resume: bool,
                 stop: StopAt | None, data: DataConfig | None = None,
                 share: LocalShare | None = None) -> None:
        self.cfg = cfg
        self.comm = comm
        self.run_dir = run_dir
        self.resume = resume
        self.stop = stop
        self.stages = resolve(cfg, comm.world_size)
        names = [s.name for s in self.stages]
        if stop is not None and stop.stage is not None and stop.stage not in names:
            raise UserError(f"--stop-stage {stop.stage!r} is not a stage of the plan; "
                            f"use one of {', '.join(names)}")
        # data: where to read (a node-local copy when staged, or this node's share)
        self.stages, self.splits = open_levels(cfg, data or cfg.data, self.stages, share)
        run_dir.check_resume(resume, cfg)
        self.num_outputs = num_outputs(cfg.task,
                                       self.splits[self.stages[0].level][0].store.schema)
        # Process groups: every rank creates every group, in plan order (torch requires it).
        self.groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        for s in self.stages:
            if s.ranks not in self.groups:
                whole = len(s.ranks) == comm.world_size
                self.groups[s.ranks] = None if whole or not comm.distributed else \
                    dist.new_group(list(s.ranks))
        # Domain decomposition: its sub-domains, process grid, and the replicas' groups.
        self.domain = DomainPhases(self) if cfg.domain.on else None
        self.horovod = HorovodGroups([s.ranks for s in self.stages], comm.world_size) \
            if cfg.comm.backend == "horovod" else None
        self.mpi = MpiGroups([s.ranks for s in self.stages], comm.info, comm.device) \
            if cfg.comm.backend == "mpi" else None
        self._t0 = time.monotonic()
        self._offset = 0.0

    def clock(self) -> float:
        """Seconds since the run started, continued across resumptions (`wall_s`)."""
        return self._offset + time.monotonic() - self._t0

    def start(self) -> None:
        comm = self.comm
        comm.barrier()  # every rank passed the checks before rank 0 writes anything
        self.run_dir.check_shared(comm)
        offset = 0.0
        if comm.is_root:
            offset = self.run_dir.begin(self.cfg, self.resume, self.stages, comm.rank)
            train = self.splits[self.stages[-1].level][0]
            print(f"hpc-multires train: {comm.world_size} rank(s) on {comm.info.node_count} "
                  f"node(s) ({comm.info.launcher}), device {comm.device.type}, "
                  f"{self.cfg.comm.backend}\n  data    {train.store.path}: "
                  f"{len(train.store)} samples of {train.store.schema.sample_shape}, "
                  f"{_labels(train.store.schema)}\n  run dir {self.run_dir}\n"
                  f"  plan\n{describe_plan(self.stages)}", file=sys.stderr, flush=True)
        self._offset = float(comm.broadcast_object(offset))
        comm.barrier()
        self._t0 = time.monotonic()

    def rank_log(self, event: str, stage: Stage) -> None:
        self.run_dir.log_rank(self.comm, self.clock(), event, stage)

    def run(self) -> dict[str, Any]:
        self.start()
        stopped = False
        results: dict[str, dict[str, Any]] = {}
        for wave in sorted({s.wave for s in self.stages}):
            for stage in self.stages:
                if stage.wave == wave and self.comm.rank in stage.ranks:
                    self.rank_log("start", stage)
                    try:
                        results[stage.name] = r = self.run_stage(stage)
                    except BaseException as e:  # the error itself goes to stderr, on one line
                        with contextlib.suppress(OSError):  # never hide it behind another
                            self.rank_log("preempted" if isinstance(e, preempt.Preempted)
                                          else "failed", stage)
                        raise
                    self.rank_log("end" if r["done"] else "stopped", stage)
                    if not r["done"]:
                        stopped = True
                        self.comm.flag("stopped", "1")
            # Other groups may still be training; leave with them if the job is preempted.
            self.comm.wait_all(f"wave-{wave}", interrupt=self._check_preempted)
            if stopped or self.comm.flag("stopped"):
                stopped = True
                break
        last = self.stages[-1]
        final = results.get(last.name, {})
        final = self.comm.broadcast_object(final, src=last.ranks[0])
        return {**final, "stopped": stopped}

    def _check_preempted(self) -> None:
        if self.comm.flag("preempted"):
            raise preempt.Preempted(
                f"stopped while waiting for other stages ({preempt.reason() or 'another rank'}"
                " was signalled); checkpoints written; continue with --resume")

    def run_stage(self, stage: Stage) -> dict[str, Any]:
        cfg, run_dir = self.cfg, self.run_dir
        comm = self.comm.subgroup(stage.ranks, self.groups[stage.ranks],
                                  self.mpi.control_comm(stage.ranks) if self.mpi else None)
        start: ResumePoint = run_dir.resume_point(stage, comm, cfg) if self.resume else \
            ("fresh", None, None)
        if stage.phase == "coherent" and self.domain is not None and self.resume:
            start = self.domain.agree_on_checkpoint(stage, self.comm, start)
        kind, value, loaded = start
        if kind == "final":
            if comm.is_root:
                print(f"stage {stage.name}: already complete; skipped", file=sys.stderr)
            return {**value, "done": True}
        resume_from = value if kind == "checkpoint" else None
        resuming = resume_from is not None
        train, val = self.splits[stage.level]
        # The training samples an epoch reads (a partition's: as its node shares allow).
        used = len(train.indices) if train.shares is None else \
            epoch_steps(train, stage.train.global_batch, stage.ranks) * stage.train.global_batch
        objective = build_objective(cfg, stage, used, train.store.schema.class_names)
        levels = {level: self.splits[level][0] for level in stage_levels(cfg, stage)}
        domain = self.domain
        if stage.phase == "aggregator" and domain is not None:
            return domain.run_aggregator(stage, comm, objective, start)
        torch.manual_seed(cfg.run.seed)  # same initial weights on every rank count
        model: torch.nn.Module
        region: dict[str, tuple[int, ...]] = {}
        vote_comm = None
        logs = comm.is_root
        if domain is not None:  # a local CNN, or a part of the coherent model
            region = domain.region(stage)
            if stage.phase == "coherent":
                model = domain.coherent_model(stage, comm, self.comm, resuming)
                vote_comm = self.comm  # its forward gathers over every stage of its wave
                logs = comm.is_root and stage.subdomain == 0  # one model: one part logs
            else:
                model = domain.local_model(stage.level)
        else:
            model = build_model(cfg.model, train.store.sample_shape, self.num_outputs,
                                stage.level)
        if stage.config.init == "fuse" and not resuming and comm.is_root:
            # Fusion runs on the consuming stage's root; DDP's construction then
            # broadcasts the fused weights to the rest of the stage's ranks.
            fused = self.fused_start(stage, model)
            model.load_state_dict(fused)
            run_dir.save_init(stage.name, {"model": fused, "fusion": stage.config.fusion,
                                           "fuse_from": list(stage.config.fuse_from)})
        log = MetricsLog(run_dir.metrics, enabled=logs)
        progress = Progress(0, logs, cfg.log.progress_s)
        spec = StageSpec(name=stage.name, level=stage.level, group=stage.group,
                         ranks=stage.ranks, train=stage.train, lr_factor=stage.lr_factor,
                         crop=stage.config.crop,
                         fused=stage.config.init == "fuse", **region)
        run = RunSettings(seed=cfg.run.seed, data=cfg.data, log=cfg.log, comm=cfg.comm,
                          dropout=cfg.model.dropout > 0,  # the only random layers
                          config_record=config_to_dict(cfg))
        carried = self.carried_optimizer(stage, model) \
            if stage.config.carry_optimizer and not resuming else None
        trainer = Trainer(spec, run, comm, model, levels, val,
                          run_dir.checkpoint_dir(stage.name), log, progress, self.clock,
                          self.horovod, objective, optimizer_state=carried,
                          vote_comm=vote_comm,
                          sample_log=run_dir.sample_log(self.comm.rank)
                          if cfg.log.samples else None, mpi=self.mpi)
        progress.total = trainer.total_steps
        stop = self.stop
        if stage.phase == "coherent" and stop is not None and stop.stage is not None \
                and stop.stage.startswith("coherent-"):
            # The coherent model's parts step together: a stop in one is a stop in all.
            stop = StopAt(stop.epoch, stage.name)
        result = trainer.fit(resume_from, stop=stop, loaded=loaded)
        if result["done"] and comm.is_root:
            run_dir.save_final(stage.name, {"model": model.state_dict(), "stage": stage.name,
                                            "level": stage.level, "result": result,
                                            "config": config_to_dict(cfg),
                                            # what a stage with carry_optimizer starts from
                                            "optimizer": trainer.optimizer.state_dict()})
        comm.barrier()
        return result

    def carried_optimizer(self, stage: Stage, model: torch.nn.Module) -> dict[str, Any]:
        """The optimizer state of the stage this one is fused from (carry_optimizer), read by
        every rank of the stage (each builds its own optimizer)."""
        name = stage.config.fuse_from[0]
        final = self.run_dir.load_final(name)
        source = final["model"]
        misfit = [n for n, p in model.named_parameters()
                  if n not in source or source[n].shape != p.shape]
        if misfit or "optimizer" not in final:
            why = (f"its model lacks or shapes differently {misfit[:3]}" if misfit else
                   "its final.pt holds no optimizer state (written before it was kept)")
            raise ConfigError(f"stage {stage.name!r}: carry_optimizer takes the optimizer of "
                              f"{name!r}, but {why}; drop carry_optimizer")
        state: dict[str, Any] = final["optimizer"]
        return state

    def fused_start(self, stage: Stage, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        by_name = {s.name: s for s in self.stages}
        sources = [self.run_dir.load_final(name)["model"] for name in stage.config.fuse_from]
        # For prolong: the resolution-dependent dense layers of the first source and of
        # this stage's model (architectures report them; see dense_input_shapes).
        first = by_name[stage.config.fuse_from[0]]
        coarse = build_model(self.cfg.model, self.splits[first.level][0].store.sample_shape,
                             self.num_outputs, first.level)
        coarse_shapes: dict[str, tuple[int, ...]] = getattr(coarse, "dense_input_shapes", dict)()
        fine_shapes: dict[str, tuple[int, ...]] = getattr(model, "dense_input_shapes", dict)()
        dense = {name: (shape, fine_shapes[name][1:]) for name, shape in coarse_shapes.items()
                 if name in fine_shapes}
        fresh = model.state_dict()
        fused = fuse(stage.config.fusion, sources, fresh,
                     weights=stage.config.fusion_weights,
                     bottom_layers=stage.config.bottom_layers, dense_layers=dense,
                     sampled=getattr(model, "level_factor", 1) > 1,
                     factor=2 ** (first.level - stage.level)
                     if stage.config.fusion == "prolong" else None)
        return shrink(fused, fresh, stage.config.fusion_keep)


def train(cfg: Config, run_dir: Path | None = None, resume: bool | str = False,
          stop: StopAt | None = None) -> dict[str, Any]:
    """Run the plan. `resume`: False, True (a checkpoint must exist) or "auto"."""
    directory = RunDir(run_dir if run_dir is not None else Path("runs") / cfg.run.name)
    preempt.install()
    comm = comm_dist.init(cfg.comm.timeout_s)
    # Rank 0 looks, takes the run directory's lock, and tells the others: ranks that each
    # listed the directory could disagree (a node's stale view of it) and then make
    # different collective calls. All of it before staging copies anything.
    found: tuple[bool, str | None] = (False, None)
    if comm.is_root:
        try:
            directory.lock()
            found = (bool(directory.checkpoints()), None)
        except UserError as e:
            found = (False, str(e))
    has_checkpoint, problem = comm.broadcast_object(found)
    try:
        if problem is not None:
            raise UserError(problem)
        if resume == "auto":
            # Continue if the run directory holds a checkpoint (a requeued job), else start.
            resume = has_checkpoint
        elif resume and not has_checkpoint:
            raise UserError(f"--resume: {directory} holds no checkpoint to continue from; "
                            "check --run-dir, or drop --resume to start the run "
                            "(--auto-resume does either)")
        return _train_locked(cfg, comm, directory, bool(resume), stop)
    finally:
        directory.release()


def _train_locked(cfg: Config, comm: Comm, run_dir: RunDir, resume: bool,
                  stop: StopAt | None) -> dict[str, Any]:
    staged: Path | None = None
    share: LocalShare | None = None
    if cfg.data.stage_to and cfg.data.path:
        from hpc_multires.data import staging

        partition = partition_data(cfg.data, comm) if cfg.data.stage == "partition" else None
        only = None if partition is None else [partition.files(comm.info.node_index), None]
        if partition is not None and comm.is_root:
            print(f"data.stage = 'partition': {cfg.data.path} {partition.describe()}",
                  file=sys.stderr, flush=True)
        (path, val_path), staged = staging.stage([cfg.data.path, cfg.data.val_path],
                                                 cfg.data.stage_to, comm, only)
        # Read the local copies; the saved config keeps the shared paths. A partition is
        # opened at its source (every shard's header) and reads its node's files locally.
        if partition is not None:
            share = LocalShare(Path(path), frozenset(partition.files(comm.info.node_index)),
                               partition.shares)
        read_cfg = replace(cfg, data=replace(
            cfg.data, path=cfg.data.path if share is not None else path,
            val_path=val_path if cfg.data.val_path else "",
            verify_reads="on" if cfg.data.verified_reads(staged=True) else "off"))
    else:
        read_cfg = cfg
    # On an error the CLI reports it and aborts the MPI job: no collective cleanup then,
    # since a barrier could wait for a rank that is gone.
    try:
        runner = PlanRunner(cfg, comm, run_dir, resume, stop, read_cfg.data, share)
        result = runner.run()
    except preempt.Preempted as e:
        if comm.is_root:
            run_dir.mark_preempted(str(e))
        # Leave together. Concurrent stages stop at their own steps, and the first rank to
        # exit ends the whole job (the launcher kills the rest): nobody goes before every
        # rank has its checkpoint written and rank 0 has written the marker.
        comm.wait_all("preempted-exit")
        if staged is not None:  # every rank is leaving: the node's copy goes too
            staging.cleanup(staged, comm)
        raise
    except UserError as e:
        # The job is about to be aborted: each node's first rank removes the node's copy
        # now, without waiting for the others (the abort would kill a waiting rank first).
        # Only for errors that every rank meets (a missing level, a bad plan), which reach
        # every node; after one rank's error its node's other ranks may still be reading
        # the copy, and the next attempt of the job clears it (staging.stage_root).
        if staged is not None and comm.info.local_rank == 0 and e.all_ranks:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    if runner.horovod is not None:
        runner.horovod.shutdown()
    if runner.mpi is not None:
        runner.mpi.free()
    if staged is not None:
        staging.cleanup(staged, comm)
    if comm.is_root:
        run_dir.write_summary(result)
    del runner  # its stages' models reference the process groups: free them before the groups
    comm_dist.shutdown(comm)  # every rank is here: leave together
    return result
