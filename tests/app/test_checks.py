"""Batch checks over HTTP: every score and percentile equals a brute-force computation with the library on the same
store and batch features; flags, verdicts and reasons follow the threshold exactly (boundary included); a passing
batch with append=true joins the index without a rebuild (the rows equal a full rebuild's, DataInf and FAISS still
answer, a rerun never appends twice, a crash between the dataset and the store leaves a queryable index); a
failing batch never joins; bad files are 4xx and leave nothing; every route is tenant-scoped; cancellation."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from sqlalchemy import update

from app.jobs.model_cache import ModelCache
from app.jobs.steps import run_build_inline, run_job_inline
from app.models import Job
from influence import load_model
from tests.app.conftest import TWO_REVIEWS, fresh_api, jsonl_bytes
from tests.app.library import featurize_as_indexed, index_store, store_scores
from tests.worker.support import assert_problem, built_index, register_dataset, tsv

TRAIN_ROWS = 100
MODELS = ModelCache()
LOADED: dict = {}  # the library's own copy of the tiny model, for the brute-force computations


class Env:
    def __init__(self, api, folder, model, dataset, reference, index, rows):
        self.api, self.folder, self.model, self.dataset = api, folder, model, dataset
        self.reference, self.index, self.rows = reference, index, rows

    @property
    def client(self):
        return self.api.client


def _make_env(
    tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows, name: str, rows: int, index_fields, **settings
) -> Env:
    """An API of its own with a ready tiny-BERT index over the first `rows` SST-2 rows and a reference dataset."""
    api = fresh_api(tmp_path_factory, sqlite_template, name, **settings)
    folder = tiny_model_dir("bert", "classification", num_labels=2)
    model, dataset, index = built_index(api, folder, sst2_rows[:rows], models=MODELS, **index_fields)
    reference = register_dataset(api.client, sst2_rows[250:270], name="reference")
    return Env(api, folder, model, dataset, reference, index, sst2_rows)


@pytest.fixture(scope="module")
def env(tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows):
    """An API with a ready tiny-BERT index (every layer, float16) over 100 SST-2 rows and a reference dataset."""
    built = _make_env(
        tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows, "checks", TRAIN_ROWS, {"chunk_size": 50}
    )
    yield built
    built.api.close()


def _submit(client, index_id: str, rows, *, reference=None, filename="batch.tsv", content=None, **form):
    data = {"text_column": "sentence", "label_column": "label"}
    data["reference"] = json.dumps(reference)
    for key, value in form.items():
        data[key] = value if isinstance(value, str) else json.dumps(value)
    body = content if content is not None else tsv(rows)
    return client.post(f"/v1/indexes/{index_id}/checks", files={"file": (filename, body)}, data=data)


def _run(env: Env, check: dict, settings=None) -> dict:
    run_job_inline(settings or env.api.settings, env.api.session_factory, check["id"], models=MODELS)
    response = env.client.get(f"/v1/checks/{check['id']}", params={"limit": 10_000})
    assert response.status_code == 200, response.text
    return response.json()


def _check(env: Env, rows, **form) -> dict:
    form.setdefault("reference", {"dataset_id": env.reference["id"]})
    response = _submit(env.client, env.index["id"], rows, **form)
    assert response.status_code == 202, response.text
    return _run(env, response.json())


# ------------------------------------------------------------------------------------------ brute force


def _store(env: Env, index_id: str | None = None):
    return index_store(env.api, index_id or env.index["id"])


def _featurize(env: Env, store, layers, rows):
    """The library's features of (text, label) rows under the index's model and projection: float32."""
    if env.folder not in LOADED:
        LOADED[env.folder] = load_model(env.folder, num_labels=2)
    return featurize_as_indexed(store, LOADED[env.folder], layers, rows, batch_size=env.api.settings.batch_size)


def _brute_force(
    env: Env, batch, reference_rows, *, layers, estimator, aggregation, vote_k=0.2, correct_only=False
):
    """Scores, aggregates and percentiles recomputed with the library: the store's live rows followed by the
    batch rows as a store would hold them (float16, norms from the float32 values)."""
    from influence import aggregate, make_estimator, score_tensor
    from influence.tokens import TokenRows

    store = _store(env)
    live = store.live_positions()
    train = _featurize(env, store, layers, batch)
    test = _featurize(env, store, layers, reference_rows)
    features, norms, estimators = {}, {}, {}
    for name in layers:
        estimators[name] = make_estimator(estimator)
        if isinstance(train.features[name], TokenRows):  # the exact embedding: token rows, float16 values
            new = train.features[name]
            stored = TokenRows(new.offsets, new.tokens, np.asarray(new.values).astype(np.float16))
            features[name] = TokenRows.concat([store.layer(name).select(live), stored])
            norms[name] = np.concatenate([np.asarray(store.norms(name))[live], new.norms().numpy()])
            if estimator == "datainf":
                estimators[name].fit_token_rows(store.layer(name), store.layer_spec(name).num_params)
            continue
        new32 = train.features[name].astype(np.float32)
        features[name] = np.concatenate([np.asarray(store.layer(name))[live], new32.astype(np.float16)])
        norms[name] = np.concatenate(
            [
                np.asarray(store.norms(name))[live],
                np.linalg.norm(new32.astype(np.float64), axis=1).astype(np.float32),
            ]
        )
        if estimator == "datainf":
            everything = torch.from_numpy(np.array(store.layer(name), dtype=np.float32))
            estimators[name].fit(lambda block=everything: [block], store.layer_spec(name).num_params)
    scores = score_tensor(features, test.features, estimators, norms)
    labels = np.array([label for _, label in reference_rows])
    correct = test.predictions == labels if correct_only else None
    n = len(live)
    voters = np.flatnonzero(correct) if correct is not None else np.arange(len(reference_rows))
    aggregated = aggregate(scores, aggregation, vote_k=vote_k, correct=correct)

    def percentile(values):
        below = (values[:n][None, :] < values[n:][:, None]).sum(axis=1)
        return 100.0 * below / n

    per_layer = []
    for u in range(len(layers)):
        own = aggregate(scores[:, u : u + 1, :], aggregation, vote_k=vote_k, correct=correct)
        mean = scores[n:, u, :][:, voters].astype(np.float64).mean(axis=1)
        per_layer.append((own[n:], percentile(own), mean))
    return aggregated[n:], percentile(aggregated), per_layer, n


REFERENCE = slice(250, 270)


@pytest.mark.parametrize(
    ("layers", "estimator", "aggregation", "correct_only"),
    [
        ("middle", "grad-dot", "rank", False),
        (None, "datainf", "vote", True),
        (["head", "block.1.attn.v"], "cosine", "mean", False),
    ],
)
def test_scores_and_percentiles_equal_the_brute_force(env, layers, estimator, aggregation, correct_only):
    batch = env.rows[120:132]
    form = {"estimator": estimator, "aggregation": aggregation, "correct_only": str(correct_only).lower()}
    if layers is not None:
        form["layers"] = layers if isinstance(layers, str) else json.dumps(layers)
    check = _check(env, batch, threshold_percentile="50", max_flagged="100", **form)
    assert check["status"] == "succeeded", check["job"]
    summary = check["summary"]
    chosen = summary["layers"]
    if layers is None:
        assert chosen == env.index["layers"]
    scores, ranks, per_layer, existing = _brute_force(
        env,
        batch,
        env.rows[REFERENCE],
        layers=chosen,
        estimator=estimator,
        aggregation=aggregation,
        correct_only=correct_only,
    )
    assert summary["existing_rows"] == existing == TRAIN_ROWS and summary["rows"] == len(batch)
    assert [row["row"] for row in check["rows"]] == list(range(len(batch)))
    for i, row in enumerate(check["rows"]):
        assert (row["text"], row["label"], row["dataset_row"]) == (batch[i][0], batch[i][1], None)
        assert row["score"] == float(scores[i])  # bit for bit
        assert row["percentile"] == float(ranks[i])
        assert row["flagged"] == (ranks[i] < 50)
        assert [layer["layer"] for layer in row["layers"]] == chosen
        for layer, (own, own_ranks, mean) in zip(row["layers"], per_layer, strict=True):
            assert layer["aggregate"] == float(own[i])
            assert layer["percentile"] == float(own_ranks[i])
            assert layer["score"] == pytest.approx(float(mean[i]), rel=1e-12, abs=1e-30)
    flagged = sum(row["flagged"] for row in check["rows"])
    assert summary["flagged"] == flagged
    assert check["verdict"] == "pass" and check["appended"] == 0
    assert check["append"] == {
        "requested": False,
        "status": "not-requested",
        "reason": None,
        "dataset_rows": None,
        "index_rows": None,
    }


def _existing_head_means(env: Env) -> np.ndarray:
    """The library's mean grad-dot score of every existing row on the head layer (what a check over the head
    layer with `mean` ranks the existing rows by: mean does not depend on the other rows)."""
    from influence import aggregate

    store = _store(env)
    reference = _featurize(env, store, ["head"], env.rows[REFERENCE])
    return aggregate(store_scores(store, reference, ["head"], "grad-dot"), "mean")


def test_copies_of_detrimental_rows_are_flagged_and_the_threshold_is_strict(env):
    existing = _existing_head_means(env)
    order = np.argsort(existing, kind="stable")
    rows = env.rows[:TRAIN_ROWS]
    low, high = [rows[i] for i in order[:3]], [rows[i] for i in order[-3:]]
    flipped = [(text, 1 - label) for text, label in high]
    form = {"layers": "head", "aggregation": "mean", "estimator": "grad-dot"}
    check = _check(env, low + high + flipped, **form)
    got = check["rows"]
    # Copies score as their originals do, so they land where the originals are: the most detrimental ones are
    # flagged, the most helpful ones are not.
    for i, source in enumerate([*order[:3], *order[-3:]]):
        assert got[i]["score"] == pytest.approx(float(existing[source]), rel=1e-3)
    assert all(row["flagged"] and row["percentile"] < 5 for row in got[:3])
    assert all(not row["flagged"] and row["percentile"] >= 95 for row in got[3:6])
    # A flipped label turns a helpful row into a harmful one (the head's gradient changes direction).
    for copy, flip in zip(got[3:6], got[6:9], strict=True):
        assert flip["score"] < 0 < copy["score"] and flip["percentile"] < 50
    flagged = sorted((r for r in got if r["flagged"]), key=lambda r: (r["percentile"], r["score"]))
    assert check["verdict"] == "fail" and check["summary"]["flagged"] == len(flagged) >= 3
    worst = flagged[0]
    assert check["reasons"][0] == (
        f"{len(flagged)} of 9 new rows score below the 5th percentile of the 100 existing rows "
        f"(most detrimental: row {worst['row']}, percentile {worst['percentile']:.1f})"
    )
    assert check["reasons"][1].startswith(f"flagged, most detrimental first: row {worst['row']} ")
    assert check["reasons"][-1] == "fail: at most 0 may be flagged (max_flagged)"
    assert any("near chance" in warning for warning in check["warnings"])  # an untrained model
    listed = env.client.get(f"/v1/checks/{check['id']}", params={"flagged_only": "true", "limit": 2}).json()
    assert (
        listed["rows_total"] == len(flagged)
        and [r["row"] for r in listed["rows"]] == sorted(r["row"] for r in flagged)[:2]
    )

    # The threshold is strict: a row whose percentile equals it is not flagged.
    percentiles = sorted({row["percentile"] for row in got})
    threshold = percentiles[1]
    below = sum(row["percentile"] < threshold for row in got)
    assert 0 < below < 9
    for max_flagged, verdict in ((below, "pass"), (below - 1, "fail")):
        again = _check(
            env,
            low + high + flipped,
            threshold_percentile=repr(threshold),
            max_flagged=str(max_flagged),
            **form,
        )
        assert [r["percentile"] for r in again["rows"]] == [r["percentile"] for r in got]  # deterministic
        assert [r["flagged"] for r in again["rows"]] == [r["percentile"] < threshold for r in got]
        assert again["verdict"] == verdict and again["summary"]["flagged"] == below
        assert again["reasons"][0].startswith(f"{below} of 9 new rows score below the ")
        assert again["reasons"][-1] == f"{verdict}: at most {max_flagged} may be flagged (max_flagged)"


# ---------------------------------------------------------------------------------------------- append

GROW_ROWS = 60
GROW_LAYERS = ["head", "block.1.attn.v", "block.0.mlp.down"]


@pytest.fixture
def grow(tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows):
    """An API with a small index (3 layers, float16, flat FAISS) over 60 rows: appends change it, so one per test."""
    index_fields = {"chunk_size": 25, "layers": GROW_LAYERS}
    env = _make_env(
        tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows, "grow", GROW_ROWS, index_fields, max_top_k=500
    )
    assert env.index["num_rows"] == GROW_ROWS
    yield env
    env.api.close()


def _query(env: Env, index_id: str, **body):
    response = env.client.post(f"/v1/indexes/{index_id}/query", json={**TWO_REVIEWS, "top_k": 500, **body})
    return response


def _rebuild(env: Env) -> dict:
    """A full build of a new index over the dataset as it is now, with the same model, layers and projection."""
    body = {
        "model_id": env.model["id"],
        "dataset_id": env.dataset["id"],
        "chunk_size": 25,
        "layers": GROW_LAYERS,
    }
    index = env.client.post("/v1/indexes", json=body).json()
    run_build_inline(env.api.settings, env.api.session_factory, index["job"]["id"], models=MODELS)
    return env.client.get(f"/v1/indexes/{index['id']}").json()


def test_a_passing_batch_joins_the_index_without_a_rebuild(grow):
    env = grow
    batch = env.rows[200:210]
    size_before = env.index["size_bytes"]
    check = _check(env, batch, append="true", max_flagged="10")
    assert check["status"] == "succeeded" and check["verdict"] == "pass"
    assert check["appended"] == 10
    assert check["append"] == {
        "requested": True,
        "status": "appended",
        "reason": None,
        "dataset_rows": [60, 70],
        "index_rows": 70,
    }
    assert [row["dataset_row"] for row in check["rows"]] == list(range(60, 70))
    index = env.client.get(f"/v1/indexes/{env.index['id']}").json()
    assert index["num_rows"] == 70 and index["size_bytes"] > size_before
    assert index["manifest"] == env.index["manifest"]  # same identity: rows were only added
    dataset = env.client.get(f"/v1/datasets/{env.dataset['id']}").json()
    assert dataset["row_count"] == 70 and dataset["content_hash"] == env.dataset["content_hash"]
    page = env.client.get(f"/v1/datasets/{env.dataset['id']}/rows", params={"offset": 55, "limit": 50}).json()
    assert page["total"] == 70
    assert [(r["text"], r["label"]) for r in page["items"]] == [tuple(r) for r in env.rows[55:60] + batch]

    # Queries see the new rows, with their text.
    answer = _query(env, env.index["id"]).json()
    assert answer["num_rows"] == 70
    hits = answer["results"][0]["helpful"]
    assert sorted(hit["row"] for hit in hits) == list(range(70))
    for hit in hits:
        if hit["row"] >= 60:
            assert (hit["text"], hit["label"]) == tuple(batch[hit["row"] - 60])

    # The stored rows are the rows a full build of the grown dataset holds.
    rebuilt = _rebuild(env)
    assert rebuilt["num_rows"] == 70
    grown, fresh = _store(env), _store(env, rebuilt["id"])
    assert grown.num_segments == 2 and list(grown.row_ids()) == list(fresh.row_ids()) == list(range(70))
    for name in GROW_LAYERS:
        np.testing.assert_allclose(
            np.asarray(grown.layer(name), dtype=np.float32),
            np.asarray(fresh.layer(name), dtype=np.float32),
            rtol=2e-3,
            atol=1e-6,
        )
        np.testing.assert_allclose(grown.norms(name), fresh.norms(name), rtol=1e-5, atol=1e-7)
        # DataInf statistics were refitted over every row: as a rebuild fits them.
        ours, theirs = grown.load_layer_statistics(name), fresh.load_layer_statistics(name)
        assert sorted(ours) == sorted(theirs)
        for key in ours:
            np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-3, atol=1e-6)

    # DataInf, cosine and approximate (FAISS) queries answer over the grown index as over the rebuilt one.
    for body in ({"estimator": "datainf", "aggregation": "mean"}, {"estimator": "cosine"}):
        a = _query(env, env.index["id"], **body).json()["results"]
        b = _query(env, rebuilt["id"], **body).json()["results"]
        for x, y in zip(a, b, strict=True):
            assert [h["score"] for h in x["helpful"][:5]] == pytest.approx(
                [h["score"] for h in y["helpful"][:5]], rel=1e-2
            )
    approximate = _query(env, env.index["id"], approximate=True, candidates_per_layer=70, top_k=5).json()
    exact = _query(env, env.index["id"], top_k=5).json()
    assert approximate["approximate"] is True and approximate["results"][0]["candidates"] == 70
    for x, y in zip(approximate["results"], exact["results"], strict=True):
        assert [h["row"] for h in x["harmful"]] == [h["row"] for h in y["harmful"]]

    # The same job delivered again (its worker died after the append, before recording it): nothing doubles.
    with env.api.session_factory() as session:
        session.execute(update(Job).where(Job.id == check["id"]).values(status="running"))
        session.commit()
    again = _run(env, check)
    assert again["status"] == "succeeded" and again["appended"] == 10
    assert again["append"]["dataset_rows"] == [60, 70] and again["rows"] == check["rows"]
    assert env.client.get(f"/v1/datasets/{env.dataset['id']}").json()["row_count"] == 70
    assert env.client.get(f"/v1/indexes/{env.index['id']}").json()["num_rows"] == 70
    store = _store(env)
    assert store.num_segments == 2 and store.num_rows == 70

    # A second batch grows it again; the previous version of the rows stays for readers that loaded it.
    second = _check(env, env.rows[210:215], append="true", max_flagged="5")
    assert second["append"]["dataset_rows"] == [70, 75]
    assert env.client.get(f"/v1/indexes/{env.index['id']}").json()["num_rows"] == 75
    versions = env.api.settings.resolved_artifacts_dir / "datasets" / env.dataset["id"] / "appends"
    assert sorted(p.name for p in versions.iterdir()) == sorted([check["id"], second["id"]])


def test_appends_queued_together_are_held_to_max_dataset_bytes_when_they_run(grow):
    """Each check passed the size check when it was created; the second to run would take the dataset past
    max_dataset_bytes, so it is refused then and changes nothing."""
    env = grow
    queued = []
    for rows in (env.rows[200:210], env.rows[210:220]):
        response = _submit(
            env.client, env.index["id"], rows, reference={"dataset_id": env.reference["id"]}, append="true",
            max_flagged="10",
        )
        assert response.status_code == 202, response.text
        queued.append(response.json())
    from app.models import Dataset
    from app.services.datasets import rows_path

    with env.api.session_factory() as session:
        size = rows_path(env.api.settings, session.get(Dataset, env.dataset["id"])).stat().st_size
    narrow = env.api.settings.model_copy(update={"max_dataset_bytes": size + 2_000})  # one batch of ~1 KB fits
    first, second = (_run(env, check, settings=narrow) for check in queued)
    assert first["append"]["status"] == "appended" and first["appended"] == 10
    assert second["append"]["status"] == "refused" and second["appended"] == 0
    assert "max_dataset_bytes" in second["append"]["reason"]
    assert env.client.get(f"/v1/datasets/{env.dataset['id']}").json()["row_count"] == GROW_ROWS + 10
    assert env.client.get(f"/v1/indexes/{env.index['id']}").json()["num_rows"] == GROW_ROWS + 10


def test_a_failing_batch_never_joins(grow):
    env = grow
    store = _store(env)
    worst = np.argsort(_existing_head_means(env), kind="stable")[:3]
    batch = [env.rows[i] for i in worst]
    check = _check(env, batch, append="true", layers="head", aggregation="mean")
    assert check["verdict"] == "fail" and check["appended"] == 0
    assert check["append"]["status"] == "skipped" and "never enters the index" in check["append"]["reason"]
    assert all(row["dataset_row"] is None for row in check["rows"])
    assert env.client.get(f"/v1/datasets/{env.dataset['id']}").json()["row_count"] == GROW_ROWS
    assert env.client.get(f"/v1/indexes/{env.index['id']}").json()["num_rows"] == GROW_ROWS
    store.refresh()
    assert store.num_rows == GROW_ROWS and store.num_segments == 1
    folder = env.api.settings.resolved_artifacts_dir / "jobs" / check["id"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "batch.jsonl",
        "check.json",
        "run.lock",
    ]  # no features kept


def test_a_crash_between_dataset_and_store_leaves_a_queryable_index(grow):
    """The job dies after the dataset switched (step 1), then after the store grew (step 2): each state answers
    queries consistently, and the rerun finishes the append without doubling anything."""
    from app.jobs.context import WorkerContext
    from app.jobs.dispatch import InlineDispatcher
    from app.services import appends

    env = grow
    batch = env.rows[220:226]
    response = _submit(
        env.client,
        env.index["id"],
        batch,
        reference={"dataset_id": env.reference["id"]},
        append="true",
        max_flagged="6",
    )
    check = response.json()
    with env.api.session_factory() as session:
        session.execute(update(Job).where(Job.id == check["id"]).values(status="running", attempts=1))
        session.commit()
    ctx = WorkerContext(env.api.settings, env.api.session_factory, MODELS, InlineDispatcher())
    rows = [{"text": t, "text_pair": None, "label": label, "noisy": None} for t, label in batch]
    with appends.dataset_append_lock(ctx.settings, env.dataset["id"]):
        assert appends.grow_dataset(ctx, env.dataset["id"], check["id"], rows) == (60, 66)
    # Step 1 done: the dataset has the rows, the index answers over its own rows only.
    assert env.client.get(f"/v1/datasets/{env.dataset['id']}").json()["row_count"] == 66
    for body in ({}, {"estimator": "datainf"}, {"approximate": True, "candidates_per_layer": 60}):
        answer = _query(env, env.index["id"], **body)
        assert answer.status_code == 200, answer.text
        assert max(h["row"] for h in answer.json()["results"][0]["helpful"]) < 60
    # Step 2 done: the store holds the rows; exact grad-dot answers include them, DataInf and FAISS say 409.
    store = _store(env)
    features = _featurize(env, store, store.layers, batch).features
    store.append(np.arange(60, 66), features)
    answer = _query(env, env.index["id"])
    assert answer.status_code == 200 and answer.json()["num_rows"] == 66
    assert {h["row"] for h in answer.json()["results"][0]["helpful"]} == set(range(66))
    assert_problem(_query(env, env.index["id"], estimator="datainf"), 409, "statistics")
    assert_problem(_query(env, env.index["id"], approximate=True, candidates_per_layer=66), 409, "FAISS")
    # The rerun scores the batch against the rows that existed before (not its own, already in), finds its
    # rows in the dataset and the store, and catches up.
    done = _run(env, check)
    assert done["status"] == "succeeded" and done["summary"]["existing_rows"] == 60
    assert done["append"]["dataset_rows"] == [60, 66] and done["appended"] == 6
    assert env.client.get(f"/v1/datasets/{env.dataset['id']}").json()["row_count"] == 66
    assert env.client.get(f"/v1/indexes/{env.index['id']}").json()["num_rows"] == 66
    store.refresh()
    assert store.num_segments == 2 and list(store.row_ids()) == list(range(66))
    for body in ({"estimator": "datainf"}, {"approximate": True, "candidates_per_layer": 66}):
        assert _query(env, env.index["id"], **body).status_code == 200


# -------------------------------------------------------------------------------------- errors, tenants


def _checks_left(env: Env) -> tuple[int, list]:
    from sqlalchemy import func, select

    with env.api.session_factory() as session:
        count = session.scalar(select(func.count()).select_from(Job).where(Job.kind == "batch_check"))
    folder = env.api.settings.resolved_artifacts_dir / "jobs"
    return count, sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_bad_input_is_4xx_and_leaves_nothing(env):
    client, index_id = env.client, env.index["id"]
    reference = {"dataset_id": env.reference["id"]}
    before = _checks_left(env)
    rows = env.rows[120:123]
    cases = [
        (
            _submit(client, index_id, rows, reference=reference, content=b"not json\n", filename="b.jsonl"),
            422,
            "line 1: invalid JSON",
        ),
        (
            _submit(
                client,
                index_id,
                rows,
                reference=reference,
                content=jsonl_bytes([{"sentence": "a", "label": 1}, {"sentence": "b"}]),
                filename="b.jsonl",
            ),
            422,
            "line 2: no 'label' field",
        ),
        (_submit(client, index_id, rows, reference=reference, content=b"", filename="b.tsv"), 422, "empty"),
        (
            _submit(client, index_id, rows, reference=reference, filename="batch.bin"),
            422,
            "cannot tell the format",
        ),
        (
            _submit(client, index_id, [("fine", "positive")], reference=reference),
            422,
            "label 'positive' is a name, but the index's dataset numbers its classes",
        ),
        (
            _submit(client, index_id, [("fine", 1), ("odd", 7)], reference=reference),
            422,
            "line 3: label 7 is not a class of the model [0, 2)",
        ),
        (
            _submit(client, index_id, rows, reference=reference, text_column="text"),
            422,
            "column 'text' (the text column) is not in the header",
        ),
        (
            _submit(client, index_id, rows, reference=reference, text_pair_column="label2"),
            422,
            "no text_pair",
        ),
        (
            _submit(client, index_id, rows, reference={"examples": []}),
            422,
            "reference is not a valid reference",
        ),
        (_submit(client, index_id, rows, reference={"dataset_id": "0" * 32}), 404, "does not exist"),
        (
            _submit(client, index_id, rows, reference=reference, layers="block.42.attn.q"),
            422,
            "layers the index",
        ),
        (
            _submit(client, index_id, rows, reference=reference, content=b"x" * (3 * 1024 * 1024)),
            413,
            "limit",
        ),
        (_submit(client, "0" * 32, rows, reference=reference), 404, "index"),
    ]
    for response, status, fragment in cases:
        assert_problem(response, status, fragment)
    malformed = client.post(
        f"/v1/indexes/{index_id}/checks",
        files={"file": ("b.tsv", tsv(rows))},
        data={"reference": "{not json"},
    )
    assert_problem(malformed, 422, "reference")
    for layers in ('{"blocks": 5}', '{"names": 5}', "[1, 2]", '{"colour": "red"}'):
        assert_problem(_submit(client, index_id, rows, reference=reference, layers=layers), 422, "layer")
    for bad in (
        {"threshold_percentile": "101"},
        {"max_flagged": "-1"},
        {"estimator": "nope"},
        {"vote_k": "0"},
    ):
        assert_problem(_submit(client, index_id, rows, reference=reference, **bad), 422)
    pending = client.post(
        "/v1/indexes", json={"model_id": env.model["id"], "dataset_id": env.dataset["id"], "layers": "head"}
    ).json()
    assert_problem(_submit(client, pending["id"], rows, reference=reference), 409, "not ready")
    client.delete(f"/v1/indexes/{pending['id']}")
    assert _checks_left(env) == before  # no job row, no folder


def test_every_route_is_tenant_scoped(env):
    client = env.client
    other = env.api.other_client()
    mine = _check(env, env.rows[120:122], layers="head")
    reference = {"dataset_id": env.reference["id"]}
    before = _checks_left(env)
    # Another tenant cannot check against my index, nor use my dataset as its reference.
    body = assert_problem(
        _submit(other, env.index["id"], env.rows[120:122], reference=reference), 404, "index"
    )
    assert body["detail"] == f"index {env.index['id']!r} does not exist"
    assert _checks_left(env) == before
    assert other.get("/v1/checks").json()["total"] == 0
    assert other.get("/v1/checks", params={"index_id": env.index["id"]}).json()["total"] == 0
    assert_problem(other.get(f"/v1/checks/{mine['id']}"), 404, "does not exist")
    assert_problem(other.delete(f"/v1/checks/{mine['id']}"), 404, "does not exist")
    assert_problem(other.get(f"/v1/jobs/{mine['id']}"), 404, "does not exist")
    # Word for word what an unknown id gets.
    unknown = other.get(f"/v1/checks/{'0' * 32}").json()["detail"]
    assert unknown.replace("0" * 32, mine["id"]) == other.get(f"/v1/checks/{mine['id']}").json()["detail"]
    # A check id is not an audit or a job of another kind: the check routes answer for checks only.
    build = env.index["job"]["id"]
    assert_problem(client.get(f"/v1/checks/{build}"), 404, "does not exist")
    assert client.get(f"/v1/checks/{mine['id']}").json()["verdict"] in ("pass", "fail")
    other.close()


def test_list_read_and_delete(env):
    client = env.client
    first = _check(env, env.rows[120:122], layers="head")
    queued = _submit(
        client,
        env.index["id"],
        env.rows[122:124],
        reference={"dataset_id": env.reference["id"]},
        layers="head",
    ).json()
    assert queued["status"] == "queued" and queued["verdict"] is None and queued["rows"] is None
    assert queued["append"] == {
        "requested": False,
        "status": "not-requested",
        "reason": None,
        "dataset_rows": None,
        "index_rows": None,
    }
    assert queued["params"]["batch"]["rows"] == 2 and queued["params"]["layers"] == ["head"]
    listed = client.get("/v1/checks", params={"limit": 500}).json()
    ids = [item["id"] for item in listed["items"]]
    assert ids.index(queued["id"]) < ids.index(first["id"])  # newest first
    assert all(item["rows"] is None for item in listed["items"])
    kinds = client.get("/v1/jobs", params={"kind": "batch_check", "limit": 500}).json()
    assert {queued["id"], first["id"]} <= {job["id"] for job in kinds["items"]}
    page = client.get(f"/v1/checks/{first['id']}", params={"offset": 1, "limit": 5}).json()
    assert [row["row"] for row in page["rows"]] == [1] and page["rows_total"] == 2
    assert_problem(client.delete(f"/v1/checks/{queued['id']}"), 409, "cancel it")
    folder = env.api.settings.resolved_artifacts_dir / "jobs" / first["id"]
    assert folder.is_dir()
    assert client.delete(f"/v1/checks/{first['id']}").status_code == 204
    assert not folder.exists()
    assert_problem(client.get(f"/v1/checks/{first['id']}"), 404)
    client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert client.delete(f"/v1/checks/{queued['id']}").status_code == 204


def test_a_corrupted_result_is_refused_not_served(env):
    check = _check(env, env.rows[120:122], layers="head")
    path = env.api.settings.resolved_artifacts_dir / "jobs" / check["id"] / "check.json"
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    assert_problem(env.client.get(f"/v1/checks/{check['id']}"), 409, "corrupted")


def test_cancellation(env):
    client = env.client
    reference = {"dataset_id": env.reference["id"]}
    # Queued: cancelled at once; the worker skips it.
    queued = _submit(client, env.index["id"], env.rows[120:122], reference=reference, append="true").json()
    assert client.post(f"/v1/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"
    done = _run(env, queued)
    assert done["status"] == "cancelled" and done["verdict"] is None and done["rows"] is None
    assert done["append"]["status"] == "incomplete"
    # Running: the runner stops at its next progress step (featurizing one row at a time here).
    slow = env.api.settings.model_copy(update={"batch_size": 1})
    running = _submit(
        client, env.index["id"], env.rows[130:190], reference=reference, append="true", max_flagged="60"
    ).json()
    worker = threading.Thread(
        target=run_job_inline, args=(slow, env.api.session_factory, running["id"], MODELS)
    )
    worker.start()
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{running['id']}").json()["done"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert client.post(f"/v1/jobs/{running['id']}/cancel").json()["cancel_requested"] is True
    worker.join()
    job = client.get(f"/v1/jobs/{running['id']}").json()
    assert job["status"] == "cancelled" and 0 < job["done"] < job["total"]
    assert not (env.api.settings.resolved_artifacts_dir / "jobs" / running["id"] / "check.json").exists()
    assert client.get(f"/v1/datasets/{env.dataset['id']}").json()["row_count"] == TRAIN_ROWS
    assert client.get(f"/v1/indexes/{env.index['id']}").json()["num_rows"] == TRAIN_ROWS


def test_deleted_rows_are_not_existing_rows(grow):
    """Rows deleted from the index (tombstoned, still on disk) neither count nor rank: the brute force over the
    live rows only gives the same numbers, and an append after a deletion counts live rows."""
    env = grow
    scored = ["block.1.attn.v", "head"]  # in the index's (model) order
    deleted = env.client.post(f"/v1/indexes/{env.index['id']}/rows/delete", json={"row_ids": [3, 7, 41]})
    assert deleted.status_code == 200, deleted.text
    batch = env.rows[120:126]
    scores, ranks, per_layer, existing = _brute_force(
        env,
        batch,
        env.rows[REFERENCE],
        layers=scored,
        estimator="grad-dot",
        aggregation="rank",
    )
    check = _check(env, batch, layers=json.dumps(scored), aggregation="rank", append="true", max_flagged="6")
    assert check["summary"]["layers"] == scored
    assert check["summary"]["existing_rows"] == existing == GROW_ROWS - 3
    assert [row["score"] for row in check["rows"]] == [float(s) for s in scores]
    assert [row["percentile"] for row in check["rows"]] == [float(p) for p in ranks]
    for row in check["rows"]:
        for layer, (own, own_ranks, _) in zip(row["layers"], per_layer, strict=True):
            assert (layer["aggregate"], layer["percentile"]) == (
                float(own[row["row"]]),
                float(own_ranks[row["row"]]),
            )
    assert check["append"]["dataset_rows"] == [60, 66] and check["append"]["index_rows"] == GROW_ROWS - 3 + 6
    index = env.client.get(f"/v1/indexes/{env.index['id']}").json()
    assert (index["num_rows"], index["deleted_rows"]) == (63, 3)
