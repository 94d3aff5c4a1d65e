"""Which training rows of an index are known to be noisy: the mask that layer reports, calibrated checks and audit
review prefixes are measured against.

A request names the mask as `"dataset"` (the index dataset's noisy column: an experiment's injected noise, or a
dataset uploaded with one), as explicit dataset row ids (`{"rows": [...]}`: e.g. the rows a reviewer confirmed),
or not at all. `resolve_noisy` checks that on the API side and gives the job its spec; `noisy_mask` reads it back
on the worker side, aligned with the store's live rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.config import Settings
from app.errors import Invalid
from app.models import Dataset, Index
from app.schemas.references import NoisyRows, NoisySpec
from app.services.datasets import iter_rows
from app.stores import open_store


def resolve_noisy(
    settings: Settings,
    index: Index,
    dataset: Dataset,
    given: NoisySpec,
    *,
    field: str = "noisy",
) -> dict[str, Any] | None:
    """The mask's spec for a job: {"source": "dataset"}, {"source": "rows", "rows": [...]} or None (422 naming
    `field` for a dataset without a noisy column, or ids that are not rows of the index)."""
    if given is None:
        return None
    if given == "dataset":
        if not dataset.has_noisy_flag:
            raise Invalid(
                f'{field}: dataset {dataset.id!r} has no noisy column; pass {field}: {{"rows": [...]}} with the '
                "noisy row ids"
            )
        return {"source": "dataset"}
    assert isinstance(given, NoisyRows)
    rows = np.unique(np.asarray(given.rows, dtype=np.int64))
    store = open_store(settings, index)
    known = np.isin(rows, store.row_ids())
    if not known.all():
        raise Invalid(
            f"{field}.rows {rows[~known][:5].tolist()} are not rows of index {index.id!r} "
            f"(it holds dataset rows by id; {store.num_rows} rows)"
        )
    return {"source": "rows", "rows": rows.tolist()}


def default_noisy(dataset: Dataset) -> NoisySpec:
    """What an omitted mask means: the dataset's noisy column when it has one, else none."""
    return "dataset" if dataset.has_noisy_flag else None


def noisy_mask(
    settings: Settings, dataset: Dataset, spec: dict[str, Any] | None, row_ids: np.ndarray
) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """(n_live,) bool mask aligned with the live rows' dataset ids, and what was left out of it."""
    if spec is None:
        return None, None
    if spec["source"] == "rows":
        given = np.asarray(spec["rows"], dtype=np.int64)
        mask = np.isin(row_ids, given)
        # Named rows deleted from the index since the request: they are not in the mask.
        return mask, {
            "source": "rows",
            "given": len(given),
            "deleted_rows_left_out": int(len(given) - mask.sum()),
        }
    flags = np.zeros(dataset.row_count, dtype=bool)
    for position, row in enumerate(iter_rows(settings, dataset)):
        flags[position] = bool(row.get("noisy"))
    inside = row_ids < dataset.row_count
    mask = np.zeros(len(row_ids), dtype=bool)
    mask[inside] = flags[row_ids[inside]]
    return mask, {
        "source": "dataset",
        # Rows appended to the index that are not rows of its dataset have no flag: they count as clean.
        "rows_without_flag": int((~inside).sum()),
        "deleted_rows_left_out": int(flags.sum() - mask.sum()),
    }
