"""Which of an index's layers a selector picks: the one rule queries, audits, layer reports and checks share."""

from __future__ import annotations

from typing import Any

from app.errors import Conflict, Invalid
from app.models import Index, RegisteredModel
from app.services.indexes import layer_from_dict
from influence import select_layers
from influence.errors import UnknownLayerError


def select_query_layers(index: Index, model: RegisteredModel, selector: Any) -> list[str]:
    """The index's layers the selector picks (names, groups, selectors), in index order; 422 if it picks none."""
    by_name = {record["name"]: record for record in model.layers}
    index_layers = [layer_from_dict(by_name[name]) for name in index.layers if name in by_name]
    if len(index_layers) != len(index.layers):
        raise Conflict(f"index {index.id!r} names layers its model no longer lists; rebuild it")
    try:
        chosen = select_layers(index_layers, selector)
    except UnknownLayerError as exc:
        raise Invalid(
            f"{exc}: the query may only use layers the index holds ({len(index.layers)} layers)"
        ) from None
    return [layer.name for layer in chosen]
