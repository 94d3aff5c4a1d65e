"""The reference ("test") set that audits, layer reports and batch checks score training rows against."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from app.schemas.common import strict_body_config
from app.schemas.indexes import QueryExample


class ReferenceSet(BaseModel):
    """Either rows of a registered dataset (`dataset_id`, optionally `rows` or `limit`) or inline `examples`."""

    model_config = strict_body_config(
        {"dataset_id": "9a1b...", "limit": 500},
        {"examples": [{"text": "a gorgeous , witty , seductive movie .", "label": 1}]},
    )

    dataset_id: str | None = Field(None, min_length=1, max_length=32, description="A dataset of this tenant")
    rows: list[Annotated[int, Field(ge=0, le=2**62)]] | None = Field(
        None,
        min_length=1,
        description="dataset_id only: these row positions (default: every row, or `limit`)",
    )
    limit: int | None = Field(None, ge=1, description="dataset_id only: the first `limit` rows")
    examples: list[QueryExample] | None = Field(None, min_length=1, description="Inline reference examples")

    @model_validator(mode="after")
    def _one_source(self) -> ReferenceSet:
        if (self.dataset_id is None) == (self.examples is None):
            raise ValueError("give exactly one of dataset_id or examples")
        if self.examples is not None and (self.rows is not None or self.limit is not None):
            raise ValueError("rows and limit apply to dataset_id only")
        if self.rows is not None and self.limit is not None:
            raise ValueError("give rows or limit, not both")
        return self


class NoisyRows(BaseModel):
    """The noisy rows by dataset row id (e.g. the record of injected noise)."""

    model_config = strict_body_config()

    rows: list[Annotated[int, Field(ge=0, le=2**62)]] = Field(
        min_length=1,
        max_length=10_000_000,
        description="Dataset row ids of the noisy rows; every id must be a row of the index (deleted rows are "
        "ignored); every other live row counts as clean",
    )


# What a request may say of the noisy rows: the dataset's noisy column, explicit ids, or none.
NoisySpec = Literal["dataset"] | NoisyRows | None
