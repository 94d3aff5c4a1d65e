"""Dataset routes: register a file (upload or server-side path), list and read datasets, page through rows."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile

from app.api.deps import PageWindowDep, SessionDep, SettingsDep, TenantDep
from app.errors import Invalid
from app.models import Dataset
from app.schemas.common import MAX_OFFSET, Page, problems
from app.schemas.datasets import DatasetFormat, DatasetOut, DatasetRow, Task
from app.services import datasets as service

router = APIRouter(prefix="/datasets", tags=["datasets"])

_REGISTER_DESCRIPTION = """
Register a dataset from a **multipart/form-data** request: either `file` (an upload) or `path` (a file on the
server, under one of the allowed roots), never both.

Formats: JSONL (one JSON object per line), CSV (RFC 4180, header line), TSV (header line, no quoting: GLUE
style) or Parquet. The format comes from `format`, else from the file name's extension. Text is UTF-8.

The column mapping is given by plain form fields: `text_column` (default `text`), `text_pair_column`,
`label_column` (default `label` for classification; optional for causal-lm, where it holds the completion)
and `noisy_column` (a true/false or 1/0 flag, e.g. known label noise). Other columns are ignored.

Classification labels are class indices (integers) or label names; names are numbered in sorted order and
returned as `label_names`, at most `max_num_labels` classes. Every bad row is refused with 422 naming its line
(row, for Parquet) and column; an upload over `max_upload_bytes`, more than `max_rows` rows, or rows that take
more than `max_dataset_bytes` once decoded and decompressed (counted as the file is read, whatever its
compression) get 413. A failed request leaves nothing behind.
"""


def dataset_out(dataset: Dataset) -> DatasetOut:
    return DatasetOut.model_validate(dataset)


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    responses=problems(403, 413, 422),
    summary="Register a dataset (upload or server-side path)",
    description=_REGISTER_DESCRIPTION,
)
def create_dataset(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    file: Annotated[UploadFile | None, File(description="The dataset file (or give `path`)")] = None,
    path: Annotated[str | None, Form(max_length=4096, description="Absolute server-side path")] = None,
    name: Annotated[str | None, Form(max_length=200, description="Default: the file name's stem")] = None,
    format: Annotated[DatasetFormat | None, Form(description="Default: from the file extension")] = None,
    task: Annotated[Task, Form(description="What the labels are")] = "classification",
    text_column: Annotated[
        str, Form(min_length=1, max_length=200, description="Column (JSONL field) holding the text")
    ] = "text",
    text_pair_column: Annotated[
        str | None, Form(max_length=200, description="Column of the second text of a pair, if any")
    ] = None,
    label_column: Annotated[
        str | None,
        Form(
            max_length=200,
            description="Column of the label: class index or name (classification, default `label`), or the "
            "completion (causal-lm, optional)",
        ),
    ] = None,
    noisy_column: Annotated[
        str | None,
        Form(max_length=200, description="Column of a true/false or 1/0 flag (e.g. known label noise)"),
    ] = None,
) -> DatasetOut:
    path = service.blank_to_none(path)
    columns = service.ColumnSpec.from_form(
        text_column,
        text_pair_column,
        label_column,
        noisy_column,
        default_label="label" if task == "classification" else None,
    )
    spec = service.DatasetSpec(columns=columns, task=task, name=service.blank_to_none(name), format=format)
    if (file is None) == (path is None):
        raise Invalid("give exactly one of `file` (an upload) and `path` (a server-side file)")
    if file is not None:
        dataset = service.register_upload(session, settings, spec, file.file, file.filename, tenant.id)
    else:
        dataset = service.register_path(session, settings, spec, path, tenant.id)  # type: ignore[arg-type]
    return dataset_out(dataset)


@router.get("", response_model=Page[DatasetOut], summary="List datasets, newest first")
def list_datasets(session: SessionDep, tenant: TenantDep, window: PageWindowDep) -> Page[DatasetOut]:
    return window.page_of(session, Dataset, tenant.id, dataset_out)


@router.get("/{dataset_id}", response_model=DatasetOut, responses=problems(404), summary="Read a dataset")
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetOut:
    return dataset_out(service.get_dataset(session, dataset_id, tenant.id))


@router.get(
    "/{dataset_id}/rows",
    response_model=Page[DatasetRow],
    responses=problems(404, 409),
    summary="Page through a dataset's normalised rows",
)
def get_rows(
    dataset_id: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> Page[DatasetRow]:
    dataset = service.get_dataset(session, dataset_id, tenant.id)
    names = dataset.label_names
    items = []
    for row in service.read_rows(settings, dataset, offset, limit):
        label = row.get("label")
        label_name = names[label] if names is not None and isinstance(label, int) else None
        items.append(DatasetRow(**row, label_name=label_name))
    return Page[DatasetRow](items=items, total=dataset.row_count, offset=offset, limit=limit)


@router.delete(
    "/{dataset_id}",
    status_code=204,
    responses=problems(404, 409),
    summary="Delete a dataset and its normalised rows",
    description="409 while an index uses the dataset: delete those indexes first. A server-side source file is "
    "never touched; the service's normalised copy is removed.",
)
def delete_dataset(dataset_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    service.delete_dataset(session, settings, dataset_id, tenant.id)
    return Response(status_code=204)
