// The plots of the layer report page (app/web/report_page.py renders the rest of it on the server).
// Data comes only from the embedded JSON (#report-data) and only reaches the page through textContent and
// setAttribute, so names in the report cannot inject markup. The page's Content-Security-Policy pins this
// file by its hash, computed from the file itself when the page module loads.
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
