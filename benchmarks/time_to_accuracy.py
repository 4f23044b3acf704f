"""Time to accuracy of multi-resolution methods against the baseline, side by side.

    python benchmarks/time_to_accuracy.py --app cosmoflow|neuron|images \
        --methods baseline,mrt,mrmf --ranks 4 [--data DIR] [--samples N] \
        [--train-seeds 0,1,2] [--network reference|level] [--task denoise|...]

    python benchmarks/time_to_accuracy.py --app images --task denoise \
        --methods baseline,mge,fullmultiscale --ranks 2 --train-seeds 0,1,2

Runs each method's config (configs/<app>-<method>.toml; with --network level the
level-consistent network's, configs/<app>-<method>-level.toml) on the same data and the same
number of ranks, one after the other. Each method gets its own copy of the dataset and
builds the pyramid levels it needs on its ranks, timed: a method's time is its pyramid
build plus its training run (all stages, evaluation included), as the MRMF paper counts
it, each from process launch (the training's set-up before its own clock starts, printed
as `set-up s`, counts for every method, the baseline included).

Accuracy is the runs' headline metric, which their start records name: validation MAE
(lower is better) for cosmoflow and neuron, validation PSNR (higher is better) for the
image tasks (`--task` sets task.kind in every method's config). The target is the
baseline's final MAE plus 2%, or its final PSNR minus 0.1 dB; a method's time to target is
the first epoch end of a level-0 stage at or past it. Each method's fine-level-equivalent
work is the forward passes of its steps in level-0 epochs (each stage's steps times the
level-0 samples' worth of work a step does, `step_work` in its start record, over the
training set's size): what the method costs on a machine where work is time; `work to
target` is that work up to the level-0 epoch that reached the target (every earlier stage
whole). The last lines are, per method M after the baseline (mrmf last), `work speedup
M/baseline = W.WW` (the baseline's work to target over M's), `speedup M/baseline = X.XX`
(time to target of the baseline over that of M) and `final error M/baseline = Y.YYY` (M's final
error over the baseline's: the ratio of the final MAEs, or for PSNR the ratio of the mean
squared errors it stands for, 10^((baseline PSNR - M's PSNR) / 10); below 1 is better).

With --train-seeds, the whole comparison runs once per training seed (same data), each
seed with its own baseline target, and the last lines give the median speedup and the
median final-error ratio. The first method is the baseline that sets the target:
`baseline`, or a variant such as `baseline-long` (configs/cosmoflow-baseline-long.toml,
trained to convergence) or `baseline-gap`.

A method is a config name, configs/<app>-<method>.toml. Besides the stage plans (mrt, mrmf):

- dynamic: the baseline with dynamic downsampling (train.downsample). Its network needs the
  gap head, so compare it with a baseline of the same network: for CosmoFlow the shipped
  baseline (`--methods baseline,dynamic`), for the Neuron Inverter, whose reference network
  has a flatten head, `--methods baseline-gap,dynamic`.
- meshfree, mrt-meshfree, mrmf-meshfree: the baseline, MRT and MRMF plans with mesh-free
  convolutions (model.conv), against the same plans with standard ones:
  `--methods baseline,mrt,mrt-meshfree,mrmf,mrmf-meshfree` (and `meshfree` for the
  one-level cost of the convolution itself).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import h5py

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, cli, env, machine

from hpc_multires.driver.run_dir import RunDir
from hpc_multires.train.metrics import read_metrics

DEFAULT_SAMPLES = {"cosmoflow": 1024, "neuron": 4096, "images": 1024}
SYNTH_OPTIONS = {"cosmoflow": ["--size", "32"], "images": ["--size", "64"]}


def max_level(config: Path) -> int:
    """The coarsest pyramid level a config reads: its stages' levels, and below them the
    levels an MGE stage with the avg restriction reads from the pyramid."""
    table = tomllib.loads(config.read_text())
    stages = table.get("stages") or [{"level": table.get("data", {}).get("level", 0)}]
    deepest = 0
    for stage in stages:
        train = {**table.get("train", {}), **stage.get("train", {})}
        mge = train.get("estimator") == "mge" and train.get("restriction", "avg") == "avg"
        deepest = max(deepest, stage.get("level", 0)
                      + (train.get("mge_levels", 2) - 1 if mge else 0))
    return deepest


def run_method(app: str, method: str, data: Path, work: Path, ranks: int,
               extra: list[str], network: str = "reference") -> dict:
    suffix = "-level" if network == "level" else ""
    config = ROOT / "configs" / f"{app}-{method}{suffix}.toml"
    if not config.exists():
        have = sorted(p.stem for p in (ROOT / "configs").glob(f"{app}-*{suffix}.toml"))
        sys.exit(f"no config {config}; for --network {network} there are: {', '.join(have)}")
    copy = work / f"data-{method}"
    if copy.exists():
        sys.exit(f"{copy} exists (an earlier run kept here); remove it or --keep elsewhere")
    shutil.copytree(data, copy)
    levels = max_level(config)
    pyramid_s = 0.0
    if levels:
        t0 = time.monotonic()
        cli(["data", "pyramid", str(copy), "--levels", str(levels)], ranks=ranks)
        pyramid_s = time.monotonic() - t0
    run = work / f"run-{method}"
    launched = time.time()
    t0 = time.monotonic()
    cli(["train", str(config), "--run-dir", str(run), "--set", f"data.path={copy}", *extra],
        ranks=ranks)
    process_s = time.monotonic() - t0
    # The run's clock (wall_s) starts once its processes have started, imported torch,
    # opened every level and made their process groups. The pyramid build is timed from
    # launch, so the training is too: its set-up is taken from launch to when rank 0 wrote
    # RUN_DIR/config.toml, just before the clock starts (same machine, same clock).
    layout = RunDir(run)
    setup_s = layout.config.stat().st_mtime - launched
    if not 0.0 <= setup_s <= process_s:
        sys.exit(f"{method}: {layout.config} was written {setup_s:.1f} s after launch, "
                 f"outside the {process_s:.1f} s the training ran; is {work} on a file "
                 "system with another clock? use --keep on a local directory")
    records = read_metrics(layout.metrics)
    starts = [r for r in records if r["kind"] == "start"]
    metric = starts[-1].get("headline", "val_mae")
    # The validated level-0 epochs (train.eval_every may skip some; a stage's last is
    # always validated).
    fine = [r for r in records if r["kind"] == "epoch" and r["level"] == 0 and metric in r]
    if not fine:
        sys.exit(f"{method}: {layout.metrics} has no validated level-0 epoch; a method's "
                 "accuracy is measured at level 0")
    return {"method": method, "run": run, "pyramid_s": pyramid_s, "setup_s": setup_s,
            "process_s": process_s, "train_s": max(r["wall_s"] for r in records),
            "fine": fine, "metric": metric,
            "higher_is_better": bool(starts[-1].get("higher_is_better", False)),
            "final": fine[-1][metric], "work": fine_work(records), "records": records}


def fine_work(records: list[dict]) -> float | None:
    """Forward-pass work of a run in level-0 epochs: each stage's steps times its step's
    work in level-0 samples, over the training set's size (None for runs whose start
    records do not say)."""
    total = 0.0
    for start in (r for r in records if r["kind"] == "start"):
        if "step_work" not in start:
            return None
        steps = max((r["step"] for r in records if r["kind"] == "epoch"
                     and r["stage"] == start["stage"]), default=0)
        total += steps * start["step_work"] / start["train_samples"]
    return total


def work_at(records: list[dict], epoch_record: dict) -> float | None:
    """Work done when `epoch_record` was written, in level-0 epochs: every stage started
    before its stage, whole, and its own stage's steps so far (None without step_work)."""
    total = 0.0
    for start in (r for r in records if r["kind"] == "start"):
        if "step_work" not in start:
            return None
        if start["stage"] == epoch_record["stage"]:
            return total + epoch_record["step"] * start["step_work"] / start["train_samples"]
        total += max((r["step"] for r in records if r["kind"] == "epoch"
                      and r["stage"] == start["stage"]), default=0) \
            * start["step_work"] / start["train_samples"]
    return None


def reached(value: float, target: float, higher_is_better: bool) -> bool:
    return value >= target if higher_is_better else value <= target


def time_to(result: dict, target: float) -> float | None:
    for r in result["fine"]:
        if reached(r[result["metric"]], target, result["higher_is_better"]):
            return result["pyramid_s"] + result["setup_s"] + r["wall_s"]
    return None


def work_to(result: dict, target: float) -> float | None:
    """Work (level-0 epochs) to the first level-0 epoch end at or past the target."""
    for r in result["fine"]:
        if reached(r[result["metric"]], target, result["higher_is_better"]):
            return work_at(result["records"], r)
    return None


def target_of(baseline: dict) -> tuple[float, str]:
    """The accuracy every method must reach: the baseline's final PSNR minus 0.1 dB, or
    its final MAE (any lower-is-better metric) plus 2%; and how it was set."""
    final, metric = baseline["final"], baseline["metric"]
    if baseline["higher_is_better"]:
        return final - 0.1, f"{metric} >= {final - 0.1:.4f} (baseline final {final:.4f} - 0.1)"
    return final * 1.02, f"{metric} <= {final * 1.02:.4f} (baseline final {final:.4f} + 2%)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--app", choices=["cosmoflow", "neuron", "images"], default="cosmoflow")
    ap.add_argument("--task", choices=["denoise", "noise", "deblur", "inpaint", "sr"],
                    help="images: the restoration task (task.kind of every method's config; "
                    "default: the configs' own, denoise)")
    ap.add_argument("--methods", default="baseline,mrt,mrmf")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--data", type=Path, help="existing level-0 dataset (default: generate)")
    ap.add_argument("--samples", type=int)
    ap.add_argument("--seed", type=int, default=0, help="data seed (when generating)")
    ap.add_argument("--train-seeds", help="comma-separated training seeds (run.seed): run "
                    "every method once per seed and report the median speedup")
    ap.add_argument("--keep", type=Path, help="keep run directories here")
    ap.add_argument("--set", action="append", default=[], help="passed to every train")
    ap.add_argument("--network", choices=["reference", "level"], default="reference",
                    help="reference: the shipped networks; level: the level-consistent "
                    "ones (model.kernel_level), every method and its baseline alike")
    args = ap.parse_args()
    methods = args.methods.split(",")
    if args.task and args.app != "images":
        sys.exit("--task is for --app images (cosmoflow and neuron regress their labels)")
    if not methods[0].startswith("baseline"):
        sys.exit("--methods must start with a baseline (baseline, or a variant such as "
                 "baseline-long: it sets the target)")

    work = args.keep or Path(tempfile.mkdtemp(prefix="hpcmr-tta-"))
    work.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        data = work / "data"
        if not data.exists():
            n = args.samples or DEFAULT_SAMPLES[args.app]
            cli(["data", "synth", args.app, "--out", str(data), "--samples", str(n),
                 "--seed", str(args.seed), *SYNTH_OPTIONS.get(args.app, [])],
                ranks=min(args.ranks, 2))
    with_levels = []
    for shard in sorted(data.glob("shard-*.h5")):
        with h5py.File(shard, "r", locking=False) as f:
            if "levels" in f:
                with_levels.append(shard.name)
    if with_levels:
        sys.exit(f"{data} already has pyramid levels ({with_levels[0]}, ...): each method's "
                 "pyramid build is part of its measured time; pass a level-0-only dataset")
    print(f"machine: {machine()}")
    task = f", task {args.task}" if args.task else ""
    print(f"app {args.app}{task}, {args.ranks} ranks, {args.network} networks, data {data}")
    # The first training's set-up would otherwise read torch's libraries from disk while
    # the later ones find them in the page cache: load them once before anything is timed.
    subprocess.run([sys.executable, "-c", "import hpc_multires.driver.run"], check=True,
                   cwd=ROOT, env=env())
    seeds = [int(x) for x in args.train_seeds.split(",")] if args.train_seeds else [None]
    per_seed: list[dict[str, Outcome]] = []
    for seed in seeds:
        seed_set = [] if seed is None else [f"--set=run.seed={seed}"]
        out = work if seed is None else work / f"seed-{seed}"
        out.mkdir(parents=True, exist_ok=True)
        if seed is not None:
            print(f"\n== training seed {seed}")
        task_set = [f"--set=task.kind={args.task}"] if args.task else []
        per_seed.append(compare(args.app, methods, data, out, args.ranks,
                                [*seed_set, *task_set, *(f"--set={s}" for s in args.set)],
                                args.network))
    outcomes = per_seed[0] if len(seeds) == 1 else median_over_seeds(methods[1:], per_seed)
    # mrmf's lines last: scripts read the last lines. Each method: its speedup, then the
    # final error against the baseline's (a method may be faster and end less accurate).
    for m in sorted(methods[1:], key=lambda name: name == "mrmf"):
        sp, err, wsp = outcomes[m].speedup, outcomes[m].error, outcomes[m].work_speedup
        print(f"work speedup {m}/{methods[0]} = {_shown(wsp)}")
        print(f"speedup {m}/{methods[0]} = {_shown(sp)}")
        print(f"final error {m}/{methods[0]} = {err:.3f}")


def _shown(ratio: float | None) -> str:
    return "not reached" if ratio is None else f"{ratio:.2f}"


@dataclass(frozen=True)
class Outcome:
    """A method against the baseline on one seed (or the medians over seeds)."""

    speedup: float | None  # time to target of the baseline over the method's; None: missed
    error: float  # the method's final error over the baseline's (`error_ratio`)
    work_speedup: float | None = None  # the same, in work to target


def error_ratio(result: dict, baseline: dict) -> float:
    """The method's final error over the baseline's: the ratio of the final values of a
    lower-is-better metric (MAE); for PSNR (higher is better, in dB) the ratio of the mean
    squared errors it stands for."""
    if baseline["higher_is_better"]:
        return float(10 ** ((baseline["final"] - result["final"]) / 10))
    return float(result["final"] / baseline["final"])


def median_over_seeds(methods: list[str], per_seed: list[dict[str, Outcome]]
                      ) -> dict[str, Outcome]:
    """Each method's (lower) median speedup over seeds and its median final-error ratio,
    printed with the per-seed values.

    A seed where the method missed its target ranks below every seed where it reached it,
    so the median speedup exists only when more than half of the seeds reached the target.
    """
    print("\nover the training seeds (speedup per seed, median; final error over the "
          "baseline's per seed, median):")
    medians: dict[str, Outcome] = {}
    for m in methods:
        values = [r[m].speedup for r in per_seed]
        work_values = [r[m].work_speedup for r in per_seed]
        median, work_median = _lower_median(values), _lower_median(work_values)
        shown = ", ".join("-" if v is None else f"{v:.2f}" for v in values)
        work_shown = ", ".join("-" if v is None else f"{v:.2f}" for v in work_values)
        ratios = [r[m].error for r in per_seed]
        medians[m] = Outcome(median, float(statistics.median(ratios)), work_median)
        print(f"  {m}: {shown}; median {_shown(median)}; in work {work_shown}; median "
              f"{_shown(work_median)}; final error {', '.join(f'{e:.3f}' for e in ratios)}; "
              f"median {medians[m].error:.3f}")
    return medians


def _lower_median(values: list[float | None]) -> float | None:
    """The lower median, a missed target (None) ranking below every reached one; None
    unless more than half reached it."""
    if sum(v is not None for v in values) * 2 <= len(values):
        return None
    ranked = sorted(values, key=lambda v: -1.0 if v is None else v)
    return ranked[(len(ranked) - 1) // 2]


def compare(app: str, methods: list[str], data: Path, work: Path, ranks: int,
            extra: list[str], network: str = "reference") -> dict[str, Outcome]:
    """Run every method once on `data`; print the table; return each method's outcome."""
    results = []
    for method in methods:
        r = run_method(app, method, data, work, ranks, extra, network)
        results.append(r)
        print(f"  {method}: final {r['metric']} {r['final']:.4f}, pyramid {r['pyramid_s']:.1f} "
              f"s, training set-up {r['setup_s']:.1f} s, training {r['train_s']:.1f} s",
              flush=True)
    target, how = target_of(results[0])
    base_t, base_w = time_to(results[0], target), work_to(results[0], target)
    assert base_t is not None
    name = results[0]["metric"].removeprefix("val_").upper()
    print(f"\ntarget: {how}")
    width = max(10, *(len(m) for m in methods))
    print(f"{'method':<{width}} {'final ' + name:>10} {'pyramid s':>9} {'set-up s':>8} "
          f"{'total s':>8} {'work':>6} {'to target s':>11} {'speedup':>8} "
          f"{'work to target':>14} {'speedup':>8} {'error':>6}")
    out: dict[str, Outcome] = {}
    for r in results:
        t, w = time_to(r, target), work_to(r, target)
        error = error_ratio(r, results[0])
        work_speedup = None if w is None or base_w is None else base_w / w
        out[r["method"]] = Outcome(None if t is None else base_t / t, error, work_speedup)
        total = r["pyramid_s"] + r["setup_s"] + r["train_s"]
        cost = "-" if r["work"] is None else f"{r['work']:.2f}"
        print(f"{r['method']:<{width}} {r['final']:10.4f} {r['pyramid_s']:9.1f} "
              f"{r['setup_s']:8.1f} {total:8.1f} {cost:>6} "
              f"{'not reached' if t is None else f'{t:.1f}':>11} "
              f"{'-' if t is None else f'{base_t / t:.2f}x':>8} "
              f"{'not reached' if w is None else f'{w:.2f}':>14} "
              f"{'-' if work_speedup is None else f'{work_speedup:.2f}x':>8} {error:6.3f}")
    print("(work: forward passes in level-0 epochs of the training set; error: final error "
          "over the baseline's)")
    runs = " ".join(str(r["run"]) for r in results)
    print(f"\nplot: hpc-multires report {runs} --out {work / 'time-to-accuracy.png'}")
    cli(["report", *[str(r["run"]) for r in results], "--out",
         str(work / "time-to-accuracy.png")])
    return out


if __name__ == "__main__":
    main()
