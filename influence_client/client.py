"""A typed HTTP client of the influence service (httpx, synchronous).

    with InfluenceClient("http://127.0.0.1:8000", api_key) as client:
        model = client.register_model("/models/minilm", name="minilm", num_labels=2)
        dataset = client.upload_dataset("train.tsv", text_column="sentence")
        index = client.create_index(model["id"], dataset["id"], layers="middle")
        client.wait_for_job(index["job"]["id"])
        answer = client.query(index["id"], [{"text": "a gorgeous , witty movie", "label": 1}], top_k=5)

Answers are the service's JSON as TypedDicts (the field names are the API's, see /docs); every error answer
(problem+json, RFC 9457) raises `InfluenceAPIError`. Request fields left at None are not sent, so the service's
own defaults apply. This module imports nothing of the service or the library: it is all a caller installs.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Generic, Literal, NotRequired, TypedDict, TypeVar, cast, overload

import httpx

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0
TERMINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# Rows per request when a method walks every page of a list (the service's largest audit/dataset page may be
# smaller; it answers with the limit it applied, which the walk follows).
PAGE_SIZE = 500

# A layer selector: a name, a glob, `re:...`, `blocks:2-4`, `role:...`, `position:...`, a group (`middle`, `CL`),
# terms joined by `&`; a list unites its items; an object {names, regex, blocks, roles, position, groups}.
LayerSelector = str | list[Any] | dict[str, Any]
JSONValue = Any


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


# ----------------------------------------------------------------------------------------------- answers


class Page(TypedDict, Generic[T]):
    """One page of a list: `items` from `offset`, at most `limit`, out of `total`."""

    items: list[T]
    total: int
    offset: int
    limit: int


class Health(TypedDict):
    status: str


class ReadinessCheck(TypedDict):
    ok: bool
    detail: str
    seconds: float


class Readiness(TypedDict):
    status: str
    checks: dict[str, ReadinessCheck]


class Checkpoint(TypedDict):
    name: str
    adapter: str
    learning_rate: float
    weights_hash: str


class CheckpointIn(TypedDict):
    adapter: str
    learning_rate: float
    name: NotRequired[str]


class Model(TypedDict):
    id: str
    name: str
    source: str
    revision: str | None
    task: str
    num_labels: int | None
    adapter: str | None
    checkpoints: list[Checkpoint]
    weights_hash: str
    num_layers: int
    num_blocks: int
    created_at: str


class Layer(TypedDict):
    name: str
    module_path: str
    kind: str
    role: str
    block: int | None
    position: str | None
    rows: int
    cols: int
    has_bias: bool
    is_lora: bool
    num_params: int
    groups: list[str]


class ModelLayers(TypedDict):
    model_id: str
    num_blocks: int
    layers: list[Layer]
    groups: dict[str, list[str]]


class ColumnMapping(TypedDict):
    text: str
    text_pair: str | None
    label: str | None
    noisy: str | None


class Dataset(TypedDict):
    id: str
    name: str
    format: str
    task: str
    source: str | None
    size_bytes: int
    columns: ColumnMapping
    row_count: int
    content_hash: str
    labels: list[int]
    label_names: list[str] | None
    has_noisy_flag: bool
    created_at: str


class DatasetRow(TypedDict):
    row: int
    text: str
    text_pair: str | None
    label: int | str | None
    label_name: str | None
    noisy: bool | None


class Job(TypedDict):
    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    target_id: str | None
    done: int
    total: int
    progress: float | None
    cancel_requested: bool
    attempts: int
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    duration_s: float | None


class UnitProjection(TypedDict):
    kind: str  # identity (exact) | factorized | gaussian | rademacher
    dim: int  # the unit's target dimension
    features: int  # numbers stored per row for the unit


class Projection(TypedDict):
    kind: str  # auto | factorized | gaussian | rademacher | identity
    dim: int
    seed: int
    exact_max_params: int | None  # auto only: the largest unit (in parameters) stored exactly
    units: dict[str, UnitProjection]  # per layer unit, the projection actually used


class Index(TypedDict):
    id: str
    model_id: str
    dataset_id: str
    status: Literal["pending", "building", "ready", "failed", "cancelled"]
    layer_selector: Any
    layers: list[str]
    projection: Projection
    dtype: str
    faiss_kind: str
    num_rows: int
    deleted_rows: int
    size_bytes: int
    feature_bytes_estimate: int
    manifest: dict[str, Any] | None
    job: Job | None
    created_at: str


class RowsDeleted(TypedDict):
    index_id: str
    deleted: int
    already_deleted: int
    num_rows: int
    deleted_rows: int


class Example(TypedDict):
    """An input to explain (or a reference example): the label whose prediction is explained (a class index
    or a label name; the completion for causal LMs)."""

    text: str
    label: int | str | None
    text_pair: NotRequired[str | None]


class LayerScore(TypedDict):
    layer: str
    score: float
    rank: float


class Hit(TypedDict):
    row: int
    text: str
    text_pair: str | None
    label: Any
    noisy: bool | None
    score: float
    layers: list[LayerScore]


class ExampleResult(TypedDict):
    example: int
    text: str
    label: Any
    prediction: int | None
    loss: float
    candidates: int
    helpful: list[Hit] | None
    harmful: list[Hit] | None


class Approximation(TypedDict):
    what: str
    faiss_kind: str
    faiss_exact_search: bool
    candidates_per_layer: int


class QueryResult(TypedDict):
    index_id: str
    estimator: str
    aggregation: str
    vote_k: float
    direction: str
    layers: list[str]
    num_rows: int
    approximate: bool
    approximation: Approximation | None
    conventions: str
    results: list[ExampleResult]
    seconds: float


# The workflows (docs/decisions/0005-workflows.md): each is a job, and its id is the job's id.


class Reference(TypedDict, total=False):
    """The reference ("test") set: `dataset_id` (with `rows` or `limit`), or inline `examples`."""

    dataset_id: str
    rows: list[int]
    limit: int
    examples: list[Example]


class AuditTopRow(TypedDict):
    rank: int
    row: int
    score: float
    text: str | None
    label: Any
    label_name: str | None
    noisy: bool | None


class NoiseDetection(TypedDict):
    noisy_rows: int
    ndr_at_30: float | None
    auc_ndr: float | None
    random_ndr_at_30: float | None
    random_auc_ndr: float | None
    ndr_at: dict[str, float] | None


class AuditSummary(TypedDict):
    num_rows: int
    layers: list[str]
    num_reference: int
    reference_accuracy: float | None
    correct_reference: int | None
    num_voters: int
    estimator: str
    aggregation: str
    correct_only: bool
    vote_k: float
    dataset_id: str
    index_deleted_rows_at_audit: int
    top: list[AuditTopRow]
    noise: NoiseDetection | None
    score_tensor_bytes: int
    seconds: float


class Audit(TypedDict):
    id: str
    index_id: str | None
    status: str
    params: dict[str, Any]
    job: Job
    summary: AuditSummary | None
    rows_deleted_since_audit: int | None
    conventions: str
    created_at: str


class AuditLayer(TypedDict):
    layer: str
    score: float
    aggregate: float
    rank: int


class AuditRow(TypedDict):
    rank: int
    row: int
    score: float
    text: str | None
    text_pair: str | None
    label: Any
    label_name: str | None
    noisy: bool | None
    layers: list[AuditLayer]


class AuditRowsPage(TypedDict):
    """A page of an audit's ranking, most detrimental first."""

    items: list[AuditRow]
    total: int
    offset: int
    limit: int
    layers: list[str]
    estimator: str
    aggregation: str
    conventions: str


class Report(TypedDict):
    id: str
    index_id: str | None
    status: str
    params: dict[str, Any]
    job: Job
    summary: dict[str, Any] | None
    # influence.LayerReport.to_dict(): GET /v1/reports/{id} once succeeded; null in lists and before.
    report: dict[str, Any] | None
    created_at: str


class CheckLayer(TypedDict):
    layer: str
    score: float
    aggregate: float
    percentile: float


class CheckRow(TypedDict):
    row: int
    dataset_row: int | None
    text: str
    text_pair: str | None
    label: Any
    score: float
    percentile: float
    flagged: bool
    layers: list[CheckLayer]


class CheckAppend(TypedDict):
    requested: bool
    status: Literal["not-requested", "appended", "skipped", "refused", "pending"]
    reason: str | None
    dataset_rows: list[int] | None
    index_rows: int | None


class Check(TypedDict):
    id: str
    index_id: str | None
    status: str
    params: dict[str, Any]
    job: Job
    verdict: Literal["pass", "fail"] | None
    reasons: list[str]
    warnings: list[str]
    summary: dict[str, Any] | None
    appended: int
    append: CheckAppend
    rows: list[CheckRow] | None
    rows_total: int | None
    created_at: str


class Experiment(TypedDict):
    id: str
    name: str | None
    status: str
    stage: str | None
    stages_done: list[str]
    params: dict[str, Any]
    job: Job
    model_id: str | None
    dataset_id: str | None
    index_id: str | None
    report_id: str | None
    noise: dict[str, Any] | None
    finetune: dict[str, Any] | None
    retraining: dict[str, Any] | None
    created_at: str


FileInput = str | os.PathLike[str] | bytes | IO[bytes]


def _given(**fields: Any) -> dict[str, Any]:
    """The fields that were given: None means "the service's default", so it is not sent."""
    return {key: value for key, value in fields.items() if value is not None}


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
        """Liveness: the API process answers."""
        return cast(Health, self._json("GET", "/healthz"))

    def ready(self) -> Readiness:
        """Readiness: database, broker and a live worker. Not ready raises InfluenceAPIError (503) whose
        `body["checks"]` says which dependency failed (the details need a valid API key; without one, the
        status only)."""
        return cast(Readiness, self._json("GET", "/readyz"))

    # ------------------------------------------------------------------------------------------- models

    def register_model(
        self,
        source: str,
        name: str,
        *,
        task: str | None = None,
        num_labels: int | None = None,
        revision: str | None = None,
        adapter: str | None = None,
        checkpoints: Sequence[CheckpointIn] | None = None,
    ) -> Model:
        """Register a model: an absolute folder under the service's allowed roots, or a hub id in its cache."""
        body = _given(
            source=source,
            name=name,
            task=task,
            num_labels=num_labels,
            revision=revision,
            adapter=adapter,
            checkpoints=list(checkpoints) if checkpoints is not None else None,
        )
        return cast(Model, self._json("POST", "/v1/models", json=body))

    def list_models(self, *, offset: int = 0, limit: int = 50) -> Page[Model]:
        return cast(Page[Model], self._json("GET", "/v1/models", params={"offset": offset, "limit": limit}))

    def get_model(self, model_id: str) -> Model:
        return cast(Model, self._json("GET", f"/v1/models/{model_id}"))

    def delete_model(self, model_id: str) -> None:
        """Delete a model (409 while an index or a running experiment uses it); its folders on the server stay."""
        self._request("DELETE", f"/v1/models/{model_id}")

    def model_layers(self, model_id: str) -> ModelLayers:
        """The model's layer units (names, roles, blocks) and groups: what layer selectors choose from."""
        return cast(ModelLayers, self._json("GET", f"/v1/models/{model_id}/layers"))

    # ----------------------------------------------------------------------------------------- datasets

    def upload_dataset(
        self,
        file: FileInput,
        *,
        name: str | None = None,
        format: str | None = None,
        task: str | None = None,
        text_column: str | None = None,
        text_pair_column: str | None = None,
        label_column: str | None = None,
        noisy_column: str | None = None,
        filename: str | None = None,
    ) -> Dataset:
        """Upload a dataset file (JSONL, CSV, TSV, Parquet): a path, bytes or a binary file object. Without
        `format` the service goes by the file name's extension (`filename` names bytes and file objects)."""
        form = _form(
            name=name,
            format=format,
            task=task,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
            noisy_column=noisy_column,
        )
        with _opened(file, filename, format) as (upload_name, handle):
            return cast(
                Dataset, self._json("POST", "/v1/datasets", data=form, files={"file": (upload_name, handle)})
            )

    def register_dataset_path(
        self,
        path: str,
        *,
        name: str | None = None,
        format: str | None = None,
        task: str | None = None,
        text_column: str | None = None,
        text_pair_column: str | None = None,
        label_column: str | None = None,
        noisy_column: str | None = None,
    ) -> Dataset:
        """Register a file that is already on the server (an absolute path under its allowed roots)."""
        form = _form(
            path=path,
            name=name,
            format=format,
            task=task,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
            noisy_column=noisy_column,
        )
        return cast(Dataset, self._json("POST", "/v1/datasets", data=form))

    def list_datasets(self, *, offset: int = 0, limit: int = 50) -> Page[Dataset]:
        return cast(
            Page[Dataset], self._json("GET", "/v1/datasets", params={"offset": offset, "limit": limit})
        )

    def get_dataset(self, dataset_id: str) -> Dataset:
        return cast(Dataset, self._json("GET", f"/v1/datasets/{dataset_id}"))

    def dataset_rows(self, dataset_id: str, *, offset: int = 0, limit: int = 50) -> Page[DatasetRow]:
        """A page of the dataset's normalised rows; `row` is the position queries and audits refer to."""
        params = {"offset": offset, "limit": limit}
        return cast(Page[DatasetRow], self._json("GET", f"/v1/datasets/{dataset_id}/rows", params=params))

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset (409 while an index uses it)."""
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    # ------------------------------------------------------------------------------------------ indexes

    def create_index(
        self,
        model_id: str,
        dataset_id: str,
        *,
        layers: LayerSelector | None = None,
        projection: Mapping[str, Any] | None = None,
        dtype: str | None = None,
        faiss_kind: str | None = None,
        chunk_size: int | None = None,
        max_length: int | None = None,
    ) -> Index:
        """Start building an index (202): follow `index["job"]` with wait_for_job. `projection` is
        {kind, dim, seed, exact_max_params, units} (auto, 256, 0, 4096 by default: units with at most
        exact_max_params parameters stored exactly, the others factorized at dim); `units` overrides single
        units, e.g. {"head": {"kind": "gaussian", "dim": 64}}."""
        body = _given(
            model_id=model_id,
            dataset_id=dataset_id,
            layers=layers,
            projection=dict(projection) if projection is not None else None,
            dtype=dtype,
            faiss_kind=faiss_kind,
            chunk_size=chunk_size,
            max_length=max_length,
        )
        return cast(Index, self._json("POST", "/v1/indexes", json=body))

    def get_index(self, index_id: str) -> Index:
        return cast(Index, self._json("GET", f"/v1/indexes/{index_id}"))

    def list_indexes(
        self,
        *,
        model_id: str | None = None,
        dataset_id: str | None = None,
        status: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> Page[Index]:
        params = _given(model_id=model_id, dataset_id=dataset_id, status=status, offset=offset, limit=limit)
        return cast(Page[Index], self._json("GET", "/v1/indexes", params=params))

    def delete_index(self, index_id: str) -> None:
        """Delete an index and its artifacts (its running build or compaction is cancelled)."""
        self._request("DELETE", f"/v1/indexes/{index_id}")

    def delete_rows(self, index_id: str, row_ids: Sequence[int]) -> RowsDeleted:
        """Tombstone training rows: out of every later answer at once; compact() removes them from disk."""
        body = {"row_ids": [int(row) for row in row_ids]}
        return cast(RowsDeleted, self._json("POST", f"/v1/indexes/{index_id}/rows/delete", json=body))

    def compact(self, index_id: str) -> Job:
        """Start a compaction job (202): deleted rows leave the store, statistics and FAISS indexes."""
        return cast(Job, self._json("POST", f"/v1/indexes/{index_id}/compact"))

    def query(
        self,
        index_id: str,
        examples: Sequence[Example | Mapping[str, Any]],
        *,
        layers: LayerSelector | None = None,
        estimator: str | None = None,
        aggregation: str | None = None,
        vote_k: float | None = None,
        top_k: int | None = None,
        direction: str | None = None,
        approximate: bool | None = None,
        candidates_per_layer: int | None = None,
    ) -> QueryResult:
        """Which training rows most helped / harmed each example (score > 0 helps; rank 0 = most harmful)."""
        body = _given(
            examples=[dict(example) for example in examples],
            layers=layers,
            estimator=estimator,
            aggregation=aggregation,
            vote_k=vote_k,
            top_k=top_k,
            direction=direction,
            approximate=approximate,
            candidates_per_layer=candidates_per_layer,
        )
        return cast(QueryResult, self._json("POST", f"/v1/indexes/{index_id}/query", json=body))

    # --------------------------------------------------------------------------------------------- jobs

    def get_job(self, job_id: str) -> Job:
        return cast(Job, self._json("GET", f"/v1/jobs/{job_id}"))

    def list_jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        target_id: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> Page[Job]:
        params = _given(status=status, kind=kind, target_id=target_id, offset=offset, limit=limit)
        return cast(Page[Job], self._json("GET", "/v1/jobs", params=params))

    def cancel_job(self, job_id: str) -> Job:
        """Cancel a job: a queued one at once, a running one at its next checkpoint (409 once finished)."""
        return cast(Job, self._json("POST", f"/v1/jobs/{job_id}/cancel"))

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
        included. TimeoutError after `timeout` seconds."""
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
        self,
        index_id: str,
        reference: Reference | Mapping[str, Any],
        *,
        layers: LayerSelector | None = None,
        estimator: str | None = None,
        aggregation: str | None = None,
        correct_only: bool | None = None,
        vote_k: float | None = None,
    ) -> Audit:
        """Start an audit (202): every training row of the index scored against the reference set. The audit's
        id is its job's id (wait_for_job)."""
        body = _given(
            reference=dict(reference),
            layers=layers,
            estimator=estimator,
            aggregation=aggregation,
            correct_only=correct_only,
            vote_k=vote_k,
        )
        return cast(Audit, self._json("POST", f"/v1/indexes/{index_id}/audits", json=body))

    def get_audit(self, audit_id: str) -> Audit:
        return cast(Audit, self._json("GET", f"/v1/audits/{audit_id}"))

    def list_audits(self, *, offset: int = 0, limit: int = 50) -> Page[Audit]:
        return cast(Page[Audit], self._json("GET", "/v1/audits", params={"offset": offset, "limit": limit}))

    def delete_audit(self, audit_id: str) -> None:
        self._request("DELETE", f"/v1/audits/{audit_id}")

    def audit_rows(self, audit_id: str, *, offset: int = 0, limit: int = 50) -> AuditRowsPage:
        """A page (limit <= 1000) of the audit's training rows, most detrimental first (rank 0), with each
        row's per-layer scores; 409 until the audit has succeeded."""
        params = {"offset": offset, "limit": limit, "format": "json"}
        return cast(AuditRowsPage, self._json("GET", f"/v1/audits/{audit_id}/rows", params=params))

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
    ) -> Path: ...

    def download_audit(
        self,
        audit_id: str,
        format: Literal["csv", "jsonl"] = "csv",
        dest: str | os.PathLike[str] | None = None,
        *,
        offset: int | None = None,
        limit: int | None = None,
    ) -> bytes | Path:
        """Every audit row (or the offset/limit slice) as CSV (columns `<layer>:score`, `<layer>:aggregate`,
        `<layer>:rank` per layer) or JSONL: the bytes, or streamed into the file `dest` (its Path returned)."""
        params = _given(format=format, offset=offset, limit=limit)
        return self._download(f"/v1/audits/{audit_id}/rows", dest, params)

    def download_audit_scores(self, audit_id: str, dest: str | os.PathLike[str]) -> Path:
        """The raw score tensor as a safetensors file: `scores` (rows, layers, reference) float32, `row_ids`,
        `reference_correct`; metadata `layers` (JSON, the layer axis), `estimator`, `aggregation`, `index_id`."""
        return cast(Path, self._download(f"/v1/audits/{audit_id}/scores", dest))

    # ------------------------------------------------------------------------------------------ reports

    def create_report(
        self,
        index_id: str,
        reference: Reference | Mapping[str, Any],
        *,
        layers: LayerSelector | None = None,
        estimators: Sequence[str] | None = None,
        aggregations: Sequence[str] | None = None,
        vote_k: float | None = None,
        noisy: str | Mapping[str, Any] | None = None,
        cancellation_rows: int | None = None,
        top_rows: int | None = None,
    ) -> Report:
        """Start a layer report (202): NDR per layer, estimator and aggregation. `noisy` is "dataset" (the
        index dataset's noisy column, the default when it has one) or {"rows": [...]}."""
        body = _given(
            reference=dict(reference),
            layers=layers,
            estimators=list(estimators) if estimators is not None else None,
            aggregations=list(aggregations) if aggregations is not None else None,
            vote_k=vote_k,
            noisy=dict(noisy) if isinstance(noisy, Mapping) else noisy,
            cancellation_rows=cancellation_rows,
            top_rows=top_rows,
        )
        return cast(Report, self._json("POST", f"/v1/indexes/{index_id}/reports", json=body))

    def get_report(self, report_id: str) -> Report:
        return cast(Report, self._json("GET", f"/v1/reports/{report_id}"))

    def list_reports(
        self, *, index_id: str | None = None, status: str | None = None, offset: int = 0, limit: int = 50
    ) -> Page[Report]:
        params = _given(index_id=index_id, status=status, offset=offset, limit=limit)
        return cast(Page[Report], self._json("GET", "/v1/reports", params=params))

    def delete_report(self, report_id: str) -> None:
        self._request("DELETE", f"/v1/reports/{report_id}")

    def report_html(self, report_id: str, dest: str | os.PathLike[str] | None = None) -> str:
        """The report as a self-contained HTML page (also written to `dest` when given)."""
        html = self._request("GET", f"/v1/reports/{report_id}/html", headers={"Accept": "text/html"}).text
        if dest is not None:
            Path(dest).write_text(html, encoding="utf-8")
        return html

    # ------------------------------------------------------------------------------------------- checks

    def create_check(
        self,
        index_id: str,
        file: FileInput,
        *,
        reference: Reference | Mapping[str, Any],
        text_column: str,
        label_column: str,
        text_pair_column: str | None = None,
        format: str | None = None,
        layers: LayerSelector | None = None,
        estimator: str | None = None,
        aggregation: str | None = None,
        vote_k: float | None = None,
        correct_only: bool | None = None,
        threshold_percentile: float | None = None,
        max_flagged: int | None = None,
        append: bool | None = None,
        filename: str | None = None,
    ) -> Check:
        """Start a batch check of new rows (202): a row scoring below `threshold_percentile` of the index's
        rows is flagged; the verdict fails when more than `max_flagged` are. `append`: a passing batch joins
        the index (no rebuild). `reference` travels as JSON text, `layers` as JSON unless a plain string."""
        form = _form(
            reference=dict(reference),
            format=format,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
            layers=layers,
            estimator=estimator,
            aggregation=aggregation,
            vote_k=vote_k,
            correct_only=correct_only,
            threshold_percentile=threshold_percentile,
            max_flagged=max_flagged,
            append=append,
        )
        with _opened(file, filename, format) as (upload_name, handle):
            return cast(
                Check,
                self._json(
                    "POST", f"/v1/indexes/{index_id}/checks", data=form, files={"file": (upload_name, handle)}
                ),
            )

    def get_check(
        self,
        check_id: str,
        *,
        offset: int | None = None,
        limit: int | None = None,
        flagged_only: bool | None = None,
    ) -> Check:
        """A check; once it has succeeded, its verdict and a page of its scored rows (`rows_total` in all)."""
        params = _given(offset=offset, limit=limit, flagged_only=flagged_only)
        return cast(Check, self._json("GET", f"/v1/checks/{check_id}", params=params))

    def list_checks(self, *, index_id: str | None = None, offset: int = 0, limit: int = 50) -> Page[Check]:
        params = _given(index_id=index_id, offset=offset, limit=limit)
        return cast(Page[Check], self._json("GET", "/v1/checks", params=params))

    def delete_check(self, check_id: str) -> None:
        self._request("DELETE", f"/v1/checks/{check_id}")

    # -------------------------------------------------------------------------------------- experiments

    def create_experiment(
        self,
        base_model_id: str,
        dataset_id: str,
        reference: Reference | Mapping[str, Any],
        *,
        name: str | None = None,
        heldout: Reference | Mapping[str, Any] | None = None,
        noise_rate: float | None = None,
        seed: int | None = None,
        lora: Mapping[str, Any] | None = None,
        epochs: int | None = None,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        max_length: int | None = None,
        warmup_ratio: float | None = None,
        layers: LayerSelector | None = None,
        projection: Mapping[str, Any] | None = None,
        dtype: str | None = None,
        chunk_size: int | None = None,
        report: Mapping[str, Any] | None = None,
        retraining: Mapping[str, Any] | None = None,
    ) -> Experiment:
        """Start the paper's protocol as one job (202): inject label noise, LoRA fine-tune, register, index,
        layer report, and optionally retrain without the most detrimental rows (`retraining: {"enabled":
        true, ...}` needs a `heldout` set). `lora` is {r, alpha, dropout, targets}; `report` the report's
        settings (layers, estimators, aggregations, vote_k, cancellation_rows, top_rows)."""
        body = _given(
            name=name,
            base_model_id=base_model_id,
            dataset_id=dataset_id,
            reference=dict(reference),
            heldout=dict(heldout) if heldout is not None else None,
            noise_rate=noise_rate,
            seed=seed,
            lora=dict(lora) if lora is not None else None,
            epochs=epochs,
            learning_rate=learning_rate,
            batch_size=batch_size,
            max_length=max_length,
            warmup_ratio=warmup_ratio,
            layers=layers,
            projection=dict(projection) if projection is not None else None,
            dtype=dtype,
            chunk_size=chunk_size,
            report=dict(report) if report is not None else None,
            retraining=dict(retraining) if retraining is not None else None,
        )
        return cast(Experiment, self._json("POST", "/v1/experiments", json=body))

    def get_experiment(self, experiment_id: str) -> Experiment:
        return cast(Experiment, self._json("GET", f"/v1/experiments/{experiment_id}"))

    def list_experiments(self, *, offset: int = 0, limit: int = 50) -> Page[Experiment]:
        params = {"offset": offset, "limit": limit}
        return cast(Page[Experiment], self._json("GET", "/v1/experiments", params=params))

    def delete_experiment(self, experiment_id: str) -> None:
        self._request("DELETE", f"/v1/experiments/{experiment_id}")


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
