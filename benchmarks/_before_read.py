"""The read path as it was before the batch reader (commit f117df6), for `io.py` to measure
side by side with today's: h5py `x[row]` per sample (a new array each, Fletcher-32 checked),
the transform per sample, then `np.stack`. A module of its own so that the loader's reader
processes can unpickle its reader."""

from __future__ import annotations

import numpy as np
import torch

from hpc_multires.data.loader import PIPE_BYTES, BatchReader, Item
from hpc_multires.data.store import SampleStore


def read_sample(store: SampleStore, index: int) -> tuple[np.ndarray, np.ndarray]:
    """`SampleStore.read` as it was: model-ready x (C, *spatial) and y (P,)."""
    shard, row = store._locate(index)
    x_ds, y_ds = store._handles(shard)
    x, y = x_ds[row], y_ds[row]
    x = x.astype(np.float32, copy=True)
    if store.schema.x_transform == "log1p":
        np.log1p(x, out=x)
    if not (np.isfinite(x.sum(dtype=np.float64)) and np.isfinite(y).all()):
        raise ValueError(f"sample {index} holds NaN or infinity")
    shape = (-1,) + (1,) * (x.ndim - 1)
    x -= store.mean.reshape(shape)
    x *= (1.0 / store.std).reshape(shape)
    return x, y.astype(np.float32, copy=False)


class BeforeBatchReader(BatchReader):
    """The loader's reader as it was: samples one by one, then stacked."""

    def read(self, item: np.ndarray) -> Item:  # type: ignore[override]
        order = np.argsort(item, kind="stable")
        xs: list[np.ndarray] = [np.empty(0)] * len(item)
        ys: list[np.ndarray] = [np.empty(0)] * len(item)
        for i in order:
            xs[i], ys[i] = read_sample(self.store, int(item[i]))
        x, y = np.stack(xs), np.stack(ys)
        if x.nbytes <= PIPE_BYTES:
            return x, y
        return torch.from_numpy(x), torch.from_numpy(y)
