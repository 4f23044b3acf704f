"""What a resumed run may change: the one compatibility policy of a run and its
resumption, used for the run's config.toml and for every checkpoint and final model."""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Any

from hpc_multires.errors import ConfigError
from hpc_multires.plan.load import config_from_dict, config_to_dict

# Config keys that may change between a run and its resumption: they do not change
# what is computed (or, for epochs, only extend it). The validation's schedule and subset
# change what is measured, not what is trained; the per-level batch and rate rules
# (batch_scale, batch_cap, lr_scale, lr_scale_warmup_steps) change the steps, so a change
# of them is refused like one of global_batch or lr.
RESUMABLE_CHANGES = ("train.epochs", "stages.*.train.epochs", "train.steps",
                     "stages.*.train.steps", "train.eval_every", "stages.*.train.eval_every",
                     "train.eval_samples", "stages.*.train.eval_samples",
                     "data.path", "data.val_path",
                     "data.stage_to", "data.verify_reads", "data.mpio",
                     "data.num_workers", "data.prefetch", "data.read_timeout_s",
                     "data.hold_mb",
                     "comm.timeout_s", "log.*", "domain.local_epochs",
                     "domain.aggregator_epochs", "domain.coherent_epochs")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): value}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ and that a resumed run may not change.

    The saved config is read back through today's schema first, so a key added since it
    was written counts as its default, not as a change.
    """
    # A key since removed or renamed fails the schema: compared as written, it is a change.
    with contextlib.suppress(ConfigError):
        saved = config_to_dict(config_from_dict(saved))
    a, b = _flatten(saved), _flatten(current)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)
                  and not any(fnmatch.fnmatchcase(k, p) for p in RESUMABLE_CHANGES))
