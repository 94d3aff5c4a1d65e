"""Validating records into normalised rows, and writing them as a dataset's rows.jsonl and rows.offsets.

Labels. classification: a class index per row. A file may give integers (JSON numbers, or digits in CSV/TSV)
or label names (any other strings); names are numbered in sorted order (Python string order): label i is
`label_names[i]`. A file mixing the two is refused. causal-lm: the label column is optional and holds the
completion (strings; numbers are turned into their text); without one the row is plain language modelling.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Settings
from app.errors import Invalid, PayloadTooLarge
from app.services.datasets.artifact import OFFSETS_FILE, ROWS_FILE, encode_row
from app.services.datasets.formats import MAX_LABEL_DIGITS, ByteBudget, ManyDigits, json_type
from app.services.datasets.spec import DatasetSpec

_INTEGER = re.compile(r"^[+-]?\d+$")
# A lone surrogate is valid in JSON text ("\ud800") and in a Python str, but has no UTF-8 form.
_SURROGATE = re.compile("[\ud800-\udfff]")
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


@dataclass
class RowsSummary:
    """What the rows of a file say about its dataset: how many, its class labels and their names."""

    row_count: int
    labels: list[int]
    label_names: list[str] | None


class RowValidator:
    """Validates raw records into normalised rows; remembers what it needs to describe the dataset."""

    def __init__(self, spec: DatasetSpec, settings: Settings):
        self.columns = spec.columns
        self.task = spec.task
        self.max_chars = settings.max_text_chars
        self.max_rows = settings.max_rows
        self.max_classes = settings.max_num_labels
        self.count = 0
        self.label_kind: tuple[str, str] | None = None  # ("integer" | "name", where first seen)
        self.integers: set[int] = set()
        self.names: set[str] = set()

    def normalise(self, where: str, record: Mapping[str, Any]) -> dict[str, Any]:
        self.count += 1
        if self.count > self.max_rows:
            raise PayloadTooLarge(f"the file has more than {self.max_rows} rows (the limit)")
        cols = self.columns
        row: dict[str, Any] = {
            "text": self._text(where, record, cols.text, "text"),
            "text_pair": self._text(where, record, cols.text_pair, "text_pair") if cols.text_pair else None,
            "label": None,
            "noisy": self._noisy(where, record, cols.noisy) if cols.noisy else None,
        }
        if cols.label is not None:
            row["label"] = (
                self._class_label(where, record, cols.label)
                if self.task == "classification"
                else self._completion(where, record, cols.label)
            )
        return row

    def _value(self, where: str, record: Mapping[str, Any], column: str) -> Any:
        if column not in record:
            fields = ", ".join(map(str, list(record)[:20]))
            raise Invalid(f"{where}: no {column!r} field (fields: {fields})")
        return record[column]

    def _text(self, where: str, record: Mapping[str, Any], column: str, role: str) -> str:
        value = self._value(where, record, column)
        if not isinstance(value, str):
            raise Invalid(f"{where}: column {column!r} (the {role}) must be a string, got {json_type(value)}")
        if not value.strip():
            raise Invalid(f"{where}: column {column!r} (the {role}) is empty")
        return self._checked_text(where, column, role, value)

    def _checked_text(self, where: str, column: str, role: str, value: str) -> str:
        if len(value) > self.max_chars:
            raise Invalid(
                f"{where}: column {column!r} (the {role}) has {len(value)} characters; "
                f"the limit is {self.max_chars}"
            )
        surrogate = _SURROGATE.search(value)
        if surrogate is not None:
            raise Invalid(
                f"{where}: column {column!r} (the {role}) holds a lone surrogate (U+{ord(surrogate.group()):04X} "
                f"at character {surrogate.start() + 1}), which is not text"
            )
        return value

    def _class_label(self, where: str, record: Mapping[str, Any], column: str) -> int | str:
        value = self._value(where, record, column)
        if isinstance(value, ManyDigits):
            value = value.digits
        if isinstance(value, str):
            value = value.strip()
        kind: str
        if isinstance(value, bool) or value is None or value == "":
            raise Invalid(
                f"{where}: column {column!r} (the label) must be a class index or a label name, "
                f"got {json_type(value) if value != '' else 'an empty value'}"
            )
        if isinstance(value, float):
            if not math.isfinite(value) or not value.is_integer():
                raise Invalid(f"{where}: column {column!r} (the label) {value!r} is not a whole number")
            value = int(value)
        if isinstance(value, int) or (isinstance(value, str) and _INTEGER.match(value)):
            digits = str(value).lstrip("+-").lstrip("0")
            if len(digits) > MAX_LABEL_DIGITS and not str(value).startswith("-"):
                raise Invalid(
                    f"{where}: column {column!r} (the label) is an integer of {len(digits)} digits, not a class "
                    f"index below {self.max_classes} (max_num_labels)"
                )
            kind, label = "integer", int(value) if len(digits) <= MAX_LABEL_DIGITS else -1
            if label < 0:
                raise Invalid(
                    f"{where}: column {column!r} (the label) {str(value)[:40]} is negative; classes count from 0"
                )
        elif isinstance(value, str):
            kind, label = "name", self._checked_text(where, column, "label", value)
        else:
            raise Invalid(
                f"{where}: column {column!r} (the label) must be a class index or a label name, "
                f"got {json_type(value)}"
            )
        if self.label_kind is None:
            self.label_kind = (kind, where)
        elif self.label_kind[0] != kind:
            first_kind, first_where = self.label_kind
            raise Invalid(
                f"{where}: label {value!r} is {'an integer' if kind == 'integer' else 'a name'}, but the label "
                f"at {first_where} was {'an integer' if first_kind == 'integer' else 'a name'}; labels must be "
                "all class indices or all names"
            )
        if kind == "integer":
            if int(label) >= self.max_classes:
                raise Invalid(
                    f"{where}: column {column!r} (the label) {label} is not a class index below "
                    f"{self.max_classes} (max_num_labels)"
                )
            self.integers.add(int(label))
        else:
            self.names.add(str(label))
            if len(self.names) > self.max_classes:
                raise Invalid(
                    f"{where}: column {column!r} has more than {self.max_classes} distinct label names "
                    "(max_num_labels); is it the label column?"
                )
        return label

    def _completion(self, where: str, record: Mapping[str, Any], column: str) -> str | None:
        value = self._value(where, record, column)
        if value is None:
            return None
        if isinstance(value, ManyDigits):
            value = value.digits
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise Invalid(f"{where}: column {column!r} (the completion) must be text, got {json_type(value)}")
        text = value if isinstance(value, str) else json.dumps(value)
        return self._checked_text(where, column, "completion", text)

    def _noisy(self, where: str, record: Mapping[str, Any], column: str) -> bool:
        value = self._value(where, record, column)
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise Invalid(f"{where}: column {column!r} (the noisy flag) must be true/false or 1/0, got {value!r}")

    def summary(self) -> RowsSummary:
        if self.task != "classification":
            return RowsSummary(self.count, [], None)
        if self.names:
            names = sorted(self.names)
            return RowsSummary(self.count, list(range(len(names))), names)
        return RowsSummary(self.count, sorted(self.integers), None)


def write_rows(
    folder: Path, records: Iterator[tuple[str, Mapping[str, Any]]], spec: DatasetSpec, settings: Settings
) -> RowsSummary:
    """Validate every record and write the normalised rows and their offsets into `folder`; the normalised
    rows.jsonl bytes are counted against max_dataset_bytes as they are written, so a refused file never
    writes more than the limit."""
    rows = RowValidator(spec, settings)
    budget = ByteBudget(settings.max_dataset_bytes)
    offsets = array("q")
    path = folder / ROWS_FILE
    with open(path, "wb") as out:
        position = 0
        for where, record in records:
            line = encode_row(rows.normalise(where, record))
            budget.charge(len(line), where)
            offsets.append(position)
            out.write(line)
            position += len(line)
    if rows.count == 0:
        raise Invalid("the file has no data rows")
    summary = rows.summary()
    if summary.label_names is not None:
        offsets = _number_label_names(path, summary.label_names, ByteBudget(settings.max_dataset_bytes))
    _write_offsets(folder / OFFSETS_FILE, offsets)
    return summary


def _number_label_names(path: Path, names: list[str], budget: ByteBudget) -> array:
    """Rewrite the rows with class indices in place of label names (names sorted); the new offsets."""
    index = {name: i for i, name in enumerate(names)}
    offsets = array("q")
    numbered = path.with_suffix(".numbered")
    with open(path, "rb") as source, open(numbered, "wb") as out:
        position = 0
        for number, raw in enumerate(source, start=1):
            row = json.loads(raw)
            row["label"] = index[row["label"]]
            line = encode_row(row)
            budget.charge(len(line), f"row {number}")
            offsets.append(position)
            out.write(line)
            position += len(line)
    os.replace(numbered, path)
    return offsets


def _write_offsets(path: Path, offsets: array) -> None:
    if sys.byteorder != "little":  # pragma: no cover - the file format is little-endian everywhere
        offsets.byteswap()
    with open(path, "wb") as out:
        offsets.tofile(out)
