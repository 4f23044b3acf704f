"""The training loop of one stage: read it top to bottom.

Per step: read a batch (prefetched in the background), forward, MSE loss, backward
(DDP allreduces gradients during it), optimizer step. Every `log.every_steps` the mean
loss over all ranks is logged; every epoch the validation MAE is computed over the
whole validation set (each rank takes a disjoint share) and a checkpoint is written.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from hpc_multires.comm.dist import Comm
from hpc_multires.data.loader import iterate_batches
from hpc_multires.data.sampler import GlobalBatchSampler, shard_evenly
from hpc_multires.data.store import SampleStore
from hpc_multires.errors import UserError
from hpc_multires.plan.config import Config, config_to_dict
from hpc_multires.train import checkpoint
from hpc_multires.train.metrics import MetricsLog, Progress
from hpc_multires.train.optim import build_optimizer, learning_rate, set_learning_rate

# Config keys that may change between a run and its resumption: they do not change
# what is computed (or, for train.epochs, only extend it).
RESUMABLE_CHANGES = ("train.epochs", "data.path", "data.val_path", "data.num_workers",
                     "data.prefetch", "comm.timeout_s", "log.every_steps", "log.progress_s")


@dataclass
class Split:
    """Samples of a store used for one purpose (training or validation)."""

    store: SampleStore
    indices: np.ndarray


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ and that a resumed run may not change."""
    a, b = _flatten(saved), _flatten(current)
    return sorted(k for k in a.keys() | b.keys()
                  if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)


class Trainer:
    def __init__(self, cfg: Config, comm: Comm, model: nn.Module, train: Split, val: Split,
                 run_dir: Path, progress: Progress) -> None:
        self.cfg = cfg
        self.comm = comm
        self.model = model.to(comm.device)
        self.train = train
        self.val = val
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.log = MetricsLog(run_dir / "metrics.jsonl", enabled=comm.is_root)
        self.progress = progress
        self.optimizer = build_optimizer(cfg.train, list(self.model.parameters()))
        self.sampler = GlobalBatchSampler(train.indices, cfg.train.global_batch, comm.rank,
                                          comm.world_size, cfg.run.seed)
        if self.sampler.steps_per_epoch == 0:
            raise UserError(
                f"the training set has {len(train.indices)} samples, fewer than "
                f"train.global_batch = {cfg.train.global_batch}; lower the global batch or "
                "use more data")

    # ------------------------------------------------------------------ state

    def state(self, epoch: int, step: int, wall_s: float) -> dict[str, Any]:
        return {"format": 1, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": epoch, "step": step,
                "wall_s": wall_s, "world_size": self.comm.world_size,
                "config": config_to_dict(self.cfg)}

    def restore(self, state: dict[str, Any], path: Path) -> tuple[int, int, float]:
        changed = config_changes(state["config"], config_to_dict(self.cfg))
        if changed:
            raise UserError(
                f"the config differs from the one {path} was trained with, in {changed}; "
                "resume with the run's own config (RUN_DIR/config.toml) or start a new "
                "--run-dir")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["epoch"]), int(state["step"]), float(state["wall_s"])

    # ------------------------------------------------------------------ loop

    def fit(self, resume: bool = False, stop_after_epoch: int | None = None) -> dict[str, Any]:
        cfg, comm = self.cfg, self.comm
        spe = self.sampler.steps_per_epoch
        total_steps = cfg.train.epochs * spe
        epoch, step, wall_offset = 0, 0, 0.0
        if resume:
            path, state = checkpoint.load_latest(self.ckpt_dir)
            epoch, step, wall_offset = self.restore(state, path)
            self.log.truncate_after(step)
            self.progress.line(f"resumed from {path} (epoch {epoch}, step {step})")
        else:
            self.log.write({"kind": "start", "step": 0, "wall_s": 0.0,
                            **self._start_record()})
        ddp = comm.wrap(self.model)
        start = time.monotonic() - wall_offset  # wall_s counts across resumptions
        last_val: dict[str, float] = {}
        while epoch < cfg.train.epochs:
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
            # Dropout masks depend on (seed, epoch, rank) only: resumable without RNG state.
            seeds = np.random.SeedSequence([cfg.run.seed, epoch, comm.rank]).generate_state(1)
            torch.manual_seed(int(seeds[0]))
            ddp.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=comm.device)
            epoch_steps = 0
            mark_t, mark_step = time.monotonic(), step
            for x, y in iterate_batches(self.train.store, self.sampler.batches(epoch),
                                        cfg.data.num_workers, cfg.data.prefetch):
                x = x.to(comm.device, non_blocking=True)  # (b, C, *spatial)
                y = y.to(comm.device, non_blocking=True)  # (b, P)
                lr = learning_rate(cfg.train, step, total_steps, spe)
                set_learning_rate(self.optimizer, lr)
                loss = nn.functional.mse_loss(ddp(x), y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()  # DDP allreduces the gradients here
                self.optimizer.step()
                loss_sum += loss.detach()  # no sync: stays on the device until epoch end
                step += 1
                epoch_steps += 1
                # .item() is a device sync point; only pay it on log steps.
                if step % cfg.log.every_steps == 0 or epoch_steps == spe:
                    mean_loss = comm.sum([loss.item()])[0] / comm.world_size
                    if not math.isfinite(mean_loss):
                        raise UserError(
                            f"the loss became {mean_loss} at step {step}; lower train.lr "
                            f"(now {cfg.train.lr}) or check the data for extreme values")
                    now = time.monotonic()
                    sps = (step - mark_step) * cfg.train.global_batch / max(now - mark_t, 1e-9)
                    mark_t, mark_step = now, step
                    self.log.write({"kind": "step", "epoch": epoch, "step": step,
                                    "wall_s": now - start, "samples_per_s": sps,
                                    "loss": mean_loss, "lr": lr})
                    self.progress.update(step, epoch + 1,
                                         f"loss {mean_loss:.4f} {sps:.1f} samples/s")
            epoch += 1
            epoch_loss = comm.sum([float(loss_sum)])[0] / (comm.world_size * max(epoch_steps, 1))
            last_val = self.evaluate()
            wall = time.monotonic() - start
            record = {"kind": "epoch", "epoch": epoch, "step": step, "wall_s": wall,
                      "samples_per_s": step * cfg.train.global_batch / max(wall, 1e-9),
                      "loss": epoch_loss, **last_val,
                      "rss_mb": psutil.Process().memory_info().rss / 2**20}
            self.log.write(record)
            self.progress.line(
                f"epoch {epoch}/{cfg.train.epochs} step {step} loss {record['loss']:.4f} "
                f"val_mae {last_val['val_mae']:.4f} wall {wall:.1f}s")
            if comm.is_root:
                checkpoint.save_atomic(self.state(epoch, step, wall),
                                       checkpoint.checkpoint_path(self.ckpt_dir, epoch))
                checkpoint.prune(self.ckpt_dir, cfg.train.checkpoint_keep)
            comm.barrier()  # nobody reads a checkpoint before it is complete
        return {"epoch": epoch, "step": step, "wall_s": time.monotonic() - start, **last_val}

    def _start_record(self) -> dict[str, Any]:
        train_y = self.train.store.labels()[self.train.indices]  # (N, P)
        val_y = self.val.store.labels()[self.val.indices]
        mean_mae = float(np.abs(val_y - train_y.mean(axis=0)).mean())
        return {"world_size": self.comm.world_size,
                "global_batch": self.cfg.train.global_batch,
                "local_batch": self.sampler.local_batch,
                "steps_per_epoch": self.sampler.steps_per_epoch,
                "train_samples": len(self.train.indices), "val_samples": len(self.val.indices),
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "val_mae_mean_predictor": mean_mae}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation MAE and MSE over the whole validation set, exact over all ranks."""
        self.model.eval()
        mine = self.val.indices[shard_evenly(len(self.val.indices), self.comm.rank,
                                             self.comm.world_size)]
        size = self.sampler.local_batch
        batches = [mine[i:i + size] for i in range(0, len(mine), size)]
        names = self.val.store.schema.label_names
        abs_sum = np.zeros(len(names))  # (P,)
        sq_sum = rows = 0.0
        for x, y in iterate_batches(self.val.store, batches, self.cfg.data.num_workers,
                                    self.cfg.data.prefetch):
            err = self.model(x.to(self.comm.device)) - y.to(self.comm.device)  # (b, P)
            abs_sum += err.abs().sum(dim=0).double().cpu().numpy()
            sq_sum += float(err.square().sum())
            rows += err.shape[0]
        *abs_total, sq_sum, rows = self.comm.sum([*abs_sum.tolist(), sq_sum, rows])
        rows = max(rows, 1)
        return {"val_mae": sum(abs_total) / (rows * len(names)),
                "val_mse": sq_sum / (rows * len(names)),
                **{f"val_mae/{n}": a / rows for n, a in zip(names, abs_total, strict=True)}}
