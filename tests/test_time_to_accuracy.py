"""The time-to-accuracy benchmark's work accounting (benchmarks/time_to_accuracy.py): the
work to the target counts every earlier stage whole and the target's own stage up to the
epoch that reached it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def tta():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("time_to_accuracy",
                                                  BENCH / "time_to_accuracy.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["time_to_accuracy"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def _plan() -> list[dict]:
    """A Full-Multiscale-like run: 96 steps at level 2 (a step of 16 level-2 samples is 1
    level-0 sample), then 48 steps of 16 at level 0, 768 training samples."""
    def start(stage: str, level: int, work: float) -> dict:
        return {"kind": "start", "stage": stage, "level": level, "step_work": work,
                "train_samples": 768}

    def epoch(stage: str, level: int, step: int, psnr: float, wall: float) -> dict:
        return {"kind": "epoch", "stage": stage, "level": level, "step": step,
                "val_psnr": psnr, "wall_s": wall}
    return [start("coarse", 2, 1.0), epoch("coarse", 2, 48, 20.0, 5.0),
            epoch("coarse", 2, 96, 21.0, 10.0), start("fine", 0, 16.0),
            epoch("fine", 0, 24, 20.5, 20.0), epoch("fine", 0, 48, 21.5, 30.0)]


def test_work_to_target_counts_earlier_stages_whole_and_its_own_up_to_the_epoch(tta) -> None:
    records = _plan()
    result = {"records": records, "metric": "val_psnr", "higher_is_better": True,
              "fine": [r for r in records if r["kind"] == "epoch" and r["level"] == 0],
              "pyramid_s": 0.0, "setup_s": 0.0}
    # coarse: 96 steps x 1 / 768 = 0.125; fine to step 48: 48 x 16 / 768 = 1.0
    assert tta.work_to(result, 21.4) == pytest.approx(1.125)
    # the first level-0 epoch (step 24) reaches a lower target: 0.125 + 0.5
    assert tta.work_to(result, 20.4) == pytest.approx(0.625)
    assert tta.work_to(result, 22.0) is None
    assert tta.fine_work(records) == pytest.approx(1.125)
    assert tta.time_to(result, 21.4) == 30.0


def test_lower_median_needs_more_than_half_reached(tta) -> None:
    assert tta._lower_median([2.0, None, 3.0]) == 2.0
    assert tta._lower_median([2.0, None]) is None
    assert tta._lower_median([4.0, 1.0, 3.0, 2.0]) == 2.0
