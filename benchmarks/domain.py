"""Domain decomposition (CNN-DNN) against one global CNN, side by side on the same data.

    python benchmarks/domain.py --config configs/cosmoflow-domain.toml --ranks 8 \
        [--data DIR] [--samples 512] [--size 32] [--global-width W] [--set KEY=VALUE ...]

Runs, one after the other, on the same data and the same number of ranks:

1. the config as shipped (its [domain] table): local CNNs, the aggregator, the coherent
   model. From its metrics: each local CNN alone (the mean over the sub-domains of their
   validation metric), the mean of the local outputs, the vote (classification), the
   CNN-DNN (the aggregator network), and the transfer-learned coherent model;
2. a single global CNN of similar total size (the local CNNs' parameters together: the
   width whose network has about as many parameters, or --global-width; one pooling block
   more per halving of the side, so its last map is the local CNNs'), on whole samples,
   data-parallel on all ranks, for the local plus the coherent epochs.

Printed: one row per model with its headline metric (validation MAE, or accuracy), its
time per epoch (the median epoch of its stage, from the metrics' wall clock), its peak
resident memory per rank (the largest over its epochs and ranks, psutil/getrusage), its
parameters, and its activation memory per sample (what autograd keeps for backward in
one forward pass of one sample, counted by saved-tensor hooks: the memory that grows with
the sample and that domain decomposition divides); then the ratios to the global CNN.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
import tomllib
from dataclasses import replace
from pathlib import Path

import tomli_w
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cli, machine

from hpc_multires.data.store import open_store
from hpc_multires.methods.domain import subdomains
from hpc_multires.models import build_model
from hpc_multires.plan.config import Config
from hpc_multires.plan.load import load_config


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def epoch_s(recs: list[dict], stage: str) -> float:
    """The median epoch of `stage`: differences of its epoch records' wall clock (the
    first from its start record)."""
    walls = [r["wall_s"] for r in recs if r["stage"] == stage and r["kind"] in ("start",
                                                                                  "epoch")]
    steps = [b - a for a, b in itertools.pairwise(walls)]
    return statistics.median(steps) if steps else float("nan")


def peak_mb(recs: list[dict], stages: list[str]) -> float:
    return max((max(r["peak_rss_mb_ranks"]) for r in recs
                if r["kind"] == "epoch" and r["stage"] in stages), default=float("nan"))


def similar_width(cfg: Config, shape: tuple[int, ...], outputs: int, depth: int,
                  target: int) -> float:
    """The model width (in steps of 1/32: one first-block filter) whose network on whole
    samples has the parameter count closest to `target` (the local CNNs' together)."""
    def count(width: float) -> int:
        model = build_model(replace(cfg.model, width=width, depth=depth), shape, outputs, 0)
        return sum(p.numel() for p in model.parameters())
    return min((k / 32 for k in range(1, 129)), key=lambda w: abs(count(w) - target))


def with_sets(args: list[str], sets: list[str]) -> list[str]:
    return [*args, *(a for s in sets for a in ("--set", s))]


def activation_mb(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """MiB autograd saves for backward in one forward pass of one sample of `shape`."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(1, *shape)).sum()
    return total / 2**20


def activations_at(cfg: Config, side: int, channels: int) -> None:
    """The activation memory per sample of the config's local CNN on a sub-domain and of
    the same network on whole samples (one pooling block more per halving), at `side`."""
    dom = cfg.domain
    spatial = tuple(side for _ in dom.grid)
    part = subdomains(spatial, dom.grid, dom.overlap)[0]
    depth = cfg.model.depth + round(math.log2(max(dom.grid)))
    local = build_model(cfg.model, (channels, *part.shape), 4, 0)
    whole = build_model(replace(cfg.model, depth=depth), (channels, *spatial), 4, 0)
    la = activation_mb(local, (channels, *part.shape))
    ga = activation_mb(whole, (channels, *spatial))
    print(f"machine: {machine()}")
    print(f"activations per sample at {'x'.join(map(str, spatial))} x {channels}, model "
          f"width {cfg.model.width:g}: local CNN on {'x'.join(map(str, part.shape))} "
          f"{la:.1f} MiB, the network on whole samples {ga:.1f} MiB, ratio {la / ga:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=Path("configs/cosmoflow-domain.toml"))
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--data", type=Path, help="an existing dataset (default: synthesise one)")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--size", type=int, default=32, help="the samples' side (32: 3D volumes; "
                   "64 for the images)")
    p.add_argument("--global-width", type=float, default=0.0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--activations", type=int, default=0, metavar="SIDE",
                   help="only print the activation memory per sample of the local CNN and "
                        "of the global network for samples of SIDE points per axis (no "
                        "training): how the saving grows with the sample")
    p.add_argument("--channels", type=int, default=4, help="with --activations")
    args = p.parse_args()
    cfg = load_config(args.config, args.set)
    dom = cfg.domain
    if args.activations:
        activations_at(cfg, args.activations, args.channels)
        return
    work = Path(tempfile.mkdtemp(prefix="domain-bench-"))
    data = args.data
    if data is None:
        data = work / "data"
        app = "classes" if cfg.task.classify else "cosmoflow"
        t0 = time.perf_counter()
        extra = ["--classes", "4"] if cfg.task.classify else []
        cli(["data", "synth", app, "--out", str(data), "--samples", str(args.samples),
             "--size", str(args.size), "--chunk", str(args.size // max(dom.grid)), *extra])
        print(f"data: {args.samples} samples of {args.size}^{len(dom.grid)} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    sets = [f"data.path={data}", *args.set]
    cfg = load_config(args.config, sets)
    dom = cfg.domain
    local_epochs = dom.local_epochs or cfg.train.epochs
    depth = cfg.model.depth + round(math.log2(max(dom.grid)))
    store = open_store(data)
    shape = store.sample_shape
    ncls = store.schema.num_classes if cfg.task.classify else store.schema.num_labels
    part = subdomains(shape[1:], dom.grid, dom.overlap)[0]
    local_model = build_model(cfg.model, (shape[0], *part.shape), ncls, 0)
    lp = sum(p.numel() for p in local_model.parameters())
    width = args.global_width or similar_width(cfg, shape, ncls, depth, dom.count * lp)
    runs = {"domain": work / "domain", "global": work / "global"}
    started = {}
    t0 = time.perf_counter()
    cli(with_sets(["train", str(args.config), "--run-dir", str(runs["domain"])], sets),
        ranks=args.ranks)
    started["domain"] = time.perf_counter() - t0
    # The global CNN: the same config without [domain], wider and deeper by a block per
    # halving of the side, on whole samples for the local and coherent epochs together.
    table = tomllib.loads(args.config.read_text())
    table.pop("domain")
    (work / "global.toml").write_text(tomli_w.dumps(table))
    t0 = time.perf_counter()
    cli(with_sets(["train", str(work / "global.toml"), "--run-dir", str(runs["global"])],
                  [*sets, f"model.width={width:g}", f"model.depth={depth}",
                   f"train.epochs={local_epochs + dom.coherent_epochs}"]), ranks=args.ranks)
    started["global"] = time.perf_counter() - t0

    recs = records(runs["domain"])
    grecs = records(runs["global"])
    start = next(r for r in recs if r["kind"] == "start" and r["stage"] == "aggregator")
    headline = start["headline"]
    agg_epochs = [r for r in recs if r["kind"] == "epoch" and r["stage"] == "aggregator"]
    coh = [r for r in recs if r["kind"] == "epoch" and r["stage"] == "coherent-0"]
    gl = [r for r in grecs if r["kind"] == "epoch"]
    locals_ = [f"local-{d}" for d in range(dom.count)]
    local_last = [[r for r in recs if r["kind"] == "epoch" and r["stage"] == s][-1][headline]
                  for s in locals_]
    # Parameters and activations per sample.
    gcfg = load_config(work / "global.toml", [*sets, f"model.width={width:g}",
                                              f"model.depth={depth}"])
    global_model = build_model(gcfg.model, shape, ncls, 0)
    gp = sum(p.numel() for p in global_model.parameters())
    la, ga = activation_mb(local_model, (shape[0], *part.shape)), activation_mb(global_model,
                                                                                 shape)
    rows = [
        ("local CNNs alone (mean of S)", statistics.mean(local_last), epoch_s(recs, "local-0"),
         peak_mb(recs, locals_), f"{dom.count} x {lp}", la),
        ("mean of local outputs", start["mean"][headline], float("nan"), float("nan"), "-",
         float("nan")),
    ]
    if "vote" in start:
        rows.append(("majority vote", start["vote"][headline], float("nan"), float("nan"),
                     "-", float("nan")))
    rows.append(("CNN-DNN (aggregator network)", agg_epochs[-1][headline],
                 epoch_s(recs, "aggregator"), peak_mb(recs, ["aggregator"]), "-",
                 float("nan")))
    if coh:
        rows.append(("coherent CNN-DNN (transfer-learned)", coh[-1][headline],
                     epoch_s(recs, "coherent-0"),
                     peak_mb(recs, [f"coherent-{d}" for d in range(dom.count)]),
                     f"{dom.count} x {lp} + dnn", la))
    rows.append((f"global CNN, width {width:.2g}, data-parallel", gl[-1][headline],
                 epoch_s(grecs, "main"), peak_mb(grecs, ["main"]), str(gp), ga))
    print(f"machine: {machine()}")
    print(f"config {args.config} grid {list(dom.grid)} on {args.ranks} ranks; "
          f"local epochs {local_epochs}, aggregator {dom.aggregator_epochs}, coherent "
          f"{dom.coherent_epochs}; global {local_epochs + dom.coherent_epochs} epochs; "
          f"runs {started['domain']:.0f} s and {started['global']:.0f} s from launch")
    print(f"| model | {headline} | s/epoch | peak RSS/rank MiB | parameters | "
          "activations/sample MiB |")
    print("|---|---|---|---|---|---|")
    def cell(value: float, digits: int) -> str:
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    for name, metric, sec, mem, params, act in rows:
        print(f"| {name} | {metric:.4f} | {cell(sec, 2)} | {cell(mem, 0)} | {params} | "
              f"{cell(act, 2)} |")
    g = rows[-1]
    for name, metric, sec, mem, _, act in rows[:-1]:
        if not math.isnan(sec):
            print(f"ratio {name} / global: {headline} {metric / g[1]:.3f}, time/epoch "
                  f"{sec / g[2]:.3f}, peak RSS {mem / g[3]:.3f}"
                  + (f", activations {act / g[5]:.3f}" if not math.isnan(act) else ""))
    print(f"runs kept in {work}")


if __name__ == "__main__":
    main()
