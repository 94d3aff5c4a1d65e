"""Registered datasets: an uploaded (or server-side) file parsed, every row validated, and written as a normalised
artifact that the rest of the service reads by row.

    spec.py          what a registration asks for: the column mapping, the task, the format
    formats.py       JSONL, CSV, TSV and Parquet read as a stream of records, bounded in size
    rows.py          records validated into normalised rows, written as rows.jsonl and rows.offsets
    artifact.py      where a dataset's files are, and reading its rows (checksums verified)
    registration.py  registering an upload or a server-side file; finding and deleting datasets

Size. Every format is read as a stream and what it decodes to is counted against `max_dataset_bytes`: the
normalised rows.jsonl bytes as they are written (so a refused file never writes more than the limit), every line
of a text format (so no line is held whole beyond it), and for Parquet the decoded bytes of the mapped columns
before a row is written.

Every name is importable from here (`from app.services.datasets import read_rows`).
"""

from app.services.datasets.artifact import (
    META_FILE,
    OFFSETS_FILE,
    ROWS_FILE,
    dataset_dir,
    encode_row,
    fsync_handle,
    iter_rows,
    load_examples,
    open_rows,
    read_rows,
    rows_path,
)
from app.services.datasets.formats import ByteBudget, read_records
from app.services.datasets.registration import (
    REGISTERING_LOCK,
    STAGING_PREFIX,
    UPLOAD_FILE,
    copy_upload,
    delete_dataset,
    get_dataset,
    normalise_file,
    register_path,
    register_upload,
    size_and_hash,
    staged_upload,
)
from app.services.datasets.rows import RowsSummary, RowValidator
from app.services.datasets.spec import (
    FORMATS,
    SUFFIX_FORMATS,
    TASKS,
    ColumnSpec,
    DatasetSpec,
    blank_to_none,
    check_spec,
    pick_format,
)
from influence.files import sha256_file

__all__ = [
    "FORMATS",
    "META_FILE",
    "OFFSETS_FILE",
    "REGISTERING_LOCK",
    "ROWS_FILE",
    "STAGING_PREFIX",
    "SUFFIX_FORMATS",
    "TASKS",
    "UPLOAD_FILE",
    "ByteBudget",
    "ColumnSpec",
    "DatasetSpec",
    "RowValidator",
    "RowsSummary",
    "blank_to_none",
    "check_spec",
    "copy_upload",
    "dataset_dir",
    "delete_dataset",
    "encode_row",
    "fsync_handle",
    "get_dataset",
    "iter_rows",
    "load_examples",
    "normalise_file",
    "open_rows",
    "pick_format",
    "read_records",
    "read_rows",
    "register_path",
    "register_upload",
    "rows_path",
    "sha256_file",
    "size_and_hash",
    "staged_upload",
]
