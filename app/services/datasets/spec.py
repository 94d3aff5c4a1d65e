"""What a dataset registration asks for besides the bytes: the column mapping, the task and the format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.errors import Invalid

FORMATS = ("jsonl", "csv", "tsv", "parquet")
TASKS = ("classification", "causal-lm")
SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def blank_to_none(value: str | None) -> str | None:
    """A form field's text stripped, None when it is blank or missing."""
    return value.strip() or None if value is not None else None


@dataclass(frozen=True)
class ColumnSpec:
    """Source column (JSONL field) of each part of a row; label None: none (causal-lm only)."""

    text: str
    text_pair: str | None = None
    label: str | None = None
    noisy: str | None = None

    @classmethod
    def from_form(
        cls,
        text: str,
        text_pair: str | None,
        label: str | None,
        noisy: str | None = None,
        *,
        default_label: str | None = None,
    ) -> ColumnSpec:
        """The mapping a multipart form's column fields give: names stripped, a blank optional field unmapped
        (the label: `default_label`)."""
        return cls(
            text=text.strip(),
            text_pair=blank_to_none(text_pair),
            label=blank_to_none(label) or default_label,
            noisy=blank_to_none(noisy),
        )

    def as_dict(self) -> dict[str, str | None]:
        return {"text": self.text, "text_pair": self.text_pair, "label": self.label, "noisy": self.noisy}

    def mapped(self) -> list[tuple[str, str]]:
        """(role, column) of the mapped parts."""
        return [(role, column) for role, column in self.as_dict().items() if column is not None]


@dataclass(frozen=True)
class DatasetSpec:
    """What the caller asked for, besides the bytes."""

    columns: ColumnSpec
    task: str = "classification"
    name: str | None = None
    format: str | None = None


def pick_format(given: str | None, filename: str | None, what: str) -> str:
    """The format given, else the one the file name's extension says (422 when neither tells)."""
    if given is not None:
        if given not in FORMATS:
            raise Invalid(f"unknown format {given!r}; expected one of {', '.join(FORMATS)}")
        return given
    suffix = Path(filename or "").suffix.lower()
    if suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[suffix]
    raise Invalid(f"cannot tell the format of {what} from its name; pass format = {' | '.join(FORMATS)}")


def check_spec(spec: DatasetSpec) -> None:
    """422 for a task not known, a classification without a label column, or a column mapped twice."""
    if spec.task not in TASKS:
        raise Invalid(f"unknown task {spec.task!r}; expected one of {', '.join(TASKS)}")
    if spec.task == "classification" and spec.columns.label is None:
        raise Invalid("classification data needs a label column (label_column)")
    used = [column for _, column in spec.columns.mapped()]
    duplicates = sorted({c for c in used if used.count(c) > 1})
    if duplicates:
        raise Invalid(f"column {duplicates[0]!r} is mapped to more than one role")
