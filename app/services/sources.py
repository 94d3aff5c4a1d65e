"""What indexes are built from (registered models and datasets): deleting one is refused (409) while an index
uses it, whether the index was there when the delete began or was committed meanwhile (the foreign key then
refuses the delete)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict
from app.models import Index

# Indexes a refusal names.
NAMED_USERS = 5


def refuse_while_indexed(session: Session, what: str, source_id: str, column: Any) -> None:
    """409 naming the indexes whose `column` (Index.model_id, Index.dataset_id) is `source_id`, if any."""
    users = session.scalars(select(Index.id).where(column == source_id).limit(NAMED_USERS + 1)).all()
    if users:
        raise Conflict(
            f"{what} {source_id!r} is used by index(es) {', '.join(users[:NAMED_USERS])}; delete them first",
            indexes=list(users[:NAMED_USERS]),
        )


def delete_unless_indexed(session: Session, source: Any, what: str, source_id: str) -> None:
    """Delete `source` now (flushed); 409 when an index using it was committed since refuse_while_indexed."""
    session.delete(source)
    try:
        session.flush()
    except IntegrityError:  # an index referencing it was committed meanwhile (the foreign key refuses)
        raise Conflict(f"{what} {source_id!r} is used by an index; delete it first") from None
