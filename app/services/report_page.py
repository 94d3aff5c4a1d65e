"""The HTML page of a layer report (`GET /v1/reports/{id}/html`, docs/decisions/0005-workflows.md).

`render_report_html(report, title=..., context=...)` turns the JSON dict of an `influence.report.LayerReport`
(`to_dict()`, after a JSON round trip) into ONE self-contained HTML5 document: no network at all (no CDN, no
web fonts; a Content-Security-Policy meta tag forbids every fetch and only lets the page's own script run).

What reads without JavaScript is rendered here, on the server: the header (context, accuracy on the reference
set against chance), the warnings, the recommendation, the metrics that could not be computed and why, the
projection's fidelity per layer unit (when the report has it: a warning line when an entry compared uses a unit
below the threshold, and a fidelity bar per row of the top entries), the top entries, every AUC-NDR value,
cancellation, score distributions and the most detrimental rows. The plots are
inline SVG drawn by a small inline script from the report JSON embedded in a `<script type="application/json">`
tag:
  ndr-curves     NDR@p against p for the best layer sets of each estimator, with the random order (and a
                 +-2 standard deviation band) and a perfect order;
  layer-bars     AUC-NDR of every single layer for one estimator / aggregation (selectable; default the
                 recommended one, else rank-c, else rank), with the random AUC-NDR and the margin a
                 recommendation needs;
  heatmap        AUC-NDR of every layer set x (estimator, aggregation), on a diverging colour scale centred on
                 the random AUC-NDR, with a legend;
  cancellation   L1/L1 and L1/L2 cancellation per layer.
Every drawn SVG carries `data-plot="<name>"`; a plot without data shows a "not available: <reason>" note
(`data-plot-na`) instead. When drawing ends without an error the script sets `<body data-plots-drawn="N">`
(N drawn SVGs), otherwise `data-plot-error` with the messages: tests (and people) can tell a broken page.

Everything that comes from users (title, context, layer and group names, row texts) is HTML-escaped here and
set with textContent (never innerHTML) by the script.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

PLOTS: tuple[str, ...] = ("ndr-curves", "layer-bars", "heatmap", "cancellation")

# Rows of the "top entries" table; the full matrix of AUC-NDR values follows in a collapsed table.
TOP_ENTRIES = 15
# Row texts are cut to this many characters (the full text is in the dataset).
MAX_TEXT_CHARS = 400
# Context keys shown in the header, in this order, with their labels; other scalar keys follow as they are.
_CONTEXT_LABELS: tuple[tuple[str, str], ...] = (
    ("report_id", "Report"),
    ("index_id", "Index"),
    ("model", "Model"),
    ("model_name", "Model"),
    ("dataset", "Dataset"),
    ("dataset_name", "Dataset"),
    ("reference", "Reference set"),
    ("reference_size", "Reference rows"),
    ("created", "Created"),
    ("created_at", "Created"),
)

_STYLE = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg-soft: #f6f8fa; --accent: #0969da;
  --warn-bg: #fff8c5; --warn-line: #d4a72c; --ok-bg: #dafbe1; --ok-line: #4ac26b; --no-bg: #ffebe9;
  --no-line: #ff8182; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.45;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1280px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 1.7rem; margin: 0 0 4px; }
h2 { font-size: 1.25rem; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.05rem; margin: 18px 0 6px; }
p { margin: 6px 0; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.9em; }
.subtitle { color: var(--muted); margin: 0 0 16px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; margin: 12px 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: 14px; margin: 16px 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; background: var(--bg-soft); }
.card .big { font-size: 1.6rem; font-weight: 600; }
.card .small { color: var(--muted); font-size: 0.9rem; }
.meter { position: relative; height: 12px; background: #e6eaef; border-radius: 6px; margin: 24px 0; }
.meter .fill { position: absolute; left: 0; top: 0; bottom: 0; background: var(--accent); border-radius: 6px; }
.meter.poor .fill { background: #cf222e; }
.meter .mark { position: absolute; top: -4px; bottom: -4px; width: 2px; background: var(--fg); }
.meter .mark span { position: absolute; top: 18px; transform: translateX(-50%); font-size: 0.75rem;
  white-space: nowrap; color: var(--muted); }
.meter .mark.chance span { top: auto; bottom: 18px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.8rem; font-weight: 600;
  border: 1px solid var(--line); background: #fff; }
.badge.bad { background: var(--no-bg); border-color: var(--no-line); }
.badge.good { background: var(--ok-bg); border-color: var(--ok-line); }
.box { border: 1px solid; border-radius: 8px; padding: 10px 16px; margin: 14px 0; }
.box h2 { border: 0; margin: 4px 0 6px; padding: 0; }
.warnings { background: var(--warn-bg); border-color: var(--warn-line); }
.warnings li { margin: 6px 0; }
.recommendation { background: var(--ok-bg); border-color: var(--ok-line); }
.recommendation.none { background: var(--no-bg); border-color: var(--no-line); }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 0.88rem; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--bg-soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.rec td { background: var(--ok-bg); }
tr.low-fidelity td { background: var(--warn-bg); }
.fbar { display: inline-block; position: relative; width: 56px; height: 8px; margin-right: 6px; overflow: hidden;
  vertical-align: middle; background: #e6eaef; border-radius: 4px; }
.fbar span { position: absolute; left: 0; top: 0; bottom: 0; background: var(--ok-line); }
.fbar.low span { background: #cf222e; }
td.text { max-width: 640px; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; }
details { margin: 8px 0; }
summary { cursor: pointer; color: var(--accent); }
figure { margin: 18px 0 28px; }
figcaption { color: var(--muted); font-size: 0.9rem; margin: 4px 0 8px; }
.controls { display: flex; gap: 16px; align-items: center; flex-wrap: wrap; margin: 4px 0 8px; }
.controls label { font-size: 0.9rem; color: var(--muted); }
.slot { overflow-x: auto; min-height: 40px; }
.slot p.na, .slot p.error { display: inline-block; border: 1px dashed var(--muted); border-radius: 6px;
  padding: 12px 16px; color: var(--muted); background: var(--bg-soft); }
.slot p.error { color: #cf222e; border-color: #cf222e; }
svg.chart { display: block; font-size: 11px; font-family: inherit; }
svg.chart .axis line { stroke: #57606a; }
svg.chart .axis line.grid { stroke: #e6eaef; }
svg.chart .axis text { fill: #424a53; }
svg.chart text.label { font-size: 12px; fill: var(--fg); }
svg.chart text.panel-title { font-size: 13px; font-weight: 600; fill: var(--fg); }
svg.chart .curve { fill: none; stroke-width: 2; }
svg.chart .random { fill: none; stroke: #57606a; stroke-width: 1.5; stroke-dasharray: 6 4; }
svg.chart .perfect { fill: none; stroke: #8c959f; stroke-width: 1.2; stroke-dasharray: 2 3; }
svg.chart .band { fill: #8c959f; fill-opacity: 0.18; stroke: none; }
svg.chart .ref { stroke-width: 1.5; }
footer { color: var(--muted); font-size: 0.85rem; margin-top: 36px; border-top: 1px solid var(--line);
  padding-top: 10px; }
@media print { .controls { display: none; } .slot { overflow: visible; } }
"""

# The plots. Data comes only from the embedded JSON and only reaches the page through textContent and
# setAttribute, so names in the report cannot inject markup.
_SCRIPT = r"""
(() => {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000"];
  const LOW = [33, 102, 172], MID = [247, 247, 247], HIGH = [178, 24, 43];
  const body = document.body;
  const errors = [];
  let drawn = 0;
  let uid = 0;
  window.addEventListener("error", (event) => { body.dataset.plotError = String(event.message); });

  const finite = (v) => typeof v === "number" && Number.isFinite(v);
  const fmt = (v, digits = 3) => (finite(v) ? v.toFixed(digits) : "n/a");
  const clip = (s, n) => (s.length > n ? s.slice(0, n - 1) + "\u2026" : s);
  const slotOf = (name) => document.querySelector('[data-slot="' + name + '"]');

  function svgEl(name, attrs, parent, text) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) node.setAttribute(k, String(v));
    }
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }
  function htmlEl(name, cls, text) {
    const node = document.createElement(name);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function titled(node, text) { svgEl("title", {}, node, text); return node; }
  function linear(d0, d1, r0, r1) {
    const span = d1 - d0 || 1;
    return (v) => r0 + ((v - d0) / span) * (r1 - r0);
  }
  function niceTicks(lo, hi, count) {
    const span = hi - lo;
    if (!(span > 0)) return [lo];
    const mag = Math.pow(10, Math.floor(Math.log10(span / count)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || span;
    const out = [];
    for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
    return out;
  }
  const tick = (t) => (Math.abs(t) >= 1e4 ? t.toExponential(1) : String(+t.toPrecision(4)));
  function pathOf(points, x, y) {
    return points.map(([a, b], i) => (i ? "L" : "M") + x(a).toFixed(1) + "," + y(b).toFixed(1)).join(" ");
  }
  function mix(a, b, t) {
    const c = a.map((v, i) => Math.round(v + (b[i] - v) * Math.max(0, Math.min(1, t))));
    return "#" + c.map((v) => v.toString(16).padStart(2, "0")).join("");
  }
  function luminance(hex) {
    const [r, g, b] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16) / 255);
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  }

  function newSvg(slot, plot, width, height, title, desc) {
    slot.replaceChildren();
    const id = "plot-" + ++uid;
    const svg = svgEl("svg", {
      class: "chart", width: Math.ceil(width), height: Math.ceil(height),
      viewBox: "0 0 " + Math.ceil(width) + " " + Math.ceil(height), role: "img",
      "aria-labelledby": id + "-title " + id + "-desc", "data-plot": plot,
    });
    svgEl("title", { id: id + "-title" }, svg, title);
    svgEl("desc", { id: id + "-desc" }, svg, desc);
    slot.appendChild(svg);
    return svg;
  }
  function notAvailable(slot, plot, reason) {
    slot.replaceChildren();
    const note = htmlEl("p", "na", "not available: " + reason);
    note.dataset.plotNa = plot;
    note.setAttribute("role", "note");
    slot.appendChild(note);
    return false;
  }
  // box: x0..x1 left to right, y0 (bottom) .. y1 (top) in pixels.
  function axes(parent, x, y, box, xTicks, yTicks, xLabel, yLabel, xFmt, yFmt) {
    const a = svgEl("g", { class: "axis" }, parent);
    for (const t of yTicks) {
      const py = y(t);
      svgEl("line", { class: "grid", x1: box.x0, x2: box.x1, y1: py, y2: py }, a);
      svgEl("text", { x: box.x0 - 6, y: py + 4, "text-anchor": "end" }, a, yFmt(t));
    }
    svgEl("line", { x1: box.x0, x2: box.x1, y1: box.y0, y2: box.y0 }, a);
    svgEl("line", { x1: box.x0, x2: box.x0, y1: box.y0, y2: box.y1 }, a);
    for (const t of xTicks || []) {
      const px = x(t);
      svgEl("line", { x1: px, x2: px, y1: box.y0, y2: box.y0 + 5 }, a);
      svgEl("text", { x: px, y: box.y0 + 17, "text-anchor": "middle" }, a, xFmt(t));
    }
    if (xLabel) {
      svgEl("text", { class: "label", x: (box.x0 + box.x1) / 2, y: box.y0 + 34, "text-anchor": "middle" }, a,
        xLabel);
    }
    if (yLabel) {
      svgEl("text", { class: "label", "text-anchor": "middle",
        transform: "translate(" + (box.x0 - 40) + " " + (box.y0 + box.y1) / 2 + ") rotate(-90)" }, a, yLabel);
    }
  }

  const report = JSON.parse(document.getElementById("report-data").textContent);
  const entries = report.entries || [];
  const baseline = report.random_baseline;
  const rec = report.recommendation;
  const criteria = report.criteria || {};
  const reasons = report.unavailable_reasons || {};
  const ndrReason = reasons.auc_ndr || reasons.ndr || "the report has no noise-detection entries";
  const SEP = "\u0000";
  const entryKey = (est, agg, kind, name) => [est, agg, kind, name].join(SEP);
  const byKey = new Map(entries.map((e) => [entryKey(e.estimator, e.aggregation, e.layers.kind, e.layers.name), e]));
  const isRec = (e) => !!rec && e.estimator === rec.estimator && e.aggregation === rec.aggregation
    && e.layers.kind === rec.layers.kind && e.layers.name === rec.layers.name;
  // NDR dicts are keyed by the percent as a string ("5", "2.5"): sorted [p, value, key] triples.
  const curve = (ndr) => Object.keys(ndr || {}).map((k) => [parseFloat(k), ndr[k], k])
    .filter(([p, v]) => finite(p) && finite(v)).sort((a, b) => a[0] - b[0]);
  const needed = baseline && finite(criteria.required_auc_gain)
    ? baseline.auc_ndr + criteria.required_auc_gain : null;

  function drawNdrCurves(slot) {
    if (!entries.length || !baseline) return notAvailable(slot, "ndr-curves", ndrReason);
    const estimators = report.estimators.filter((est) => entries.some((e) => e.estimator === est));
    const TOP = 4, PW = 400, PH = 300, LEG = 18 * (TOP + 2) + 8;
    const M = { l: 58, r: 16, t: 28, b: 46 };
    const cols = Math.min(estimators.length, 3), rows = Math.ceil(estimators.length / cols);
    const svg = newSvg(slot, "ndr-curves", cols * PW, rows * (PH + LEG), "Noise detection rate curves",
      "For each estimator: NDR@p, the share of the noisy rows among the p% lowest-scored training rows, for "
      + "its best layer sets (best aggregation each), against a random order (dashed, with a band of two "
      + "standard deviations) and a perfect order (dotted).");
    const noise = report.noise_rate;
    const random = curve(baseline.ndr), std = baseline.ndr_std || {};
    estimators.forEach((est, i) => {
      const g = svgEl("g", { "data-estimator": est,
        transform: "translate(" + (i % cols) * PW + " " + Math.floor(i / cols) * (PH + LEG) + ")" }, svg);
      const best = new Map();
      for (const e of entries) {
        if (e.estimator !== est || !finite(e.auc_ndr)) continue;
        const k = e.layers.kind + SEP + e.layers.name;
        if (!best.has(k) || e.auc_ndr > best.get(k).auc_ndr) best.set(k, e);
      }
      const top = [...best.values()].sort((a, b) => b.auc_ndr - a.auc_ndr).slice(0, TOP);
      const box = { x0: M.l, x1: PW - M.r, y0: PH - M.b, y1: M.t };
      const x = linear(0, 100, box.x0, box.x1), y = linear(0, 1, box.y0, box.y1);
      svgEl("text", { class: "panel-title", x: box.x0, y: 17 }, g, "Estimator: " + est);
      axes(g, x, y, box, niceTicks(0, 100, 5), niceTicks(0, 1, 5), "% of training rows inspected, lowest score first",
        "NDR (share of noisy rows found)", (t) => t + "%", (t) => t.toFixed(1));
      if (random.length) {
        const at = (p, v) => x(p).toFixed(1) + "," + y(Math.max(0, Math.min(1, v))).toFixed(1);
        const up = random.map(([p, v, k]) => at(p, v + 2 * (std[k] || 0)));
        const down = random.map(([p, v, k]) => at(p, v - 2 * (std[k] || 0)));
        titled(svgEl("path", { class: "band", d: "M" + x(0) + "," + y(0) + " L" + up.join(" L") + " L"
          + down.reverse().join(" L") + " Z" }, g), "random order \u00b1 2 standard deviations");
        titled(svgEl("path", { class: "random", d: pathOf([[0, 0], ...random], x, y) }, g),
          "random order: AUC-NDR " + fmt(baseline.auc_ndr));
      }
      if (finite(noise) && noise > 0) {
        titled(svgEl("path", { class: "perfect", d: pathOf([[0, 0], [100 * noise, 1], [100, 1]], x, y) }, g),
          "perfect order: every noisy row first");
      }
      top.forEach((e, j) => {
        const color = PALETTE[j % PALETTE.length];
        const points = [[0, 0], ...curve(e.ndr)];
        const name = e.layers.name + (e.layers.kind === "group" ? " (group)" : "") + " \u00b7 " + e.aggregation;
        titled(svgEl("path", { class: "curve", stroke: color, d: pathOf(points, x, y),
          "data-layers": e.layers.name, "data-aggregation": e.aggregation }, g),
          name + ": AUC-NDR " + fmt(e.auc_ndr));
        for (const [p, v] of points.slice(1)) {
          titled(svgEl("circle", { cx: x(p).toFixed(1), cy: y(v).toFixed(1), r: 2.6, fill: color }, g),
            name + ": NDR@" + p + " = " + fmt(v));
        }
        const ly = PH + 6 + j * 18;
        svgEl("line", { x1: M.l, x2: M.l + 22, y1: ly, y2: ly, stroke: color, "stroke-width": 2.5 }, g);
        titled(svgEl("text", { x: M.l + 28, y: ly + 4 }, g, clip(name, 44) + "  AUC-NDR " + fmt(e.auc_ndr)),
          name);
      });
      const ly = PH + 6 + top.length * 18;
      svgEl("line", { class: "random", x1: M.l, x2: M.l + 22, y1: ly, y2: ly }, g);
      svgEl("text", { x: M.l + 28, y: ly + 4 }, g, "random order  AUC-NDR " + fmt(baseline.auc_ndr));
      svgEl("line", { class: "perfect", x1: M.l, x2: M.l + 22, y1: ly + 18, y2: ly + 18 }, g);
      svgEl("text", { x: M.l + 28, y: ly + 22 }, g, "perfect order");
    });
    return true;
  }

  function drawLayerBars(slot, est, agg) {
    if (!entries.length || !baseline) return notAvailable(slot, "layer-bars", ndrReason);
    const rows = report.layers.map((name) => byKey.get(entryKey(est, agg, "layer", name))).filter(Boolean);
    if (!rows.length) return notAvailable(slot, "layer-bars", "no single-layer entries for " + est + " / " + agg);
    const step = Math.max(14, Math.min(56, Math.floor(960 / rows.length)));
    const longest = Math.max(...rows.map((e) => Math.min(e.layers.name.length, 40)));
    // Labels run down-left at 45 degrees from their bar: the first ones need room on the left too.
    const M = { l: Math.max(62, 12 + longest * 5), r: 120, t: 24, b: 24 + longest * 5 };
    const H = 300 + M.b, W = M.l + rows.length * step + M.r;
    const svg = newSvg(slot, "layer-bars", W, H, "AUC-NDR per layer (" + est + ", " + agg + ")",
      "One bar per single layer: its AUC-NDR with estimator " + est + " and aggregation " + agg + ". The dashed "
      + "line is a random order; the dotted line is what a recommendation needs.");
    const box = { x0: M.l, x1: W - M.r, y0: H - M.b, y1: M.t };
    const values = rows.map((e) => e.auc_ndr).filter(finite);
    const top = Math.max(1, ...values, needed || 0);
    const y = linear(0, top, box.y0, box.y1);
    axes(svg, null, y, box, [], niceTicks(0, top, 5), null, "AUC-NDR", null, tick);
    rows.forEach((e, i) => {
      const v = finite(e.auc_ndr) ? e.auc_ndr : 0;
      const fill = needed !== null && v >= needed ? "#1a7f37" : v > baseline.auc_ndr ? "#54aeff" : "#afb8c1";
      const bx = box.x0 + i * step + step * 0.15;
      titled(svgEl("rect", { class: "bar", x: bx.toFixed(1), y: y(v).toFixed(1), width: (step * 0.7).toFixed(1),
        height: Math.max(0.5, box.y0 - y(v)).toFixed(1), fill, stroke: isRec(e) ? "#000" : "none",
        "data-layer": e.layers.name, "data-value": fmt(e.auc_ndr, 6) }, svg),
        e.layers.name + ": AUC-NDR " + fmt(e.auc_ndr) + " (random " + fmt(baseline.auc_ndr) + ", z = "
        + fmt(e.auc_ndr_z, 1) + ")");
      const cx = bx + step * 0.35;
      titled(svgEl("text", { x: cx.toFixed(1), y: box.y0 + 10, "text-anchor": "end",
        transform: "rotate(-45 " + cx.toFixed(1) + " " + (box.y0 + 10) + ")" }, svg, clip(e.layers.name, 40)),
        e.layers.name);
    });
    const refs = [[baseline.auc_ndr, "#57606a", "6 4", "random " + fmt(baseline.auc_ndr)]];
    if (needed !== null) refs.push([needed, "#1a7f37", "2 3", "needed " + fmt(needed)]);
    for (const [v, color, dash, label] of refs) {
      svgEl("line", { class: "ref", x1: box.x0, x2: box.x1, y1: y(v), y2: y(v), stroke: color,
        "stroke-dasharray": dash }, svg);
      svgEl("text", { x: box.x1 + 6, y: y(v) + 4, fill: color }, svg, label);
    }
    return true;
  }

  function drawHeatmap(slot) {
    if (!entries.length || !baseline) return notAvailable(slot, "heatmap", ndrReason);
    const sets = [], seen = new Set();
    for (const e of entries) {
      const k = e.layers.kind + SEP + e.layers.name;
      if (!seen.has(k)) { seen.add(k); sets.push(e.layers); }
    }
    sets.sort((a, b) => (a.kind === "layer" ? 0 : 1) - (b.kind === "layer" ? 0 : 1));
    const singles = sets.filter((s) => s.kind === "layer").length;
    const cols = [];
    for (const est of report.estimators) {
      for (const agg of report.aggregations) {
        if (entries.some((e) => e.estimator === est && e.aggregation === agg)) cols.push([est, agg]);
      }
    }
    const estimators = [...new Set(cols.map((c) => c[0]))];
    const CW = 46, CH = 18, GAP = 10;
    const labelW = 16 + Math.min(40, Math.max(...sets.map((s) => s.name.length))) * 6.4;
    const M = { l: labelW + 8, t: 56, r: 24, b: 78 };
    const colX = (c) => M.l + c * CW + estimators.indexOf(cols[c][0]) * GAP;
    const rowY = (r) => M.t + r * CH + (r >= singles ? GAP : 0);
    const W = colX(cols.length - 1) + CW + M.r, H = rowY(sets.length - 1) + CH + M.b;
    const svg = newSvg(slot, "heatmap", Math.max(W, M.l + 320), H, "AUC-NDR heat map",
      "AUC-NDR of every layer set (rows: single layers, then groups) for every estimator and aggregation "
      + "(columns). Blue: worse than a random order, white: random, red: better. The recommended cell is "
      + "outlined in black.");
    const values = entries.map((e) => e.auc_ndr).filter(finite);
    const base = baseline.auc_ndr;
    // Symmetric around the random AUC-NDR: equal distances from random get equally strong colours.
    const reach = Math.max(0.05, ...values.map((v) => Math.abs(v - base)));
    const lo = base - reach, hi = base + reach;
    const color = (v) => (v <= base ? mix(MID, LOW, (base - v) / reach) : mix(MID, HIGH, (v - base) / reach));
    estimators.forEach((est) => {
      const first = cols.findIndex((c) => c[0] === est);
      const count = cols.filter((c) => c[0] === est).length;
      svgEl("text", { class: "panel-title", x: colX(first) + (count * CW) / 2, y: 18, "text-anchor": "middle" }, svg,
        est);
    });
    cols.forEach(([, agg], c) => {
      svgEl("text", { x: colX(c) + CW / 2, y: M.t - 8, "text-anchor": "middle" }, svg, agg);
    });
    sets.forEach((s, r) => {
      titled(svgEl("text", { x: M.l - 8, y: rowY(r) + CH / 2 + 4, "text-anchor": "end",
        "font-weight": s.kind === "group" ? 600 : null }, svg, clip(s.name, 40)),
        s.name + (s.kind === "group" ? " (group of " + s.members.length + ")" : ""));
      cols.forEach(([est, agg], c) => {
        const e = byKey.get(entryKey(est, agg, s.kind, s.name));
        const v = e && finite(e.auc_ndr) ? e.auc_ndr : null;
        const fill = v === null ? "#ffffff" : color(v);
        titled(svgEl("rect", { class: "cell", x: colX(c), y: rowY(r), width: CW - 1, height: CH - 1, fill,
          stroke: e && isRec(e) ? "#000" : "none", "stroke-width": 2, "data-layers": s.name,
          "data-estimator": est, "data-aggregation": agg, "data-value": v === null ? "" : fmt(v, 6) }, svg),
          s.name + " \u00b7 " + est + " \u00b7 " + agg + ": AUC-NDR " + fmt(v));
        svgEl("text", { x: colX(c) + CW / 2, y: rowY(r) + CH / 2 + 3.5, "text-anchor": "middle",
          "font-size": 10, fill: v !== null && luminance(fill) < 0.45 ? "#fff" : "#1f2328" }, svg, fmt(v, 2));
      });
    });
    // Legend: the same piecewise-linear scale sampled into gradient stops.
    const gradId = "heat-grad-" + ++uid, LW = 300, lx = M.l, ly = H - 46;
    const grad = svgEl("linearGradient", { id: gradId, x1: 0, x2: 1, y1: 0, y2: 0 }, svgEl("defs", {}, svg));
    for (let s = 0; s <= 20; s++) {
      svgEl("stop", { offset: s / 20, "stop-color": color(lo + ((hi - lo) * s) / 20) }, grad);
    }
    svgEl("rect", { class: "legend-bar", x: lx, y: ly, width: LW, height: 12, fill: "url(#" + gradId + ")",
      stroke: "#8c959f" }, svg);
    const lxs = linear(lo, hi, lx, lx + LW);
    for (const [v, label] of [[lo, fmt(lo, 2)], [base, "random " + fmt(base, 3)], [hi, fmt(hi, 2)]]) {
      svgEl("line", { x1: lxs(v), x2: lxs(v), y1: ly - 3, y2: ly + 16, stroke: "#1f2328" }, svg);
      svgEl("text", { x: lxs(v), y: ly + 28, "text-anchor": "middle" }, svg, label);
    }
    svgEl("text", { class: "label", x: lx + LW + 12, y: ly + 10 }, svg, "AUC-NDR");
    return true;
  }

  function drawCancellation(slot) {
    const c = report.cancellation;
    if (!c || !(c.layers || []).length) {
      return notAvailable(slot, "cancellation", "no cancellation was computed for this report");
    }
    const rows = c.layers;
    const step = Math.max(14, Math.min(56, Math.floor(960 / rows.length)));
    const longest = Math.max(...rows.map((r) => Math.min(r.layer.length, 40)));
    const M = { l: Math.max(66, 12 + longest * 5), r: 24, t: 30, b: 24 + longest * 5 };
    const PH = 230 + M.b, W = M.l + rows.length * step + M.r;
    const svg = newSvg(slot, "cancellation", W, 2 * PH, "Cancellation per layer",
      "Two bar charts: L1/L1 cancellation (sum over rows of |g| divided by |sum over rows of g|) and L1/L2 "
      + "cancellation per layer. Higher means per-row gradients cancel more; n/a marks a zero gradient sum.");
    const panels = [
      ["l1_over_l1", "L1 / L1 cancellation", "#8250df"],
      ["l1_over_l2", "L1 / L2 cancellation", "#bf8700"],
    ];
    panels.forEach(([field, title, fill], p) => {
      const g = svgEl("g", { transform: "translate(0 " + p * PH + ")", "data-metric": field }, svg);
      const box = { x0: M.l, x1: W - M.r, y0: PH - M.b, y1: M.t };
      const values = rows.map((r) => r[field]).filter(finite);
      const top = Math.max(1e-12, ...values) * 1.05;
      const y = linear(0, top, box.y0, box.y1);
      svgEl("text", { class: "panel-title", x: box.x0, y: 18 }, g, title);
      axes(g, null, y, box, [], niceTicks(0, top, 4), null, field === "l1_over_l1" ? "L1/L1" : "L1/L2", null,
        tick);
      rows.forEach((r, i) => {
        const bx = box.x0 + i * step + step * 0.15, cx = bx + step * 0.35;
        const v = r[field];
        if (finite(v)) {
          titled(svgEl("rect", { class: "bar", x: bx.toFixed(1), y: y(v).toFixed(1), width: (step * 0.7).toFixed(1),
            height: Math.max(0.5, box.y0 - y(v)).toFixed(1), fill, "data-layer": r.layer,
            "data-value": fmt(v, 6) }, g), r.layer + ": " + title + " " + fmt(v) + " over " + r.num_samples + " rows");
        } else {
          titled(svgEl("text", { x: cx.toFixed(1), y: box.y0 - 4, "text-anchor": "middle", fill: "#cf222e" }, g,
            "n/a"), r.layer + ": not finite (the gradients sum to zero)");
        }
        titled(svgEl("text", { x: cx.toFixed(1), y: box.y0 + 10, "text-anchor": "end",
          transform: "rotate(-45 " + cx.toFixed(1) + " " + (box.y0 + 10) + ")" }, g, clip(r.layer, 40)), r.layer);
      });
    });
    return true;
  }

  function attempt(name, draw) {
    const slot = slotOf(name);
    if (!slot) return;
    try {
      if (draw(slot)) drawn += 1;
    } catch (err) {
      const message = name + ": " + (err && err.message ? err.message : String(err));
      errors.push(message);
      slot.replaceChildren(htmlEl("p", "error", "could not draw this plot: " + message));
    }
  }

  const estimatorSelect = document.getElementById("bars-estimator");
  const aggregationSelect = document.getElementById("bars-aggregation");
  const drawBars = (slot) => drawLayerBars(slot, estimatorSelect ? estimatorSelect.value : "",
    aggregationSelect ? aggregationSelect.value : "");
  attempt("ndr-curves", drawNdrCurves);
  attempt("layer-bars", drawBars);
  attempt("heatmap", drawHeatmap);
  attempt("cancellation", drawCancellation);
  for (const select of [estimatorSelect, aggregationSelect]) {
    if (select) select.addEventListener("change", () => attempt("layer-bars", drawBars));
  }
  if (errors.length) body.dataset.plotError = errors.join("; ");
  else body.dataset.plotsDrawn = String(drawn);
})();
"""

# Only this exact script may run (and nothing may be fetched): the hash pins it, so markup that slipped
# through escaping could still not execute. The API may send the same policy as a header.
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode("ascii")
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src 'sha256-{_SCRIPT_HASH}'; style-src 'unsafe-inline'; "
    "img-src data:; base-uri 'none'; form-action 'none'"
)
# The page as the API serves it: the same policy as a response header, where browsers also honour
# frame-ancestors (a meta tag cannot forbid framing).
CONTENT_SECURITY_POLICY_HEADER = f"{CONTENT_SECURITY_POLICY}; frame-ancestors 'none'"


# ------------------------------------------------------------------------------------------- helpers


def _e(value: Any) -> str:
    """HTML-escaped text of any value (quotes too: safe inside attributes)."""
    return html.escape(str(value), quote=True)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "—"


def _signed(value: Any, digits: int = 3) -> str:
    return f"{value:+.{digits}f}" if _finite(value) else "—"


def _pct(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}%}" if _finite(value) else "—"


def _general(value: Any) -> str:
    """A compact number whatever its magnitude (scores can be 1e-6 or 1e4)."""
    return f"{value:.4g}" if _finite(value) else "—"


def _clean(value: Any) -> Any:
    """A copy that strict JSON accepts: non-finite numbers become null."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _embedded_json(report: Mapping[str, Any]) -> str:
    """The report as JSON that cannot end its <script> element early: <, > and & as \\u escapes (still JSON)."""
    text = json.dumps(_clean(report), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        text = text.replace(char, escape)
    # U+2028 / U+2029 are legal in JSON but were line breaks in older JavaScript parsers.
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _table(headers: Sequence[tuple[str, str]], rows: Sequence[str], cls: str = "") -> str:
    """A table from (label, css class) headers and pre-rendered <tr> rows, in a horizontal scroller."""
    head = "".join(f'<th scope="col" class="{c}">{_e(label)}</th>' for label, c in headers)
    attr = f' class="{cls}"' if cls else ""
    return (
        f'<div class="scroll"><table{attr}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _td(value: str, cls: str = "") -> str:
    """A cell of already-escaped content."""
    return f'<td class="{cls}">{value}</td>' if cls else f"<td>{value}</td>"


def _layers_text(layers: Mapping[str, Any] | None) -> str:
    if not layers:
        return "—"
    name, kind, members = layers.get("name", ""), layers.get("kind", ""), layers.get("members") or []
    if kind == "group":
        shown = ", ".join(str(m) for m in members[:8]) + (
            f", … ({len(members)} in all)" if len(members) > 8 else ""
        )
        return f"<strong>{_e(name)}</strong> (group: {_e(shown)})"
    return f"<strong>{_e(name)}</strong> (single layer)"


def _ndr_percents(ndr: Mapping[str, Any], wanted: Sequence[str] = ("10", "20", "30")) -> list[str]:
    """The NDR@p columns to show: 10/20/30 where present (30 is the paper's headline), else the first three."""
    keys = [k for k in wanted if k in ndr]
    if keys:
        return keys
    return sorted(ndr, key=lambda k: float(k))[:3]


def _default_view(report: Mapping[str, Any]) -> tuple[str, str]:
    """The estimator / aggregation the per-layer bars show first: the recommended one, else rank-c or rank."""
    estimators = list(report.get("estimators") or [])
    aggregations = list(report.get("aggregations") or [])
    rec = report.get("recommendation")
    if rec:
        return rec["estimator"], rec["aggregation"]
    aggregation = next(
        (a for a in ("rank-c", "rank") if a in aggregations), aggregations[0] if aggregations else ""
    )
    return (estimators[0] if estimators else ""), aggregation


# -------------------------------------------------------------------------------------------- sections


def _header(report: Mapping[str, Any], title: str, context: Mapping[str, Any]) -> str:
    facts = []
    shown = set()
    for key, label in _CONTEXT_LABELS:
        value = context.get(key)
        if value is None or value == "" or label in shown:
            continue
        shown.add(label)
        facts.append((label, value))
    known = {k for k, _ in _CONTEXT_LABELS} | {"rows"}
    facts += [
        (k.replace("_", " ").capitalize(), v)
        for k, v in context.items()
        if k not in known and isinstance(v, str | int | float | bool)
    ]
    if "Reference rows" not in shown and report.get("n_reference") is not None:
        facts.append(("Reference rows", report["n_reference"]))
    dl = "".join(f"<dt>{_e(label)}</dt><dd>{_e(value)}</dd>" for label, value in facts)
    return (
        f'<header><h1>{_e(title)}</h1><p class="subtitle">Layer report: which layers, aggregation and '
        f'estimator find the noisy training rows.</p><dl class="facts">{dl}</dl></header>'
    )


def _summary_cards(report: Mapping[str, Any]) -> str:
    criteria = report.get("criteria") or {}
    accuracy, chance = report.get("reference_accuracy"), criteria.get("chance_accuracy")
    threshold = criteria.get("accuracy_threshold")
    near = report.get("near_chance")
    if near is True:
        badge = '<span class="badge bad">near chance</span>'
    elif near is False:
        badge = '<span class="badge good">above chance</span>'
    else:
        badge = '<span class="badge">unknown</span>'
    correct = report.get("reference_correct_count")
    counted = f"{_e(correct)} of {_e(report.get('n_reference'))} correct. " if correct is not None else ""
    meter = ""
    if _finite(accuracy):
        marks = "".join(
            f'<div class="mark {label}" style="left:{100 * v:.2f}%"><span>{_e(label)} {_pct(v)}</span></div>'
            for v, label in ((chance, "chance"), (threshold, "needed"))
            if _finite(v)
        )
        meter = (
            f'<div class="meter{" poor" if near else ""}" role="img" aria-label="accuracy {_pct(accuracy)}, chance '
            f'{_pct(chance)}, needed {_pct(threshold)}"><div class="fill" style="width:{100 * accuracy:.2f}%">'
            f"</div>{marks}</div>"
        )
    accuracy_card = (
        f'<div class="card"><div class="small">Accuracy on the reference set {badge}</div>'
        f'<div class="big">{_pct(accuracy)}</div>{meter}<div class="small">{counted}Guessing gets '
        f"{_pct(chance)} ({_e(report.get('num_classes'))} classes); at least {_pct(threshold)} on "
        f"{_e(report.get('n_reference'))} rows counts as having learned the task.</div></div>"
    )
    n_noisy, rate = report.get("n_noisy"), report.get("noise_rate")
    noisy = f"{_e(n_noisy)} noisy ({_pct(rate)})" if n_noisy is not None else "noisy rows unknown (no mask)"
    train_card = (
        f'<div class="card"><div class="small">Training rows</div><div class="big">{_e(report.get("n_train"))}'
        f'</div><div class="small">{noisy}</div></div>'
    )
    baseline = report.get("random_baseline")
    random_card = ""
    if baseline:
        random_card = (
            '<div class="card"><div class="small">AUC-NDR of a random order</div>'
            f'<div class="big">{_num(baseline.get("auc_ndr"))}</div><div class="small">± '
            f"{_num(baseline.get('auc_ndr_std'))} (one standard deviation); a recommendation needs "
            f"{_signed(criteria.get('required_auc_gain'))} above it</div></div>"
        )
    setup = (
        '<div class="card"><div class="small">Compared</div>'
        f'<div class="big">{len(report.get("layers") or [])} layers</div><div class="small">'
        f"{len(report.get('groups') or {})} groups; estimators: {_e(', '.join(report.get('estimators') or []))};"
        f" aggregations: {_e(', '.join(report.get('aggregations') or []))}; vote k = "
        f"{_e(report.get('vote_k'))}</div></div>"
    )
    return f'<section class="cards" aria-label="Summary">{accuracy_card}{train_card}{random_card}{setup}</section>'


def _warnings(report: Mapping[str, Any]) -> str:
    warnings = report.get("warnings") or []
    if not warnings:
        return ""
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    return f'<section class="box warnings" role="alert"><h2>Warnings</h2><ul>{items}</ul></section>'


def _recommendation(report: Mapping[str, Any]) -> str:
    rec = report.get("recommendation")
    if not rec:
        reasons = report.get("unavailable_reasons") or {}
        if "recommendation" in reasons:
            why = f"The recommendation could not be computed: {_e(reasons['recommendation'])}."
        elif report.get("warnings"):
            why = "See the warnings above."
        else:
            why = "No entry cleared the margins below."
        return (
            '<section class="box recommendation none" id="recommendation"><h2>Recommendation</h2>'
            f"<p><strong>No layers are recommended.</strong> {why}</p></section>"
        )
    ndr = rec.get("ndr") or {}
    ndr_text = ", ".join(f"NDR@{_e(p)} {_num(ndr[p])}" for p in _ndr_percents(ndr))
    baseline = report.get("random_baseline") or {}
    parts = [
        f"<p>Use {_layers_text(rec.get('layers'))} with the <strong>{_e(rec.get('estimator'))}</strong> estimator "
        f"and <strong>{_e(rec.get('aggregation'))}</strong> aggregation.</p>",
        f"<p>AUC-NDR <strong>{_num(rec.get('auc_ndr'))}</strong> against {_num(baseline.get('auc_ndr'))} for a "
        f"random order: {_signed(rec.get('auc_ndr_gain'))} (a recommendation needs "
        f"{_signed(rec.get('required_gain'))}; z = {_num(rec.get('auc_ndr_z'), 1)}). {ndr_text}.</p>",
    ]
    fidelity = _fidelity_of(report)
    if fidelity is not None and _finite(rec.get("fidelity_min")):
        low = rec["fidelity_min"] < fidelity[0]
        marked = ' class="fidelity-warning"' if low else ""
        parts.append(
            f"<p{marked}>Projection fidelity of its units: lowest "
            f"{_fidelity_bar(rec['fidelity_min'], fidelity[0])}, mean {_num(rec.get('fidelity_mean'), 2)}"
            + (
                f" <strong>(below {_e(f'{fidelity[0]:g}')}: its AUC-NDR is uncertain; see the warnings)</strong>"
                if low
                else ""
            )
            + ".</p>"
        )
    single = rec.get("best_single_layer")
    if single:
        parts.append(
            f"<p>Best single layer: <strong>{_e(single.get('layers'))}</strong> ({_e(single.get('estimator'))}, "
            f"{_e(single.get('aggregation'))}): AUC-NDR {_num(single.get('auc_ndr'))}.</p>"
        )
    runners = rec.get("runners_up") or []
    if runners:
        rows = [
            "<tr>"
            + _td(_e(r.get("layers")))
            + _td(_e(r.get("kind")))
            + _td(_e(r.get("estimator")))
            + _td(_e(r.get("aggregation")))
            + _td(_num(r.get("auc_ndr")), "num")
            + "</tr>"
            for r in runners
        ]
        parts.append("<h3>Runners-up</h3>")
        parts.append(
            _table(
                [("Layer set", ""), ("Kind", ""), ("Estimator", ""), ("Aggregation", ""), ("AUC-NDR", "num")],
                rows,
            )
        )
    return (
        '<section class="box recommendation" id="recommendation"><h2>Recommendation</h2>'
        f"{''.join(parts)}</section>"
    )


def _criteria(report: Mapping[str, Any]) -> str:
    c = report.get("criteria") or {}
    if not c:
        return ""
    facts = [
        ("Candidates compared", _e(c.get("num_candidates"))),
        ("Significance level", _e(c.get("alpha"))),
        ("One-sided Bonferroni z", _num(c.get("z_critical"), 2)),
        ("Minimum AUC-NDR gain", _num(c.get("min_auc_gain"))),
        ("Required AUC-NDR gain", _num(c.get("required_auc_gain"))),
        ("Chance accuracy", _pct(c.get("chance_accuracy"))),
        ("Accuracy needed", _pct(c.get("accuracy_threshold"))),
    ]
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in facts)
    return (
        f"<details><summary>How the recommendation is decided</summary><p>{_e(c.get('explanation', ''))}</p>"
        f'<dl class="facts">{dl}</dl></details>'
    )


def _unavailable(report: Mapping[str, Any]) -> str:
    names = list(report.get("unavailable") or [])
    reasons = report.get("unavailable_reasons") or {}
    names += [n for n in reasons if n not in names]
    if not names:
        return '<section id="unavailable"><h2>Metrics not computed</h2><p>Every metric could be computed.</p></section>'
    rows = [f"<tr>{_td(f'<code>{_e(n)}</code>')}{_td(_e(reasons.get(n, 'not given')))}</tr>" for n in names]
    return (
        '<section id="unavailable"><h2>Metrics not computed</h2>'
        f"{_table([('Metric', ''), ('Why not', '')], rows, 'unavailable')}</section>"
    )


def _plots(report: Mapping[str, Any]) -> str:
    estimator, aggregation = _default_view(report)
    entries = report.get("entries") or []
    controls = ""
    if entries:
        estimators = [e for e in report.get("estimators") or [] if any(x["estimator"] == e for x in entries)]
        aggregations = [
            a for a in report.get("aggregations") or [] if any(x["aggregation"] == a for x in entries)
        ]

        def options(values: Sequence[str], chosen: str) -> str:
            return "".join(
                f'<option value="{_e(v)}"{" selected" if v == chosen else ""}>{_e(v)}</option>'
                for v in values
            )

        controls = (
            '<div class="controls"><label for="bars-estimator">Estimator</label>'
            f'<select id="bars-estimator">{options(estimators, estimator)}</select>'
            '<label for="bars-aggregation">Aggregation</label>'
            f'<select id="bars-aggregation">{options(aggregations, aggregation)}</select></div>'
        )
    placeholder = (
        '<p class="na">This plot is drawn by the page\'s script; the tables below carry the same numbers.</p>'
    )
    figures = [
        (
            "ndr-curves",
            "Noise detection rate (NDR@p) against the share p of training rows inspected, lowest scores first, "
            "for the best layer sets of each estimator.",
            "",
        ),
        (
            "layer-bars",
            "AUC-NDR of each single layer for the chosen estimator and aggregation; dashed: a random order, "
            "dotted: what a recommendation needs. Green bars clear it.",
            controls,
        ),
        (
            "heatmap",
            "AUC-NDR of every layer set (single layers, then groups) for every estimator and aggregation.",
            "",
        ),
        (
            "cancellation",
            "Cancellation per layer (method.md §5): large values mean per-row gradients cancel. "
            "Low cancellation does not by itself make a layer better for influence.",
            "",
        ),
    ]
    body = "".join(
        f'<figure id="figure-{name}"><figcaption>{_e(caption)}</figcaption>{extra}'
        f'<div class="slot" data-slot="{name}">{placeholder}</div></figure>'
        for name, caption, extra in figures
    )
    return f'<section id="plots"><h2>Plots</h2>{body}</section>'


def _sort_entries(entries: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Best AUC-NDR first, smaller layer sets first on ties (as the recommendation orders them)."""
    return sorted(
        entries,
        key=lambda e: (
            -(e["auc_ndr"] if _finite(e.get("auc_ndr")) else -math.inf),
            len(e["layers"].get("members") or []),
        ),
    )


def _is_recommended(entry: Mapping[str, Any], rec: Mapping[str, Any] | None) -> bool:
    return bool(rec) and (
        entry["estimator"],
        entry["aggregation"],
        entry["layers"].get("kind"),
        entry["layers"].get("name"),
    ) == (rec["estimator"], rec["aggregation"], rec["layers"].get("kind"), rec["layers"].get("name"))


def _top_entries(report: Mapping[str, Any]) -> str:
    entries = report.get("entries") or []
    if not entries:
        reasons = report.get("unavailable_reasons") or {}
        why = reasons.get("auc_ndr") or reasons.get("ndr") or "the report has no entries"
        return f'<section id="entries"><h2>Top entries</h2><p>No entries: {_e(why)}.</p></section>'
    rec = report.get("recommendation")
    percents = _ndr_percents(entries[0].get("ndr") or {})
    ranked = _sort_entries(entries)
    fidelity = _fidelity_of(report)
    rows = []
    for position, entry in enumerate(ranked[:TOP_ENTRIES], start=1):
        layers = entry["layers"]
        ndr = entry.get("ndr") or {}
        low = fidelity is not None and _finite(entry.get("fidelity_min")) and entry["fidelity_min"] < fidelity[0]
        classes = " ".join(c for c, on in (("rec", _is_recommended(entry, rec)), ("low-fidelity", low)) if on)
        cls = f' class="{classes}"' if classes else ""
        rows.append(
            f"<tr{cls}>"
            + _td(str(position), "num")
            + _td(_e(layers.get("name")))
            + _td(_e(layers.get("kind")))
            + _td(str(len(layers.get("members") or [])), "num")
            + _td(_e(entry.get("estimator")))
            + _td(_e(entry.get("aggregation")))
            + _td(_num(entry.get("auc_ndr")), "num")
            + _td(_num(entry.get("random_auc_ndr")), "num")
            + _td(_signed(entry.get("auc_ndr_gain")), "num")
            + _td(_num(entry.get("auc_ndr_z"), 1), "num")
            + "".join(_td(_num(ndr.get(p)), "num") for p in percents)
            + (_td(_fidelity_bar(entry.get("fidelity_min"), fidelity[0]), "num") if fidelity is not None else "")
            + "</tr>"
        )
    headers = [
        ("#", "num"),
        ("Layer set", ""),
        ("Kind", ""),
        ("Layers", "num"),
        ("Estimator", ""),
        ("Aggregation", ""),
        ("AUC-NDR", "num"),
        ("Random", "num"),
        ("Gain", "num"),
        ("z", "num"),
        *[(f"NDR@{p}", "num") for p in percents],
        *([("Fidelity (min)", "num")] if fidelity is not None else []),
    ]
    return (
        f'<section id="entries"><h2>Top entries</h2><p>The {min(TOP_ENTRIES, len(entries))} best of '
        f"{len(entries)} (estimator, aggregation, layer set) entries by AUC-NDR; the recommended one is "
        "highlighted"
        + (
            "; Fidelity (min) is the lowest projection fidelity among the entry's units (rows below the "
            "threshold are marked: their AUC-NDR is uncertain)"
            if fidelity is not None
            else ""
        )
        + f".</p>{_table(headers, rows, 'entries')}{_matrix(report)}</section>"
    )


def _matrix(report: Mapping[str, Any]) -> str:
    """Every AUC-NDR value (the heat map's numbers) as a table, collapsed."""
    entries = report.get("entries") or []
    cols = []
    for est in report.get("estimators") or []:
        for agg in report.get("aggregations") or []:
            if any(e["estimator"] == est and e["aggregation"] == agg for e in entries):
                cols.append((est, agg))
    by_key: dict[tuple[str, str, str, str], Any] = {
        (e["estimator"], e["aggregation"], e["layers"]["kind"], e["layers"]["name"]): e.get("auc_ndr")
        for e in entries
    }
    sets: list[tuple[str, str]] = []
    for e in entries:
        key = (e["layers"]["kind"], e["layers"]["name"])
        if key not in sets:
            sets.append(key)
    sets.sort(key=lambda s: s[0] != "layer")
    rows = [
        "<tr>"
        + _td(_e(name) if kind == "layer" else f"<strong>{_e(name)}</strong>")
        + "".join(_td(_num(by_key.get((est, agg, kind, name))), "num") for est, agg in cols)
        + "</tr>"
        for kind, name in sets
    ]
    headers = [("Layer set", ""), *[(f"{est} · {agg}", "num") for est, agg in cols]]
    return (
        "<details><summary>All AUC-NDR values (the heat map's numbers; groups in bold)</summary>"
        f"{_table(headers, rows, 'matrix')}</details>"
    )


def _fidelity_of(report: Mapping[str, Any]) -> tuple[float, Mapping[str, Any]] | None:
    """(threshold, {unit: Spearman}) when the report was given the index's projection fidelity, else None."""
    fidelity = report.get("fidelity")
    if not isinstance(fidelity, Mapping) or not _finite(fidelity.get("threshold")):
        return None
    return float(fidelity["threshold"]), fidelity.get("units") or {}


def _fidelity_bar(value: Any, threshold: float) -> str:
    """A small bar (0 to 1) and the number; red below the threshold."""
    if not _finite(value):
        return "—"
    low = value < threshold
    width = 100 * max(0.0, min(1.0, float(value)))
    return (
        f'<span class="fbar{" low" if low else ""}" aria-hidden="true"><span style="width:{width:.0f}%"></span>'
        f"</span>{_num(value, 2)}"
    )


# Units listed in the fidelity table, lowest first.
FIDELITY_ROWS = 15


def _fidelity(report: Mapping[str, Any]) -> str:
    """The projection's fidelity per unit (lowest first) and a warning line when entries use a unit below the
    threshold; nothing when the report was not given fidelity (the warnings say why)."""
    found = _fidelity_of(report)
    if found is None:
        return ""
    threshold, units = found
    known = sorted(((v, str(n)) for n, v in units.items() if _finite(v)), key=lambda item: item[0])
    entries = report.get("entries") or []
    low_entries = [e for e in entries if _finite(e.get("fidelity_min")) and e["fidelity_min"] < threshold]
    parts = [
        '<section id="fidelity"><h2>Projection fidelity</h2><p>How well each layer unit\'s stored (projected) '
        "features keep its exact gradient scores, measured when the index was built: the Spearman correlation "
        f"of projected against exact scores. Below {_e(f'{threshold:g}')} a unit ranks rows unlike its exact "
        "gradients, and what is compared with it is uncertain.</p>"
    ]
    if low_entries and known and known[0][0] < threshold:
        value, name = known[0]
        parts.append(
            '<p class="box warnings fidelity-warning">'
            f"<strong>{len(low_entries)} of the {len(entries)} entries compared use a layer unit below "
            f"{_e(f'{threshold:g}')}: their AUC-NDR is uncertain.</strong> Unit <code>{_e(name)}</code>'s "
            f"projected scores agree with its exact ones at Spearman {_num(value, 2)}; rebuild the index with an "
            "exact projection for it (projection.units {unit: {kind: identity}}, or tokens for an embedding).</p>"
        )
    rows = [
        ('<tr class="low-fidelity">' if value < threshold else "<tr>")
        + _td(f"<code>{_e(name)}</code>")
        + _td(_fidelity_bar(value, threshold), "num")
        + "</tr>"
        for value, name in known[:FIDELITY_ROWS]
    ]
    unknown = [str(n) for n, v in units.items() if not _finite(v)]
    if rows:
        parts.append(_table([("Layer unit (lowest first)", ""), ("Spearman", "num")], rows, "fidelity"))
    if len(known) > FIDELITY_ROWS:
        parts.append(f"<p>… and {len(known) - FIDELITY_ROWS} more units, the lowest shown first.</p>")
    if unknown:
        counted = f"{len(unknown)} unit{'s' if len(unknown) > 1 else ''}"
        parts.append(f"<p>Not measured for {counted} ({_e(', '.join(unknown[:5]))}).</p>")
    parts.append("</section>")
    return "".join(parts)


def _cancellation(report: Mapping[str, Any]) -> str:
    c = report.get("cancellation")
    if not c:
        return (
            '<section id="cancellation"><h2>Cancellation</h2><p>No cancellation was computed.</p></section>'
        )
    layer_rows = [
        "<tr>"
        + _td(_e(r.get("layer")))
        + _td(_general(r.get("l1_over_l1")), "num")
        + _td(_general(r.get("l1_over_l2")), "num")
        + _td(_e(r.get("num_samples")), "num")
        + "</tr>"
        for r in c.get("layers") or []
    ]
    group_rows = [
        "<tr>"
        + _td(_e(g.get("group")))
        + _td(f"{_e(g.get('members_used'))} of {len(g.get('members') or [])}", "num")
        + _td(_general(g.get("l1_over_l1")), "num")
        + _td(_general(g.get("l1_over_l2")), "num")
        + "</tr>"
        for g in c.get("groups") or []
    ]
    corr_rows = [
        "<tr>"
        + _td(_e(r.get("estimator")))
        + _td(_e(r.get("aggregation")))
        + _td(_num(r.get("spearman")), "num")
        + _td(_e(r.get("layers")), "num")
        + "</tr>"
        for r in c.get("correlation_with_auc_ndr") or []
    ]
    parts = [
        '<section id="cancellation"><h2>Cancellation</h2>',
        f"<p>{_e(c.get('note', ''))}</p>",
        _table([("Layer", ""), ("L1/L1", "num"), ("L1/L2", "num"), ("Rows", "num")], layer_rows),
    ]
    if group_rows:
        parts.append("<h3>Groups</h3>")
        parts.append(
            _table([("Group", ""), ("Layers used", "num"), ("L1/L1", "num"), ("L1/L2", "num")], group_rows)
        )
    if corr_rows:
        parts.append(
            "<h3>Spearman correlation of L1/L1 cancellation with AUC-NDR across single layers</h3>"
            "<p>Negative: layers with less cancellation detect noise better (Yeh et al.'s premise).</p>"
        )
        parts.append(
            _table(
                [("Estimator", ""), ("Aggregation", ""), ("Spearman", "num"), ("Layers", "num")], corr_rows
            )
        )
    parts.append("</section>")
    return "".join(parts)


def _distributions(report: Mapping[str, Any]) -> str:
    dists = report.get("distributions") or []
    if not dists:
        return '<section id="distributions"><h2>Score distributions</h2><p>None recorded.</p></section>'
    quantiles: list[str] = []
    for d in dists:
        for q in d.get("quantiles") or {}:
            if q not in quantiles:
                quantiles.append(q)
    quantiles.sort(key=float)

    def label(q: str) -> str:
        value = float(q)
        return {0.0: "min", 0.5: "median", 1.0: "max"}.get(value, f"{100 * value:g}%")

    with_mask = any(d.get("noisy_mean") is not None for d in dists)
    rows = []
    for d in dists:
        qs = d.get("quantiles") or {}
        cells = [
            _td(_e(d.get("estimator"))),
            _td(_e(d.get("layer"))),
            *[_td(_general(qs.get(q)), "num") for q in quantiles],
            _td(_general(d.get("mean")), "num"),
            _td(_general(d.get("std")), "num"),
            _td(_pct(d.get("share_negative")), "num"),
        ]
        if with_mask:
            cells += [_td(_general(d.get("noisy_mean")), "num"), _td(_general(d.get("clean_mean")), "num")]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    headers = [
        ("Estimator", ""),
        ("Layer", ""),
        *[(label(q), "num") for q in quantiles],
        ("Mean", "num"),
        ("Std", "num"),
        ("Negative", "num"),
        *([("Noisy mean", "num"), ("Clean mean", "num")] if with_mask else []),
    ]
    return (
        '<section id="distributions"><h2>Score distributions</h2><p>Per layer and estimator, over every '
        "(training row, reference row) score. Positive scores help the reference prediction; noisy rows "
        "should score lower than clean ones.</p><details open><summary>"
        f"{len(dists)} distributions</summary>{_table(headers, rows, 'distributions')}</details></section>"
    )


def _row_info(row: Mapping[str, Any], texts: Mapping[str, Any]) -> tuple[str, str]:
    """(text, label) of a detrimental row: from the row itself, else from context["rows"][row_id]."""
    info: Any = {k: row[k] for k in ("text", "text_pair", "label") if row.get(k) is not None}
    if "text" not in info:
        found = texts.get(str(row.get("row_id")))
        if isinstance(found, Mapping):
            info = {**found, **info}
        elif found is not None:
            info["text"] = found
    text = str(info.get("text") or "")
    if info.get("text_pair"):
        text = f"{text} ‖ {info['text_pair']}"
    if len(text) > MAX_TEXT_CHARS:
        text = text[: MAX_TEXT_CHARS - 1] + "…"
    label = info.get("label")
    return text, "" if label is None else str(label)


def _detrimental(report: Mapping[str, Any], context: Mapping[str, Any]) -> str:
    rows = report.get("detrimental") or []
    if not rows:
        return '<section id="detrimental"><h2>Most detrimental rows</h2><p>None recorded.</p></section>'
    raw = context.get("rows") or {}
    texts = {str(k): v for k, v in raw.items()} if isinstance(raw, Mapping) else {}
    estimators: list[str] = []
    for r in rows:
        if r.get("estimator") not in estimators:
            estimators.append(r.get("estimator"))
    rec = report.get("recommendation")
    first = rec["estimator"] if rec and rec.get("estimator") in estimators else estimators[0]
    estimators.sort(key=lambda e: e != first)
    parts = [
        '<section id="detrimental"><h2>Most detrimental rows</h2><p>Training rows with the lowest rank '
        "aggregate over all layers (most harmful first), per estimator.</p>"
    ]
    for index, est in enumerate(estimators):
        table_rows = []
        for position, r in enumerate((r for r in rows if r.get("estimator") == est), start=1):
            text, label = _row_info(r, texts)
            noisy = r.get("noisy")
            table_rows.append(
                "<tr>"
                + _td(str(position), "num")
                + _td(_e(r.get("row_id")), "num")
                + _td("yes" if noisy is True else "no" if noisy is False else "—")
                + _td(_general(r.get("score")), "num")
                + _td(_e(label))
                + _td(_e(text) if text else "—", "text")
                + "</tr>"
            )
        found = sum(1 for r in rows if r.get("estimator") == est and r.get("noisy") is True)
        known = any(r.get("noisy") is not None for r in rows if r.get("estimator") == est)
        share = f" — {found} of {len(table_rows)} are noisy" if known else ""
        table = _table(
            [("#", "num"), ("Row", "num"), ("Noisy", ""), ("Score", "num"), ("Label", ""), ("Text", "")],
            table_rows,
            "detrimental",
        )
        opened = " open" if index == 0 else ""
        parts.append(f"<details{opened}><summary>{_e(est)}{_e(share)}</summary>{table}</details>")
    parts.append("</section>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ page


def render_report_html(
    report: Mapping[str, Any], *, title: str, context: Mapping[str, Any] | None = None
) -> str:
    """A self-contained HTML5 page of a layer report (`LayerReport.to_dict()` after a JSON round trip).

    context: what the report was made from, shown in the header: `report_id`, `index_id`, `model`,
    `dataset`, `reference_size`, `created` (other scalar keys are shown as they are), and `rows`: row id ->
    text or {text, text_pair, label}, for the texts of the most detrimental rows. Everything is escaped.
    """
    context = dict(context or {})
    sections = [
        _header(report, title, context),
        _summary_cards(report),
        _warnings(report),
        _recommendation(report),
        _criteria(report),
        _unavailable(report),
        _fidelity(report),
        _plots(report),
        _top_entries(report),
        _cancellation(report),
        _distributions(report),
        _detrimental(report, context),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CONTENT_SECURITY_POLICY)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body><main>{''.join(sections)}"
        "<footer>Generated by the influence service. Method: layer-wise influence, cross-layer aggregation and "
        "noise detection rate (Vitel &amp; Chhabra, ICLR 2026). The report's JSON is embedded in this page "
        "(<code>#report-data</code>).</footer></main>\n"
        f'<script type="application/json" id="report-data">{_embedded_json(report)}</script>\n'
        f"<script>{_SCRIPT}</script>\n</body></html>\n"
    )
