"""`hpc-multires data inspect DIR`: schema, counts, label ranges and checksums of a store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpc_multires.data.store import checksum_shard, open_store
from hpc_multires.data.volumes import VolumeStore
from hpc_multires.errors import DataError


def _classes(names: tuple[str, ...], labels: np.ndarray) -> str:
    """The classes of a classification store and how many samples each has."""
    counts = np.bincount(labels[:, 0].astype(np.int64), minlength=len(names))
    return (f"classes   {len(names)}, samples per class: "
            + ", ".join(f"{i} {n} ({c})" for i, (n, c) in enumerate(zip(names, counts,
                                                                         strict=True))))


def inspect_store(path: Path, verify: bool = True) -> tuple[str, bool]:
    """A printable report and whether every shard verified."""
    store = open_store(path)
    s = store.schema
    with h5py.File(store.shards[0].path, "r", locking=False) as f:
        prov: dict[str, Any] = json.loads(f.attrs["provenance"])
    labels = store.labels()  # (N, P)
    lines = [
        f"dataset   {path}",
        f"samples   {s.num_samples} in {s.num_shards} shard(s)",
        f"sample    {s.sample_shape} {s.x_dtype}, transform {s.x_transform}",
        *([f"arrays    {len(store) // store.grid.per_volume} of "
           f"{tuple(store.volume_shape)} in {s.num_shards} volume file(s), cut in a grid "
           f"of {'x'.join(map(str, store.grid.counts))} sub-volumes every "
           f"{'x'.join(map(str, store.grid.stride))} points"]
          if isinstance(store, VolumeStore) else []),
        f"channels  mean {[round(float(v), 4) for v in store.mean]} "
        f"std {[round(float(v), 4) for v in store.std]} (after transform)",
        f"source    {prov.get('generator')} ({prov.get('created')}) seed {prov.get('seed', '-')}",
        _classes(s.class_names, labels) if s.class_names else "labels    " + "; ".join(
            f"{n} [{col.min():.3f}, {col.max():.3f}] mean {col.mean():.3f}"
            for n, col in zip(s.label_names, labels.T, strict=True)),
    ]
    outside = [n for n, col in zip(s.label_names, labels.T, strict=True)
               if col.size and (col.min() < -1.0 or col.max() > 1.0) and not s.class_names]
    if outside:  # trains, but the output layer reaches only (-1.2, 1.2)
        lines.append(f"labels    {', '.join(outside)} outside [-1, 1]: the models end in "
                     "1.2 * tanh and cannot fit values beyond 1.2; map each label into "
                     "[-1, 1] (`data convert` does)")
    all_ok = True
    if verify:
        combined = hashlib.sha256()
        incomplete: set[int] = set()
        layout: set[str] = set()
        for info in store.shards:
            try:
                r = checksum_shard(info.path)
            except (OSError, DataError) as e:
                lines.append(f"  {info.path.name}  {info.num_samples:6d} samples  UNREADABLE: {e}")
                all_ok = False
                continue
            ok = r["ok"] and r["nonfinite"] == 0
            all_ok &= ok
            combined.update((r["x_sha256"] + r["y_sha256"]).encode())
            status = "ok" if ok else ("CHECKSUM MISMATCH" if not r["ok"] else
                                      f"{r['nonfinite']} NaN/inf values")
            levels = ",".join(map(str, r["levels"])) or "-"
            if r["incomplete_levels"]:  # an interrupted pyramid build: training refuses them
                levels += f" ({','.join(map(str, r['incomplete_levels']))} incomplete)"
                incomplete.update(r["incomplete_levels"])
            lines.append(f"  {info.path.name}  {info.num_samples:6d} samples  levels {levels:<6} "
                         f"sha256 {r['x_sha256'][:12]}  {status}")
            layout.update(r["notes"])
        for note in sorted(layout):  # it reads, but not as docs/data-format.md asks
            lines.append(f"layout    {note} (in one or more shards; docs/data-format.md)")
        if incomplete:
            lines.append(f"pyramid   level(s) {', '.join(map(str, sorted(incomplete)))} "
                         "incomplete in the shards marked above, so training cannot use them: "
                         f"rebuild with `hpc-multires data pyramid {path} --levels "
                         f"{max(incomplete)}`")
        lines.append(f"checksum  {combined.hexdigest()[:16]} (over all shards' x and y bytes)")
        lines.append("verified  all shards match their stored checksums" if all_ok else
                     "verified  FAILED: regenerate or re-copy the shards marked above")
    store.close()
    return "\n".join(lines), all_ok
