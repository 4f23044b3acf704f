"""log.step_parts: each step record says where the steps since the previous one spent
their time, and the parts add up to the wall time between the records."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

from hpc_multires.train.step_parts import PARTS, StepParts


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_laps_are_summed_per_part_and_nothing_is_left_out() -> None:
    parts = StepParts(enabled=True)
    for _ in range(2):
        time.sleep(0.01)
        parts.lap("forward")
        time.sleep(0.02)
        parts.lap("backward")
    t0 = time.perf_counter()
    out = parts.take(steps=2)
    assert list(out) == list(PARTS)
    assert out["forward"] >= 10 and out["backward"] >= 20  # ms per step
    assert out["backward"] > out["forward"]
    assert parts.take(steps=1)["forward"] == 0  # counting starts again
    assert time.perf_counter() - t0 < 1
    assert StepParts(enabled=False).take(steps=3) == {}


def test_step_records_carry_the_parts(cli, tiny_config, tmp_path: Path) -> None:
    """One rank, one epoch of 9 steps, a record every step: each record's parts add up to
    the wall time since the previous record (the laps are continuous), forward and
    backward are among them, and without log.step_parts the records have no parts."""
    on, off = tmp_path / "on", tmp_path / "off"
    r = cli(["train", str(tiny_config(epochs=1)), "--run-dir", str(on), "--set",
             "log.step_parts=true"])
    assert r.returncode == 0, r.stderr
    steps = [s for s in records(on) if s["kind"] == "step"]
    assert len(steps) == 9
    for prev, rec in itertools.pairwise(steps):
        parts = rec["parts_ms"]
        assert set(parts) == set(PARTS) and min(parts.values()) >= 0
        assert parts["forward"] > 0 and parts["backward"] > 0 and parts["optimizer"] > 0
        wall_ms = 1e3 * (rec["wall_s"] - prev["wall_s"])
        assert abs(sum(parts.values()) - wall_ms) < 2 + 0.05 * wall_ms, (parts, wall_ms)
    r = cli(["train", str(tiny_config(epochs=1)), "--run-dir", str(off)])
    assert r.returncode == 0, r.stderr
    assert not any("parts_ms" in s for s in records(off))
