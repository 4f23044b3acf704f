"""`hpc-multires report RUN_DIR...`: a summary table and the validation metric against
wall time.

Each run is reported by its headline metric, which its start record names (`headline`,
`higher_is_better`): val_mae (lower is better) for regression, val_acc (higher is better)
for classification, val_psnr (higher is better) for the image tasks; records written
before the name was recorded count as val_mae. Several runs share one plot, and every
stage of a multi-stage run is its own curve on the run's wall-clock axis (coarse levels
dashed), so methods compare at a glance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpc_multires.driver.run_dir import RunDir
from hpc_multires.errors import UserError
from hpc_multires.train.metrics import read_metrics

REFERENCE_LABELS = {"val_mae": "predict the mean", "val_acc": "predict the majority class"}


def summarize(run_dir: Path) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found; pass the --run-dir of a "
                        "`hpc-multires train` run")
    run = RunDir(run_dir)
    records = read_metrics(run.metrics)
    if not records:
        raise UserError(f"{run_dir} has no {run.metrics.name} records; is it a run directory "
                        "of `hpc-multires train`?")
    starts = {r.get("stage", "main"): r for r in records if r.get("kind") == "start"}
    epochs = [r for r in records if r.get("kind") == "epoch"]
    order = list(starts) or ["main"]
    last_stage = order[-1]
    last_epochs = [r for r in epochs if r.get("stage", "main") == last_stage]
    last = last_epochs[-1] if last_epochs else {}
    first = starts.get(last_stage, {})
    metric = str(first.get("headline", "val_mae"))
    higher = bool(first.get("higher_is_better", False))
    curves: dict[str, dict[str, Any]] = {}
    for r in epochs:
        if r.get(metric) is None:
            continue
        c = curves.setdefault(r.get("stage", "main"), {"level": r.get("level", 0), "points": []})
        c["points"].append((r["wall_s"], r[metric]))
    values = [r[metric] for r in last_epochs if r.get(metric) is not None]
    # What a trivial model scores: the training mean (regression), the most frequent
    # class (classification), the corrupted input itself (an image task).
    reference = first.get("val_mae_mean_predictor",
                          first.get("val_acc_majority", last.get("val_psnr_input")))
    return {"run": run_dir.name, "status": run.status(), "stages": len(order),
            # the job's ranks: the widest stage (domain decomposition's stages each run on
            # a sub-domain's ranks; an aggregator on all)
            "ranks": max((int(st.get("world_size") or 0) for st in starts.values()),
                         default=0) or None,
            "epochs": last.get("epoch", 0), "wall_s": max(r.get("wall_s") or 0 for r in records),
            # Validation's share of wall_s: every epoch's and every fused start's (None
            # for logs written before it was recorded).
            "eval_s": sum(r.get("eval_s") or 0.0 for r in epochs)
            + sum(r.get("start_eval_s") or 0.0 for r in starts.values())
            if any("eval_s" in r for r in epochs) else None,
            "samples_per_s": last.get("samples_per_s"), "metric": metric,
            "higher_is_better": higher, "final": last.get(metric),
            "best": (max if higher else min)(values, default=None),
            "reference": reference,
            "reference_label": REFERENCE_LABELS.get(metric, "the corrupted input"),
            "curves": curves}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["run", "status", "stages", "ranks", "epochs", "wall_s", "eval_s", "samples_per_s",
            "metric",
            "final", "best", "reference"]
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(rows):
        color = colors[i % len(colors)]
        for stage, curve in r["curves"].items():
            t, value = zip(*curve["points"], strict=True)
            label = r["run"] if r["stages"] == 1 else \
                f"{r['run']}: {stage} (level {curve['level']})"
            ax.plot(t, value, marker="o", ms=3, color=color, label=label,
                    ls="-" if curve["level"] == 0 else "--", alpha=1 if curve["level"] == 0 else .6)
        if r["reference"] is not None and i == 0:
            ax.axhline(r["reference"], ls=":", color="grey", label=r["reference_label"])
    metrics = sorted({r["metric"] for r in rows})
    name = " / ".join(m.removeprefix("val_").upper() for m in metrics)
    better = {("higher" if r["higher_is_better"] else "lower") for r in rows}
    ax.set_xlabel("wall time since the run started (s)")
    ax.set_ylabel(f"validation {name}" + (f" ({better.pop()} is better)" if len(better) == 1
                                          else ""))
    ax.set_title(f"validation {name} against wall time (dashed: coarse levels)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    except OSError as e:
        raise UserError(f"--out {str(out)!r}: cannot write the plot ({e.strerror or e}); "
                        "pass a path in a directory you can write to") from None
    finally:
        plt.close(fig)


def plot_path(out: Path) -> Path:
    """The file the plot goes to: `out` as given, with `.png` added when it has no suffix
    (matplotlib would add it silently), so the path printed is the path written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if out.is_dir():
        raise UserError(f"--out {str(out)!r} is a directory; pass a file path such as "
                        f"{str(out / 'report.png')!r}")
    if not out.suffix:
        return out.with_name(out.name + ".png")
    formats = FigureCanvasAgg.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:
        raise UserError(f"--out {str(out)!r}: {out.suffix!r} is not an image format; end the "
                        f"path with .png (or one of {', '.join('.' + f for f in sorted(formats))})")
    return out


def report(run_dirs: list[Path], out: Path | None) -> str:
    png = plot_path(out) if out is not None else RunDir(run_dirs[0]).report_plot
    rows = [summarize(d) for d in run_dirs]
    plot(rows, png)
    return table(rows) + f"\nplot: {png}"
