"""`fastgpt plot log [other_log ...] --out loss.png`: loss curves (and HellaSwag) from metrics.jsonl files.

Two panels share the runs' colours: train (thin) and val (thick, markers) loss against optimizer steps,
and against tokens trained on, so runs with different batch sizes line up. A third panel shows
HellaSwag acc_norm when any run logged it. Matplotlib's Agg backend: no display needed.
"""
from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics


def series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[int], list[float]]:
    """(steps, tokens, values) of one record type, skipping values that are missing (null: non-finite)."""
    rows = [r for r in records if r.get("type") == kind and r.get(key) is not None]
    return [r["step"] for r in rows], [r["tokens"] for r in rows], [float(r[key]) for r in rows]


def plot_runs(paths: list[str | Path], out: str | Path, labels: list[str] | None = None):
    """Draw every run's curves into `out` (PNG, SVG or PDF by suffix); returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(labels[i] if labels else str(p), read_metrics(p)) for i, p in enumerate(paths)]
    has_hs = any(r.get("type") == "hellaswag" for _, recs in runs for r in recs)
    ncols = 3 if has_hs else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), constrained_layout=True)
    for i, (label, recs) in enumerate(runs):
        colour = f"C{i}"
        ts, tt, tv = series(recs, "train", "loss")
        vs, vt, vv = series(recs, "val", "loss")
        for ax, tx, vx in ((axes[0], ts, vs), (axes[1], tt, vt)):
            ax.plot(tx, tv, color=colour, lw=0.8, alpha=0.6, label=f"{label} train")
            ax.plot(vx, vv, color=colour, lw=2, marker="o", ms=3, label=f"{label} val")
        if has_hs:
            hs, _, hv = series(recs, "hellaswag", "acc_norm")
            axes[2].plot(hs, hv, color=colour, marker="o", ms=3, label=label)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("tokens")
    for ax in axes[:2]:
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if has_hs:
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("HellaSwag acc_norm")
        axes[2].axhline(0.25, color="grey", ls="--", lw=0.8)  # chance: 4 endings
        axes[2].grid(alpha=0.3)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return fig
