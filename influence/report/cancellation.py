"""A layer report's cancellation (method.md §5): per layer and group, and its Spearman correlation with
AUC-NDR across single layers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from influence.aggregation import average_ranks
from influence.metrics import Cancellation
from influence.report.results import (
    CancellationSummary,
    GroupCancellation,
    LayerCancellation,
    LayerSet,
    ReportEntry,
)


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 3:
        return None
    rx = average_ranks(torch.tensor(x, dtype=torch.float64)).numpy()
    ry = average_ranks(torch.tensor(y, dtype=torch.float64)).numpy()
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def cancellation_summary(
    cancellation: Mapping[str, Cancellation],
    sets: list[LayerSet],
    entries: list[ReportEntry],
    names: list[str],
) -> CancellationSummary:
    """Cancellation of the named layers, the mean over each group's members, and per (estimator, aggregation)
    its correlation with the single layers' AUC-NDR in `entries`."""
    rows = [
        LayerCancellation(n, _finite(c.l1_over_l1), _finite(c.l1_over_l2), int(c.num_samples))
        for n in names
        if (c := cancellation.get(n)) is not None
    ]
    by_layer = {r.layer: r for r in rows}
    groups = []
    for s in sets:
        if s.kind != "group":
            continue
        known = [by_layer[m] for m in s.members if m in by_layer]
        l1 = [r.l1_over_l1 for r in known if r.l1_over_l1 is not None]
        l2 = [r.l1_over_l2 for r in known if r.l1_over_l2 is not None]
        groups.append(
            GroupCancellation(
                s.name,
                s.members,
                float(np.mean(l1)) if l1 else None,
                float(np.mean(l2)) if l2 else None,
                len(l1),
            )
        )
    correlations = []
    cells = sorted({(e.estimator, e.aggregation) for e in entries}, key=lambda c: (c[0], c[1]))
    for est, agg in cells:
        pairs = [
            (by_layer[e.layers.name].l1_over_l1, e.auc_ndr)
            for e in entries
            if (e.estimator, e.aggregation, e.layers.kind) == (est, agg, "layer")
            and e.layers.name in by_layer
            and by_layer[e.layers.name].l1_over_l1 is not None
        ]
        correlations.append(
            {
                "estimator": est,
                "aggregation": agg,
                "spearman": _spearman([p[0] for p in pairs], [p[1] for p in pairs]),
                "layers": len(pairs),
            }
        )
    note = (
        "Group values are the mean over member layers. Embedding gradients are row-sparse, so their "
        "cancellation is low by construction; label-flipped rows push against clean ones, so cancellation is "
        "partly the very signal noise detection uses (method.md §5)."
    )
    return CancellationSummary(rows, groups, correlations, note)
