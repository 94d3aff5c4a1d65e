"""The report page's tables, rendered on the server so that every number reads without JavaScript.

One function per section (`*_section(report)`): the metrics that could not be computed, the projection's
fidelity per layer unit, the top entries with every AUC-NDR value, cancellation, score distributions and the
most detrimental rows. `fidelity_of`, `fidelity_bar` and `ndr_percents` also serve the recommendation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from app.web.markup import (
    MISSING,
    cell,
    compact,
    escape,
    is_finite,
    number,
    percent,
    row,
    section,
    signed,
    table,
)

# Rows of the "top entries" table; the full matrix of AUC-NDR values follows in a collapsed table.
TOP_ENTRIES = 15
# Units listed in the fidelity table, lowest first.
FIDELITY_ROWS = 15
# Row texts are cut to this many characters (the full text is in the dataset).
MAX_TEXT_CHARS = 400


def ndr_percents(ndr: Mapping[str, Any], wanted: Sequence[str] = ("10", "20", "30")) -> list[str]:
    """The NDR@p columns to show: 10/20/30 where present (30 is the paper's headline), else the first three."""
    keys = [k for k in wanted if k in ndr]
    if keys:
        return keys
    return sorted(ndr, key=lambda k: float(k))[:3]


def fidelity_of(report: Mapping[str, Any]) -> tuple[float, Mapping[str, Any]] | None:
    """(threshold, {unit: Spearman}) when the report was given the index's projection fidelity, else None."""
    fidelity = report.get("fidelity")
    if not isinstance(fidelity, Mapping) or not is_finite(fidelity.get("threshold")):
        return None
    return float(fidelity["threshold"]), fidelity.get("units") or {}


def fidelity_bar(value: Any, threshold: float) -> str:
    """A small bar (0 to 1) and the number; red below the threshold."""
    if not is_finite(value):
        return MISSING
    low = value < threshold
    width = 100 * max(0.0, min(1.0, float(value)))
    return (
        f'<span class="fbar{" low" if low else ""}" aria-hidden="true">'
        f'<span style="width:{width:.0f}%"></span></span>{number(value, 2)}'
    )


def runners_up_table(runners: Sequence[Mapping[str, Any]]) -> str:
    """The recommendation's runners-up: the next best layer sets."""
    rows = [
        row(
            *[cell(escape(r.get(key))) for key in ("layers", "kind", "estimator", "aggregation")],
            cell(number(r.get("auc_ndr")), "num"),
        )
        for r in runners
    ]
    headers = [("Layer set", ""), ("Kind", ""), ("Estimator", ""), ("Aggregation", ""), ("AUC-NDR", "num")]
    return table(headers, rows)


def unavailable_section(report: Mapping[str, Any]) -> str:
    names = list(report.get("unavailable") or [])
    reasons = report.get("unavailable_reasons") or {}
    names += [n for n in reasons if n not in names]
    if not names:
        return section("unavailable", "Metrics not computed", "<p>Every metric could be computed.</p>")
    rows = [row(cell(f"<code>{escape(n)}</code>"), cell(escape(reasons.get(n, "not given")))) for n in names]
    return section(
        "unavailable", "Metrics not computed", table([("Metric", ""), ("Why not", "")], rows, "unavailable")
    )


def _sort_entries(entries: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Best AUC-NDR first, smaller layer sets first on ties (as the recommendation orders them)."""
    return sorted(
        entries,
        key=lambda e: (
            -(e["auc_ndr"] if is_finite(e.get("auc_ndr")) else -math.inf),
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


def entries_section(report: Mapping[str, Any]) -> str:
    """The best entries by AUC-NDR, then every AUC-NDR value in a collapsed table."""
    entries = report.get("entries") or []
    if not entries:
        reasons = report.get("unavailable_reasons") or {}
        why = reasons.get("auc_ndr") or reasons.get("ndr") or "the report has no entries"
        return section("entries", "Top entries", f"<p>No entries: {escape(why)}.</p>")
    rec = report.get("recommendation")
    percents = ndr_percents(entries[0].get("ndr") or {})
    fidelity = fidelity_of(report)
    rows = []
    for position, entry in enumerate(_sort_entries(entries)[:TOP_ENTRIES], start=1):
        layers = entry["layers"]
        ndr = entry.get("ndr") or {}
        low = (
            fidelity is not None
            and is_finite(entry.get("fidelity_min"))
            and entry["fidelity_min"] < fidelity[0]
        )
        classes = " ".join(c for c, on in (("rec", _is_recommended(entry, rec)), ("low-fidelity", low)) if on)
        rows.append(
            row(
                cell(str(position), "num"),
                cell(escape(layers.get("name"))),
                cell(escape(layers.get("kind"))),
                cell(str(len(layers.get("members") or [])), "num"),
                cell(escape(entry.get("estimator"))),
                cell(escape(entry.get("aggregation"))),
                cell(number(entry.get("auc_ndr")), "num"),
                cell(number(entry.get("random_auc_ndr")), "num"),
                cell(signed(entry.get("auc_ndr_gain")), "num"),
                cell(number(entry.get("auc_ndr_z"), 1), "num"),
                *[cell(number(ndr.get(p)), "num") for p in percents],
                *(
                    [cell(fidelity_bar(entry.get("fidelity_min"), fidelity[0]), "num")]
                    if fidelity is not None
                    else []
                ),
                cls=classes,
            )
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
    fidelity_note = (
        "; Fidelity (min) is the lowest projection fidelity among the entry's units (rows below the "
        "threshold are marked: their AUC-NDR is uncertain)"
        if fidelity is not None
        else ""
    )
    return section(
        "entries",
        "Top entries",
        f"<p>The {min(TOP_ENTRIES, len(entries))} best of {len(entries)} (estimator, aggregation, layer set) "
        f"entries by AUC-NDR; the recommended one is highlighted{fidelity_note}.</p>"
        f"{table(headers, rows, 'entries')}{_matrix(report)}",
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
        row(
            cell(escape(name) if kind == "layer" else f"<strong>{escape(name)}</strong>"),
            *[cell(number(by_key.get((est, agg, kind, name))), "num") for est, agg in cols],
        )
        for kind, name in sets
    ]
    headers = [("Layer set", ""), *[(f"{est} · {agg}", "num") for est, agg in cols]]
    return (
        "<details><summary>All AUC-NDR values (the heat map's numbers; groups in bold)</summary>"
        f"{table(headers, rows, 'matrix')}</details>"
    )


def fidelity_section(report: Mapping[str, Any]) -> str:
    """The projection's fidelity per unit (lowest first) and a warning line when entries use a unit below the
    threshold; nothing when the report was not given fidelity (the warnings say why)."""
    found = fidelity_of(report)
    if found is None:
        return ""
    threshold, units = found
    known = sorted(((v, str(n)) for n, v in units.items() if is_finite(v)), key=lambda item: item[0])
    entries = report.get("entries") or []
    low_entries = [e for e in entries if is_finite(e.get("fidelity_min")) and e["fidelity_min"] < threshold]
    parts = [
        "<p>How well each layer unit's stored (projected) features keep its exact gradient scores, measured "
        "when the index was built: the Spearman correlation of projected against exact scores. Below "
        f"{escape(f'{threshold:g}')} a unit ranks rows unlike its exact gradients, and what is compared with "
        "it is uncertain.</p>"
    ]
    if low_entries and known and known[0][0] < threshold:
        value, name = known[0]
        parts.append(
            '<p class="box warnings fidelity-warning">'
            f"<strong>{len(low_entries)} of the {len(entries)} entries compared use a layer unit below "
            f"{escape(f'{threshold:g}')}: their AUC-NDR is uncertain.</strong> "
            f"Unit <code>{escape(name)}</code>'s projected scores agree with its exact ones at Spearman "
            f"{number(value, 2)}; rebuild the index with an exact projection for it "
            "(projection.units {unit: {kind: identity}}, or tokens for an embedding).</p>"
        )
    rows = [
        row(
            cell(f"<code>{escape(name)}</code>"),
            cell(fidelity_bar(value, threshold), "num"),
            cls="low-fidelity" if value < threshold else "",
        )
        for value, name in known[:FIDELITY_ROWS]
    ]
    unknown = [str(n) for n, v in units.items() if not is_finite(v)]
    if rows:
        parts.append(table([("Layer unit (lowest first)", ""), ("Spearman", "num")], rows, "fidelity"))
    if len(known) > FIDELITY_ROWS:
        parts.append(f"<p>… and {len(known) - FIDELITY_ROWS} more units, the lowest shown first.</p>")
    if unknown:
        counted = f"{len(unknown)} unit{'s' if len(unknown) > 1 else ''}"
        parts.append(f"<p>Not measured for {counted} ({escape(', '.join(unknown[:5]))}).</p>")
    return section("fidelity", "Projection fidelity", "".join(parts))


def cancellation_section(report: Mapping[str, Any]) -> str:
    c = report.get("cancellation")
    if not c:
        return section("cancellation", "Cancellation", "<p>No cancellation was computed.</p>")
    layer_rows = [
        row(
            cell(escape(r.get("layer"))),
            *[cell(compact(r.get(ratio)), "num") for ratio in ("l1_over_l1", "l1_over_l2")],
            cell(escape(r.get("num_samples")), "num"),
        )
        for r in c.get("layers") or []
    ]
    group_rows = [
        row(
            cell(escape(g.get("group"))),
            cell(f"{escape(g.get('members_used'))} of {len(g.get('members') or [])}", "num"),
            *[cell(compact(g.get(ratio)), "num") for ratio in ("l1_over_l1", "l1_over_l2")],
        )
        for g in c.get("groups") or []
    ]
    correlation_rows = [
        row(
            *[cell(escape(r.get(key))) for key in ("estimator", "aggregation")],
            cell(number(r.get("spearman")), "num"),
            cell(escape(r.get("layers")), "num"),
        )
        for r in c.get("correlation_with_auc_ndr") or []
    ]
    parts = [
        f"<p>{escape(c.get('note', ''))}</p>",
        table([("Layer", ""), ("L1/L1", "num"), ("L1/L2", "num"), ("Rows", "num")], layer_rows),
    ]
    if group_rows:
        parts.append("<h3>Groups</h3>")
        parts.append(
            table([("Group", ""), ("Layers used", "num"), ("L1/L1", "num"), ("L1/L2", "num")], group_rows)
        )
    if correlation_rows:
        parts.append(
            "<h3>Spearman correlation of L1/L1 cancellation with AUC-NDR across single layers</h3>"
            "<p>Negative: layers with less cancellation detect noise better (Yeh et al.'s premise).</p>"
        )
        parts.append(
            table(
                [("Estimator", ""), ("Aggregation", ""), ("Spearman", "num"), ("Layers", "num")],
                correlation_rows,
            )
        )
    return section("cancellation", "Cancellation", "".join(parts))


def _quantile_label(q: str) -> str:
    value = float(q)
    return {0.0: "min", 0.5: "median", 1.0: "max"}.get(value, f"{100 * value:g}%")


def distributions_section(report: Mapping[str, Any]) -> str:
    dists = report.get("distributions") or []
    if not dists:
        return section("distributions", "Score distributions", "<p>None recorded.</p>")
    quantiles: list[str] = []
    for d in dists:
        for q in d.get("quantiles") or {}:
            if q not in quantiles:
                quantiles.append(q)
    quantiles.sort(key=float)
    with_mask = any(d.get("noisy_mean") is not None for d in dists)
    masked = ("noisy_mean", "clean_mean") if with_mask else ()
    rows = [
        row(
            *[cell(escape(d.get(key))) for key in ("estimator", "layer")],
            *[cell(compact((d.get("quantiles") or {}).get(q)), "num") for q in quantiles],
            *[cell(compact(d.get(key)), "num") for key in ("mean", "std")],
            cell(percent(d.get("share_negative")), "num"),
            *[cell(compact(d.get(key)), "num") for key in masked],
        )
        for d in dists
    ]
    headers = [
        ("Estimator", ""),
        ("Layer", ""),
        *[(_quantile_label(q), "num") for q in quantiles],
        ("Mean", "num"),
        ("Std", "num"),
        ("Negative", "num"),
        *([("Noisy mean", "num"), ("Clean mean", "num")] if with_mask else []),
    ]
    return section(
        "distributions",
        "Score distributions",
        "<p>Per layer and estimator, over every (training row, reference row) score. Positive scores help "
        "the reference prediction; noisy rows should score lower than clean ones.</p><details open><summary>"
        f"{len(dists)} distributions</summary>{table(headers, rows, 'distributions')}</details>",
    )


def _row_info(detrimental: Mapping[str, Any], texts: Mapping[str, Any]) -> tuple[str, str]:
    """(text, label) of a detrimental row: from the row itself, else from context["rows"][row_id]."""
    info: Any = {k: detrimental[k] for k in ("text", "text_pair", "label") if detrimental.get(k) is not None}
    if "text" not in info:
        found = texts.get(str(detrimental.get("row_id")))
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


def _detrimental_row(position: int, detrimental: Mapping[str, Any], texts: Mapping[str, Any]) -> str:
    text, label = _row_info(detrimental, texts)
    noisy = detrimental.get("noisy")
    return row(
        cell(str(position), "num"),
        cell(escape(detrimental.get("row_id")), "num"),
        cell("yes" if noisy is True else "no" if noisy is False else MISSING),
        cell(compact(detrimental.get("score")), "num"),
        cell(escape(label)),
        cell(escape(text) if text else MISSING, "text"),
    )


def detrimental_section(report: Mapping[str, Any], context: Mapping[str, Any]) -> str:
    """The most detrimental rows per estimator (the recommended estimator's opened first), with their texts
    from context["rows"]."""
    rows = report.get("detrimental") or []
    if not rows:
        return section("detrimental", "Most detrimental rows", "<p>None recorded.</p>")
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
        "<p>Training rows with the lowest rank aggregate over all layers (most harmful first), per "
        "estimator.</p>"
    ]
    for index, est in enumerate(estimators):
        own = [r for r in rows if r.get("estimator") == est]
        table_rows = [_detrimental_row(position, r, texts) for position, r in enumerate(own, start=1)]
        found = sum(1 for r in own if r.get("noisy") is True)
        known = any(r.get("noisy") is not None for r in own)
        share = f" — {found} of {len(table_rows)} are noisy" if known else ""
        rendered = table(
            [("#", "num"), ("Row", "num"), ("Noisy", ""), ("Score", "num"), ("Label", ""), ("Text", "")],
            table_rows,
            "detrimental",
        )
        opened = " open" if index == 0 else ""
        parts.append(f"<details{opened}><summary>{escape(est)}{escape(share)}</summary>{rendered}</details>")
    return section("detrimental", "Most detrimental rows", "".join(parts))
