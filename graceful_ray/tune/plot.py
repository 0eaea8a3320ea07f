"""One PNG of a search: every trial, the Pareto front, the old (or cloud) model.

Complete trials are dots, the front is joined by a line, trials that did not
finish (stopped early or failed after reporting) are crosses at their last
reported values, so nobody mistakes them for finished models. The reference
model is a star: for the trade-off search the old model at (its accuracy,
NFR 0), since a model never flips against itself.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from graceful_ray.tune.trials import Objective, TrialRecord

# Lazy imports: matplotlib loads only when a plot is drawn.


def plot_trials(records: Sequence[TrialRecord], front: Sequence[TrialRecord], x: Objective, y: Objective, *,
                reference: tuple[float, float, str] | None = None, selected: str | None = None,
                annotate: str | None = None, title: str = "", log_x: bool = False) -> bytes:
    """The PNG bytes of the plot (callers write them wherever the run lives)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    try:
        on_front = {r.trial_id for r in front}
        done = [r for r in records if r.complete and r.has(x.metric, y.metric) and r.trial_id not in on_front]
        partial = [r for r in records if not r.complete and r.has(x.metric, y.metric)]
        if done:
            ax.scatter([r.value(x.metric) for r in done], [r.value(y.metric) for r in done], s=28,
                       color="tab:gray", alpha=0.7, label=f"complete trials ({len(done)})")
        if partial:
            ax.scatter([r.value(x.metric) for r in partial], [r.value(y.metric) for r in partial], s=36,
                       marker="x", color="tab:orange", label=f"not complete: stopped early / failed ({len(partial)})")
        if front:
            pts = sorted(((r.value(x.metric), r.value(y.metric), r) for r in front), key=lambda t: (t[0], t[1]))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color="tab:red", ms=6,
                    label=f"Pareto front ({len(front)})")
            if annotate:
                for px, py, r in pts:
                    v = r.params.get(annotate)
                    if v is not None:
                        ax.annotate(f"{annotate}={v:.3g}" if isinstance(v, float) else f"{annotate}={v}",
                                    (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if selected is not None:
            sel = [r for r in records if r.trial_id == selected and r.has(x.metric, y.metric)]
            if sel:
                ax.scatter([sel[0].value(x.metric)], [sel[0].value(y.metric)], s=180, facecolors="none",
                           edgecolors="tab:green", linewidths=2, label="selected")
        if reference is not None:
            rx, ry, rlabel = reference
            ax.scatter([rx], [ry], s=160, marker="*", color="tab:blue", zorder=5, label=rlabel)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(f"{x.title} ({'higher' if x.mode == 'max' else 'lower'} is better)")
        ax.set_ylabel(f"{y.title} ({'higher' if y.mode == 'max' else 'lower'} is better)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
        if title:
            ax.set_title(title, fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)
