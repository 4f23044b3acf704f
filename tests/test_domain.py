"""Domain decomposition without MPI: the sub-domain layout, the process grid, the CNN-DNN on
one process, and the bad configs (each one line naming the fix, before anything runs).
The multi-rank runs are tests/test_domain_mpi.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_multires.errors import ConfigError
from hpc_multires.methods.domain import CoherentPart, process_grid, subdomains
from hpc_multires.models.cnn_dnn import CNNDNN, Aggregator, MeanAggregate, VoteAggregate
from hpc_multires.plan.load import load_config
from hpc_multires.plan.stages import resolve

DOMAIN = """
[run]
name = "domain"
[data]
path = "{data}"
val_fraction = 0.25
num_workers = 0
[model]
name = "cosmoflow"
width = 0.125
depth = 2
head = "gap"
fc_sizes = [16]
[train]
epochs = 1
global_batch = 8
lr = 2e-3
[domain]
grid = {grid}
aggregator_epochs = 2
coherent_epochs = 1
"""


def domain_config(tmp_path: Path, data: Path, grid: str = "[2, 2, 1]", extra: str = "") -> Path:
    path = tmp_path / "domain.toml"
    path.write_text(DOMAIN.format(data=data, grid=grid) + extra)
    return path


def test_subdomains_tile_the_sample_in_grid_order() -> None:
    parts = subdomains((32, 32, 32), (2, 2, 2))
    assert [p.start for p in parts] == [(a, b, c) for a in (0, 16) for b in (0, 16)
                                        for c in (0, 16)]
    assert {p.shape for p in parts} == {(16, 16, 16)}
    covered = np.zeros((32, 32, 32), int)
    for p in parts:
        covered[p.region()] += 1
    assert (covered == 1).all()


def test_overlap_keeps_one_size_and_moves_border_blocks_inwards() -> None:
    parts = subdomains((16, 16), (2, 2), overlap=2)
    assert {p.shape for p in parts} == {(12, 12)}
    assert [p.start for p in parts] == [(0, 0), (0, 4), (4, 0), (4, 4)]


def test_overlap_wider_than_the_sample_is_refused() -> None:
    with pytest.raises(ConfigError, match="domain.overlap = 3 makes sub-domains of 10 points"):
        subdomains((8, 8), (2, 2), overlap=3)


def test_process_grid_is_subdomain_by_replica() -> None:
    g = process_grid(16, (2, 2, 2))
    assert (g.subdomains, g.replicas) == (8, 2)
    assert g.subdomain_ranks(3) == (6, 7)
    assert g.replica_ranks(1) == (1, 3, 5, 7, 9, 11, 13, 15)
    assert [g.subdomain_of(r) for r in (0, 1, 2, 15)] == [0, 0, 1, 7]


def test_cnn_dnn_on_one_process_equals_its_parts() -> None:
    """The whole model's forward is the aggregator of each local CNN on its block."""
    torch.manual_seed(0)
    parts = subdomains((8, 8), (2, 2))
    locals_ = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)) for _ in parts]
    agg = Aggregator(4, 3, [5])
    model = CNNDNN(locals_, agg, [p.region() for p in parts])
    x = torch.randn(2, 1, 8, 8)
    by_hand = agg(torch.stack([cnn(x[:, :, p.region()[0], p.region()[1]])
                               for cnn, p in zip(locals_, parts, strict=True)], dim=1))
    torch.testing.assert_close(model(x), by_hand)
    # One process: the coherent part gathers nothing and reduces nothing.
    part = CoherentPart(locals_[0], MeanAggregate(), grid=process_grid(1, (1,)),
                        rank=0, replica_group=None, subdomain_group=None)
    torch.testing.assert_close(part(x[:, :, :4, :4]), locals_[0](x[:, :, :4, :4]))


def test_vote_takes_the_majority_and_mean_the_mean_probability() -> None:
    # 3 local classifiers over 2 classes: two vote class 1 weakly, one class 0 strongly.
    logits = torch.tensor([[[0.0, 0.1], [0.0, 0.2], [5.0, 0.0]]])  # (1, 3, 2)
    assert VoteAggregate()(logits).argmax(dim=1).item() == 1
    assert MeanAggregate(probabilities=True)(logits).argmax(dim=1).item() == 0
    torch.testing.assert_close(MeanAggregate()(logits), logits.mean(dim=1))


def test_plan_resolves_local_aggregator_coherent_waves(tmp_path: Path, tiny_cosmo: Path
                                                       ) -> None:
    cfg = load_config(domain_config(tmp_path, tiny_cosmo))
    stages = resolve(cfg, 8)
    assert [(s.name, s.ranks, s.wave) for s in stages] == [
        ("local-0", (0, 1), 0), ("local-1", (2, 3), 0), ("local-2", (4, 5), 0),
        ("local-3", (6, 7), 0), ("aggregator", tuple(range(8)), 1),
        ("coherent-0", (0, 1), 2), ("coherent-1", (2, 3), 2), ("coherent-2", (4, 5), 2),
        ("coherent-3", (6, 7), 2)]


@pytest.mark.parametrize(("grid", "ranks", "expected"), [
    ("[3, 2, 1]", 6, "does not divide the samples of 16x16x16: 3 sub-domains cannot split "
                     "16 points evenly"),
    ("[2, 2, 2]", 4, "makes 8 sub-domains, more than the 4 rank(s) of the job"),
    ("[2, 2, 1]", 6, "6 ranks are not divisible by the 4 sub-domains"),
    ("[2, 2]", 4, "has 2 axes, but the samples (16x16x16) have 3 spatial axes"),
])
def test_bad_grids_are_one_line_errors(cli_in_process, tmp_path: Path, tiny_cosmo: Path,
                                       grid: str, ranks: int, expected: str) -> None:
    r = cli_in_process(["plan", domain_config(tmp_path, tiny_cosmo, grid), "--ranks", ranks])
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_good_grid_plans(cli_in_process, tmp_path: Path, tiny_cosmo: Path) -> None:
    r = cli_in_process(["plan", domain_config(tmp_path, tiny_cosmo), "--ranks", 4])
    assert r.returncode == 0, r.stderr
    assert "coherent-3" in r.stdout
    # A local CNN's epoch: a quarter of a sample on a quarter of the ranks; the aggregator
    # on the local outputs is counted as free.
    assert "local-0 1 x 1 = 1.00" in r.stdout and "aggregator 2 x 0 = 0.00" in r.stdout


@pytest.mark.parametrize(("extra", "expected"), [
    ("[comm]\nbackend = \"horovod\"\n", "runs on torch.distributed only"),
    ("[comm]\nbackend = \"mpi\"\n", "runs on torch.distributed only"),
    ("[[stages]]\nname = \"a\"\n", "makes its own plan"),
    ("", "a vote has no gradient"),
])
def test_config_combinations_refused(tmp_path: Path, tiny_cosmo: Path, extra: str,
                                     expected: str) -> None:
    text = DOMAIN.format(data=tiny_cosmo, grid="[2, 2, 1]") + extra
    if not extra:
        text = text.replace("coherent_epochs = 1", "coherent_epochs = 1\naggregate = \"vote\"")
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(tmp_path / "c.toml")


def test_global_batch_must_split_over_replicas(tmp_path: Path, tiny_cosmo: Path) -> None:
    cfg = load_config(domain_config(tmp_path, tiny_cosmo, extra=""),
                      ["train.global_batch=3"])
    with pytest.raises(ConfigError, match="not divisible by the 2 replicas"):
        resolve(cfg, 8)


def test_shipped_domain_configs_load() -> None:
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "cosmoflow-domain.toml")
    assert cfg.domain.grid == (2, 2, 2) and cfg.domain.coherent_epochs > 0
    assert json.dumps(cfg.domain.hidden)  # a plain tuple, written back as TOML
    images = load_config(root / "configs" / "images-domain.toml")
    assert images.domain.grid == (2, 2) and images.task.classify
    assert [s.name for s in resolve(images, 4)][-1] == "coherent-3"


def test_trainer_reads_trains_and_validates_on_its_region(tmp_path: Path) -> None:
    """A stage given a region (a sub-domain) sees only that block of every sample, in
    training and in validation: the model below takes 1x2x2x2 inputs only, and the first
    batch it trains on is the block of the sampler's first samples."""
    from conftest import write_arrays_store
    from test_objective import one_process

    from hpc_multires.data.config import DataConfig
    from hpc_multires.data.sampler import GlobalBatchSampler
    from hpc_multires.data.store import SampleStore
    from hpc_multires.train.config import LogConfig, TrainConfig
    from hpc_multires.train.loop import Split, Trainer
    from hpc_multires.train.metrics import MetricsLog, Progress
    from hpc_multires.train.spec import RunSettings, StageSpec

    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 1, 4, 4, 4)).astype(np.float32)
    y = rng.uniform(-1, 1, size=(12, 2)).astype(np.float32)
    store = SampleStore(write_arrays_store(tmp_path / "data", x, y, per_shard=6))
    seen: list[torch.Tensor] = []

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape[1:] == (1, 2, 2, 2), x.shape
            seen.append(x.detach().clone())
            return self.linear(x.flatten(1))

    stage = StageSpec(name="local-5", level=0, group="sub5", ranks=(0,),
                      train=TrainConfig(epochs=1, global_batch=4, lr=0.01),
                      region_start=(2, 0, 2), region_shape=(2, 2, 2))
    run = RunSettings(seed=1, data=DataConfig(num_workers=0), log=LogConfig(every_steps=1))
    trainer = Trainer(stage, run, one_process(), Probe(), Split(store, np.arange(8)),
                      Split(store, np.arange(8, 12)), tmp_path / "ckpt",
                      MetricsLog(tmp_path / "metrics.jsonl", enabled=True),
                      Progress(2, enabled=False, interval_s=30.0), lambda: 0.0)
    assert trainer.fit()["done"]
    first = GlobalBatchSampler(np.arange(8), 4, 0, 1, seed=1).batches(0)[0]
    block = np.stack([store.read(int(i), (slice(2, 4), slice(0, 2), slice(2, 4)))[0]
                      for i in first])
    torch.testing.assert_close(seen[0], torch.from_numpy(block))
    start = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert start["region_start"] == [2, 0, 2] and start["region_shape"] == [2, 2, 2]
