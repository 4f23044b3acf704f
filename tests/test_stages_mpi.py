"""Stage plans under a real mpiexec: MRMF's concurrent coarse stages, fusion, resume.
The plan and its 4-rank run are conftest's `mrmf_4_ranks`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.mpi


def rank_events(run: Path) -> dict[int, list[tuple[float, str, str]]]:
    out = {}
    for log in sorted((run / "logs").glob("rank-*.log")):
        rank = int(log.stem.split("-")[1])
        out[rank] = [(float(t), ev, st.split("=")[1])
                     for t, ev, st, *_ in (line.split() for line in log.read_text().splitlines())]
    return out


def test_mrmf_runs_coarse_stages_concurrently_then_fuses(mrmf_4_ranks, pyramid_data: Path
                                                         ) -> None:
    config, run = mrmf_4_ranks.config, mrmf_4_ranks.run(4)
    events = rank_events(run)
    assert [st for _, ev, st in events[0] if ev == "start"] == ["coarse2", "fine"]
    assert [st for _, ev, st in events[1] if ev == "start"] == ["coarse2", "fine"]
    assert [st for _, ev, st in events[2] if ev == "start"] == ["coarse1", "fine"]
    assert [st for _, ev, st in events[3] if ev == "start"] == ["coarse1", "fine"]
    # The two coarse stages ran at the same time: their [start, end] intervals overlap.
    span = {st: (min(t for t, ev, s in events[r0] if s == st and ev == "start"),
                 max(t for t, ev, s in events[r0] if s == st and ev == "end"))
            for st, r0 in (("coarse2", 0), ("coarse1", 2))}
    assert span["coarse2"][0] < span["coarse1"][1] and span["coarse1"][0] < span["coarse2"][1]
    # ... and the fine stage started after both ended, on all four ranks. (Each rank's
    # clock starts at a common barrier; 0.1 s covers the skew between ranks' clocks.)
    fine_start = min(t for rank in range(4) for t, ev, s in events[rank]
                     if s == "fine" and ev == "start")
    assert fine_start >= max(span["coarse2"][1], span["coarse1"][1]) - 0.1

    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    starts = {r["stage"]: r for r in recs if r["kind"] == "start"}
    assert starts["coarse2"]["ranks"] == [0, 1] and starts["coarse1"]["ranks"] == [2, 3]
    assert starts["coarse2"]["sample_shape"] == [4, 4, 4, 4]
    assert starts["coarse1"]["sample_shape"] == [4, 8, 8, 8]
    assert starts["fine"]["ranks"] == [0, 1, 2, 3]
    # Every record carries its stage, level and group, for the report's common axis.
    assert all({"stage", "level", "group"} <= r.keys() for r in recs)

    # The fine stage started from the average of the two coarse models' final weights.
    final = {s: torch.load(run / "stages" / s / "final.pt", weights_only=False)["model"]
             for s in ("coarse1", "coarse2")}
    init = torch.load(run / "stages" / "fine" / "init.pt", weights_only=False)["model"]
    for k, v in init.items():
        torch.testing.assert_close(v, (final["coarse1"][k] + final["coarse2"][k]) / 2)
    assert not all(torch.equal(final["coarse1"][k], final["coarse2"][k]) for k in init)

    # The fine stage's start record holds the fused model's validation MAE before training:
    # the same figure as evaluating init.pt on the held-out tail at level 0 here.
    from hpc_multires.data.store import SampleStore
    from hpc_multires.models import build_model
    from hpc_multires.plan.load import load_config

    store = SampleStore(pyramid_data, level=0)
    n_val = round(len(store) * 0.25)
    xs, ys = zip(*(store.read(i) for i in range(len(store) - n_val, len(store))), strict=True)
    model = build_model(load_config(config).model, store.sample_shape, len(ys[0]))
    model.load_state_dict(init)
    model.eval()
    with torch.no_grad():
        err = model(torch.from_numpy(np.stack(xs))) - torch.from_numpy(np.stack(ys))
    assert starts["fine"]["start_val_mae"] == pytest.approx(float(err.abs().mean()), rel=1e-5)
    assert "start_val_mae" not in starts["coarse1"]  # a fresh stage has no fused start


def test_resume_in_the_middle_of_a_stage(cli, mrmf_4_ranks, tmp_path: Path) -> None:
    """Stopped inside coarse1, then inside fine: each resumes where it stopped, and the end
    result equals an uninterrupted run.

    Equal up to float32 rounding, not bit for bit: a process that ran coarse-level
    convolutions before the fine stage can get other CPU conv kernels than one that starts
    at the fine stage (observed differences 1e-8). Restarting a stage, losing the optimizer
    state or replaying other data would differ by 1e-2 or more. The uninterrupted run is the
    session's (test_mrmf_runs_coarse_stages_concurrently_then_fuses examines it too).
    """
    config, straight = mrmf_4_ranks.config, mrmf_4_ranks.run(4)
    resumed = tmp_path / "resumed"
    b1 = cli(["train", str(config), "--run-dir", str(resumed), "--stop-after-epoch", "1",
              "--stop-stage", "coarse1"], ranks=4, timeout=300)
    assert b1.returncode == 0, b1.stderr
    assert (resumed / "stages" / "coarse2" / "final.pt").exists()  # the concurrent stage ended
    assert not (resumed / "stages" / "coarse1" / "final.pt").exists()
    assert not (resumed / "stages" / "fine").exists()
    b2 = cli(["train", str(config), "--run-dir", str(resumed), "--resume",
              "--stop-after-epoch", "1", "--stop-stage", "fine"], ranks=4, timeout=300)
    assert b2.returncode == 0, b2.stderr
    assert "stage coarse2: already complete; skipped" in b2.stderr
    assert "stage coarse1: resumed from epoch-0001.pt" in b2.stderr
    b3 = cli(["train", str(config), "--run-dir", str(resumed), "--resume"], ranks=4, timeout=300)
    assert b3.returncode == 0, b3.stderr
    assert "stage fine: resumed from epoch-0001.pt" in b3.stderr

    for stage in ("coarse1", "coarse2", "fine"):
        sa = torch.load(straight / "stages" / stage / "final.pt", weights_only=False)["model"]
        sb = torch.load(resumed / "stages" / stage / "final.pt", weights_only=False)["model"]
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=stage)

    def steps(run: Path) -> list[tuple[str, int, float]]:
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return sorted((r["stage"], r["step"], r["loss"]) for r in recs if r["kind"] == "step")

    sa, sb = steps(straight), steps(resumed)
    assert [s[:2] for s in sb] == [s[:2] for s in sa]  # no step twice, none missing
    assert [s[2] for s in sb] == pytest.approx([s[2] for s in sa], rel=1e-5)
