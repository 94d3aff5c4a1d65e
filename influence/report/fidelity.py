"""The projection fidelity a layer report was given (influence.fidelity): per entry the lowest and mean
Spearman of its units, and warnings naming the entries a low-fidelity unit makes uncertain."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from influence.errors import InvalidInputError
from influence.report.results import FidelitySummary, LayerSet, Recommendation, ReportEntry


def fidelity_input(
    fidelity: Mapping[str, Any] | None, names: Sequence[str]
) -> dict[str, float | None] | None:
    """The reported layers' fidelity (None: unknown, as are layers the mapping lacks); None when not given."""
    if fidelity is None:
        return None
    if not isinstance(fidelity, Mapping):
        raise InvalidInputError("fidelity must be a mapping of layer name -> Spearman (or None)")
    out: dict[str, float | None] = {}
    for name in names:
        value = fidelity.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float | np.number)):
            raise InvalidInputError(f"fidelity of layer {name!r} must be a number or None, got {value!r}")
        out[name] = float(value) if value is not None and math.isfinite(float(value)) else None
    return out


def set_fidelity(
    layer_set: LayerSet, fidelity: Mapping[str, float | None] | None
) -> tuple[float | None, float | None]:
    """(lowest, mean) fidelity of a layer set's units that have one; (None, None) when none has."""
    if fidelity is None:
        return None, None
    known = [value for name in layer_set.members if (value := fidelity.get(name)) is not None]
    if not known:
        return None, None
    return min(known), float(np.mean(known))


def fidelity_summary(
    fidelity: dict[str, float | None],
    threshold: float,
    sets: list[LayerSet],
    entries: list[ReportEntry],
    recommendation: Recommendation | None,
) -> FidelitySummary:
    """The units below the threshold, and one warning per such unit (the 5 lowest; then one for the rest)
    naming the layer sets whose AUC-NDR it makes uncertain, and one when the recommendation uses one."""
    low = sorted(
        ((value, name) for name, value in fidelity.items() if value is not None and value < threshold),
        key=lambda item: item[0],
    )
    warnings = []
    compared = {(e.layers.kind, e.layers.name) for e in entries}
    for value, name in low[:5]:
        using = [s.name for s in sets if name in s.members and (not entries or (s.kind, s.name) in compared)]
        shown = ", ".join(using[:4]) + (f" and {len(using) - 4} more" if len(using) > 4 else "")
        what = (
            f"the AUC-NDR of every layer set that uses it ({shown}) is uncertain"
            if entries
            else f"the scores of every layer set that uses it ({shown}) are approximate"
        )
        warnings.append(
            f"Layer unit {name}'s projected scores agree with its exact ones at Spearman {value:.2f} (below "
            f"{threshold:g}): {what}. Rebuild the index with an exact projection for it (projection.units "
            f"{{{name}: {{kind: identity}}}}, or tokens for an embedding) or a larger projection dim."
        )
    if len(low) > 5:
        rest = ", ".join(f"{name} ({value:.2f})" for value, name in low[5:15])
        warnings.append(
            f"{len(low) - 5} more layer units are below fidelity {threshold:g}: {rest}"
            + (", ..." if len(low) > 15 else "")
            + "; the layer sets that use them are uncertain too."
        )
    rec = recommendation
    if rec is not None and rec.fidelity_min is not None and rec.fidelity_min < threshold:
        worst = min((v, n) for v, n in low if n in set(rec.layers.members))
        warnings.append(
            f"The recommended entry ({rec.estimator}, {rec.aggregation}, {rec.layers.name}) uses layer unit "
            f"{worst[1]}, whose projected scores agree with its exact ones at Spearman {worst[0]:.2f}: its AUC-NDR "
            "is uncertain; confirm it on an index with an exact projection for that unit."
        )
    return FidelitySummary(
        threshold=threshold,
        units=dict(fidelity),
        below_threshold=[name for _, name in low],
        warnings=warnings,
    )
