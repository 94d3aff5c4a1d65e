"""The client against the service it talks to: the service's OpenAPI document, built in process, holds every
TypedDict of influence_client.schemas (which schema each mirrors is the table SCHEMAS below) and every route
the client calls, so a field or a path renamed on either side fails here.

For each TypedDict: its keys are the schema's properties; the Literal values of a key are the enum of the
property where the service has one (and only there); a nested TypedDict is the schema the property refers to.
Which keys are required depends on the direction:
- a request body (sent) requires exactly what the schema requires;
- a method's options fill a request body beside the method's own arguments: every option may be left out, and
  the options and the arguments together are the body's properties;
- an answer carries every field of its model, defaults included (FastAPI serializes them all), so the client
  may rely on a key the schema leaves optional; it must never take as optional a key the schema requires.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple, NotRequired, Required
from urllib.parse import parse_qs

import httpx
import pytest

from app.main import create_app
from influence_client import schemas
from influence_client.client import InfluenceClient
from tests.app.conftest import make_settings

REF_PREFIX = "#/components/schemas/"


class Mirror(NamedTuple):
    schema: str
    sent: bool = False  # a request body, or a method's options that fill one
    arguments: frozenset[str] = frozenset()  # fields of the body the method takes as its own arguments

    @property
    def options(self) -> bool:
        return self.sent and bool(self.arguments)


def answer(schema: str) -> Mirror:
    return Mirror(schema)


def body(schema: str) -> Mirror:
    return Mirror(schema, sent=True)


def options(schema: str, *arguments: str) -> Mirror:
    return Mirror(schema, sent=True, arguments=frozenset(arguments))


# Each TypedDict of the client -> the schema of the service it mirrors (FastAPI names a generic model
# `Page_<Item>_` and two models of one name after their modules).
SCHEMAS: dict[type, Mirror] = {
    schemas.Page: answer("Page"),
    schemas.Health: answer("Health"),
    schemas.ReadinessCheck: answer("app__api__v1__health__CheckOut"),
    schemas.ScoringKernel: answer("ScoringKernel"),
    schemas.SmallBatches: answer("SmallBatches"),
    schemas.Readiness: answer("Readiness"),
    schemas.CheckpointIn: body("CheckpointIn"),
    schemas.Checkpoint: answer("CheckpointOut"),
    schemas.MemoryEstimate: answer("MemoryEstimateOut"),
    schemas.Model: answer("ModelOut"),
    schemas.Layer: answer("LayerOut"),
    schemas.ModelLayers: answer("ModelLayers"),
    schemas.ModelOptions: options("ModelCreate", "source", "name"),
    schemas.ColumnMapping: answer("ColumnMapping"),
    schemas.Dataset: answer("DatasetOut"),
    schemas.DatasetRow: answer("DatasetRow"),
    schemas.DatasetOptions: options("DatasetRegistrationForm", "file", "path"),
    schemas.Job: answer("JobOut"),
    schemas.UnitProjection: answer("UnitProjectionOut"),
    schemas.Projection: answer("ProjectionOut"),
    schemas.FidelitySample: answer("FidelitySample"),
    schemas.UnitFidelity: answer("UnitFidelityOut"),
    schemas.IndexFidelity: answer("IndexFidelity"),
    schemas.Index: answer("IndexOut"),
    schemas.IndexOptions: options("IndexCreate", "model_id", "dataset_id"),
    schemas.AnswerSettings: answer("AnswerSettings"),
    schemas.WorkflowSettings: answer("WorkflowSettings"),
    schemas.IndexSettings: answer("IndexSettingsOut"),
    schemas.IndexSettingsUpdate: body("IndexSettingsUpdate"),
    schemas.RowsDeleted: answer("RowsDeleted"),
    schemas.Example: body("QueryExample"),
    schemas.ScoringOptions: options(
        "QueryRequest", "examples", "top_k", "direction", "approximate", "candidates_per_layer"
    ),
    schemas.QueryOptions: options("QueryRequest", "examples"),
    schemas.LayerScore: answer("LayerScore"),
    schemas.Hit: answer("Hit"),
    schemas.ExampleResult: answer("ExampleResult"),
    schemas.Approximation: answer("Approximation"),
    schemas.QueryResult: answer("QueryResponse"),
    schemas.Reference: body("ReferenceSet"),
    schemas.NoisyRows: body("NoisyRows"),
    schemas.AuditReview: body("AuditReview"),
    schemas.AuditOptions: options("AuditCreate", "reference"),
    schemas.AuditTopRow: answer("AuditTopRow"),
    schemas.NoiseDetection: answer("NoiseDetection"),
    schemas.AuditSummary: answer("AuditSummary"),
    schemas.Audit: answer("AuditOut"),
    schemas.AuditLayer: answer("AuditLayerScore"),
    schemas.AuditRow: answer("AuditRow"),
    schemas.AuditRowsPage: answer("AuditRowsPage"),
    schemas.ReportOptions: options("ReportCreate", "reference"),
    schemas.Report: answer("ReportOut"),
    schemas.CheckOptions: options(
        "Body_create_check_v1_indexes__index_id__checks_post",
        "file",
        "reference",
        "text_column",
        "label_column",
    ),
    schemas.CheckLayer: answer("CheckLayer"),
    schemas.CheckRow: answer("CheckRow"),
    schemas.CheckAppend: answer("CheckAppend"),
    schemas.Check: answer("app__workflows__check__schemas__CheckOut"),
    schemas.ExperimentOptions: options("ExperimentCreate", "base_model_id", "dataset_id", "reference"),
    schemas.Experiment: answer("ExperimentOut"),
}

ID = "0123abcd"
EXAMPLE = {"text": "a fine film", "label": 1}
REFERENCE = {"dataset_id": ID, "limit": 5}
# Every public method of the client, called as a caller would; each request it sends is checked against the
# document's operations.
CALLS: dict[str, Callable[[InfluenceClient, Any], Any]] = {
    "health": lambda c, _: c.health(),
    "check_service_version": lambda c, _: c.check_service_version(),
    "ready": lambda c, _: c.ready(),
    "register_model": lambda c, _: c.register_model("/models/m", "m", num_labels=2),
    "list_models": lambda c, _: c.list_models(),
    "get_model": lambda c, _: c.get_model(ID),
    "delete_model": lambda c, _: c.delete_model(ID),
    "model_layers": lambda c, _: c.model_layers(ID),
    "upload_dataset": lambda c, _: c.upload_dataset(b"text\tlabel\nfine\t1\n", format="tsv"),
    "register_dataset_path": lambda c, _: c.register_dataset_path("/data/d.tsv", text_column="sentence"),
    "list_datasets": lambda c, _: c.list_datasets(),
    "get_dataset": lambda c, _: c.get_dataset(ID),
    "dataset_rows": lambda c, _: c.dataset_rows(ID),
    "delete_dataset": lambda c, _: c.delete_dataset(ID),
    "create_index": lambda c, _: c.create_index(ID, ID, layers="middle"),
    "get_index": lambda c, _: c.get_index(ID),
    "list_indexes": lambda c, _: c.list_indexes(status="ready"),
    "delete_index": lambda c, _: c.delete_index(ID),
    "delete_rows": lambda c, _: c.delete_rows(ID, [1, 2]),
    "compact": lambda c, _: c.compact(ID),
    "index_settings": lambda c, _: c.index_settings(ID),
    "set_index_settings": lambda c, _: c.set_index_settings(ID, "pinned-report", ID),
    "query": lambda c, _: c.query(ID, [EXAMPLE], top_k=3),
    "get_job": lambda c, _: c.get_job(ID),
    "list_jobs": lambda c, _: c.list_jobs(kind="audit"),
    "cancel_job": lambda c, _: c.cancel_job(ID),
    "wait_for_job": lambda c, _: c.wait_for_job(ID),
    "create_audit": lambda c, _: c.create_audit(
        ID, REFERENCE, aggregation="mean", review={"target_recall": 0.9, "noisy": "dataset"}
    ),
    "get_audit": lambda c, _: c.get_audit(ID),
    "list_audits": lambda c, _: c.list_audits(),
    "delete_audit": lambda c, _: c.delete_audit(ID),
    "audit_rows": lambda c, _: c.audit_rows(ID, review=True),
    "iter_audit_rows": lambda c, _: list(c.iter_audit_rows(ID)),
    "download_audit": lambda c, _: c.download_audit(ID, "jsonl", review=True),
    "download_audit_scores": lambda c, folder: c.download_audit_scores(ID, folder / "scores.safetensors"),
    "create_report": lambda c, _: c.create_report(ID, REFERENCE, estimators=["grad-dot"]),
    "get_report": lambda c, _: c.get_report(ID),
    "list_reports": lambda c, _: c.list_reports(index_id=ID),
    "delete_report": lambda c, _: c.delete_report(ID),
    "report_html": lambda c, _: c.report_html(ID),
    "create_check": lambda c, _: c.create_check(
        ID,
        b"text\tlabel\nfine\t1\n",
        reference=REFERENCE,
        text_column="text",
        label_column="label",
        target_recall=0.8,
        noisy={"rows": [1, 2]},
        append=True,
    ),
    "get_check": lambda c, _: c.get_check(ID, flagged_only=True),
    "list_checks": lambda c, _: c.list_checks(),
    "delete_check": lambda c, _: c.delete_check(ID),
    "create_experiment": lambda c, _: c.create_experiment(ID, ID, REFERENCE, noise_rate=0.2),
    "get_experiment": lambda c, _: c.get_experiment(ID),
    "list_experiments": lambda c, _: c.list_experiments(),
    "delete_experiment": lambda c, _: c.delete_experiment(ID),
}


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("openapi")
    return create_app(make_settings(folder, "sqlite://", [folder])).openapi()


def _typed_dicts() -> dict[str, type]:
    return {
        name: value
        for name, value in vars(schemas).items()
        if typing.is_typeddict(value) and value.__module__ == schemas.__name__
    }


def _schemas_of(document: dict[str, Any], mirror: Mirror) -> dict[str, dict[str, Any]]:
    """The schema a TypedDict mirrors, by name; a generic model's every instance."""
    components = document["components"]["schemas"]
    if mirror.schema == "Page":
        return {name: schema for name, schema in components.items() if name.startswith("Page_")}
    assert mirror.schema in components, f"the service has no schema {mirror.schema}"
    return {mirror.schema: components[mirror.schema]}


def _annotations(typed_dict: type) -> dict[str, Any]:
    return typing.get_type_hints(typed_dict, include_extras=True)


def _members(annotation: Any) -> Iterator[Any]:
    """The alternatives of an annotation: through Required / NotRequired and unions, not into containers."""
    origin = typing.get_origin(annotation)
    if origin in (Required, NotRequired, typing.Union, types.UnionType):
        for argument in typing.get_args(annotation):
            yield from _members(argument)
    else:
        yield annotation


def _literal_values(annotation: Any) -> set[Any] | None:
    values = [
        value
        for member in _members(annotation)
        if typing.get_origin(member) is Literal
        for value in typing.get_args(member)
    ]
    return set(values) or None


def _enum_values(prop: dict[str, Any]) -> set[Any] | None:
    values = [
        value
        for member in [prop, *prop.get("anyOf", [])]
        for value in [*member.get("enum", []), *([member["const"]] if "const" in member else [])]
    ]
    return set(values) or None


def _nested_typed_dicts(annotation: Any) -> set[type]:
    """Every TypedDict of the client an annotation holds, at any depth (lists, dicts, unions)."""
    found = {annotation} if typing.is_typeddict(annotation) else set()
    origin = typing.get_origin(annotation)
    if typing.is_typeddict(origin):  # a generic TypedDict, Page[Job]
        found.add(origin)
    for argument in typing.get_args(annotation):
        found |= _nested_typed_dicts(argument)
    return found


def _refs(prop: Any) -> set[str]:
    """Every schema a property refers to, at any depth."""
    if isinstance(prop, dict):
        own = {prop["$ref"].removeprefix(REF_PREFIX)} if "$ref" in prop else set()
        return own.union(*(_refs(value) for value in prop.values()))
    if isinstance(prop, list):
        return set().union(*(_refs(value) for value in prop))
    return set()


def _contract_errors(typed_dict: type, mirror: Mirror, name: str, schema: dict[str, Any]) -> list[str]:
    """How a TypedDict departs from the schema it mirrors ([] when it does not)."""
    where = f"{typed_dict.__name__} ~ {name}"
    properties: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    keys, client_required = set(_annotations(typed_dict)), set(typed_dict.__required_keys__)
    errors = []
    expected = set(properties) - mirror.arguments
    if keys != expected:
        errors.append(
            f"{where}: keys only in the client {sorted(keys - expected)}, only in the service "
            f"{sorted(expected - keys)}"
        )
    if mirror.options:
        if client_required:
            errors.append(f"{where}: options the caller must give {sorted(client_required)}")
        if not required <= mirror.arguments:
            errors.append(
                f"{where}: the service requires {sorted(required - mirror.arguments)}, not arguments"
            )
    elif mirror.sent:
        if client_required != required & keys:
            errors.append(
                f"{where}: required in the client {sorted(client_required)}, in the service "
                f"{sorted(required)}"
            )
    elif not required & keys <= client_required:
        errors.append(
            f"{where}: the service always sends {sorted(required & keys - client_required)}, "
            "which the client takes as optional"
        )
    for key, annotation in _annotations(typed_dict).items():
        prop = properties.get(key)
        if prop is None:
            continue
        literals, enum = _literal_values(annotation), _enum_values(prop)
        if not mirror.options and literals != enum:
            errors.append(f"{where}.{key}: Literal {sorted(literals or [])}, enum {sorted(enum or [])}")
        nested = {SCHEMAS[typed].schema for typed in _nested_typed_dicts(annotation) if typed in SCHEMAS}
        if not nested <= _refs(prop):
            errors.append(
                f"{where}.{key}: the client's {sorted(nested)}, the service's {sorted(_refs(prop))}"
            )
    return errors


def test_every_typed_dict_of_the_client_names_the_schema_it_mirrors():
    assert set(_typed_dicts().values()) == set(SCHEMAS)


def test_every_typed_dict_matches_its_schema(document):
    errors = [
        error
        for typed_dict, mirror in SCHEMAS.items()
        for name, schema in _schemas_of(document, mirror).items()
        for error in _contract_errors(typed_dict, mirror, name, schema)
    ]
    assert errors == [], "\n".join(errors)


class Sent(NamedTuple):
    """What a request carried: its query parameters' names and its body's fields (JSON, form or multipart)."""

    query: frozenset[str]
    fields: frozenset[str]


def _sent(request: httpx.Request) -> Sent:
    content_type = request.headers.get("content-type", "")
    content = request.read()
    if content_type.startswith("application/json"):
        fields = set(json.loads(content))
    elif content_type.startswith("multipart/form-data"):
        fields = {
            name.decode() for name in re.findall(rb'Content-Disposition: form-data; name="([^"]+)"', content)
        }
    elif content_type.startswith("application/x-www-form-urlencoded"):
        fields = set(parse_qs(content.decode(), keep_blank_values=True))
    else:
        fields = set()
    return Sent(frozenset(request.url.params.keys()), frozenset(fields))


class Recorder(httpx.BaseTransport):
    """Answers every request with one JSON body that each method can read (a finished job, an empty page)."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.sent: list[Sent] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        self.sent.append(_sent(request))
        return httpx.Response(
            200, json={"id": ID, "status": "succeeded", "items": [], "total": 0, "offset": 0, "limit": 50}
        )


def _operation(document: dict[str, Any], method: str, path: str) -> str | None:
    """The document's operation (`GET /v1/models/{model_id}`) that a request goes to."""
    for template, operations in document["paths"].items():
        pattern = re.sub(r"\{[^/}]+\}", "[^/]+", template)
        if re.fullmatch(pattern, path) and method.lower() in operations:
            return f"{method} {template}"
    return None


def _accepted(document: dict[str, Any], operation: str) -> Sent:
    """The query parameters and the body fields an operation of the document takes."""
    method, template = operation.split(" ", 1)
    spec = document["paths"][template][method.lower()]
    query = {p["name"] for p in spec.get("parameters", []) if p["in"] == "query"}
    fields: set[str] = set()
    for media in (spec.get("requestBody") or {}).get("content", {}).values():
        schema = media["schema"]
        if "$ref" in schema:
            schema = document["components"]["schemas"][schema["$ref"].removeprefix(REF_PREFIX)]
        fields |= set(schema.get("properties", {}))
    return Sent(frozenset(query), frozenset(fields))


def test_every_route_the_client_calls_is_in_the_document(document, tmp_path):
    methods = {
        name
        for name, member in vars(InfluenceClient).items()
        if callable(member) and not name.startswith("_") and name != "close"
    }
    assert methods == set(CALLS), "each public method of the client has its call in CALLS"
    missing = []
    for name, call in CALLS.items():
        recorder = Recorder()
        with InfluenceClient("http://service", "key", transport=recorder) as client:
            call(client, tmp_path)
        assert recorder.requests, f"{name} sent no request"
        missing += [f"{name}: {m} {p}" for m, p in recorder.requests if _operation(document, m, p) is None]
    assert missing == [], "routes the service does not have:\n" + "\n".join(missing)


def test_every_parameter_and_field_the_client_sends_is_one_the_route_takes(document, tmp_path):
    """A query parameter or a body field the service does not know would be ignored (or refused) there: e.g.
    `review` of audit_rows, the targets of create_check, the body of set_index_settings."""
    unknown = []
    for name, call in CALLS.items():
        recorder = Recorder()
        with InfluenceClient("http://service", "key", transport=recorder) as client:
            call(client, tmp_path)
        for (method, path), sent in zip(recorder.requests, recorder.sent, strict=True):
            operation = _operation(document, method, path)
            assert operation is not None, f"{name}: {method} {path}"
            accepted = _accepted(document, operation)
            unknown += [f"{name}: query {key}" for key in sorted(sent.query - accepted.query)]
            unknown += [f"{name}: field {key}" for key in sorted(sent.fields - accepted.fields)]
    assert unknown == [], "sent, but not in the document:\n" + "\n".join(unknown)


def test_scoring_options_left_out_are_not_sent(tmp_path):
    """Layers, estimator, aggregation, vote_k, correct_only (and a check's threshold) a caller leaves out are
    not sent: the service then takes them from the index's settings, which anything sent would override."""
    sent = {
        "query": lambda c: c.query(ID, [EXAMPLE]),
        "create_audit": lambda c: c.create_audit(ID, REFERENCE),
        "create_check": lambda c: c.create_check(
            ID, b"text\tlabel\nfine\t1\n", reference=REFERENCE, text_column="text", label_column="label"
        ),
        "create_audit (estimator)": lambda c: c.create_audit(ID, REFERENCE, estimator="cosine"),
    }
    fields = {}
    for name, call in sent.items():
        recorder = Recorder()
        with InfluenceClient("http://service", "key", transport=recorder) as client:
            call(client)
        fields[name] = set(recorder.sent[0].fields)
    assert fields == {
        "query": {"examples"},
        "create_audit": {"reference"},
        "create_check": {"file", "reference", "text_column", "label_column"},
        "create_audit (estimator)": {"reference", "estimator"},
    }
