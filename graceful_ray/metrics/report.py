"""A human-readable flip report: where an update regresses, not just how much.

The aggregate NFR says whether an update hurts; the per-class flip counts and
the old-vs-new decision matrix say where, which is what a reviewer deciding on
a release needs. The report prints as a plain-text table, serialises to JSON,
and draws one PNG (per-class flips and the decision matrix).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graceful_ray.errors import MetricsError
from graceful_ray.metrics.flips import FlipMetrics, flip_metrics, validate_predictions

# Lazy imports: matplotlib loads only when a report is drawn.

#: Above this many classes the text table omits the decision matrix (it would not fit a terminal).
TABLE_MAX_CONFUSION_CLASSES = 12
#: Without class_names the class count is inferred from the largest label; above
#: this it is far more likely a wrong array (ids, hashes) than real classes, and
#: its K x K decision matrix would not fit in memory (10,000 classes: 800 MB).
MAX_INFERRED_CLASSES = 10_000


@dataclass(frozen=True)
class FlipReport:
    """Per-class flips and the old-vs-new decision matrix of one update.

    ``negative_flips[c]`` / ``positive_flips[c]`` count samples of *true* class
    ``c`` that the update broke / fixed; ``support[c]`` is the number of samples
    of class ``c``. ``confusion[a, b]`` counts samples the old model put in
    class ``a`` and the new model in class ``b``: off-diagonal mass is every
    changed decision, right or wrong.
    """

    metrics: FlipMetrics
    class_names: tuple[str, ...]
    support: np.ndarray
    old_correct: np.ndarray
    new_correct: np.ndarray
    negative_flips: np.ndarray
    positive_flips: np.ndarray
    confusion: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics.to_dict(),
            "per_class": [
                {"class": i, "name": name, "support": int(self.support[i]),
                 "old_correct": int(self.old_correct[i]), "new_correct": int(self.new_correct[i]),
                 "negative_flips": int(self.negative_flips[i]),
                 "positive_flips": int(self.positive_flips[i])}
                for i, name in enumerate(self.class_names)
            ],
            "confusion": self.confusion.tolist(),
        }

    def to_table(self, max_classes: int = 50) -> str:
        """Plain-text summary, per-class table and (for few classes) the decision matrix.

        With more than ``max_classes`` classes only those with the most negative
        flips are listed, since they are where a reviewer should look first.
        """
        m = self.metrics
        lines = [f"Flip report: {m.n} samples, {self.num_classes} classes", ""]
        rates = [("error rate old", m.error_rate_old), ("error rate new", m.error_rate_new),
                 ("NFR", m.nfr), ("PFR", m.pfr), ("NFI", m.nfi), ("PFI", m.pfi),
                 ("BTC", m.btc), ("BEC", m.bec)]
        lines += _render([["metric", "value", "95% CI", "count"]]
                         + [[name, _fmt(r.value), f"[{r.low:.4f}, {r.high:.4f}]",
                             f"{r.count}/{r.total}"] for name, r in rates]
                         + [["relative NFR", _fmt(m.relative_nfr), "", ""]])

        order = np.arange(self.num_classes)
        note = ""
        if self.num_classes > max_classes:
            # Stable sort so equal counts keep class order.
            order = np.argsort(-self.negative_flips, kind="stable")[:max_classes]
            note = (f"(showing the {max_classes} classes with most negative flips "
                    f"of {self.num_classes})")
        rows = [["class", "support", "old acc", "new acc", "neg flips", "pos flips"]]
        for c in order:
            n = int(self.support[c])
            rows.append([self.class_names[c], str(n),
                         _fmt(self.old_correct[c] / n if n else float("nan")),
                         _fmt(self.new_correct[c] / n if n else float("nan")),
                         str(int(self.negative_flips[c])), str(int(self.positive_flips[c]))])
        lines += ["", "Per class (by true label)" + (f" {note}" if note else "")]
        lines += _render(rows, right_from=1)

        if self.num_classes <= TABLE_MAX_CONFUSION_CLASSES:
            lines += ["", "Decisions: rows = old prediction, columns = new prediction"]
            header = ["old \\ new", *self.class_names]
            lines += _render([header] + [[self.class_names[a], *map(str, self.confusion[a])]
                                         for a in range(self.num_classes)], right_from=1)
        else:
            lines += ["", f"(decision matrix omitted: {self.num_classes} classes; "
                          "see to_dict() or save_png())"]
        return "\n".join(lines)

    def to_png_bytes(self) -> bytes:
        """The PNG as bytes, for callers that write through graceful_ray.storage."""
        buf = io.BytesIO()
        self._figure().savefig(buf, format="png")
        return buf.getvalue()

    def save_png(self, path: str | os.PathLike[str]) -> None:
        """Bar chart of per-class negative/positive flips beside the decision heatmap."""
        with open(path, "wb") as fh:
            fh.write(self.to_png_bytes())

    def _figure(self) -> Any:
        # A bare Figure renders with Agg without touching pyplot, so no global
        # backend switch and no figure registry that could leak in a server.
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        k = self.num_classes
        fig = Figure(figsize=(max(10.0, 0.25 * k + 6.0), max(4.5, 0.18 * k + 2.5)),
                     layout="constrained")
        ax_bar, ax_cm = fig.subplots(1, 2, width_ratios=(3, 2))
        x = np.arange(k)
        ax_bar.bar(x - 0.2, self.negative_flips, width=0.4, label="negative flips",
                   color="tab:red")
        ax_bar.bar(x + 0.2, self.positive_flips, width=0.4, label="positive flips",
                   color="tab:green")
        ax_bar.set_xlabel("true class")
        ax_bar.set_ylabel("samples")
        ax_bar.set_title(f"Flips per class (NFR {self.metrics.nfr.value:.2%}, "
                         f"PFR {self.metrics.pfr.value:.2%})")
        ax_bar.legend()
        ax_bar.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts, not fractions
        rotation = 90 if k > 10 else 0
        _class_ticks(ax_bar.set_xticks, x, self.class_names, rotation=rotation)

        im = ax_cm.imshow(self.confusion, cmap="viridis", aspect="auto")
        ax_cm.set_title("Decisions: old (rows) vs new (columns)")
        ax_cm.set_xlabel("new prediction")
        ax_cm.set_ylabel("old prediction")
        _class_ticks(ax_cm.set_xticks, x, self.class_names, rotation=rotation)
        _class_ticks(ax_cm.set_yticks, x, self.class_names)
        fig.colorbar(im, ax=ax_cm, label="samples", ticks=MaxNLocator(integer=True))
        return fig


def flip_report(y: Any, old_pred: Any, new_pred: Any,
                class_names: Sequence[str] | None = None) -> FlipReport:
    """Per-class flips, decision matrix and :class:`FlipMetrics` of one update.

    Labels are class indices ``0..K-1``: ``K = len(class_names)`` when names are
    given, else one more than the largest label seen.
    """
    y, old_pred, new_pred = validate_predictions(y, old_pred, new_pred)
    old_ok, new_ok = old_pred == y, new_pred == y
    lowest = min(int(y.min()), int(old_pred.min()), int(new_pred.min()))
    if lowest < 0:
        raise MetricsError(f"labels must be class indices >= 0 for a per-class report, got {lowest}")
    highest = max(int(y.max()), int(old_pred.max()), int(new_pred.max()))
    if class_names is None:
        k = highest + 1
        if k > MAX_INFERRED_CLASSES:
            raise MetricsError(
                f"the largest label is {highest}, so a per-class report would have {k} classes "
                f"(more than {MAX_INFERRED_CLASSES}); labels must be class indices 0..K-1 -- map "
                "them to indices, or pass class_names to say how many classes there are")
        names = tuple(str(c) for c in range(k))
    else:
        names = tuple(str(c) for c in class_names)
        k = len(names)
        if highest >= k:
            raise MetricsError(
                f"label {highest} has no name: class_names has {k} entries (classes 0..{k - 1})"
            )

    def per_class(mask: np.ndarray) -> np.ndarray:
        return np.bincount(y[mask], minlength=k)

    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (old_pred, new_pred), 1)
    return FlipReport(
        metrics=flip_metrics(y, old_pred, new_pred),
        class_names=names,
        support=np.bincount(y, minlength=k),
        old_correct=per_class(old_ok),
        new_correct=per_class(new_ok),
        negative_flips=per_class(old_ok & ~new_ok),
        positive_flips=per_class(~old_ok & new_ok),
        confusion=confusion,
    )


def _class_ticks(set_ticks: Any, positions: np.ndarray, names: tuple[str, ...],
                 rotation: int = 0) -> None:
    """Label every class when they fit, otherwise let matplotlib pick sparse ticks."""
    if len(names) <= 40:
        set_ticks(positions, labels=list(names), rotation=rotation, fontsize=8)


def _fmt(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.4f}"


def _render(rows: list[list[str]], right_from: int = 1) -> list[str]:
    """Columns padded to their widest cell; numbers (from ``right_from`` on) right-aligned."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]

    def line(r: list[str]) -> str:
        return "  ".join(cell.ljust(w) if c < right_from else cell.rjust(w)
                         for c, (cell, w) in enumerate(zip(r, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return [line(rows[0]), rule, *(line(r) for r in rows[1:])]
