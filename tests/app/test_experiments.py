"""Experiments over HTTP, run in-process: the injected noise is exactly the library's seeded noise, the model it
registers reloads with its adapter and scores as the fine-tune measured, the index is ready, the layer report's
NDR is the library's computation against the injected mask, the retraining check removes what it says it
removes (the oracle: exactly the flipped rows) and reports accuracies that reloading its checkpoints confirms;
bad requests are 4xx, other tenants see nothing, a cancelled experiment stops at its next progress check."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from app.jobs.steps import run_job_inline
from app.models import Dataset, Index, Job, RegisteredModel
from app.stores import job_dir
from influence.files import sha256_file
from tests.app.conftest import fresh_api
from tests.app.library import featurize_as_indexed, index_store, store_scores
from tests.worker.support import assert_problem, register_dataset, register_model

TRAIN_ROWS = 120
NOISE = 0.2
SEED = 3
REMOVE = 0.3
MAX_LENGTH = 48
INDEX_OR_LATER = ("index", "report", "done")
LABEL_NAMES = ("negative", "positive")  # sorted: class i is LABEL_NAMES[i], as SST-2 numbers them


def _named(rows):
    return [(text, LABEL_NAMES[label]) for text, label in rows]


def experiment_body(model_id: str, train_id: str, reference_id: str, **overrides) -> dict:
    body = {
        "name": "tiny",
        "base_model_id": model_id,
        "dataset_id": train_id,
        "reference": {"dataset_id": reference_id, "rows": list(range(40))},
        "heldout": {"dataset_id": reference_id, "rows": list(range(40, 80))},
        "noise_rate": NOISE,
        "seed": SEED,
        "lora": {"r": 4, "alpha": 4, "dropout": 0.0},
        "epochs": 1,
        "learning_rate": 0.01,
        "batch_size": 16,
        "max_length": MAX_LENGTH,
        "chunk_size": 40,
        "projection": {"kind": "factorized", "dim": 16, "seed": 0},
        "report": {
            "estimators": ["grad-dot", "datainf"],
            "aggregations": ["mean", "rank-c"],
            "cancellation_rows": 20,
        },
        "retraining": {
            "enabled": True,
            "remove_fraction": REMOVE,
            "aggregation": "rank",
            "estimator": "grad-dot",
        },
    }
    body.update(overrides)
    return body


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared, loaded machine: one torch thread is several times faster than contended ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ran(tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows, one_thread):
    """One experiment (noise 0.2, 1 epoch, retraining on) over 120 SST-2 rows of a tiny BERT, run inline."""
    api = fresh_api(tmp_path_factory, sqlite_template, "experiments")
    folder = tiny_model_dir("bert", "classification", num_labels=2)
    base = register_model(api.client, folder, name="tiny-base")
    # Labels by name: the noisy dataset must number its classes as the training dataset does.
    train = register_dataset(api.client, _named(sst2_rows[:TRAIN_ROWS]), name="train")
    reference = register_dataset(api.client, _named(sst2_rows[200:280]), name="reference")
    assert train["label_names"] == reference["label_names"] == list(LABEL_NAMES)
    response = api.client.post(
        "/v1/experiments", json=experiment_body(base["id"], train["id"], reference["id"])
    )
    assert response.status_code == 202, response.text
    created = response.json()
    started = time.perf_counter()
    run_job_inline(api.settings, api.session_factory, created["id"])
    seconds = time.perf_counter() - started
    done = api.client.get(f"/v1/experiments/{created['id']}").json()
    yield {
        "api": api,
        "folder": folder,
        "base": base,
        "train": train,
        "reference": reference,
        "created": created,
        "done": done,
        "seconds": seconds,
        "rows": sst2_rows,
    }
    api.close()


def test_the_experiment_runs_every_stage(ran):
    created, done = ran["created"], ran["done"]
    assert (
        created["status"] == "queued" and created["stage"] is None and created["job"]["kind"] == "experiment"
    )
    assert done["status"] == "succeeded", done["job"]["error"]
    assert done["stage"] == "done"
    assert done["stages_done"] == ["noise", "finetune", "register", "index", "report", "retraining"]
    assert done["job"]["done"] == done["job"]["total"] == 1000
    print(f"experiment ran in {ran['seconds']:.1f}s")


def _train_examples(rows):
    from influence.data import Example

    return [Example(text=text, label=label) for text, label in rows]


def _noise(rows):
    from influence import inject_label_noise

    return inject_label_noise([label for _, label in rows[:TRAIN_ROWS]], NOISE, seed=SEED, num_classes=2)


def test_the_noisy_dataset_is_the_librarys_seeded_noise(ran):
    api, done = ran["api"], ran["done"]
    noisy_labels, mask = _noise(ran["rows"])
    assert int(mask.sum()) == round(NOISE * TRAIN_ROWS) == 24
    assert done["noise"] == {"rate": NOISE, "seed": SEED, "rows": TRAIN_ROWS, "flipped": 24, "num_classes": 2}
    dataset = api.client.get(f"/v1/datasets/{done['dataset_id']}").json()
    assert dataset["row_count"] == TRAIN_ROWS and dataset["id"] != ran["train"]["id"]
    assert dataset["label_names"] == list(LABEL_NAMES) and dataset["has_noisy_flag"] is True
    rows = api.client.get(f"/v1/datasets/{done['dataset_id']}/rows", params={"limit": 500}).json()["items"]
    assert [row["text"] for row in rows] == [text for text, _ in ran["rows"][:TRAIN_ROWS]]
    assert [row["label"] for row in rows] == noisy_labels.tolist()
    assert [row["noisy"] for row in rows] == mask.tolist()
    # The flipped rows are exactly those whose label differs from the clean one.
    clean = np.array([label for _, label in ran["rows"][:TRAIN_ROWS]])
    assert np.array_equal(noisy_labels != clean, mask)


def test_the_registered_model_reloads_with_its_adapter_and_scores_as_trained(ran):
    from influence import load_model, predict

    api, done = ran["api"], ran["done"]
    model = api.client.get(f"/v1/models/{done['model_id']}").json()
    assert model["source"] == ran["base"]["source"] and model["adapter"] and model["task"] == "classification"
    assert model["id"] != ran["base"]["id"] and model["num_labels"] == 2
    layers = [layer["name"] for layer in api.client.get(f"/v1/models/{model['id']}/layers").json()["layers"]]
    assert "block.0.attn.q.lora_A" in layers
    loaded = load_model(ran["folder"], adapter=model["adapter"], num_labels=2)
    assert loaded.weights_hash == model["weights_hash"]
    finetune = done["finetune"]
    assert finetune["best_epoch"] == 1 and len(finetune["epochs"]) == 1 and finetune["reused"] is False
    best = finetune["epochs"][finetune["best_epoch"] - 1]
    reference = _train_examples(ran["rows"][200:240])
    predictions, losses = predict(loaded, reference, batch_size=16, max_length=MAX_LENGTH)
    labels = np.array([e.label for e in reference])
    assert float((predictions == labels).mean()) == best["eval_accuracy"]
    assert float(losses.mean()) == pytest.approx(best["eval_loss"], rel=1e-5)


def test_the_index_is_ready_over_the_noisy_dataset_and_the_new_model(ran):
    api, done = ran["api"], ran["done"]
    index = api.client.get(f"/v1/indexes/{done['index_id']}").json()
    assert index["status"] == "ready" and index["num_rows"] == TRAIN_ROWS
    assert index["model_id"] == done["model_id"] and index["dataset_id"] == done["dataset_id"]
    assert index["layers"] == done["params"]["planned_layers"]
    assert index["layers"][0] == "embed" and index["layers"][-1] == "head"
    assert index["job"]["status"] == "succeeded" and index["job"]["done"] == index["job"]["total"] == 3


def _brute_force_scores(ran, index):
    """The (n, U, m) grad-dot score tensor from the index's store and the reference featurized independently."""
    from influence import load_model

    api = ran["api"]
    model = api.client.get(f"/v1/models/{index['model_id']}").json()
    store = index_store(api, index["id"])
    loaded = load_model(ran["folder"], adapter=model["adapter"], num_labels=2)
    names = list(index["layers"])
    reference = featurize_as_indexed(
        store, loaded, names, ran["rows"][200:240], batch_size=api.settings.batch_size
    )
    scores = store_scores(store, reference, names, "grad-dot")
    return names, scores, reference


def test_the_report_measures_ndr_against_the_injected_noise(ran):
    from influence import aggregate, auc_ndr, ndr_at

    api, done = ran["api"], ran["done"]
    report = api.client.get(f"/v1/reports/{done['report_id']}").json()
    assert report["status"] == "succeeded" and report["index_id"] == done["index_id"]
    body = report["report"]
    assert body["n_train"] == TRAIN_ROWS and body["n_noisy"] == 24 and body["n_reference"] == 40
    assert body["estimators"] == ["grad-dot", "datainf"] and body["aggregations"] == ["mean", "rank-c"]
    _, mask = _noise(ran["rows"])
    index = api.client.get(f"/v1/indexes/{done['index_id']}").json()
    names, scores, reference = _brute_force_scores(ran, index)
    correct = reference.predictions == np.array([label for _, label in ran["rows"][200:240]])
    checked = 0
    for entry in body["entries"]:
        if entry["estimator"] != "grad-dot" or entry["layers"]["name"] not in ("head", "total"):
            continue
        members = [names.index(m) for m in entry["layers"]["members"]]
        method = entry["aggregation"]
        agg = aggregate(
            scores[:, members, :],
            method.removesuffix("-c"),
            correct=correct if method.endswith("-c") else None,
        )
        assert entry["auc_ndr"] == pytest.approx(auc_ndr(agg, mask), rel=1e-9), entry
        expected = ndr_at(agg, mask)
        assert {k: pytest.approx(expected[float(k)], rel=1e-9) for k in entry["ndr"]} == entry["ndr"]
        checked += 1
    assert checked == 4  # (mean, rank-c) x (head, total)
    experiment_result = api.client.get(f"/v1/jobs/{done['id']}").json()["result"]
    assert experiment_result["outputs"]["report"]["summary"]["n_noisy"] == 24


def test_the_retraining_check_removes_what_it_reports(ran):
    from influence import load_model, predict

    api, done = ran["api"], ran["done"]
    retraining = done["retraining"]
    _, mask = _noise(ran["rows"])
    k = round(REMOVE * TRAIN_ROWS)
    assert retraining["remove_fraction"] == REMOVE and retraining["heldout_rows"] == 40
    # The removal sets, as recorded (checksummed artifact) and as each run reports them.
    result = api.client.get(f"/v1/jobs/{done['id']}").json()["result"]
    path = job_dir(api.settings, done["id"]) / "retraining.json"
    assert sha256_file(path) == result["artifacts"]["retraining.json"]
    removed = json.loads(path.read_text())
    flipped = np.flatnonzero(mask).tolist()
    # The oracle removes exactly the flipped rows (remove_fraction >= noise rate), never a clean one.
    assert removed["oracle"] == flipped
    audit = api.client.get(f"/v1/audits/{retraining['audit_id']}").json()
    assert audit["status"] == "succeeded" and audit["index_id"] == done["index_id"]
    ranked = api.client.get(f"/v1/audits/{retraining['audit_id']}/rows", params={"limit": k}).json()["items"]
    assert removed["influence"] == sorted(row["row"] for row in ranked)
    assert removed["random"] == sorted(
        np.random.default_rng(SEED).choice(TRAIN_ROWS, size=k, replace=False).tolist()
    )
    for name, expected_removed in (("influence", k), ("random", k), ("oracle", 24)):
        run = retraining[name]
        assert run["removed"] == len(removed[name]) == expected_removed
        assert run["noisy_removed"] == int(mask[removed[name]].sum())
        assert len(run["epochs"]) == 1 and run["best_accuracy"] == run["best_loss_epoch_accuracy"]
        assert 0.0 <= run["best_accuracy"] <= 1.0
    assert retraining["oracle"]["noisy_removed"] == 24
    # The oracle's accuracy is what its retrained checkpoint scores on the held-out rows.
    oracle = job_dir(api.settings, done["id"]) / "retraining" / "oracle" / "best"
    loaded = load_model(ran["folder"], adapter=oracle, num_labels=2)
    heldout = _train_examples(ran["rows"][240:280])
    predictions, _ = predict(loaded, heldout, batch_size=16, max_length=MAX_LENGTH)
    labels = np.array([e.label for e in heldout])
    assert float((predictions == labels).mean()) == retraining["oracle"]["best_accuracy"]


def test_listed_and_visible_as_a_job(ran):
    api, done = ran["api"], ran["done"]
    listed = api.client.get("/v1/experiments").json()
    assert done["id"] in [item["id"] for item in listed["items"]]
    jobs = api.client.get("/v1/jobs", params={"kind": "experiment"}).json()["items"]
    assert done["id"] in [job["id"] for job in jobs]
    assert done["params"]["reference"]["dataset_id"] == ran["reference"]["id"]
    assert done["params"]["noise_rate"] == NOISE and done["params"]["seed"] == SEED


def _experiment_count(api) -> int:
    from sqlalchemy import func, select

    with api.session_factory() as session:
        return session.scalar(select(func.count()).select_from(Job).where(Job.kind == "experiment")) or 0


def test_bad_requests_are_4xx_and_record_nothing(ran, tiny_model_dir):
    api, done = ran["api"], ran["done"]
    client = api.client
    base, train, reference = ran["base"]["id"], ran["train"]["id"], ran["reference"]["id"]
    before = _experiment_count(api)
    gpt2 = client.post(
        "/v1/models",
        json={"name": "lm", "source": str(tiny_model_dir("gpt2", "causal-lm")), "task": "causal-lm"},
    ).json()

    def post(**overrides):
        return client.post("/v1/experiments", json=experiment_body(base, train, reference, **overrides))

    assert_problem(post(base_model_id=gpt2["id"]), 422, "classification models only")
    assert_problem(post(base_model_id=done["model_id"]), 422, "has an adapter")
    assert_problem(post(base_model_id="0" * 32), 404, "does not exist")
    assert_problem(post(dataset_id="0" * 32), 404, "does not exist")
    assert_problem(post(reference={"dataset_id": "0" * 32}), 404, "does not exist")
    assert_problem(post(heldout=None), 422, "heldout")
    assert_problem(post(heldout={"dataset_id": reference, "rows": [39, 40]}), 422, "shares 1 rows")
    assert_problem(post(heldout={"dataset_id": train, "limit": 10}), 422, "training dataset")
    assert_problem(post(reference={"dataset_id": reference, "rows": [500]}), 422, "out of range")
    assert_problem(post(layers="role:nothing"), 422)
    assert_problem(post(layers=["no-such-layer"]), 422, "no-such-layer")
    assert_problem(post(lora={"targets": ["no_such_module"]}), 422, "no_such_module")
    assert_problem(post(max_length=65), 422, "64 positions")
    assert_problem(post(report={"aggregations": ["nope"]}), 422, "nope")
    assert_problem(post(report={"layers": "WE"}, layers="head"), 422, "report.layers")
    assert_problem(post(noise_rate=0.001), 422, "flips no label")
    for bad in (
        {"noise_rate": 0},
        {"noise_rate": 1},
        {"epochs": 0},
        {"learning_rate": -1},
        {"unknown": 1},
        {"retraining": {"enabled": True, "remove_fraction": 1.5}},
        {"lora": {"r": 0}},
        {"seed": -1},
    ):
        response = post(**bad)
        assert response.status_code == 422, (bad, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    assert _experiment_count(api) == before


def test_other_tenants_see_nothing(ran):
    api, done = ran["api"], ran["done"]
    other = api.other_client()
    unknown = "0" * 32
    for method, path in (("GET", "/v1/experiments/{}"), ("DELETE", "/v1/experiments/{}")):
        mine = other.request(method, path.format(done["id"]))
        body = assert_problem(mine, 404, "does not exist")
        assert body["detail"] == other.request(method, path.format(unknown)).json()["detail"].replace(
            unknown, done["id"]
        )
    assert other.get("/v1/experiments").json() == {"items": [], "total": 0, "offset": 0, "limit": 50}
    # Another tenant's base model, dataset or reference dataset is unknown to this one.
    body = experiment_body(ran["base"]["id"], ran["train"]["id"], ran["reference"]["id"])
    assert_problem(other.post("/v1/experiments", json=body), 404, "does not exist")
    own_model = register_model(other, ran["folder"], name="b-base")
    own_data = register_dataset(other, ran["rows"][:TRAIN_ROWS], name="b-train")
    for key, value in (("base_model_id", own_model["id"]), ("dataset_id", own_data["id"])):
        assert_problem(other.post("/v1/experiments", json={**body, key: value}), 404, "does not exist")
    mixed = {**body, "base_model_id": own_model["id"], "dataset_id": own_data["id"]}
    assert_problem(other.post("/v1/experiments", json=mixed), 404, "does not exist")  # A's reference dataset
    assert api.client.get(f"/v1/experiments/{done['id']}").json()["status"] == "succeeded"
    other.close()


def test_cancelling_stops_the_experiment_at_its_next_progress_check(ran):
    api = ran["api"]
    body = experiment_body(
        ran["base"]["id"],
        ran["train"]["id"],
        ran["reference"]["id"],
        chunk_size=5,
        epochs=2,
        retraining={"enabled": False},
        heldout=None,
    )
    created = api.client.post("/v1/experiments", json=body).json()
    worker = threading.Thread(target=run_job_inline, args=(api.settings, api.session_factory, created["id"]))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while api.client.get(f"/v1/experiments/{created['id']}").json()["stage"] not in INDEX_OR_LATER:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        cancelled = api.client.post(f"/v1/jobs/{created['id']}/cancel")
    finally:
        worker.join(timeout=120)
    assert cancelled.status_code == 200, cancelled.text
    assert not worker.is_alive()
    done = api.client.get(f"/v1/experiments/{created['id']}").json()
    assert done["status"] == "cancelled", done
    assert "report" not in done["stages_done"] and done["report_id"] is None
    with api.session_factory() as session:
        reports = (
            session.query(Job).filter(Job.kind == "layer_report", Job.target_id == done["index_id"]).count()
        )
        index = session.get(Index, done["index_id"])
        build = session.get(Job, index.job_id)
    assert reports == 0
    # The build it ran is not left behind as an active job: done before the cancel, or cancelled with it.
    assert (build.status, index.status) in (("succeeded", "ready"), ("cancelled", "cancelled")), build.status


def test_delete_keeps_what_the_experiment_registered(ran):
    api, done = ran["api"], ran["done"]
    # A queued experiment cannot be deleted before it is cancelled.
    body = experiment_body(ran["base"]["id"], ran["train"]["id"], ran["reference"]["id"])
    queued = api.client.post("/v1/experiments", json=body).json()
    assert_problem(api.client.delete(f"/v1/experiments/{queued['id']}"), 409, "cancel it")
    assert api.client.post(f"/v1/jobs/{queued['id']}/cancel").status_code == 200
    assert api.client.delete(f"/v1/experiments/{queued['id']}").status_code == 204

    folder = job_dir(api.settings, done["id"])
    assert folder.is_dir()
    assert api.client.delete(f"/v1/experiments/{done['id']}").status_code == 204
    assert not folder.exists()
    assert_problem(api.client.get(f"/v1/experiments/{done['id']}"), 404, "does not exist")
    # The model (its adapter lives outside the experiment's folder), dataset, index and report stay usable.
    with api.session_factory() as session:
        assert session.get(RegisteredModel, done["model_id"]) is not None
        assert session.get(Dataset, done["dataset_id"]) is not None
    query = {"examples": [{"text": "a gorgeous , witty , seductive movie .", "label": 1}], "top_k": 3}
    answer = api.client.post(f"/v1/indexes/{done['index_id']}/query", json=query)
    assert answer.status_code == 200, answer.text
    assert api.client.get(f"/v1/reports/{done['report_id']}").json()["status"] == "succeeded"
