"""Shadow replay: run recorded live traffic through a candidate, offline.

A candidate trained after the live shadow run (or a second candidate) can be
judged on the very inputs production saw, with the labels that arrived since,
without touching the service. The recorded log is read with Ray Data, the
candidate runs in ``map_batches`` (so the replay scales out like any batch
inference job), and the results go through the same accumulator and gates as
the live report: the two reports are directly comparable.

The baseline's decisions are taken from the log where the baseline answered
(it was primary, or a successful shadow); rows without one are re-computed
with the baseline model from the registry.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from graceful_ray.data.reader import read_parquet
from graceful_ray.errors import ConfigError
from graceful_ray.raycluster import runtime_env
from graceful_ray.serve.model_runner import ModelRunner
from graceful_ray.serve.shadow_config import BASELINE, CANDIDATE, GateConfig
from graceful_ray.serve.comparison_log import LABELS_DIR, RECORDS_DIR, RecordLog
from graceful_ray.serve.stats import ShadowStats, compose_report

# Lazy imports: Ray Data and the registry (torch) load only when a replay runs, after its arguments
# are checked.

log = logging.getLogger(__name__)

_COLUMNS = ["request_id", "features", "baseline_decision", "baseline_ms", "label"]


class _ReplayPredictor:
    """``map_batches`` UDF: candidate decisions, and baseline ones where missing."""

    def __init__(self, registry: str, candidate: str, baseline: str) -> None:
        self.candidate = ModelRunner(registry, candidate)
        self._baseline_ref = baseline
        self._registry = registry
        self.baseline = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.stack([np.asarray(f, dtype=np.float32) for f in batch["features"]])
        t0 = time.perf_counter()
        cand = self.candidate.predict(x, with_scores=False).decisions
        per_row_ms = (time.perf_counter() - t0) * 1000.0 / max(len(x), 1)
        base = batch["baseline_decision"]
        missing = np.asarray([v is None or (isinstance(v, float) and np.isnan(v)) for v in base])
        base_out = np.asarray([-1 if m else int(v) for v, m in zip(base, missing)], np.int64)
        if missing.any():
            if self.baseline is None:
                self.baseline = ModelRunner(self._registry, self._baseline_ref)
            base_out[missing] = self.baseline.predict(x[missing], with_scores=False).decisions
        out = {"request_id": batch["request_id"], "baseline_decision": base_out,
               "baseline_recomputed": missing,
               "baseline_ms": batch["baseline_ms"], "label": batch["label"],
               "candidate_decision": cand.astype(np.int64),
               "candidate_ms": np.full(len(x), per_row_ms, np.float64)}
        if "segment" in batch:
            out["segment"] = batch["segment"]
        return out


def replay(log_dir: str, registry: str, candidate: str | None = None,
           baseline: str | None = None, gates: GateConfig | dict | None = None,
           batch_size: int = 512, num_cpus: float = 0.5) -> dict[str, Any]:
    """The shadow report for ``candidate`` over the traffic recorded in ``log_dir``.

    ``candidate`` and ``baseline`` default to the two models the log recorded;
    ``gates`` default to the gates the live service last used (a dict changes
    only the fields it names).
    """
    import ray

    from graceful_ray.registry import Registry

    rl = RecordLog(log_dir)
    state = rl.read_state() or {}
    files = rl.files(RECORDS_DIR)
    if not files:
        raise ConfigError(f"no comparison records under {rl.root.uri}/{RECORDS_DIR}: give the "
                          "storage path the shadow service wrote to")
    schema = pq.read_schema(files[0].fs.open_input_file(files[0].path))
    if "features" not in schema.names:
        raise ConfigError(f"the log at {rl.root.uri} has no 'features' column: it was recorded "
                          "with log_inputs=false, so there is nothing to replay")
    reg = Registry(registry)
    candidate = reg.get(candidate or _required(state, "candidate", rl.root.uri)).ref
    baseline = reg.get(baseline or _required(state, "baseline", rl.root.uri)).ref
    if not isinstance(gates, GateConfig):
        gates = GateConfig.from_dict({**state.get("gates", {}), **(gates or {})})

    if not ray.is_initialized():
        ray.init(runtime_env=runtime_env())
    labels = {}
    label_table = rl.read_table(LABELS_DIR, ["request_id", "label"])
    if label_table is not None:
        labels = dict(zip(label_table.column("request_id").to_pylist(),
                          label_table.column("label").to_pylist()))

    # Logs written before segments existed lack the column: replay them without.
    with_segment = all("segment" in pq.read_schema(f.path, filesystem=f.fs).names for f in files)
    columns = _COLUMNS + (["segment"] if with_segment else [])
    ds = read_parquet([f.path for f in files], filesystem=files[0].fs, columns=columns)
    ds = ds.map_batches(_ReplayPredictor, fn_constructor_args=(registry, candidate, baseline),
                        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
                        num_cpus=num_cpus)
    stats = ShadowStats(latency_window=10_000_000)
    recomputed = 0
    for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        recomputed += int(batch["baseline_recomputed"].sum())
        for i, rid in enumerate(batch["request_id"]):
            b, c = int(batch["baseline_decision"][i]), int(batch["candidate_decision"][i])
            # No latencies offline: the candidate's would be a batch's time per row on
            # this machine, next to the baseline's live times; not comparable.
            segment = batch["segment"][i] if with_segment else None
            segment = segment if isinstance(segment, str) else None
            stats.add_record(BASELINE, {BASELINE: b, CANDIDATE: c},
                             {BASELINE: None, CANDIDATE: None}, shadowed=True, shadow_error=None,
                             segment=segment)
            label = labels.get(rid, _int_or_none(batch["label"][i]))
            if label is not None:
                stats.add_label(b, c, label, segment)
    log.info("replayed %d records through %s (%d baseline decisions recomputed)",
             stats.requests, candidate, recomputed)
    report = compose_report(stats, gates, {BASELINE: baseline, CANDIDATE: candidate}, BASELINE,
                            app="replay", mode="replay", log=rl.root.uri,
                            baseline_recomputed=recomputed)
    return without_latency_gate(report)


def without_latency_gate(report: dict[str, Any]) -> dict[str, Any]:
    """An offline report judges decisions only: the latency gate is left out (and
    said so), not failed for want of samples nor passed on a made-up ratio."""
    g = report["gates"]
    checks = [c for c in g["checks"] if c["name"] != "max_latency_ratio"]
    failing = [c["name"] for c in checks if not c["passed"]]
    report["gates"] = {**g, "checks": checks, "failing": failing, "passed": not failing,
                       "not_judged": ["max_latency_ratio (offline: no comparable latencies)"]}
    return report


def _required(state: dict, key: str, where: str) -> str:
    if key not in state:
        raise ConfigError(f"{where}/state/ does not name the {key}; pass it explicitly")
    return state[key]


def _int_or_none(v: Any) -> int | None:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return int(v)
