"""Reading the formats (JSONL, CSV, TSV, Parquet) as a stream of (where, record) pairs: `where` names the line
(text formats) or row (Parquet) that a refusal points at.

No line of a text format is held whole beyond max_dataset_bytes. A Parquet file's mapped columns are refused
from the sizes its row groups declare, then from their decoded bytes counted in a first pass that keeps string
columns dictionary-encoded (a few KB of zstd and dictionary pages can decode to GBs), before a row is read;
rows reach Python in slices of a few MB, never a whole batch of decoded text.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app.config import Settings
from app.errors import Invalid, PayloadTooLarge
from app.services.datasets.spec import ColumnSpec

# More digits than any class index has; int() of a longer string is refused by Python (4300 digits) anyway.
MAX_LABEL_DIGITS = 18
# Decoded Parquet bytes turned into Python objects at once, and the most rows Arrow decodes at once.
_PARQUET_SLICE_BYTES = 4 << 20
_PARQUET_MAX_BATCH_ROWS = 8192


class ManyDigits:
    """A JSON integer with more digits than Python turns into an int: kept as its digits, so the row's
    validation can name the column that holds it (and an unmapped field with one stays harmless)."""

    def __init__(self, digits: str):
        self.digits = digits

    def __repr__(self) -> str:
        return f"an integer of {len(self.digits.lstrip('-'))} digits"


def _json_int(digits: str) -> int | ManyDigits:
    return int(digits) if len(digits) <= MAX_LABEL_DIGITS else ManyDigits(digits)


class ByteBudget:
    """Bytes counted against max_dataset_bytes; over it, 413 naming the limit and its setting."""

    def __init__(self, limit: int, what: str = "the dataset's rows"):
        self.limit = limit
        self.what = what
        self.used = 0

    def charge(self, size: int, where: str) -> None:
        self.used += size
        if self.used > self.limit:
            raise PayloadTooLarge(_too_large(self.what, self.limit, where))


def _too_large(what: str, limit: int, where: str) -> str:
    return (
        f"{what} take more than max_dataset_bytes = {limit} bytes once decoded (at {where}); the limit is the "
        "setting INFLUENCE_MAX_DATASET_BYTES"
    )


def read_records(
    handle: IO[bytes], fmt: str, columns: ColumnSpec, settings: Settings
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """The file's records as a stream of (where, {column: value}), each line or batch bounded in size."""
    if fmt == "jsonl":
        return _jsonl_records(handle, settings.max_dataset_bytes)
    if fmt in ("csv", "tsv"):
        return _delimited_records(handle, fmt, columns, settings.max_dataset_bytes)
    return _parquet_records(handle, columns, settings)


def _text_lines(handle: IO[bytes], max_line: int) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its ending), refusing what is not UTF-8 with the line's number. A line is
    read with a bound, so a file without line ends is never held whole."""
    number = 0
    while True:
        raw = handle.readline(max_line + 1)
        if not raw:
            return
        number += 1
        if len(raw) > max_line:
            raise PayloadTooLarge(
                f"line {number} is longer than max_dataset_bytes = {max_line} bytes; the limit is the setting "
                "INFLUENCE_MAX_DATASET_BYTES"
            )
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Invalid(f"line {number}: not UTF-8 text (byte {exc.start} of the line)") from None
        if number == 1 and line.startswith("\ufeff"):
            line = line[1:]
        yield number, line


def _jsonl_records(handle: IO[bytes], max_line: int) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for number, line in _text_lines(handle, max_line):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_int=_json_int)
        except json.JSONDecodeError as exc:
            raise Invalid(f"line {number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        except RecursionError:
            raise Invalid(f"line {number}: invalid JSON: nested too deeply") from None
        except ValueError as exc:
            raise Invalid(f"line {number}: invalid JSON: {str(exc)[:200]}") from None
        if not isinstance(record, dict):
            raise Invalid(f"line {number}: expected a JSON object, got {json_type(record)}")
        yield f"line {number}", record


def _delimited_records(
    handle: IO[bytes], fmt: str, columns: ColumnSpec, max_line: int
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    # CSV: RFC 4180 quoting. TSV: no quoting at all (fields hold no tabs or newlines), as GLUE writes it.
    lines = (line for _, line in _text_lines(handle, max_line))
    if fmt == "csv":
        reader = csv.reader(lines, delimiter=",", strict=True)
    else:
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE, strict=True)
    try:
        header = next(reader, None)
        while header is not None and not header:
            header = next(reader, None)
        if header is None:
            raise Invalid("the file has no header line")
        header = [name.strip() for name in header]
        missing = [(role, column) for role, column in columns.mapped() if column not in header]
        if missing:
            role, column = missing[0]
            raise Invalid(
                f"column {column!r} (the {role} column) is not in the header; columns: {', '.join(header)}"
            )
        for _, column in columns.mapped():
            if header.count(column) > 1:
                raise Invalid(f"column {column!r} appears {header.count(column)} times in the header")
        positions = {column: header.index(column) for _, column in columns.mapped()}
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if len(fields) != len(header):
                raise Invalid(
                    f"line {reader.line_num}: {len(fields)} fields, but the header has {len(header)}"
                )
            yield f"line {reader.line_num}", {column: fields[i] for column, i in positions.items()}
    except csv.Error as exc:
        raise Invalid(f"line {reader.line_num}: unreadable {fmt.upper()}: {exc}") from None


def _is_text_type(kind: Any) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _parquet_records(
    handle: IO[bytes], columns: ColumnSpec, settings: Settings
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    try:
        parquet = pq.ParquetFile(handle)
        schema = parquet.schema_arrow
        metadata = parquet.metadata
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise Invalid(f"not a readable Parquet file: {str(exc)[:300]}") from None
    names = schema.names
    if metadata.num_rows > settings.max_rows:
        raise PayloadTooLarge(f"the file has {metadata.num_rows} rows; the limit is {settings.max_rows}")
    for role, column in columns.mapped():
        if column not in names:
            raise Invalid(
                f"column {column!r} (the {role} column) is not in the file; columns: {', '.join(names)}"
            )
        if names.count(column) > 1:
            raise Invalid(f"column {column!r} appears {names.count(column)} times in the file")
        kind = schema.field(column).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if role in ("text", "text_pair") and not _is_text_type(kind):
            raise Invalid(f"column {column!r} (the {role} column) has type {kind}; expected strings")
        if role == "label" and not (
            pa.types.is_integer(kind) or _is_text_type(kind) or pa.types.is_floating(kind)
        ):
            raise Invalid(
                f"column {column!r} (the label column) has type {kind}; expected integers or strings"
            )
        if role == "noisy" and not (pa.types.is_boolean(kind) or pa.types.is_integer(kind)):
            raise Invalid(f"column {column!r} (the noisy column) has type {kind}; expected booleans or 0/1")
    roles = {column: role for role, column in columns.mapped()}
    wanted = sorted(roles)
    texts = [c for c in wanted if _is_text_type(_value_type(schema.field(c).type))]
    declared, batch_rows = _declared_sizes(metadata, wanted)
    if declared > settings.max_dataset_bytes:
        limit = settings.max_dataset_bytes
        raise PayloadTooLarge(
            _too_large("the file's mapped columns", limit, "the sizes its row groups declare")
        )
    try:
        # Text columns stay dictionary-encoded in Arrow: repeated values are decoded once, not once per row.
        parquet = pq.ParquetFile(handle, read_dictionary=texts, metadata=metadata)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise Invalid(f"not a readable Parquet file: {str(exc)[:300]}") from None
    return _parquet_rows(parquet, wanted, texts, roles, batch_rows, settings)


def _value_type(kind: Any) -> Any:
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def _declared_sizes(metadata: Any, wanted: list[str]) -> tuple[int, int]:
    """The uncompressed bytes the row groups declare for the wanted columns, and Arrow batch rows that keep a
    batch of plain-encoded values near _PARQUET_SLICE_BYTES by that declaration (a hint only: metadata can lie,
    the decoded bytes are counted as they are read)."""
    leaves = [j for j in range(metadata.num_columns) if metadata.schema.column(j).path in wanted]
    total, widest = 0, 1.0
    for r in range(metadata.num_row_groups):
        group = metadata.row_group(r)
        size = sum(max(0, group.column(j).total_uncompressed_size) for j in leaves)
        total += size
        if group.num_rows > 0:
            widest = max(widest, size / group.num_rows)
    return total, int(min(_PARQUET_MAX_BATCH_ROWS, max(16, _PARQUET_SLICE_BYTES // widest)))


def _byte_lengths(array: Any) -> Any:
    """UTF-8 bytes of every value of a string column (0 for null), without decoding a dictionary's values."""
    if pa.types.is_dictionary(array.type):
        lengths = pc.take(pc.binary_length(array.dictionary), array.indices)
    else:
        if pa.types.is_string_view(array.type):
            array = array.cast(pa.large_string())
        lengths = pc.binary_length(array)
    return lengths.fill_null(0).to_numpy(zero_copy_only=False).astype("int64")


def _parquet_rows(
    parquet: Any,
    wanted: list[str],
    texts: list[str],
    roles: dict[str, str],
    batch_rows: int,
    settings: Settings,
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    # A first pass counts the decoded bytes of the text columns from their lengths alone (cheap: dictionaries
    # are never expanded), so a file that decodes past the limit is refused before any row is written.
    budget = ByteBudget(settings.max_dataset_bytes, "the file's mapped columns")
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=wanted):
            sizes = sum((_byte_lengths(batch.column(c)) for c in texts), np.zeros(batch.num_rows, "int64"))
            budget.charge(int(sizes.sum()), f"row {number + batch.num_rows}")
            number += batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise Invalid(f"row {number + 1}: unreadable Parquet data: {str(exc)[:300]}") from None

    # Every mapped string is at most max_text_chars characters, so at most 4 bytes each: a longer value is
    # refused before it is turned into a Python object.
    longest = 4 * settings.max_text_chars
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=wanted):
            lengths = {c: _byte_lengths(batch.column(c)) for c in texts}
            stop, too_long = batch.num_rows, None
            for column, sizes in lengths.items():
                over = np.flatnonzero(sizes > longest)
                if over.size and over[0] < stop:
                    stop, too_long = int(over[0]), column
            row_bytes = sum(lengths.values(), np.zeros(batch.num_rows, "int64"))
            start = 0
            while start < stop:
                cumulative = np.cumsum(row_bytes[start:stop])
                fit = int(np.searchsorted(cumulative, _PARQUET_SLICE_BYTES, side="right"))
                end = start + max(1, fit)
                piece = batch.slice(start, end - start)
                values = {c: _python_values(piece.column(c), c, number) for c in wanted}
                for i in range(end - start):
                    number += 1
                    yield f"row {number}", {c: values[c][i] for c in wanted}
                start = end
            if too_long is not None:
                limit = settings.max_text_chars
                raise Invalid(
                    f"row {number + 1}: column {too_long!r} (the {roles[too_long]}) has more than "
                    f"{limit} characters; the limit is {limit}"
                )
    except (pa.ArrowException, OSError) as exc:
        raise Invalid(f"row {number + 1}: unreadable Parquet data: {str(exc)[:300]}") from None


def _python_values(array: Any, column: str, before: int) -> list[Any]:
    try:
        return array.to_pylist()
    except UnicodeDecodeError:
        for i in range(len(array)):
            try:
                array[i].as_py()
            except UnicodeDecodeError:
                raise Invalid(f"row {before + i + 1}: column {column!r} is not UTF-8 text") from None
        raise Invalid(
            f"rows {before + 1} to {before + len(array)}: column {column!r} is not UTF-8 text"
        ) from None


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float, ManyDigits)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
