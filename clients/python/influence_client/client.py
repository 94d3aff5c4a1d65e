"""A typed HTTP client of the influence service (httpx, synchronous).

    with InfluenceClient("http://127.0.0.1:8000", api_key) as client:
        model = client.register_model("/models/minilm", name="minilm", num_labels=2)
        dataset = client.upload_dataset("train.tsv", text_column="sentence")
        index = client.create_index(model["id"], dataset["id"], layers="middle")
        client.wait_for_job(index["job"]["id"])
        answer = client.query(index["id"], [{"text": "a gorgeous , witty movie", "label": 1}], top_k=5)

Answers are the service's JSON as TypedDicts (influence_client.schemas; the field names are the API's, see
/docs); every error answer (problem+json, RFC 9457) raises `InfluenceAPIError`. Options left at None are not
sent, so the service's own defaults apply (a query's, audit's or check's scoring options: the index's settings,
see index_settings). This module imports nothing of the service or the library: it is all a caller installs.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Generic, Literal, TypeVar, Unpack, cast, overload

import httpx

from influence_client.schemas import (
    Audit,
    AuditOptions,
    AuditRow,
    AuditRowsPage,
    Check,
    CheckOptions,
    Dataset,
    DatasetOptions,
    DatasetRow,
    Example,
    Experiment,
    ExperimentOptions,
    Health,
    Index,
    IndexOptions,
    IndexSettings,
    Job,
    Model,
    ModelLayers,
    ModelOptions,
    Page,
    QueryOptions,
    QueryResult,
    Readiness,
    Reference,
    Report,
    ReportOptions,
    RowsDeleted,
    SettingsMode,
)
from influence_client.version import version_warning

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0
TERMINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# Rows per request when a method walks every page of a list (the service's largest audit/dataset page may be
# smaller; it answers with the limit it applied, which the walk follows).
PAGE_SIZE = 500

FileInput = str | os.PathLike[str] | bytes | IO[bytes]
ReferenceInput = Reference | Mapping[str, Any]


class InfluenceAPIError(Exception):
    """An error answer of the service: its status, the problem's title and detail, and the whole body (the
    problem object, with extension members such as `errors` or `checks`; {} when the body was not JSON)."""

    def __init__(self, status: int, title: str, detail: str | None, body: Mapping[str, Any]):
        super().__init__(f"{status} {title}" + (f": {detail}" if detail else ""))
        self.status = status
        self.title = title
        self.detail = detail
        self.body = dict(body)

    @property
    def type(self) -> str | None:
        """The problem type, e.g. urn:influence:problem:not-found."""
        return self.body.get("type")

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Validation failures [{loc, msg, type}] of an invalid-request problem; [] otherwise."""
        return list(self.body.get("errors") or [])

    @classmethod
    def from_response(cls, response: httpx.Response) -> InfluenceAPIError:
        body: dict[str, Any] = {}
        try:
            parsed = response.json()
            if isinstance(parsed, dict):
                body = parsed
        except ValueError:
            pass
        title = body.get("title") or response.reason_phrase or "Error"
        detail = body.get("detail")
        if detail is None and not body:
            # Not problem+json (a proxy's page, say): its text is all there is to tell.
            detail = response.text.strip()[:500] or None
        return cls(response.status_code, str(title), detail, body)


@dataclass(frozen=True)
class Collection(Generic[T]):
    """Where one kind of resource lives, e.g. /v1/models; reading one of them answers a T."""

    path: str

    def item(self, resource_id: str) -> str:
        return f"{self.path}/{resource_id}"


MODELS: Collection[Model] = Collection("/v1/models")
DATASETS: Collection[Dataset] = Collection("/v1/datasets")
INDEXES: Collection[Index] = Collection("/v1/indexes")
JOBS: Collection[Job] = Collection("/v1/jobs")
AUDITS: Collection[Audit] = Collection("/v1/audits")
REPORTS: Collection[Report] = Collection("/v1/reports")
CHECKS: Collection[Check] = Collection("/v1/checks")
EXPERIMENTS: Collection[Experiment] = Collection("/v1/experiments")


def _plain(value: Any) -> Any:
    """JSON's own types: any mapping as a dict, any sequence (not text) as a list."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(item) for item in value]
    return value


def _given(**fields: Any) -> dict[str, Any]:
    """The fields that were given: None means "the service's default", so it is not sent."""
    return {key: _plain(value) for key, value in fields.items() if value is not None}


def _form_value(value: Any) -> str:
    # Form fields are text: booleans as the service parses them, structures (a layer list) as JSON.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _form(**fields: Any) -> dict[str, str]:
    return {key: _form_value(value) for key, value in _given(**fields).items()}


class InfluenceClient:
    """The service's HTTP API as typed methods. A context manager (closes its connection pool).

    `base_url` and `api_key` default to the environment variables INFLUENCE_URL and INFLUENCE_API_KEY (the URL
    to http://127.0.0.1:8000). `transport` replaces the network (an in-process ASGI app in tests, a proxy)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ):
        self.base_url = (base_url or os.environ.get("INFLUENCE_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("INFLUENCE_API_KEY")
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key.strip()}"
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )
        self._version_checked = False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> InfluenceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.is_error:
            raise InfluenceAPIError.from_response(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _show(self, collection: Collection[T], resource_id: str, **params: Any) -> T:
        """One resource of a collection (params left at None are not sent)."""
        return cast(T, self._json("GET", collection.item(resource_id), params=_given(**params)))

    def _list(self, collection: Collection[T], **params: Any) -> Page[T]:
        """A page of a collection, newest first (filters left at None are not sent)."""
        return cast(Page[T], self._json("GET", collection.path, params=_given(**params)))

    def _delete(self, collection: Collection[Any], resource_id: str) -> None:
        self._request("DELETE", collection.item(resource_id))

    def _download(
        self, path: str, dest: str | os.PathLike[str] | None, params: dict[str, Any] | None = None
    ) -> bytes | Path:
        """The body of a GET: bytes, or streamed into `dest` (written to a temporary name, then renamed, so a
        failed download never leaves a partial file under the name asked for) and its Path returned."""
        if dest is None:
            return self._request("GET", path, params=params).content
        target = Path(dest)
        partial = target.with_name(f".{target.name}.part")
        with self._http.stream("GET", path, params=params) as response:
            if response.is_error:
                response.read()
                raise InfluenceAPIError.from_response(response)
            try:
                with open(partial, "wb") as handle:
                    for block in response.iter_bytes():
                        handle.write(block)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
        return target

    # ------------------------------------------------------------------------------------------- health

    def health(self) -> Health:
        """Liveness: the API process answers, and its version."""
        return cast(Health, self._json("GET", "/healthz"))

    def check_service_version(self) -> str | None:
        """Compare the service's version (/healthz) with this client's, on the first call only: another major
        version raises IncompatibleServiceError; another minor one returns a one-line warning; else None (also
        when the service names no version)."""
        if self._version_checked:
            return None
        try:
            health: Any = self.health()
        except InfluenceAPIError:
            # A proxy that does not pass /healthz on: the command itself shows whether the service answers.
            health = {}
        self._version_checked = True
        # A service from before the version field (0.1.0) names none: it is not refused.
        service_version = health.get("version") if isinstance(health, dict) else None
        return version_warning(self.base_url, str(service_version)) if service_version else None

    def ready(self) -> Readiness:
        """Readiness: database, broker and a live worker. Not ready raises InfluenceAPIError (503) whose
        `body["checks"]` says which dependency failed (the details need a valid API key; without one, the
        status only)."""
        return cast(Readiness, self._json("GET", "/readyz"))

    # ------------------------------------------------------------------------------------------- models

    def register_model(self, source: str, name: str, **options: Unpack[ModelOptions]) -> Model:
        """Register a model: an absolute folder under the service's allowed roots, or a hub id in its cache."""
        body = _given(source=source, name=name, **options)
        return cast(Model, self._json("POST", MODELS.path, json=body))

    def list_models(self, *, offset: int = 0, limit: int = 50) -> Page[Model]:
        return self._list(MODELS, offset=offset, limit=limit)

    def get_model(self, model_id: str) -> Model:
        return self._show(MODELS, model_id)

    def delete_model(self, model_id: str) -> None:
        """Delete a model (409 while an index or a running experiment uses it); its folders on the server stay."""
        self._delete(MODELS, model_id)

    def model_layers(self, model_id: str) -> ModelLayers:
        """The model's layer units (names, roles, blocks) and groups: what layer selectors choose from."""
        return cast(ModelLayers, self._json("GET", f"{MODELS.item(model_id)}/layers"))

    # ----------------------------------------------------------------------------------------- datasets

    def upload_dataset(
        self, file: FileInput, *, filename: str | None = None, **options: Unpack[DatasetOptions]
    ) -> Dataset:
        """Upload a dataset file (JSONL, CSV, TSV, Parquet): a path, bytes or a binary file object. Without
        `format` the service goes by the file name's extension (`filename` names bytes and file objects)."""
        with _opened(file, filename, options.get("format")) as (upload_name, handle):
            files = {"file": (upload_name, handle)}
            return cast(Dataset, self._json("POST", DATASETS.path, data=_form(**options), files=files))

    def register_dataset_path(self, path: str, **options: Unpack[DatasetOptions]) -> Dataset:
        """Register a file that is already on the server (an absolute path under its allowed roots)."""
        return cast(Dataset, self._json("POST", DATASETS.path, data=_form(path=path, **options)))

    def list_datasets(self, *, offset: int = 0, limit: int = 50) -> Page[Dataset]:
        return self._list(DATASETS, offset=offset, limit=limit)

    def get_dataset(self, dataset_id: str) -> Dataset:
        return self._show(DATASETS, dataset_id)

    def dataset_rows(self, dataset_id: str, *, offset: int = 0, limit: int = 50) -> Page[DatasetRow]:
        """A page of the dataset's normalised rows; `row` is the position queries and audits refer to."""
        params = {"offset": offset, "limit": limit}
        return cast(Page[DatasetRow], self._json("GET", f"{DATASETS.item(dataset_id)}/rows", params=params))

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset (409 while an index uses it)."""
        self._delete(DATASETS, dataset_id)

    # ------------------------------------------------------------------------------------------ indexes

    def create_index(self, model_id: str, dataset_id: str, **options: Unpack[IndexOptions]) -> Index:
        """Start building an index (202): follow `index["job"]` with wait_for_job. The options are
        schemas.IndexOptions (layers, projection, dtype, faiss_kind, chunk_size, max_length)."""
        body = _given(model_id=model_id, dataset_id=dataset_id, **options)
        return cast(Index, self._json("POST", INDEXES.path, json=body))

    def get_index(self, index_id: str) -> Index:
        return self._show(INDEXES, index_id)

    def list_indexes(
        self,
        *,
        model_id: str | None = None,
        dataset_id: str | None = None,
        status: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> Page[Index]:
        return self._list(
            INDEXES, model_id=model_id, dataset_id=dataset_id, status=status, offset=offset, limit=limit
        )

    def delete_index(self, index_id: str) -> None:
        """Delete an index and its artifacts (its running build or compaction is cancelled)."""
        self._delete(INDEXES, index_id)

    def delete_rows(self, index_id: str, row_ids: Sequence[int]) -> RowsDeleted:
        """Tombstone training rows: out of every later answer at once; compact() removes them from disk."""
        body = {"row_ids": [int(row) for row in row_ids]}
        return cast(RowsDeleted, self._json("POST", f"{INDEXES.item(index_id)}/rows/delete", json=body))

    def compact(self, index_id: str) -> Job:
        """Start a compaction job (202): deleted rows leave the store, statistics and FAISS indexes."""
        return cast(Job, self._json("POST", f"{INDEXES.item(index_id)}/compact"))

    def index_settings(self, index_id: str) -> IndexSettings:
        """The settings mode, pinned report and settings (each with its source) of what names no settings."""
        return cast(IndexSettings, self._json("GET", f"{INDEXES.item(index_id)}/settings"))

    def set_index_settings(
        self, index_id: str, mode: SettingsMode, report_id: str | None = None
    ) -> IndexSettings:
        """Follow the latest layer report, pin one (`pinned-report`, `report_id`) or use the `defaults`."""
        body = _given(mode=mode, report_id=report_id)
        return cast(IndexSettings, self._json("PUT", f"{INDEXES.item(index_id)}/settings", json=body))

    def query(
        self, index_id: str, examples: Sequence[Example | Mapping[str, Any]], **options: Unpack[QueryOptions]
    ) -> QueryResult:
        """Which training rows most helped / harmed each example (score > 0 helps; rank 0 = most harmful)."""
        body = _given(examples=examples, **options)
        return cast(QueryResult, self._json("POST", f"{INDEXES.item(index_id)}/query", json=body))

    # --------------------------------------------------------------------------------------------- jobs

    def get_job(self, job_id: str) -> Job:
        return self._show(JOBS, job_id)

    def list_jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        target_id: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> Page[Job]:
        return self._list(JOBS, status=status, kind=kind, target_id=target_id, offset=offset, limit=limit)

    def cancel_job(self, job_id: str) -> Job:
        """Cancel a job: a queued one at once, a running one at its next checkpoint (409 once finished)."""
        return cast(Job, self._json("POST", f"{JOBS.item(job_id)}/cancel"))

    def wait_for_job(
        self,
        job_id: str,
        *,
        poll: float = 0.5,
        timeout: float | None = None,
        on_progress: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll a job until it is succeeded, failed or cancelled and return it (a failed job is an answer, not
        an exception: look at `status` and `error`). `on_progress(job)` sees every state polled, the last one
        included. TimeoutError after `timeout` seconds. Every workflow's id is its job's id."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] in TERMINAL_JOB_STATUSES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout} s")
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    # ------------------------------------------------------------------------------------------- audits

    def create_audit(
        self, index_id: str, reference: ReferenceInput, **options: Unpack[AuditOptions]
    ) -> Audit:
        """Start an audit (202): every training row of the index scored against the reference set. The audit's
        id is its job's id (wait_for_job). `review={"target_recall": 0.9}` also marks the review prefix."""
        body = _given(reference=reference, **options)
        return cast(Audit, self._json("POST", f"{INDEXES.item(index_id)}/audits", json=body))

    def get_audit(self, audit_id: str) -> Audit:
        return self._show(AUDITS, audit_id)

    def list_audits(self, *, offset: int = 0, limit: int = 50) -> Page[Audit]:
        return self._list(AUDITS, offset=offset, limit=limit)

    def delete_audit(self, audit_id: str) -> None:
        self._delete(AUDITS, audit_id)

    def audit_rows(
        self, audit_id: str, *, offset: int = 0, limit: int = 50, review: bool = False
    ) -> AuditRowsPage:
        """A page (limit <= 1000) of the audit's training rows (`review`: of its review prefix), most detrimental
        first (rank 0), with each row's per-layer scores; 409 until the audit has succeeded."""
        params = _given(offset=offset, limit=limit, format="json", review=review or None)
        return cast(AuditRowsPage, self._json("GET", f"{AUDITS.item(audit_id)}/rows", params=params))

    def iter_audit_rows(self, audit_id: str, *, page_size: int = PAGE_SIZE) -> Iterator[AuditRow]:
        """Every row of the audit, most detrimental first, a page at a time."""
        offset = 0
        while True:
            page = self.audit_rows(audit_id, offset=offset, limit=page_size)
            yield from page["items"]
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return

    @overload
    def download_audit(
        self,
        audit_id: str,
        format: Literal["csv", "jsonl"] = ...,
        dest: None = None,
        *,
        offset: int | None = ...,
        limit: int | None = ...,
        review: bool = ...,
    ) -> bytes: ...

    @overload
    def download_audit(
        self,
        audit_id: str,
        format: Literal["csv", "jsonl"],
        dest: str | os.PathLike[str],
        *,
        offset: int | None = ...,
        limit: int | None = ...,
        review: bool = ...,
    ) -> Path: ...

    def download_audit(
        self,
        audit_id: str,
        format: Literal["csv", "jsonl"] = "csv",
        dest: str | os.PathLike[str] | None = None,
        *,
        offset: int | None = None,
        limit: int | None = None,
        review: bool = False,
    ) -> bytes | Path:
        """Every audit row (or the offset/limit slice, of the review prefix with `review`) as CSV (`<layer>:score`,
        `<layer>:aggregate`, `<layer>:rank` per layer) or JSONL: the bytes, or streamed into the file `dest`."""
        params = _given(format=format, offset=offset, limit=limit, review=review or None)
        return self._download(f"{AUDITS.item(audit_id)}/rows", dest, params)

    def download_audit_scores(self, audit_id: str, dest: str | os.PathLike[str]) -> Path:
        """The raw score tensor as a safetensors file: `scores` (rows, layers, reference) float32, `row_ids`,
        `reference_correct`; metadata `layers` (JSON, the layer axis), `estimator`, `aggregation`, `index_id`."""
        return cast(Path, self._download(f"{AUDITS.item(audit_id)}/scores", dest))

    # ------------------------------------------------------------------------------------------ reports

    def create_report(
        self, index_id: str, reference: ReferenceInput, **options: Unpack[ReportOptions]
    ) -> Report:
        """Start a layer report (202): NDR per layer, estimator and aggregation."""
        body = _given(reference=reference, **options)
        return cast(Report, self._json("POST", f"{INDEXES.item(index_id)}/reports", json=body))

    def get_report(self, report_id: str) -> Report:
        return self._show(REPORTS, report_id)

    def list_reports(
        self, *, index_id: str | None = None, status: str | None = None, offset: int = 0, limit: int = 50
    ) -> Page[Report]:
        return self._list(REPORTS, index_id=index_id, status=status, offset=offset, limit=limit)

    def delete_report(self, report_id: str) -> None:
        self._delete(REPORTS, report_id)

    def report_html(self, report_id: str, dest: str | os.PathLike[str] | None = None) -> str:
        """The report as a self-contained HTML page (also written to `dest` when given)."""
        path = f"{REPORTS.item(report_id)}/html"
        html = self._request("GET", path, headers={"Accept": "text/html"}).text
        if dest is not None:
            Path(dest).write_text(html, encoding="utf-8")
        return html

    # ------------------------------------------------------------------------------------------- checks

    def create_check(
        self,
        index_id: str,
        file: FileInput,
        *,
        reference: ReferenceInput,
        text_column: str,
        label_column: str,
        filename: str | None = None,
        **options: Unpack[CheckOptions],
    ) -> Check:
        """Start a batch check of new rows (202): a row scoring below `threshold_percentile` of the index's
        rows is flagged (or, with `target_precision` / `target_recall`, below a threshold calibrated against the
        mask `noisy`); the verdict fails when more than `max_flagged` are. `append`: a passing batch joins the
        index (no rebuild). `reference` (and a `noisy` object) travel as JSON text."""
        form = _form(reference=reference, text_column=text_column, label_column=label_column, **options)
        with _opened(file, filename, options.get("format")) as (upload_name, handle):
            path = f"{INDEXES.item(index_id)}/checks"
            return cast(Check, self._json("POST", path, data=form, files={"file": (upload_name, handle)}))

    def get_check(
        self,
        check_id: str,
        *,
        offset: int | None = None,
        limit: int | None = None,
        flagged_only: bool | None = None,
    ) -> Check:
        """A check; once it has succeeded, its verdict and a page of its scored rows (`rows_total` in all)."""
        return self._show(CHECKS, check_id, offset=offset, limit=limit, flagged_only=flagged_only)

    def list_checks(self, *, index_id: str | None = None, offset: int = 0, limit: int = 50) -> Page[Check]:
        return self._list(CHECKS, index_id=index_id, offset=offset, limit=limit)

    def delete_check(self, check_id: str) -> None:
        self._delete(CHECKS, check_id)

    # -------------------------------------------------------------------------------------- experiments

    def create_experiment(
        self,
        base_model_id: str,
        dataset_id: str,
        reference: ReferenceInput,
        **options: Unpack[ExperimentOptions],
    ) -> Experiment:
        """Start the paper's protocol as one job (202): inject label noise, LoRA fine-tune, register, index,
        layer report, and optionally retrain without the most detrimental rows (schemas.ExperimentOptions)."""
        body = _given(base_model_id=base_model_id, dataset_id=dataset_id, reference=reference, **options)
        return cast(Experiment, self._json("POST", EXPERIMENTS.path, json=body))

    def get_experiment(self, experiment_id: str) -> Experiment:
        return self._show(EXPERIMENTS, experiment_id)

    def list_experiments(self, *, offset: int = 0, limit: int = 50) -> Page[Experiment]:
        return self._list(EXPERIMENTS, offset=offset, limit=limit)

    def delete_experiment(self, experiment_id: str) -> None:
        self._delete(EXPERIMENTS, experiment_id)


@contextlib.contextmanager
def _opened(
    file: FileInput, filename: str | None, format: str | None
) -> Iterator[tuple[str, IO[bytes] | bytes]]:
    """(upload name, content) of a path, bytes or an open binary file; closes only what it opened itself."""
    # The service infers the format from the extension when none is given; bytes have no name of their own.
    default = f"upload.{format}" if format else "upload"
    if isinstance(file, bytes):
        yield filename or default, file
    elif isinstance(file, str | os.PathLike):
        path = Path(file)
        with open(path, "rb") as handle:
            yield filename or path.name, handle
    else:
        yield filename or Path(getattr(file, "name", "") or default).name, file
