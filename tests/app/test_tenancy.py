"""Tenants and API keys: every /v1 route needs a valid key (401 otherwise), and no key sees, lists, queries,
changes or deletes another tenant's models, datasets, indexes or jobs: another tenant's id answers 404 exactly
as an unknown id does (a test per route; a test that every route has one). Keys are stored as hashes only;
`python -m app.admin` makes tenants and keys; the embedded runner's local key is made once, mode 0600; the
concurrent jobs of a tenant are limited."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import threading

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.jobs.steps import run_job_inline
from app.models import ApiKey, Index, Job
from tests.app.conftest import ROOT_DIR, build_api, fresh_api, make_settings
from tests.worker.support import assert_problem, built_index, register_dataset, register_model, tsv


@pytest.fixture(scope="module")
def owner(tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows):
    """Tenant A's resources (model, dataset, a ready index, a finished and a queued job) and tenant B's client."""
    api = fresh_api(tmp_path_factory, sqlite_template, "tenancy")
    folder = tiny_model_dir("bert", "classification", num_labels=2)
    model, dataset, index = built_index(api, folder, sst2_rows[:30], dataset_name="sst2", layers="head")
    queued = api.client.post(
        "/v1/indexes", json={"model_id": model["id"], "dataset_id": dataset["id"], "layers": "CL"}
    ).json()
    # One of each workflow (audit, layer report, batch check: run; experiment: left queued).
    audit = api.client.post(f"/v1/indexes/{index['id']}/audits", json={"reference": EXAMPLES}).json()
    report = api.client.post(
        f"/v1/indexes/{index['id']}/reports", json={"reference": EXAMPLES, "cancellation_rows": 0}
    ).json()
    check = api.client.post(
        f"/v1/indexes/{index['id']}/checks",
        files={"file": ("b.tsv", tsv(sst2_rows[40:42]))},
        data={"text_column": "sentence", "reference": json.dumps(EXAMPLES)},
    ).json()
    for job in (audit, report, check):
        run_job_inline(api.settings, api.session_factory, job["id"])
    experiment = api.client.post(
        "/v1/experiments",
        json={
            "base_model_id": model["id"],
            "dataset_id": dataset["id"],
            "reference": {"dataset_id": dataset["id"], "limit": 5},
            "max_length": 32,
        },
    ).json()
    other = api.other_client("tenant-b")
    mine = {
        "audit": audit["id"],
        "report": report["id"],
        "check": check["id"],
        "experiment": experiment["id"],
        "model": model["id"],
        "dataset": dataset["id"],
        "index": index["id"],
        "job": index["job"]["id"],
        "queued_job": queued["job"]["id"],
        "queued_index": queued["id"],
    }
    yield api, other, mine, folder
    api.close()
    other.close()


EXAMPLES = {"examples": [{"text": "a fine film", "label": 1}]}


def _reads(noun: str, plural: str, *below: str, deletable: bool = True) -> dict:
    """The cross-tenant cases of a collection: its list (none of A's), and its item, the `below` routes under
    the item and (when `deletable`) its DELETE: each 404 for A's id. `noun` is the key of A's id."""
    item = f"/v1/{plural}/{{{noun}_id}}"
    cases = {("GET", f"/v1/{plural}"): lambda b, a: ("list", b.get(f"/v1/{plural}"))}
    for tail in ("", *below):
        cases[("GET", item + tail)] = lambda b, a, tail=tail: (404, b.get(f"/v1/{plural}/{a[noun]}{tail}"))
    if deletable:
        cases[("DELETE", item)] = lambda b, a: (404, b.delete(f"/v1/{plural}/{a[noun]}"))
    return cases


# (method, route path) -> what tenant B does there with tenant A's ids, and what it must get.
CROSS_TENANT = {
    **_reads("model", "models", "/layers"),
    **_reads("dataset", "datasets", "/rows"),
    **_reads("index", "indexes", "/settings"),
    ("PUT", "/v1/indexes/{index_id}/settings"): lambda b, a: (
        404,
        b.put(f"/v1/indexes/{a['index']}/settings", json={"mode": "pinned-report", "report_id": a["report"]}),
    ),
    ("POST", "/v1/indexes"): lambda b, a: (
        404,
        b.post("/v1/indexes", json={"model_id": a["model"], "dataset_id": a["dataset"]}),
    ),
    ("POST", "/v1/indexes/{index_id}/query"): lambda b, a: (
        404,
        b.post(f"/v1/indexes/{a['index']}/query", json=EXAMPLES),
    ),
    ("POST", "/v1/indexes/{index_id}/rows/delete"): lambda b, a: (
        404,
        b.post(f"/v1/indexes/{a['index']}/rows/delete", json={"row_ids": [1]}),
    ),
    ("POST", "/v1/indexes/{index_id}/compact"): lambda b, a: (404, b.post(f"/v1/indexes/{a['index']}/compact")),
    ("POST", "/v1/indexes/{index_id}/audits"): lambda b, a: (
        404,
        b.post(f"/v1/indexes/{a['index']}/audits", json={"reference": EXAMPLES}),
    ),
    **_reads("audit", "audits", "/rows", "/scores"),
    ("POST", "/v1/indexes/{index_id}/reports"): lambda b, a: (
        404,
        b.post(f"/v1/indexes/{a['index']}/reports", json={"reference": EXAMPLES}),
    ),
    **_reads("report", "reports", "/html"),
    ("POST", "/v1/indexes/{index_id}/checks"): lambda b, a: (
        404,
        b.post(
            f"/v1/indexes/{a['index']}/checks",
            files={"file": ("b.tsv", tsv([("a fine film", 1)]))},
            data={"text_column": "sentence", "reference": json.dumps(EXAMPLES)},
        ),
    ),
    **_reads("check", "checks"),
    ("POST", "/v1/experiments"): lambda b, a: (
        404,
        b.post(
            "/v1/experiments",
            json={
                "base_model_id": a["model"],
                "dataset_id": a["dataset"],
                "reference": {"dataset_id": a["dataset"]},
            },
        ),
    ),
    **_reads("experiment", "experiments"),
    **_reads("job", "jobs", deletable=False),
    ("POST", "/v1/jobs/{job_id}/cancel"): lambda b, a: (404, b.post(f"/v1/jobs/{a['queued_job']}/cancel")),
}
# Routes that only create the caller's own resource: B's own creation must not touch or reveal A's.
OWN_CREATION = {("POST", "/v1/models"), ("POST", "/v1/datasets")}


def _v1_routes(app) -> set[tuple[str, str]]:
    """Every /v1 operation the API publishes (its OpenAPI document lists each route and method)."""
    return {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        if path.startswith("/v1/")
        for method in operations
    }


def test_every_v1_route_has_a_cross_tenant_case(owner):
    api, *_ = owner
    assert _v1_routes(api.app) == set(CROSS_TENANT) | OWN_CREATION


@pytest.mark.parametrize("route", sorted(CROSS_TENANT), ids=lambda r: f"{r[0]} {r[1]}")
def test_another_tenant_sees_nothing(owner, route):
    api, other, mine, _ = owner
    expected, response = CROSS_TENANT[route](other, mine)
    if expected == "list":
        assert response.status_code == 200, response.text
        assert not {item["id"] for item in response.json()["items"]} & set(mine.values())
    else:
        body = assert_problem(response, 404, "does not exist")
        # Word for word what an unknown id gets: nothing confirms that the id exists.
        unknown = CROSS_TENANT[route](other, dict.fromkeys(mine, "0" * 32))[1].json()
        assert body["detail"].replace(body["detail"].split("'")[1], "X") == unknown["detail"].replace(
            unknown["detail"].split("'")[1], "X"
        )
    # Tenant A still has everything, unchanged.
    client = api.client
    assert client.get(f"/v1/models/{mine['model']}").status_code == 200
    assert client.get(f"/v1/datasets/{mine['dataset']}").status_code == 200
    assert client.get(f"/v1/indexes/{mine['index']}").json()["deleted_rows"] == 0
    assert client.get(f"/v1/indexes/{mine['index']}/settings").json()["mode"] == "latest-report"
    assert client.get(f"/v1/jobs/{mine['queued_job']}").json()["status"] == "queued"
    assert client.get(f"/v1/audits/{mine['audit']}/scores").status_code == 200
    assert client.get(f"/v1/reports/{mine['report']}/html").status_code == 200
    assert client.get(f"/v1/checks/{mine['check']}").json()["status"] == "succeeded"
    assert client.get(f"/v1/experiments/{mine['experiment']}").json()["status"] == "queued"
    assert client.post(f"/v1/indexes/{mine['index']}/query", json=EXAMPLES).status_code == 200


def test_filters_do_not_cross_tenants(owner):
    _, other, mine, _ = owner
    for url, params in (
        ("/v1/indexes", {"model_id": mine["model"]}),
        ("/v1/indexes", {"dataset_id": mine["dataset"]}),
        ("/v1/jobs", {"target_id": mine["index"]}),
        ("/v1/jobs", {"kind": "index_build"}),
    ):
        assert other.get(url, params=params).json()["total"] == 0


def test_own_creations_stay_apart(owner, sst2_rows):
    api, other, mine, folder = owner
    model = register_model(other, folder, name="b-model")
    dataset = register_dataset(other, sst2_rows[:10], name="b-data")
    assert model["id"] != mine["model"] and model["weights_hash"]
    # B cannot mix its own model with A's dataset (or the reverse).
    for body in (
        {"model_id": model["id"], "dataset_id": mine["dataset"]},
        {"model_id": mine["model"], "dataset_id": dataset["id"]},
    ):
        assert_problem(other.post("/v1/indexes", json=body), 404)
    assert [m["id"] for m in other.get("/v1/models").json()["items"]] == [model["id"]]
    assert mine["model"] in [m["id"] for m in api.client.get("/v1/models").json()["items"]]
    assert model["id"] not in [m["id"] for m in api.client.get("/v1/models").json()["items"]]
    assert_problem(api.client.get(f"/v1/datasets/{dataset['id']}"), 404)


def _route_request(client, method, path, headers):
    url = path.replace("{model_id}", "x").replace("{dataset_id}", "x").replace("{index_id}", "x")
    for name in ("job", "audit", "report", "check", "experiment"):
        url = url.replace(f"{{{name}_id}}", "x")
    return client.request(method, url, headers=headers)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer infl_not-a-real-key-at-all-000000000000000000000"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"X-API-Key": "wrong"},
    ],
    ids=["none", "unknown", "empty", "basic", "bad-header"],
)
def test_every_v1_route_needs_a_valid_key(owner, headers):
    api, *_ = owner
    anonymous = TestClient(api.app)
    for method, path in sorted(_v1_routes(api.app)):
        response = _route_request(anonymous, method, path, headers)
        body = assert_problem(response, 401)
        assert body["type"] == "urn:influence:problem:unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    # Health, readiness and the API description stay open.
    for url in ("/healthz", "/openapi.json", "/docs"):
        assert anonymous.get(url).status_code == 200


def test_keys_are_stored_as_hashes_and_can_be_revoked(owner):
    from app.db import session_scope
    from app.services import tenancy

    api, *_ = owner
    client = api.other_client("tenant-revoked")
    token = client.token
    assert client.get("/v1/models").status_code == 200
    with api.session_factory() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == token[:13]))
        assert row.key_hash == hashlib.sha256(token.encode()).hexdigest()
        assert token not in (row.prefix, row.key_hash, row.name)
    # The same key works in either header; a key with the right prefix and a wrong secret does not.
    assert TestClient(api.app).get("/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    forged = token[:13] + "A" * (len(token) - 13)
    assert TestClient(api.app).get("/v1/models", headers={"X-API-Key": forged}).status_code == 401
    with session_scope(api.session_factory) as session:
        tenancy.revoke_key(session, token[:13])
    assert_problem(client.get("/v1/models"), 401, "revoked")


def test_admin_command_makes_tenants_and_keys(owner, capsys):
    from app.admin import main as admin_main

    api, *_ = owner
    url = str(api.settings.resolved_database_url)

    def admin(*args):
        code = admin_main(["--url", url, *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    # Once as the command line an operator types; the rest in-process (the same main()).
    done = subprocess.run(
        [sys.executable, "-m", "app.admin", "--url", url, "create-tenant", "acme"],
        cwd=ROOT_DIR,
        env={**os.environ, "PYTHONPATH": str(ROOT_DIR)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "tenant acme created" in done.stdout, done.stderr
    code, _, err = admin("create-tenant", "acme")
    assert code == 1 and "exists already" in err  # names are unique
    code, out, _ = admin("create-key", "acme", "--name", "ci")
    assert code == 0
    token = out.strip().splitlines()[-1]
    assert token.startswith("infl_") and len(token) == 48
    acme = TestClient(api.app, headers={"Authorization": f"Bearer {token}"})
    assert acme.get("/v1/models").json()["total"] == 0
    code, out, _ = admin("list-tenants")
    assert "acme" in out and token[:13] in out and token not in out
    assert admin("create-key", "nobody")[0] == 1
    code, out, _ = admin("revoke-key", token[:13])
    assert code == 0 and "revoked" in out
    assert acme.get("/v1/models").status_code == 401


def test_the_embedded_local_key_is_made_once_with_mode_0600(tmp_path, sqlite_url):
    from app.db import make_engine, make_session_factory, session_scope
    from app.services.tenancy import authenticate, ensure_local_key

    engine = make_engine(sqlite_url)
    factory = make_session_factory(engine)
    try:
        with session_scope(factory) as session:
            path, created = ensure_local_key(session, tmp_path / "var")
        assert created and path == tmp_path / "var" / "local-api-key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = path.read_text().strip()
        with session_scope(factory) as session:
            assert authenticate(session, token).name == "local"
            assert ensure_local_key(session, tmp_path / "var") == (path, False)
        assert path.read_text().strip() == token
        path.write_text("infl_garbage\n")  # a key the database does not know: replaced
        with session_scope(factory) as session:
            assert ensure_local_key(session, tmp_path / "var")[1] is True
            assert authenticate(session, path.read_text().strip()).name == "local"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        engine.dispose()


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "concurrent"])
def test_concurrent_jobs_per_tenant_are_limited(tmp_path, any_db_url, default_roots, tiny_model_dir, sst2_rows,
                                                parallel):
    api = build_api(make_settings(tmp_path, any_db_url, default_roots, max_active_jobs_per_tenant=2))
    model = register_model(api.client, tiny_model_dir("bert", "classification", num_labels=2))
    dataset = register_dataset(api.client, sst2_rows[:10])
    body = {"model_id": model["id"], "dataset_id": dataset["id"], "layers": "head"}
    if parallel:
        responses = []

        def create():
            responses.append(api.client.post("/v1/indexes", json=body))

        threads = [threading.Thread(target=create) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        codes = sorted(r.status_code for r in responses)
        assert codes == [202, 202, 429, 429, 429], [r.text for r in responses]
        assert api.count(Job) == 2 and api.count(Index) == 2
        return
    first = api.client.post("/v1/indexes", json=body).json()
    api.client.post("/v1/indexes", json=body)
    body_429 = assert_problem(api.client.post("/v1/indexes", json=body), 429, "max_active_jobs_per_tenant = 2")
    assert body_429["type"] == "urn:influence:problem:too-many-requests"
    assert api.count(Index) == 2  # the refused request left nothing
    # Another tenant has its own allowance; a finished (here: cancelled) job frees one.
    other = api.other_client()
    other_model = register_model(other, tiny_model_dir("bert", "classification", num_labels=2))
    other_data = other.post(
        "/v1/datasets", files={"file": ("d.tsv", tsv(sst2_rows[:10]))}, data={"text_column": "sentence"}
    ).json()
    assert other.post(
        "/v1/indexes", json={**body, "model_id": other_model["id"], "dataset_id": other_data["id"]}
    ).status_code == 202
    api.client.post(f"/v1/jobs/{first['job']['id']}/cancel")
    assert api.client.post("/v1/indexes", json=body).status_code == 202
