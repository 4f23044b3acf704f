"""`hpc-multires report RUN_DIR...`: a summary table and validation MAE against wall time.

Several runs share one plot, and every stage of a multi-stage run is its own curve on
the run's wall-clock axis (coarse levels dashed), so methods compare at a glance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpc_multires.driver.run_dir import RunDir
from hpc_multires.errors import UserError
from hpc_multires.train.metrics import read_metrics


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
    curves: dict[str, dict[str, Any]] = {}
    for r in epochs:
        if r.get("val_mae") is None:
            continue
        c = curves.setdefault(r.get("stage", "main"), {"level": r.get("level", 0), "points": []})
        c["points"].append((r["wall_s"], r["val_mae"]))
    return {"run": run_dir.name, "status": run.status(), "stages": len(order),
            "ranks": first.get("world_size"),
            "epochs": last.get("epoch", 0), "wall_s": max(r.get("wall_s") or 0 for r in records),
            "samples_per_s": last.get("samples_per_s"), "val_mae": last.get("val_mae"),
            "best_val_mae": min((r["val_mae"] for r in last_epochs
                                 if r.get("val_mae") is not None), default=None),
            "mean_predictor_mae": first.get("val_mae_mean_predictor"), "curves": curves}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["run", "status", "stages", "ranks", "epochs", "wall_s", "samples_per_s", "val_mae",
            "best_val_mae", "mean_predictor_mae"]
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
            t, mae = zip(*curve["points"], strict=True)
            label = r["run"] if r["stages"] == 1 else \
                f"{r['run']}: {stage} (level {curve['level']})"
            ax.plot(t, mae, marker="o", ms=3, color=color, label=label,
                    ls="-" if curve["level"] == 0 else "--", alpha=1 if curve["level"] == 0 else .6)
        if r["mean_predictor_mae"] is not None and i == 0:
            ax.axhline(r["mean_predictor_mae"], ls=":", color="grey", label="predict the mean")
    ax.set_xlabel("wall time since the run started (s)")
    ax.set_ylabel("validation MAE")
    ax.set_title("validation MAE against wall time (dashed: coarse levels)")
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
