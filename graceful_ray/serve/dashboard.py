"""``GET /dashboard``: one self-contained HTML page over ``/v1/shadow/report``.

No external scripts, fonts or styles (clusters often have no internet), no
build step. The page polls the report and renders it; every number it shows
sits in an element with ``data-field="<path in the report>"`` and
``data-fmt="<int|rate|ms|text|bool>"`` so a browser test (and a curious
operator) can tie each figure back to the JSON it came from.
"""

from __future__ import annotations

import html
import json

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>graceful-ray shadow: __APP__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
 h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.05em;margin:1.2em 0 .4em}
 .grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:12px}
 .card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px}
 table{border-collapse:collapse;width:100%} td,th{padding:3px 6px;text-align:left;
 border-bottom:1px solid #eee} th{font-weight:600;color:#555}
 .big{font-size:1.6em;font-weight:600} .muted{color:#777}
 .pass{color:#0a7a2f;font-weight:600} .fail{color:#b00020;font-weight:600}
 code{background:#f0f0f0;padding:0 3px;border-radius:3px}
</style></head><body>
<h1>Shadow comparison <span class="muted">__APP__</span></h1>
<div class="muted">primary <code data-field="primary.ref" data-fmt="text">-</code>,
 shadow <code data-field="shadow.ref" data-fmt="text">-</code>,
 shadow fraction <span data-field="shadow_fraction" data-fmt="rate">-</span>,
 epoch <span data-field="epoch" data-fmt="int">-</span>.
 <span id="status">loading...</span></div>

<h2>Cutover gates: <span id="gate-status" data-field="gates.passed" data-fmt="bool">-</span></h2>
<table id="gates"><thead><tr><th>gate</th><th>status</th><th>detail</th></tr></thead>
<tbody></tbody></table>
<div class="muted">label-free NFR bound (disagreement, anytime-valid):
 <span data-field="disagreement.sequence.high" data-fmt="rate">-</span>
 (<span data-field="disagreement.count" data-fmt="int">-</span> /
 <span data-field="disagreement.total" data-fmt="int">-</span>)</div>
<div id="watch" class="muted"></div>

<h2>Slices, worst first</h2>
<div class="muted">classes and segments with enough labelled pairs; NFR lower bound at the
 Bonferroni level (alpha / number of slices)</div>
<table id="slices"><thead><tr><th>slice</th><th>labelled pairs</th><th>negative flips</th>
<th>NFR</th><th>NFR lower bound</th><th>shown above budget</th></tr></thead><tbody></tbody></table>

<div class="grid">
 <div class="card"><h2>Traffic</h2><table>
  <tr><td>records</td><td data-field="requests" data-fmt="int">-</td></tr>
  <tr><td>compared (both answered)</td><td data-field="compared" data-fmt="int">-</td></tr>
  <tr><td>labelled</td><td data-field="labelled" data-fmt="int">-</td></tr>
  <tr><td>labelled pairs</td><td data-field="labelled_pairs" data-fmt="int">-</td></tr>
  <tr><td>in flight</td><td data-field="in_flight" data-fmt="int">-</td></tr>
  <tr><td>written to Parquet</td><td data-field="records_written" data-fmt="int">-</td></tr>
 </table></div>
 <div class="card"><h2>Agreement</h2>
  <div class="big" data-field="agreement.value" data-fmt="rate">-</div>
  <div>anytime-valid [<span data-field="agreement.sequence.low" data-fmt="rate">-</span>,
  <span data-field="agreement.sequence.high" data-fmt="rate">-</span>] (the gates' bound)</div>
  <div class="muted">fixed-sample 95% Wilson [<span data-field="agreement.low" data-fmt="rate">-</span>,
  <span data-field="agreement.high" data-fmt="rate">-</span>]</div>
  (<span data-field="agreement.count" data-fmt="int">-</span> /
  <span data-field="agreement.total" data-fmt="int">-</span>)</div>
 <div class="card"><h2>Negative flip rate</h2>
  <div class="big" data-field="nfr.value" data-fmt="rate">-</div>
  <div>anytime-valid [<span data-field="nfr.sequence.low" data-fmt="rate">-</span>,
  <span data-field="nfr.sequence.high" data-fmt="rate">-</span>] (the gates' bound)</div>
  <div class="muted">fixed-sample 95% Wilson [<span data-field="nfr.low" data-fmt="rate">-</span>,
  <span data-field="nfr.high" data-fmt="rate">-</span>]</div>
  (<span data-field="nfr.count" data-fmt="int">-</span> /
  <span data-field="nfr.total" data-fmt="int">-</span>)</div>
 <div class="card"><h2>Positive flip rate</h2>
  <div class="big" data-field="pfr.value" data-fmt="rate">-</div>
  <div>anytime-valid [<span data-field="pfr.sequence.low" data-fmt="rate">-</span>,
  <span data-field="pfr.sequence.high" data-fmt="rate">-</span>] (the gates' bound)</div>
  <div class="muted">fixed-sample 95% Wilson [<span data-field="pfr.low" data-fmt="rate">-</span>,
  <span data-field="pfr.high" data-fmt="rate">-</span>]</div>
  (<span data-field="pfr.count" data-fmt="int">-</span> /
  <span data-field="pfr.total" data-fmt="int">-</span>)</div>
</div>

<h2>Models</h2>
<table><thead><tr><th></th><th>baseline <code data-field="baseline" data-fmt="text">-</code></th>
<th>candidate <code data-field="candidate" data-fmt="text">-</code></th></tr></thead><tbody>
<tr><td>accuracy (labelled pairs)</td>
 <td data-field="models.baseline.accuracy.value" data-fmt="rate">-</td>
 <td data-field="models.candidate.accuracy.value" data-fmt="rate">-</td></tr>
<tr><td>latency p50 (ms)</td>
 <td data-field="models.baseline.latency_ms.p50" data-fmt="ms">-</td>
 <td data-field="models.candidate.latency_ms.p50" data-fmt="ms">-</td></tr>
<tr><td>latency p90 (ms)</td>
 <td data-field="models.baseline.latency_ms.p90" data-fmt="ms">-</td>
 <td data-field="models.candidate.latency_ms.p90" data-fmt="ms">-</td></tr>
<tr><td>latency p99 (ms)</td>
 <td data-field="models.baseline.latency_ms.p99" data-fmt="ms">-</td>
 <td data-field="models.candidate.latency_ms.p99" data-fmt="ms">-</td></tr>
<tr><td>requests as shadow</td>
 <td data-field="models.baseline.shadow_requests" data-fmt="int">-</td>
 <td data-field="models.candidate.shadow_requests" data-fmt="int">-</td></tr>
<tr><td>shadow errors</td>
 <td data-field="models.baseline.shadow_errors.count" data-fmt="int">-</td>
 <td data-field="models.candidate.shadow_errors.count" data-fmt="int">-</td></tr>
<tr><td>shadow error rate</td>
 <td data-field="models.baseline.shadow_errors.rate.value" data-fmt="rate">-</td>
 <td data-field="models.candidate.shadow_errors.rate.value" data-fmt="rate">-</td></tr>
</tbody></table>

<h2>Search <span class="muted">(POST /v1/search; gallery
 <code data-field="retrieval.gallery" data-fmt="text">-</code>)</span></h2>
<table><thead><tr><th></th><th>baseline</th><th>candidate</th></tr></thead><tbody>
<tr><td>searches / compared / labelled pairs</td><td colspan="2">
 <span data-field="retrieval.searches" data-fmt="int">-</span> /
 <span data-field="retrieval.compared" data-fmt="int">-</span> /
 <span data-field="retrieval.labelled_pairs" data-fmt="int">-</span></td></tr>
<tr><td>mean top-k overlap</td><td colspan="2">
 <span data-field="retrieval.mean_topk_overlap" data-fmt="rate">-</span></td></tr>
<tr><td>top-1 hit rate (labelled pairs)</td>
 <td data-field="retrieval.models.baseline.hit_top1.value" data-fmt="rate">-</td>
 <td data-field="retrieval.models.candidate.hit_top1.value" data-fmt="rate">-</td></tr>
<tr><td>top-k hit rate (labelled pairs)</td>
 <td data-field="retrieval.models.baseline.hit_topk.value" data-fmt="rate">-</td>
 <td data-field="retrieval.models.candidate.hit_topk.value" data-fmt="rate">-</td></tr>
<tr><td>shadow searches skipped (may not search)</td>
 <td data-field="retrieval.models.baseline.skipped.count" data-fmt="int">-</td>
 <td data-field="retrieval.models.candidate.skipped.count" data-fmt="int">-</td></tr>
<tr><td>shadow search errors</td>
 <td data-field="retrieval.models.baseline.shadow_errors.count" data-fmt="int">-</td>
 <td data-field="retrieval.models.candidate.shadow_errors.count" data-fmt="int">-</td></tr>
</tbody></table>

<h2>Flips per true class</h2>
<table id="per-class"><thead><tr><th>class</th><th>labelled pairs</th>
<th>negative flips</th><th>NFR upper bound (anytime-valid)</th><th>positive flips</th></tr></thead>
<tbody></tbody></table>

<script>
const REPORT_URL = __REPORT_URL__;
const REFRESH_MS = __REFRESH_MS__;
function get(obj, path) {
  return path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);
}
function fmt(v, kind) {
  if (v === null || v === undefined || (typeof v === "number" && !isFinite(v))) return "n/a";
  if (kind === "int") return String(Math.round(v));
  if (kind === "rate") return Number(v).toFixed(4);
  if (kind === "ms") return Number(v).toFixed(2);
  if (kind === "bool") return v ? "PASS" : "BLOCKED";
  return String(v);
}
function cell(tag, field, kind, text) {
  const el = document.createElement(tag);
  if (field) { el.dataset.field = field; el.dataset.fmt = kind; }
  if (text !== undefined) el.textContent = text;
  return el;
}
function render(r) {
  document.querySelectorAll("[data-field]").forEach(el => {
    el.textContent = fmt(get(r, el.dataset.field), el.dataset.fmt);
  });
  const gs = document.getElementById("gate-status");
  gs.className = r.gates.passed ? "pass" : "fail";
  const gb = document.querySelector("#gates tbody");
  gb.replaceChildren(...r.gates.checks.map((c, i) => {
    const tr = document.createElement("tr");
    tr.append(cell("td", null, null, c.name));
    const st = cell("td", "gates.checks." + i + ".passed", "bool", fmt(c.passed, "bool"));
    st.className = c.passed ? "pass" : "fail";
    tr.append(st, cell("td", null, null, c.detail));
    return tr;
  }));
  const sb = document.querySelector("#slices tbody");
  sb.replaceChildren(...r.gates.slices.slices.map((s, i) => {
    const p = "gates.slices.slices." + i + ".";
    const tr = document.createElement("tr");
    const bad = cell("td", null, null, s.regressed ? "yes" : "no");
    bad.className = s.regressed ? "fail" : "pass";
    tr.append(cell("td", p + "slice", "text", fmt(s.slice, "text")),
      cell("td", p + "labelled", "int", fmt(s.labelled, "int")),
      cell("td", p + "negative_flips", "int", fmt(s.negative_flips, "int")),
      cell("td", p + "nfr", "rate", fmt(s.nfr, "rate")),
      cell("td", p + "nfr_low", "rate", fmt(s.nfr_low, "rate")), bad);
    return tr;
  }));
  document.getElementById("watch").textContent = r.watch
    ? "watch since the cutover: " + r.watch.labelled_pairs + " labelled pairs, NFR lower bound " +
      fmt(r.watch.nfr.sequence.low, "rate") + (r.watch.rollback ? " - REGRESSION: " +
      r.watch.reasons.join("; ") : "") + (r.watch.auto_rollback ? " (auto_rollback on)" : "")
    : "";
  const pb = document.querySelector("#per-class tbody");
  pb.replaceChildren(...Object.keys(r.per_class).map(k => {
    const row = r.per_class[k], p = "per_class." + k + ".";
    const tr = document.createElement("tr");
    tr.append(cell("td", null, null, k),
      cell("td", p + "labelled", "int", fmt(row.labelled, "int")),
      cell("td", p + "negative_flips", "int", fmt(row.negative_flips, "int")),
      cell("td", p + "nfr.sequence.high", "rate", fmt(row.nfr.sequence.high, "rate")),
      cell("td", p + "positive_flips", "int", fmt(row.positive_flips, "int")));
    return tr;
  }));
  document.getElementById("status").textContent =
    "updated " + new Date(r.generated_at * 1000).toLocaleTimeString();
  document.body.dataset.generatedAt = String(r.generated_at);
}
async function refresh() {
  try {
    const resp = await fetch(REPORT_URL, {cache: "no-store"});
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
  } catch (e) {
    document.getElementById("status").textContent = "report unavailable: " + e.message;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}
refresh();
</script></body></html>
"""


def render_dashboard(app_name: str, route_prefix: str, refresh_s: float) -> str:
    """The page for one application; the report URL honours the route prefix."""
    prefix = route_prefix.rstrip("/")
    return (_PAGE.replace("__APP__", html.escape(app_name))
            .replace("__REPORT_URL__", json.dumps(f"{prefix}/v1/shadow/report"))
            .replace("__REFRESH_MS__", str(int(refresh_s * 1000))))
