"""`hpc-multires report RUN_DIR...`: a summary table and validation MAE against wall time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpc_multires.errors import UserError
from hpc_multires.train.metrics import read_metrics


def summarize(run_dir: Path) -> dict[str, Any]:
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise UserError(f"{run_dir} has no metrics.jsonl records; is it a run directory of "
                        "`hpc-multires train`?")
    start = next((r for r in records if r.get("kind") == "start"), {})
    epochs = [r for r in records if r.get("kind") == "epoch"]
    last = epochs[-1] if epochs else {}
    best = min((r["val_mae"] for r in epochs if r.get("val_mae") is not None), default=None)
    return {"run": run_dir.name, "ranks": start.get("world_size"), "epochs": last.get("epoch", 0),
            "steps": last.get("step", 0), "wall_s": last.get("wall_s"),
            "samples_per_s": last.get("samples_per_s"), "val_mae": last.get("val_mae"),
            "best_val_mae": best, "mean_predictor_mae": start.get("val_mae_mean_predictor"),
            "curve": [(r["wall_s"], r["val_mae"]) for r in epochs if r.get("val_mae") is not None]}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["run", "ranks", "epochs", "steps", "wall_s", "samples_per_s", "val_mae",
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

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in rows:
        if r["curve"]:
            t, mae = zip(*r["curve"], strict=True)
            ax.plot(t, mae, marker="o", label=r["run"])
        if r["mean_predictor_mae"] is not None:
            ax.axhline(r["mean_predictor_mae"], ls=":", color="grey")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("validation MAE")
    ax.set_title("validation MAE against wall time (dotted: predict the mean)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def report(run_dirs: list[Path], out: Path | None) -> str:
    rows = [summarize(d) for d in run_dirs]
    png = out if out is not None else run_dirs[0] / "report.png"
    plot(rows, png)
    return table(rows) + f"\nplot: {png}"
