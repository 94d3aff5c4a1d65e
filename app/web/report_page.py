"""The HTML page of a layer report (`GET /v1/reports/{id}/html`, docs/decisions/0005-workflows.md).

`render_report_html(report, title=..., context=...)` turns the JSON dict of an `influence.report.LayerReport`
(`to_dict()`, after a JSON round trip) into ONE self-contained HTML5 document: no network at all (no CDN, no
web fonts; a Content-Security-Policy meta tag forbids every fetch and only lets the page's own script run).

The page is `report.html`, a `string.Template` filled with this module's sections, `report.css` and
`report.js`, all package resources of `app.web` read once when this module loads. The policy pins the script
by its SHA-256 computed from `report.js` itself, so editing the file cannot put the two out of step.

What reads without JavaScript is rendered here and in `app.web.report_tables`, on the server: the header
(context, accuracy on the reference set against chance), the warnings, the recommendation, the metrics that
could not be computed and why, the projection's fidelity per layer unit (when the report has it: a warning
line when an entry compared uses a unit below the threshold, and a fidelity bar per row of the top entries),
the top entries, every AUC-NDR value, cancellation, score distributions and the most detrimental rows.
The plots are inline SVG drawn by `report.js` from the report JSON embedded in a
`<script type="application/json">` tag:
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
import json
import math
from collections.abc import Mapping, Sequence
from importlib.resources import files
from string import Template
from typing import Any

from app.web.markup import MISSING, escape, is_finite, number, percent, section, signed
from app.web.report_tables import (
    cancellation_section,
    detrimental_section,
    distributions_section,
    entries_section,
    fidelity_bar,
    fidelity_of,
    fidelity_section,
    ndr_percents,
    runners_up_table,
    unavailable_section,
)

PLOTS: tuple[str, ...] = ("ndr-curves", "layer-bars", "heatmap", "cancellation")

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

_RESOURCES = files("app.web")
_PAGE = Template((_RESOURCES / "report.html").read_text(encoding="utf-8"))
_STYLE = (_RESOURCES / "report.css").read_text(encoding="utf-8")
_SCRIPT = (_RESOURCES / "report.js").read_text(encoding="utf-8")


def _sha256_source(text: str) -> str:
    """A CSP hash source for an inline element whose content is exactly `text`."""
    digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
    return f"'sha256-{digest}'"


# Only this exact script may run (and nothing may be fetched): the hash pins it, so markup that slipped
# through escaping could still not execute. Styles stay 'unsafe-inline': the meters and fidelity bars are
# sized by style attributes, which a hash cannot allow (and a hash in style-src would switch 'unsafe-inline'
# off). The API may send the same policy as a header.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_sha256_source(_SCRIPT)}; style-src 'unsafe-inline'; "
    "img-src data:; base-uri 'none'; form-action 'none'"
)
# The page as the API serves it: the same policy as a response header, where browsers also honour
# frame-ancestors (a meta tag cannot forbid framing).
CONTENT_SECURITY_POLICY_HEADER = f"{CONTENT_SECURITY_POLICY}; frame-ancestors 'none'"


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
        unavailable_section(report),
        fidelity_section(report),
        _plots(report),
        entries_section(report),
        cancellation_section(report),
        distributions_section(report),
        detrimental_section(report, context),
    ]
    return _PAGE.substitute(
        content_security_policy=escape(CONTENT_SECURITY_POLICY),
        title=escape(title),
        style=_STYLE,
        sections="".join(sections),
        report_json=_embedded_json(report),
        script=_SCRIPT,
    )


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
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        text = text.replace(char, escaped)
    # U+2028 / U+2029 are legal in JSON but were line breaks in older JavaScript parsers.
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


# -------------------------------------------------------------------------------------------- sections


def _layers_text(layers: Mapping[str, Any] | None) -> str:
    if not layers:
        return MISSING
    name, kind, members = layers.get("name", ""), layers.get("kind", ""), layers.get("members") or []
    if kind == "group":
        shown = ", ".join(str(m) for m in members[:8]) + (
            f", … ({len(members)} in all)" if len(members) > 8 else ""
        )
        return f"<strong>{escape(name)}</strong> (group: {escape(shown)})"
    return f"<strong>{escape(name)}</strong> (single layer)"


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
    dl = "".join(f"<dt>{escape(label)}</dt><dd>{escape(value)}</dd>" for label, value in facts)
    return (
        f'<header><h1>{escape(title)}</h1><p class="subtitle">Layer report: which layers, aggregation and '
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
    counted = (
        f"{escape(correct)} of {escape(report.get('n_reference'))} correct. " if correct is not None else ""
    )
    meter = ""
    if is_finite(accuracy):
        marks = "".join(
            f'<div class="mark {label}" style="left:{100 * v:.2f}%">'
            f"<span>{escape(label)} {percent(v)}</span></div>"
            for v, label in ((chance, "chance"), (threshold, "needed"))
            if is_finite(v)
        )
        meter = (
            f'<div class="meter{" poor" if near else ""}" role="img" aria-label="accuracy '
            f'{percent(accuracy)}, chance {percent(chance)}, needed {percent(threshold)}">'
            f'<div class="fill" style="width:{100 * accuracy:.2f}%"></div>{marks}</div>'
        )
    accuracy_card = (
        f'<div class="card"><div class="small">Accuracy on the reference set {badge}</div>'
        f'<div class="big">{percent(accuracy)}</div>{meter}<div class="small">{counted}Guessing gets '
        f"{percent(chance)} ({escape(report.get('num_classes'))} classes); at least {percent(threshold)} on "
        f"{escape(report.get('n_reference'))} rows counts as having learned the task.</div></div>"
    )
    n_noisy, rate = report.get("n_noisy"), report.get("noise_rate")
    noisy = (
        f"{escape(n_noisy)} noisy ({percent(rate)})"
        if n_noisy is not None
        else "noisy rows unknown (no mask)"
    )
    train_card = (
        '<div class="card"><div class="small">Training rows</div>'
        f'<div class="big">{escape(report.get("n_train"))}</div><div class="small">{noisy}</div></div>'
    )
    baseline = report.get("random_baseline")
    random_card = ""
    if baseline:
        random_card = (
            '<div class="card"><div class="small">AUC-NDR of a random order</div>'
            f'<div class="big">{number(baseline.get("auc_ndr"))}</div><div class="small">± '
            f"{number(baseline.get('auc_ndr_std'))} (one standard deviation); a recommendation needs "
            f"{signed(criteria.get('required_auc_gain'))} above it</div></div>"
        )
    setup = (
        '<div class="card"><div class="small">Compared</div>'
        f'<div class="big">{len(report.get("layers") or [])} layers</div><div class="small">'
        f"{len(report.get('groups') or {})} groups; "
        f"estimators: {escape(', '.join(report.get('estimators') or []))}; "
        f"aggregations: {escape(', '.join(report.get('aggregations') or []))}; vote k = "
        f"{escape(report.get('vote_k'))}</div></div>"
    )
    cards = f"{accuracy_card}{train_card}{random_card}{setup}"
    return f'<section class="cards" aria-label="Summary">{cards}</section>'


def _warnings(report: Mapping[str, Any]) -> str:
    warnings = report.get("warnings") or []
    if not warnings:
        return ""
    items = "".join(f"<li>{escape(w)}</li>" for w in warnings)
    return f'<section class="box warnings" role="alert"><h2>Warnings</h2><ul>{items}</ul></section>'


def _recommendation(report: Mapping[str, Any]) -> str:
    rec = report.get("recommendation")
    if not rec:
        reasons = report.get("unavailable_reasons") or {}
        if "recommendation" in reasons:
            why = f"The recommendation could not be computed: {escape(reasons['recommendation'])}."
        elif report.get("warnings"):
            why = "See the warnings above."
        else:
            why = "No entry cleared the margins below."
        return (
            '<section class="box recommendation none" id="recommendation"><h2>Recommendation</h2>'
            f"<p><strong>No layers are recommended.</strong> {why}</p></section>"
        )
    ndr = rec.get("ndr") or {}
    ndr_text = ", ".join(f"NDR@{escape(p)} {number(ndr[p])}" for p in ndr_percents(ndr))
    baseline = report.get("random_baseline") or {}
    parts = [
        f"<p>Use {_layers_text(rec.get('layers'))} with the <strong>{escape(rec.get('estimator'))}</strong> "
        f"estimator and <strong>{escape(rec.get('aggregation'))}</strong> aggregation.</p>",
        f"<p>AUC-NDR <strong>{number(rec.get('auc_ndr'))}</strong> against {number(baseline.get('auc_ndr'))} "
        f"for a random order: {signed(rec.get('auc_ndr_gain'))} (a recommendation needs "
        f"{signed(rec.get('required_gain'))}; z = {number(rec.get('auc_ndr_z'), 1)}). {ndr_text}.</p>",
    ]
    fidelity = fidelity_of(report)
    if fidelity is not None and is_finite(rec.get("fidelity_min")):
        low = rec["fidelity_min"] < fidelity[0]
        marked = ' class="fidelity-warning"' if low else ""
        parts.append(
            f"<p{marked}>Projection fidelity of its units: lowest "
            f"{fidelity_bar(rec['fidelity_min'], fidelity[0])}, mean {number(rec.get('fidelity_mean'), 2)}"
            + (
                f" <strong>(below {escape(f'{fidelity[0]:g}')}: its AUC-NDR is uncertain; see the "
                "warnings)</strong>"
                if low
                else ""
            )
            + ".</p>"
        )
    single = rec.get("best_single_layer")
    if single:
        parts.append(
            f"<p>Best single layer: <strong>{escape(single.get('layers'))}</strong> "
            f"({escape(single.get('estimator'))}, {escape(single.get('aggregation'))}): "
            f"AUC-NDR {number(single.get('auc_ndr'))}.</p>"
        )
    runners = rec.get("runners_up") or []
    if runners:
        parts.append("<h3>Runners-up</h3>")
        parts.append(runners_up_table(runners))
    return (
        '<section class="box recommendation" id="recommendation"><h2>Recommendation</h2>'
        f"{''.join(parts)}</section>"
    )


def _criteria(report: Mapping[str, Any]) -> str:
    c = report.get("criteria") or {}
    if not c:
        return ""
    facts = [
        ("Candidates compared", escape(c.get("num_candidates"))),
        ("Significance level", escape(c.get("alpha"))),
        ("One-sided Bonferroni z", number(c.get("z_critical"), 2)),
        ("Minimum AUC-NDR gain", number(c.get("min_auc_gain"))),
        ("Required AUC-NDR gain", number(c.get("required_auc_gain"))),
        ("Chance accuracy", percent(c.get("chance_accuracy"))),
        ("Accuracy needed", percent(c.get("accuracy_threshold"))),
    ]
    dl = "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in facts)
    return (
        "<details><summary>How the recommendation is decided</summary>"
        f'<p>{escape(c.get("explanation", ""))}</p><dl class="facts">{dl}</dl></details>'
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
                f'<option value="{escape(v)}"{" selected" if v == chosen else ""}>{escape(v)}</option>'
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
            "Noise detection rate (NDR@p) against the share p of training rows inspected, lowest scores "
            "first, for the best layer sets of each estimator.",
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
        f'<figure id="figure-{name}"><figcaption>{escape(caption)}</figcaption>{extra}'
        f'<div class="slot" data-slot="{name}">{placeholder}</div></figure>'
        for name, caption, extra in figures
    )
    return section("plots", "Plots", body)
