"""The `data synth` datasets: generators wired to the parallel dataset writer.

Sample i is a function of (seed, i) alone, so the dataset is the same whatever the
number of ranks that wrote it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpc_multires.data.store import provenance
from hpc_multires.data.writer import write_dataset
from hpc_multires.errors import UserError


def synth_cosmoflow(out: Path, *, num_samples: int, size: int, channels: int, seed: int,
                    samples_per_shard: int, overwrite: bool = False,
                    chunk: int | None = None) -> int:
    from hpc_multires.data.synth import cosmoflow

    if num_samples < 1:
        raise UserError(f"--samples {num_samples}: need at least 1")
    try:
        cosmoflow.generate(0, seed, size, channels)  # validates size and channels early
    except ValueError as e:
        raise UserError(str(e)) from None
    return write_dataset(
        out, num_samples=num_samples, samples_per_shard=samples_per_shard,
        sample_fn=lambda i: cosmoflow.generate(i, seed, size, channels),
        sample_shape=(channels, size, size, size), x_dtype="uint16",
        label_names=tuple(cosmoflow.LABEL_NAMES), x_transform="log1p",
        prov=provenance(cosmoflow.GENERATOR_NAME, seed=seed, size=size, channels=channels,
                        label_ranges=[[p.name, p.low, p.high, p.log] for p in cosmoflow.PARAMS]),
        overwrite=overwrite, chunk=chunk)


def synth_neuron(out: Path, *, num_samples: int, num_bins: int, probes: int, seed: int,
                 samples_per_shard: int, overwrite: bool = False,
                 chunk: int | None = None) -> int:
    from hpc_multires.data.synth import neuron

    if num_samples < 1:
        raise UserError(f"--samples {num_samples}: need at least 1")
    try:
        neuron.generate(0, seed, num_bins, probes)  # validates the arguments early
    except ValueError as e:
        raise UserError(str(e)) from None
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def sample(i: int) -> tuple[np.ndarray, np.ndarray]:
        # Neurons are integrated a shard at a time (vectorised over samples); the result
        # equals sample-by-sample generation, so the dataset does not depend on it.
        shard = i // samples_per_shard
        if shard not in cache:
            cache.clear()
            first = shard * samples_per_shard
            indices = list(range(first, min(num_samples, first + samples_per_shard)))
            cache[shard] = neuron.generate_batch(indices, seed, num_bins, probes)
        x, y = cache[shard]
        row = i - shard * samples_per_shard
        return x[row], y[row]

    return write_dataset(
        out, num_samples=num_samples, samples_per_shard=samples_per_shard, sample_fn=sample,
        sample_shape=(probes, num_bins), x_dtype="float32",
        label_names=tuple(neuron.LABEL_NAMES), x_transform="none",
        prov=provenance(neuron.GENERATOR_NAME, seed=seed, num_bins=num_bins, probes=probes,
                        sample_rate_hz=neuron.SAMPLE_RATE_HZ,
                        label_ranges=[[p.name, p.low, p.high, p.log] for p in neuron.PARAMS]),
        overwrite=overwrite, chunk=chunk)


def synth_images(out: Path, *, num_samples: int, size: int, channels: int, seed: int,
                 samples_per_shard: int, overwrite: bool = False,
                 chunk: int | None = None) -> int:
    from hpc_multires.data.synth import images

    if num_samples < 1:
        raise UserError(f"--samples {num_samples}: need at least 1")
    try:
        images.check_args(size, channels)
    except ValueError as e:
        raise UserError(f"data synth images: {e}") from None
    return write_dataset(
        out, num_samples=num_samples, samples_per_shard=samples_per_shard,
        sample_fn=lambda i: images.generate(i, seed, size, channels),
        sample_shape=(channels, size, size), x_dtype="float32",
        label_names=tuple(images.LABEL_NAMES), x_transform="none",
        prov=provenance(images.GENERATOR_NAME, seed=seed, size=size, channels=channels,
                        label_ranges=[[p.name, p.low, p.high, p.log] for p in images.PARAMS]),
        overwrite=overwrite, chunk=chunk)


def synth_classes(out: Path, *, num_samples: int, size: int, classes: int, channels: int,
                  seed: int, samples_per_shard: int, overwrite: bool = False,
                  chunk: int | None = None) -> int:
    from hpc_multires.data.synth import classes as cl

    if num_samples < 1:
        raise UserError(f"--samples {num_samples}: need at least 1")
    try:
        cl.check_args(size, classes, channels)
    except ValueError as e:
        raise UserError(f"data synth classes: {e}") from None
    names = cl.class_names(classes)
    return write_dataset(
        out, num_samples=num_samples, samples_per_shard=samples_per_shard,
        sample_fn=lambda i: cl.generate(i, seed, size, classes, channels),
        sample_shape=(channels, size, size), x_dtype="float32",
        label_names=cl.LABEL_NAMES, x_transform="none",
        prov=provenance(cl.GENERATOR_NAME, seed=seed, size=size, channels=channels,
                        classes=classes, class_names=list(names)),
        overwrite=overwrite, chunk=chunk, class_names=names)
