"""One finished (or not) trial, as the front, the selection rule and the plot see it.

A :class:`TrialRecord` is plain data: the sampled parameters, the final
metrics, and a status. Only ``complete`` trials ran every epoch and reported
their final result; ``early_stopped`` and ``error`` trials are kept so reports
can show them, but never compete for the front or the selection.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from graceful_ray.errors import ConfigError

COMPLETE = "complete"
EARLY_STOPPED = "early_stopped"
ERROR = "error"
RUNNING = "running"  # no final result yet (only seen mid-run or after an interruption)
STATUSES = (COMPLETE, EARLY_STOPPED, ERROR, RUNNING)

#: Set to 1 in the final report of a trial that trained every epoch.
COMPLETE_FLAG = "trial_complete"


@dataclass(frozen=True)
class Objective:
    """A metric and its direction (``max`` or ``min``)."""

    metric: str
    mode: str
    label: str = ""

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ConfigError(f"objective {self.metric!r}: mode must be 'max' or 'min', got {self.mode!r}")

    @property
    def title(self) -> str:
        return self.label or self.metric

    def better(self, a: float, b: float) -> bool:
        """``a`` strictly better than ``b``."""
        return a > b if self.mode == "max" else a < b

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


#: The trade-off search: accuracy up, negative flip rate down.
ACCURACY = Objective("val_accuracy", "max", "accuracy")
NFR = Objective("val_nfr", "min", "NFR")
TRADEOFF_OBJECTIVES = (ACCURACY, NFR)
#: The edge search: cross-model retrieval mAP M(small, large) up, FLOPs per sample down.
CROSS_MAP = Objective("cross_map", "max", "M(small, large) mAP")
FLOPS = Objective("flops_per_sample", "min", "FLOPs / sample")
EDGE_OBJECTIVES = (CROSS_MAP, FLOPS)


@dataclass
class TrialRecord:
    trial_id: str
    status: str
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint_path: str | None = None
    train_run: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ConfigError(f"trial {self.trial_id}: unknown status {self.status!r}; use one of {STATUSES}")

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE

    def value(self, metric: str) -> float:
        """The metric as a float; NaN when missing or not a number."""
        v = self.metrics.get(metric)
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan

    def has(self, *metrics: str) -> bool:
        return all(not math.isnan(self.value(m)) for m in metrics)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialRecord":
        return cls(trial_id=str(d["trial_id"]), status=d["status"], params=dict(d.get("params") or {}),
                   metrics=dict(d.get("metrics") or {}), checkpoint_path=d.get("checkpoint_path"),
                   train_run=d.get("train_run"), error=d.get("error"))
