"""cluster/argo and cluster/flagger: the rollout tools' templates that gate on
graceful-ray's NFR bound, validated against the tools' published CRD schemas
(vendored under tests/data/rollouts/), and pointing at fields the report really has
and metrics the comparator really exports."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.kube_schema import OBJECT_META, KubeValidator, prune_nulls, to_jsonschema

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).resolve().parent / "data" / "rollouts"


def _validate(doc: dict, crd_file: str, kind: str, group: str) -> None:
    """Raise ``jsonschema.ValidationError`` where ``doc`` breaks the tool's CRD,
    read as the API server reads it (unknown fields refused, nulls pruned)."""
    crd = yaml.safe_load((SCHEMAS / crd_file).read_text())
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v.get("served", True))
    raw = version["schema"]["openAPIV3Schema"]
    schema = to_jsonschema(raw)
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind",
                                 "metadata", "spec"})
    KubeValidator(schema).validate(prune_nulls(doc, raw))


def test_argo_analysis_template_matches_the_crd_and_the_report():
    doc = yaml.safe_load((ROOT / "cluster/argo/analysis-template.yaml").read_text())
    _validate(doc, "argo-rollouts-analysis-template-crd.yaml", "AnalysisTemplate",
              "argoproj.io")
    metrics = {m["name"]: m for m in doc["spec"]["metrics"]}
    assert metrics["nfr-bound-web"]["provider"]["web"]["jsonPath"] == "{$.nfr.sequence.high}"
    assert "ray_graceful_ray_gate_bound" in metrics["nfr-bound-prometheus"]["provider"][
        "prometheus"]["query"]
    args = {a["name"] for a in doc["spec"]["args"]}
    for m in doc["spec"]["metrics"]:  # every {{args.x}} is declared
        assert set(re.findall(r"\{\{args\.([\w-]+)\}\}", yaml.safe_dump(m))) <= args


def test_flagger_metric_template_matches_the_crd():
    doc = yaml.safe_load((ROOT / "cluster/flagger/metric-template.yaml").read_text())
    _validate(doc, "flagger-metric-template-crd.yaml", "MetricTemplate", "flagger.app")
    assert doc["spec"]["provider"]["type"] == "prometheus"
    assert 'rate="nfr"' in doc["spec"]["query"] and 'interval="sequence"' in doc["spec"]["query"]


def test_schema_check_catches_a_typo():
    doc = yaml.safe_load((ROOT / "cluster/argo/analysis-template.yaml").read_text())
    doc["spec"]["metrics"][0]["provider"]["web"]["jsonpath"] = "{$.nfr}"  # wrong case
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc, "argo-rollouts-analysis-template-crd.yaml", "AnalysisTemplate",
                  "argoproj.io")
    doc = yaml.safe_load((ROOT / "cluster/flagger/metric-template.yaml").read_text())
    doc["spec"]["provider"]["type"] = "graceful"
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc, "flagger-metric-template-crd.yaml", "MetricTemplate", "flagger.app")


def test_templates_name_fields_the_report_has_and_metrics_we_export():
    """The web provider's jsonPath and the Prometheus query's labels exist."""
    import numpy as np

    from graceful_ray.serve.shadow_config import BASELINE, CANDIDATE, GateConfig
    from graceful_ray.serve.prometheus import GATE_RATES, ComparatorMetrics
    from graceful_ray.serve.stats import ShadowStats, compose_report

    stats = ShadowStats()
    for i in range(50):
        stats.add_record(BASELINE, {BASELINE: i % 3, CANDIDATE: i % 3}, {BASELINE: 1.0,
                         CANDIDATE: 1.0}, True, None)
        stats.add_label(i % 3, i % 3, i % 3)
    report = compose_report(stats, GateConfig(), {BASELINE: "m@v1", CANDIDATE: "m@v2"}, BASELINE)
    assert isinstance(report["nfr"]["sequence"]["high"], float)
    assert isinstance(report["gates"]["passed"], bool)
    assert "nfr" in GATE_RATES

    seen = []

    class Recorder:
        def set(self, value, tags):
            seen.append((value, dict(tags)))

    m = ComparatorMetrics("shadow")
    m.bound = Recorder()
    m.publish(report)
    want = {"app": "shadow", "rate": "nfr", "interval": "sequence", "end": "high"}
    assert [v for v, t in seen if t == want] == [report["nfr"]["sequence"]["high"]]
    assert np.isfinite([v for v, _ in seen]).all()
