"""Stages on windows (`crop`): the windows, the tiles, the plan's checks and costs, and a
window stage trained, validated, resumed and fused under mpiexec."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_arrays_store

from hpc_multires.data.crop import tiles, window_rng, window_starts
from hpc_multires.data.loader import WindowedBatch, iterate_batches
from hpc_multires.data.store import SampleStore
from hpc_multires.errors import ConfigError
from hpc_multires.plan.cost import describe_cost, plan_cost, window_work
from hpc_multires.plan.load import config_from_dict
from hpc_multires.plan.stages import resolve


def coordinates(b: int, n: int) -> torch.Tensor:
    """(b, 2, n, n, n): channel 0 holds each point's flat position, channel 1 the sample."""
    pos = torch.arange(n**3, dtype=torch.float64).reshape(n, n, n)
    return torch.stack([torch.stack([pos, torch.full_like(pos, i)]) for i in range(b)])


@pytest.mark.parametrize("workers", [0, 1])
def test_the_reader_reads_each_window_of_its_own_sample_at_its_own_place(
        tmp_path: Path, workers: int) -> None:
    n, size, b = 10, 4, 24
    x = coordinates(b, n).numpy().astype(np.float32)
    store = SampleStore(write_arrays_store(tmp_path / "d", x, np.zeros((b, 1), np.float32)))
    starts = window_starts((n, n, n), size, b, np.random.default_rng(0))
    assert starts.shape == (b, 3) and starts.min() >= 0 and starts.max() <= n - size
    assert len({tuple(s) for s in starts}) > b // 2  # a place per sample, not per batch
    batch = np.random.default_rng(1).permutation(b)[:8]
    item = WindowedBatch(batch, starts[:8], size)
    (w, _), = iterate_batches(store, [item], workers, 2)
    assert w.shape == (8, 2, size, size, size)
    for i, index in enumerate(batch):
        whole = torch.as_tensor(store.read(int(index))[0])  # normalised alike
        a, c, d = starts[i]
        assert torch.equal(w[i], whole[:, a:a + size, c:c + size, d:d + size])


def test_window_places_depend_on_the_step_only() -> None:
    def take(step: int, rank: int = 0) -> np.ndarray:
        return window_starts((12, 12, 12), 5, 8, window_rng(7, "win", 1, step, rank))
    assert np.array_equal(take(3), take(3))  # a resumed step takes the same windows
    assert not np.array_equal(take(3), take(4))
    assert not np.array_equal(take(3), take(3, rank=1))


def test_tiles_cover_the_sample_once() -> None:
    x = coordinates(2, 8)
    parts = tiles(x, 4)
    assert len(parts) == 8 and all(p.shape == (2, 2, 4, 4, 4) for p in parts)
    seen = torch.cat([p[:, 0].reshape(2, -1) for p in parts], dim=1)
    assert torch.equal(seen.sort(dim=1).values, x[:, 0].reshape(2, -1))
    # A remainder that no whole window fits is left out: 9 = 2 x 4 + 1.
    assert len(tiles(coordinates(1, 9), 4)) == 8
    assert len(tiles(torch.zeros(3, 4, 100), 30)) == 3  # 1D traces alike


def plan(*stages: dict, head: str = "gap") -> dict:
    return {"model": {"head": head}, "stages": list(stages)}


def test_bad_windows_fail_at_load() -> None:
    with pytest.raises(ConfigError, match="crop = -2; use a window size"):
        config_from_dict(plan({"name": "a", "crop": -2}))
    with pytest.raises(ConfigError, match=r"crop = 8 .* set model.head = \"gap\""):
        config_from_dict(plan({"name": "a", "crop": 8}, head="flatten"))


def test_a_window_larger_than_the_samples_is_refused_by_plan(cli_in_process, tiny_config) -> None:
    base = tiny_config()
    cfg = base.with_name("w.toml")
    cfg.write_text(base.read_text().replace("[model]", '[model]\nhead = "gap"')
                   + '\n[[stages]]\nname = "w"\ncrop = 17\n')
    r = cli_in_process(["plan", str(cfg), "--ranks", "1"])
    assert r.returncode != 0
    assert "stage 'w': crop = 17 is larger than the samples at level 0, 16x16x16; use " \
        "crop <= 16" in r.stderr


def test_windows_cost_their_share_of_the_sample() -> None:
    assert window_work(16, (32, 32, 32)) == 1 / 8
    assert window_work(0, (32, 32, 32)) == window_work(16, None) == 1.0
    cfg = config_from_dict(plan({"name": "w", "crop": 8, "train": {"epochs": 4}},
                                {"name": "f", "after": ["w"], "train": {"epochs": 2}}))
    costs, waves = plan_cost(resolve(cfg, 2), 2, 3, spatial={0: (16, 16, 16)})
    assert [c.per_epoch for c in costs] == [1 / 8, 1.0]
    assert waves == {0: 0.5, 1: 2.0}
    # The header explains the windows' share only where a stage has windows.
    assert "windows" in describe_cost(costs, waves, 2, 3, {})
    whole = plan_cost(resolve(cfg, 2), 2, 3)  # sample size unknown: whole samples
    assert "windows" not in describe_cost(*whole, 2, 3, {})


WINDOW_PLAN = """
[[stages]]
name = "win"
crop = 8

[[stages]]
name = "fine"
init = "fuse"
fuse_from = ["win"]
fusion = "transfer"
[stages.train]
epochs = 1
"""


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


@pytest.mark.mpi
def test_a_window_stage_trains_validates_resumes_and_fuses(cli, tiny_config,
                                                           tmp_path: Path) -> None:
    base = tiny_config(epochs=2, workers=1)
    cfg = tmp_path / "win.toml"
    cfg.write_text(base.read_text().replace("[model]", '[model]\nhead = "gap"') + WINDOW_PLAN)
    whole = tmp_path / "whole.toml"  # the same plan on whole samples
    whole.write_text(cfg.read_text().replace("crop = 8\n", ""))
    straight, resumed, plain = tmp_path / "straight", tmp_path / "resumed", tmp_path / "plain"
    a = cli(["train", str(cfg), "--run-dir", str(straight)], ranks=2)
    assert a.returncode == 0, a.stderr
    assert "win          level 0 windows 8" in a.stderr
    b1 = cli(["train", str(cfg), "--run-dir", str(resumed), "--stop-after-epoch", "1",
              "--stop-stage", "win"], ranks=2)
    assert b1.returncode == 0, b1.stderr
    b2 = cli(["train", str(cfg), "--run-dir", str(resumed), "--resume"], ranks=2)
    assert b2.returncode == 0, b2.stderr and "resumed from" in b2.stderr
    # Only its first step's loss is looked at: its first epoch of "win", on one rank.
    c = cli(["train", str(whole), "--run-dir", str(plain), "--stop-after-epoch", "1",
             "--stop-stage", "win"])
    assert c.returncode == 0, c.stderr

    # Windows, not whole samples: the first step's loss differs from the whole-sample plan's.
    loss = {run: [r["loss"] for r in records(run, "step") if r["stage"] == "win"]
            for run in (straight, resumed, plain)}
    assert loss[straight] == loss[resumed]  # the resumed epoch took the same windows
    assert loss[straight][0] != loss[plain][0]
    final = {run: torch.load(run / "stages" / "win" / "final.pt", weights_only=False)["model"]
             for run in (straight, resumed)}
    for name, tensor in final[straight].items():
        assert torch.equal(tensor, final[resumed][name]), name

    # Validation: the mean prediction over the 8 tiles of 8^3 of each 16^3 sample.
    from hpc_multires.models import build_model
    from hpc_multires.plan.load import load_config

    conf = load_config(cfg)
    store = SampleStore(conf.data.path)
    model = build_model(conf.model, store.sample_shape, store.schema.num_labels)
    model.load_state_dict(final[straight])
    model.eval()
    n_val = round(len(store) * conf.data.val_fraction)
    xs, ys = zip(*(store.read(i) for i in range(len(store) - n_val, len(store))), strict=True)
    x, y = torch.as_tensor(np.stack(xs)), torch.as_tensor(np.stack(ys))
    with torch.no_grad():
        tiled = (torch.stack([model(t) for t in tiles(x, 8)]).mean(0) - y).abs().mean()
        whole_mae = (model(x) - y).abs().mean()
    logged = [r["val_mae"] for r in records(straight, "epoch") if r["stage"] == "win"][-1]
    assert logged == pytest.approx(float(tiled), rel=1e-4)
    assert float(whole_mae) != pytest.approx(float(tiled), rel=1e-4)

    # The fine stage starts from the window stage's model: same architecture, every layer.
    start = torch.load(straight / "stages" / "fine" / "init.pt", weights_only=False)["model"]
    for name, tensor in final[straight].items():
        assert torch.equal(start[name], tensor), name
    assert [r["stage"] for r in records(straight, "epoch")] == ["win", "win", "fine"]
