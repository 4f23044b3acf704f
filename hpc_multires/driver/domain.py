"""Running domain decomposition's phases (methods/domain.py), stages of the plan that
`plan.stages.domain_stages` makes:

- `local-D`: an ordinary stage on sub-domain D's ranks (the trainer reads only the
  sub-domain of each sample, `StageSpec.region_*`), all sub-domains at the same time;
- `aggregator`: every rank computes its local CNN's outputs on its replica's share of the
  training and validation sets (reading its sub-domain only), they are gathered on every
  rank, the local CNNs alone, their mean and (classification) their vote are evaluated,
  and the dense network is trained on the gathered outputs: on every rank the same
  computation (it is small), rank 0's weights kept;
- `coherent-D`: the trainer on sub-domain D's ranks with `CoherentPart` (its local CNN and
  the aggregator, the outputs gathered over each replica's ranks in the forward pass), the
  stop vote over the whole job, each sub-domain's first rank checkpointing its part.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from hpc_multires.comm.dist import Comm
from hpc_multires.data.loader import WindowedBatch, iterate_batches
from hpc_multires.data.sampler import shard_evenly
from hpc_multires.errors import UserError
from hpc_multires.methods.domain import CoherentPart, SubDomain, process_grid, subdomains
from hpc_multires.models import build_model
from hpc_multires.models.cnn_dnn import Aggregator, MeanAggregate, PickLocal, VoteAggregate
from hpc_multires.plan.load import config_to_dict
from hpc_multires.plan.stages import Stage
from hpc_multires.train import checkpoint, preempt
from hpc_multires.train.loop import Split, peak_memory
from hpc_multires.train.metrics import MetricsLog
from hpc_multires.train.objective import Batch, Objective

if TYPE_CHECKING:
    from hpc_multires.driver.run import PlanRunner


class DomainPhases:
    """What the phases share: the sub-domains, the process grid and its groups. Built on
    every rank in the same order (it creates the replicas' process groups)."""

    def __init__(self, runner: PlanRunner) -> None:
        self.runner = runner
        cfg, comm = runner.cfg, runner.comm
        self.cfg = cfg
        self.grid = process_grid(comm.world_size, cfg.domain.grid)
        store = runner.splits[runner.stages[0].level][0].store
        self.channels, *spatial = store.sample_shape
        self.parts: list[SubDomain] = subdomains(spatial, cfg.domain.grid, cfg.domain.overlap)
        self.probabilities = cfg.task.classify  # the aggregates read probabilities
        # Every rank creates every replica's group, in order (torch requires it); with one
        # replica the replica is the whole job.
        self.replica_groups: dict[int, dist.ProcessGroup | None] = {}
        for r in range(self.grid.replicas):
            ranks = self.grid.replica_ranks(r)
            if ranks not in runner.groups:
                whole = len(ranks) == comm.world_size
                runner.groups[ranks] = None if whole or not comm.distributed else \
                    dist.new_group(list(ranks))
            self.replica_groups[r] = runner.groups[ranks]

    @property
    def local_shape(self) -> tuple[int, ...]:
        """(C, *sub-domain): what a local CNN takes."""
        return (self.channels, *self.parts[0].shape)

    def local_model(self, level: int) -> nn.Module:
        return build_model(self.cfg.model, self.local_shape, self.runner.num_outputs, level)

    def aggregator_model(self) -> nn.Module:
        dom = self.cfg.domain
        if dom.aggregate == "mean":
            return MeanAggregate(self.probabilities)
        return Aggregator(self.grid.subdomains, self.runner.num_outputs, dom.hidden,
                          self.probabilities)

    def region(self, stage: Stage) -> dict[str, tuple[int, ...]]:
        """The StageSpec keys of a local or coherent stage's sub-domain."""
        part = self.parts[stage.subdomain]
        return {"region_start": part.start, "region_shape": part.shape}

    # ------------------------------------------------------------------ aggregator

    def local_outputs(self, comm: Comm, split: Split, model: nn.Module, level: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The local CNNs' outputs on `split`, on every rank: (N, S, P), with the labels
        (N, P). This rank runs its sub-domain's CNN on its replica's share, reading only
        its sub-domain; the shares are gathered over the job (`comm`, every rank)."""
        grid, data = self.grid, self.cfg.data
        d, r = grid.subdomain_of(comm.rank), grid.replica_of(comm.rank)
        part = self.parts[d]
        positions = shard_evenly(len(split.indices), r, grid.replicas)
        size = max(1, self.cfg.train.global_batch // grid.replicas)
        items = [positions[i:i + size] for i in range(0, len(positions), size)]
        start = np.asarray(part.start, dtype=np.int64)
        tasks = [WindowedBatch(split.indices[p], np.tile(start, (len(p), 1)), part.shape)
                 for p in items]
        outs: list[torch.Tensor] = []
        model.eval()
        with torch.no_grad():
            for x, _ in iterate_batches(split.store, tasks, data.num_workers, data.prefetch,
                                        data.read_timeout_s):
                outs.append(model(x.to(comm.device)).cpu())  # (b, P)
        mine = torch.cat(outs) if outs else torch.zeros(0, self.runner.num_outputs)
        every = comm.gather_object((d, r, mine))
        n, p = len(split.indices), self.runner.num_outputs
        features = torch.zeros(n, grid.subdomains, p)
        for d_, r_, values in every:
            features[shard_evenly(n, r_, grid.replicas), d_] = values
        labels = torch.from_numpy(np.ascontiguousarray(
            split.store.labels()[split.indices], dtype=np.float32))
        return features, labels

    def evaluate(self, objective: Objective, module: nn.Module, features: torch.Tensor,
                 labels: torch.Tensor, names: list[str], level: int) -> dict[str, float]:
        """`objective`'s validation metrics of `module` on gathered outputs (every rank has
        all of them: no sums over ranks)."""
        metrics = objective.validation(names, 0)
        module.eval()
        with torch.no_grad():
            for a in range(0, len(features), 256):
                metrics.add(module, Batch(level, features[a:a + 256], labels[a:a + 256],
                                          np.arange(a, min(a + 256, len(features)))))
        return metrics.result(metrics.sums())

    def run_aggregator(self, stage: Stage, comm: Comm, objective: Objective,
                       start: tuple[str, Any, Any]) -> dict[str, Any]:
        runner, cfg = self.runner, self.cfg
        run_dir, seed = runner.run_dir, cfg.run.seed
        _, resume_from, loaded = start
        log = MetricsLog(run_dir.metrics, enabled=comm.is_root)
        train, val = runner.splits[stage.level]
        names = list(train.store.schema.label_names)
        d = self.grid.subdomain_of(comm.rank)
        local = self.local_model(stage.level)
        local.load_state_dict(run_dir.load_final(f"local-{d}")["model"])
        local.to(comm.device)
        t0 = runner.clock()
        train_f, train_y = self.local_outputs(comm, train, local, stage.level)
        val_f, val_y = self.local_outputs(comm, val, local, stage.level)
        headline = objective.headline
        aggregates: dict[str, Any] = {
            "local": [self.evaluate(objective, PickLocal(i), val_f, val_y, names, stage.level)
                      for i in range(self.grid.subdomains)],
            "mean": self.evaluate(objective, MeanAggregate(self.probabilities), val_f, val_y,
                                  names, stage.level)}
        if self.probabilities:
            aggregates["vote"] = self.evaluate(objective, VoteAggregate(), val_f, val_y,
                                               names, stage.level)
        tag = {"stage": stage.name, "level": stage.level, "group": stage.group}
        if resume_from is None:
            log.write({"kind": "start", **tag, "step": 0, "wall_s": runner.clock(),
                       "world_size": comm.world_size, "ranks": list(stage.ranks),
                       "headline": headline, "higher_is_better": objective.higher_is_better,
                       "grid": list(cfg.domain.grid), "replicas": self.grid.replicas,
                       "outputs_s": runner.clock() - t0, **aggregates})
        torch.manual_seed(seed)
        model = self.aggregator_model().to(comm.device)
        params = list(model.parameters())
        t = stage.train
        optimizer = torch.optim.Adam(params, lr=t.lr) if params else None
        epoch = step = 0
        if resume_from is not None:
            state = loaded if loaded is not None else checkpoint.load_chosen(resume_from)
            model.load_state_dict(state["model"])
            if optimizer is not None:
                optimizer.load_state_dict(state["optimizer"])
            epoch, step = int(state["epoch"]), int(state["step"])
        n, batch = len(train_f), min(t.global_batch, len(train_f))
        ckpt_dir = run_dir.checkpoint_dir(stage.name)
        val_metrics = self.evaluate(objective, model, val_f, val_y, names, stage.level)
        while epoch < t.epochs and optimizer is not None:
            began = time.monotonic()
            model.train()
            order = torch.from_numpy(np.random.default_rng([seed, epoch, 0xA66]).permutation(n))
            total = 0.0
            for k in range(n // batch):
                idx = order[k * batch:(k + 1) * batch]
                loss = objective.criterion(model(train_f[idx].to(comm.device)),
                                           train_y[idx].to(comm.device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                step += 1
            epoch += 1
            val_metrics = self.evaluate(objective, model, val_f, val_y, names, stage.level)
            log.write({"kind": "epoch", **tag, "epoch": epoch, "step": step,
                       "wall_s": runner.clock(), "epoch_s": time.monotonic() - began,
                       "loss": total / max(n // batch, 1), **val_metrics,
                       **peak_memory(comm)})
            if comm.is_root:
                checkpoint.save_atomic(
                    {"format": 1, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "stage": stage.name, "epoch": epoch,
                     "step": step, "epoch_step": 0, "loss_sum": 0.0, "stage_elapsed_s": 0.0,
                     "wall_s": runner.clock(), "world_size": comm.world_size,
                     "config": config_to_dict(cfg)},
                    checkpoint.checkpoint_path(ckpt_dir, epoch))
                checkpoint.prune(ckpt_dir, t.checkpoint_keep)
            comm.barrier()  # the checkpoint is complete before anyone reads or leaves
            # A signal to any rank (or to a rank of the job, through the job-wide flag)
            # stops every rank here, at the epoch whose checkpoint was just written.
            if comm.max(float(preempt.requested() or bool(comm.flag("preempted")))):
                comm.flag("preempted", "1")
                raise preempt.Preempted(
                    f"stopped on {preempt.reason() or 'a signal'} after epoch {epoch} of "
                    "stage 'aggregator', checkpoint written; continue with --resume (the "
                    "Slurm scripts requeue themselves)")
        # Every rank trained the same network on the same data; rank 0's is the one kept.
        model.load_state_dict(comm.broadcast_object(model.state_dict()))
        aggregates["dnn"] = val_metrics if cfg.domain.aggregate == "dnn" else None
        chosen = aggregates["dnn" if cfg.domain.aggregate == "dnn" else cfg.domain.aggregate]
        result = {"done": True, "epoch": epoch, "step": step, "wall_s": runner.clock(),
                  "headline": headline, "aggregate": cfg.domain.aggregate, **chosen,
                  "aggregates": aggregates}
        if comm.is_root:
            run_dir.save_final(stage.name, {"model": model.state_dict(), "stage": stage.name,
                                            "level": stage.level, "result": result,
                                            "config": config_to_dict(cfg)})
            alone = float(np.mean([a[headline] for a in aggregates["local"]]))
            print(f"aggregator: {headline} local {alone:.4f} "
                  f"(mean of {self.grid.subdomains}), mean {aggregates['mean'][headline]:.4f}"
                  + (f", vote {aggregates['vote'][headline]:.4f}" if "vote" in aggregates
                     else "")
                  + (f", dnn {val_metrics[headline]:.4f}" if cfg.domain.aggregate == "dnn"
                     else ""), file=sys.stderr, flush=True)
        comm.barrier()
        return result

    # ------------------------------------------------------------------ coherent

    def coherent_model(self, stage: Stage, comm: Comm, world: Comm,
                       resuming: bool) -> CoherentPart:
        """This rank's part of the coherent model: its sub-domain's local CNN and the
        aggregator, from their final models (a resumed stage's checkpoint replaces them)."""
        run_dir, d = self.runner.run_dir, stage.subdomain
        local = self.local_model(stage.level)
        aggregator = self.aggregator_model()
        if not resuming:
            local.load_state_dict(run_dir.load_final(f"local-{d}")["model"])
            aggregator.load_state_dict(run_dir.load_final("aggregator")["model"])
        r = self.grid.replica_of(world.rank)
        return CoherentPart(local, aggregator, grid=self.grid, rank=world.rank,
                            replica_group=self.replica_groups[r],
                            subdomain_group=self.runner.groups[stage.ranks])

    def agree_on_checkpoint(self, stage: Stage, world: Comm,
                            start: tuple[str, Any, Any]) -> tuple[str, Any, Any]:
        """The coherent parts resume from the same step: each part's first rank chose its
        newest checkpoint; where a part lacks that one (a job ended between the parts'
        writes), every part takes the newest checkpoint they all have."""
        kind, value, _ = start
        mine = sorted(p.name for p in checkpoint.list_checkpoints(
            self.runner.run_dir.checkpoint_dir(stage.name)))
        every = world.gather_object((kind, value.name if kind == "checkpoint" else None, mine))
        kinds = {k for k, _, _ in every}
        if kinds == {"final"} or kinds == {"fresh"}:
            return start
        names = {n for _, n, _ in every}
        if kinds == {"checkpoint"} and len(names) == 1:
            return start
        common = set.intersection(*(set(m) for _, _, m in every))
        if not common:
            raise UserError(
                "the coherent model's parts have no checkpoint in common ("
                f"{', '.join(sorted(n for n in names if n))}); its stages cannot resume together: "
                f"remove {self.runner.run_dir}/stages/"
                "coherent-* to train the coherent phase again from the local CNNs")
        ckpts = self.runner.run_dir.checkpoint_dir(stage.name)
        newest = [p for p in checkpoint.list_checkpoints(ckpts) if p.name in common][-1]
        return "checkpoint", newest, None
