"""`hpc-multires train`: from a validated config to a trained model in a run directory.

Every rank runs this. The checks that can fail on user input (config, world size,
dataset, run directory) come before any collective other than the rendezvous, and
raise the same error on every rank, so a bad input ends the job at once with one
message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpc_multires.comm import dist as comm_dist
from hpc_multires.data.store import SampleStore
from hpc_multires.errors import ConfigError, DataError, UserError
from hpc_multires.models import build_model
from hpc_multires.plan.config import Config, DataConfig, config_to_toml
from hpc_multires.train import checkpoint
from hpc_multires.train.loop import Split, Trainer
from hpc_multires.train.metrics import Progress


def open_splits(cfg: DataConfig) -> tuple[Split, Split]:
    """Training and validation samples, from one store (held-out tail) or two."""
    if not cfg.path:
        raise ConfigError("data.path is empty; set it in the config or pass "
                          "--set data.path=DIR (a directory made by `hpc-multires data`)")
    store = SampleStore(cfg.path, level=cfg.level)
    if cfg.val_path:
        val = SampleStore(cfg.val_path, level=cfg.level)
        a, b = store.schema, val.schema
        if (a.sample_shape, a.label_names) != (b.sample_shape, b.label_names):
            raise DataError(
                f"data.val_path {cfg.val_path!r} holds samples {b.sample_shape} with labels "
                f"{b.label_names}, data.path holds {a.sample_shape} with {a.label_names}; "
                "use a validation set made the same way as the training set")
        # Normalise validation inputs with the training set's statistics.
        val.mean, val.std = store.mean, store.std
        return (Split(store, np.arange(len(store))), Split(val, np.arange(len(val))))
    n_val = round(len(store) * cfg.val_fraction)
    if n_val == 0:
        raise ConfigError(
            f"no validation samples: {len(store)} samples x data.val_fraction = "
            f"{cfg.val_fraction} rounds to 0; raise data.val_fraction or set data.val_path")
    n_train = len(store) - n_val
    return (Split(store, np.arange(n_train)), Split(store, np.arange(n_train, len(store))))


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to overwrite a run's checkpoints unless resuming it. Runs on every rank."""
    existing = checkpoint.list_checkpoints(run_dir / "checkpoints")
    if existing and not resume:
        raise UserError(
            f"{run_dir} already holds checkpoints (latest {existing[-1].name}); pass --resume "
            "to continue that run, or choose another --run-dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file; choose a directory")


def describe(cfg: Config, comm: comm_dist.Comm, train: Split, val: Split,
             model: torch.nn.Module, run_dir: Path) -> str:
    s = train.store.schema
    info = comm.info
    rows = [
        ("ranks", f"{info.world_size} on {info.node_count} node(s), launcher {info.launcher}, "
                  f"device {comm.device.type}, backend {cfg.comm.backend}"),
        ("data", f"{train.store.path} level {cfg.data.level}: sample {train.store.sample_shape} "
                 f"{s.x_dtype} ({s.x_transform}), labels {', '.join(s.label_names)}"),
        ("samples", f"{len(train.indices)} train, {len(val.indices)} validation"),
        ("model", f"{cfg.model.name} width {cfg.model.width} depth {cfg.model.depth} head "
                  f"{cfg.model.head}: {sum(p.numel() for p in model.parameters()):,} parameters"),
        ("batch", f"global {cfg.train.global_batch} = {comm.world_size} ranks x "
                  f"{cfg.train.global_batch // comm.world_size} per rank"),
        ("optimizer", f"{cfg.train.optimizer} lr {cfg.train.lr} {cfg.train.schedule}, "
                      f"{cfg.train.epochs} epochs"),
        ("run dir", str(run_dir)),
    ]
    return "\n".join(f"  {k:<10} {v}" for k, v in rows)


def train(cfg: Config, run_dir: Path | None = None, resume: bool = False,
          stop_after_epoch: int | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir if run_dir is not None else Path("runs") / cfg.run.name)
    comm = comm_dist.init(cfg.comm.timeout_s)
    try:
        cfg.check_world(comm.world_size)
        train_split, val_split = open_splits(cfg.data)
        prepare_run_dir(run_dir, resume)
        torch.manual_seed(cfg.run.seed)  # same initial weights on every rank count
        model = build_model(cfg.model, train_split.store.sample_shape,
                            train_split.store.schema.num_labels)
        comm.barrier()  # every rank passed the checks before rank 0 writes anything
        if comm.is_root:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.toml").write_text(config_to_toml(cfg))
            plan = describe(cfg, comm, train_split, val_split, model, run_dir)
            print(f"hpc-multires train\n{plan}", file=sys.stderr, flush=True)
        comm.barrier()
        progress = Progress(0, comm.is_root, cfg.log.progress_s)
        trainer = Trainer(cfg, comm, model, train_split, val_split, run_dir, progress)
        progress.total = cfg.train.epochs * trainer.sampler.steps_per_epoch
        result = trainer.fit(resume=resume, stop_after_epoch=stop_after_epoch)
        if comm.is_root:
            (run_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        comm_dist.shutdown()
