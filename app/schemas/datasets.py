"""Dataset registration and rows as the API reports them (the upload itself is a multipart form)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import UTCDateTime

DatasetFormat = Literal["jsonl", "csv", "tsv", "parquet"]
Task = Literal["classification", "causal-lm"]


class ColumnMapping(BaseModel):
    """Which source column (JSONL field) holds each part of a row."""

    text: str
    text_pair: str | None = None
    label: str | None = None
    noisy: str | None = None


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    format: DatasetFormat = Field(description="Format of the registered file")
    task: Task = Field(description="classification: integer class labels; causal-lm: completion strings")
    source: str | None = Field(description="Uploaded file name, or the server-side path")
    size_bytes: int
    columns: ColumnMapping
    row_count: int
    content_hash: str = Field(description="sha256 of the uploaded (or server-side) file's bytes")
    labels: list[int] = Field(description="Distinct class labels (classification); empty for causal-lm")
    label_names: list[str] | None = Field(
        description="When the file named its labels: label i is label_names[i] (names sorted)"
    )
    has_noisy_flag: bool
    created_at: UTCDateTime


class DatasetRow(BaseModel):
    """One normalised row; `row` is its 0-based position in the dataset (the id index results refer to)."""

    row: int
    text: str
    text_pair: str | None = None
    label: int | str | None = None
    label_name: str | None = None
    noisy: bool | None = None
