"""Artifacts carry checksums, checked when a process first opens them: a flipped byte in a feature file, a
tombstone file, DataInf statistics, a FAISS index or a dataset's rows is refused with a 409 problem, never
served. Orphans left by killed processes are swept when the API starts."""

from __future__ import annotations

import fcntl
import shutil

import pytest

from app.jobs.steps import run_build_inline
from app.services.artifacts import sweep_orphans
from tests.app.conftest import build_api, make_settings
from tests.worker.support import assert_problem, register_dataset, register_model

QUERY = {"examples": [{"text": "a fine and moving film", "label": 1}], "top_k": 3}


@pytest.fixture
def built(tmp_path, sqlite_url, default_roots, tiny_model_dir, sst2_rows):
    settings = make_settings(tmp_path, sqlite_url, default_roots)
    api = build_api(settings)
    model = register_model(api.client, tiny_model_dir("bert", "classification", num_labels=2))
    dataset = register_dataset(api.client, sst2_rows[:40])
    index = api.client.post(
        "/v1/indexes", json={"model_id": model["id"], "dataset_id": dataset["id"], "layers": ["head"]}
    ).json()
    run_build_inline(settings, api.session_factory, index["job"]["id"])
    assert api.client.post(f"/v1/indexes/{index['id']}/query", json=QUERY).status_code == 200
    return api, settings, dataset, index


def _fresh(api, settings):
    """Another API process on the same database and artifacts: nothing opened or verified yet."""
    fresh = build_api(settings)
    fresh.client.headers.update(api.client.headers)
    return fresh


def _flip(path, offset=-3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _one(folder, pattern):
    (found,) = sorted(folder.glob(pattern))
    return found


@pytest.mark.parametrize("artifact", ["features", "norms", "row_ids", "statistics", "tombstones"])
def test_a_corrupted_store_file_is_refused_with_409(built, artifact):
    api, settings, _, index = built
    store = settings.resolved_artifacts_dir / f"indexes/{index['id']}/store"
    if artifact == "tombstones":
        api.client.post(f"/v1/indexes/{index['id']}/rows/delete", json={"row_ids": [5]})
        target = _one(store / "tombstones", "*.npy")
    elif artifact == "statistics":
        target = _one(store / "statistics", "*.safetensors")
    else:
        files = sorted((store / "segments").glob("*/*.npy"))
        target = next(
            p
            for p in files
            if (artifact == "row_ids" and p.name == "row_ids.npy")
            or (artifact == "norms" and p.name.endswith(".norms.npy"))
            or (artifact == "features" and p.name != "row_ids.npy" and not p.name.endswith(".norms.npy"))
        )
    _flip(target)
    body = assert_problem(_fresh(api, settings).client.post(f"/v1/indexes/{index['id']}/query", json=QUERY), 409)
    assert body["type"] == "urn:influence:problem:store-corrupted"
    assert "sha256" in body["detail"] and "rebuild" in body["detail"]


def test_a_corrupted_faiss_index_is_refused_for_approximate_queries(built):
    api, settings, _, index = built
    faiss_file = _one(settings.resolved_artifacts_dir / f"indexes/{index['id']}/store/faiss", "*.faiss")
    _flip(faiss_file, offset=-8)
    fresh = _fresh(api, settings)
    url = f"/v1/indexes/{index['id']}/query"
    assert fresh.client.post(url, json=QUERY).status_code == 200  # exact answers do not use FAISS
    body = assert_problem(fresh.client.post(url, json={**QUERY, "approximate": True}), 409)
    assert body["type"] == "urn:influence:problem:store-corrupted"


def test_a_corrupted_dataset_artifact_is_refused_with_409(built):
    api, settings, dataset, index = built
    rows = settings.resolved_artifacts_dir / f"datasets/{dataset['id']}/rows.jsonl"
    text = rows.read_text()
    rows.write_text(text.replace(text[10:20], text[10:20].upper(), 1))  # same length, other bytes
    fresh = _fresh(api, settings)
    assert_problem(fresh.client.get(f"/v1/datasets/{dataset['id']}/rows"), 409, "rows.jsonl failed its sha256")
    assert_problem(fresh.client.post(f"/v1/indexes/{index['id']}/query", json=QUERY), 409, "sha256")
    # The process that read it before notices too: the file changed on disk since it was checked.
    assert_problem(api.client.get(f"/v1/datasets/{dataset['id']}/rows"), 409, "corrupted")


def test_start_up_sweeps_what_killed_processes_left(built, sst2_rows):
    api, settings, dataset, index = built
    root = settings.resolved_artifacts_dir
    # A registration killed mid-way (staging folder, lock free), one killed between rename and commit (a
    # dataset folder no row names), one still in flight (lock held), and a deleted index's leftover folder.
    staging = root / "tmp" / "dataset-0123-abcd"
    staging.mkdir(parents=True)
    (staging / "rows.jsonl").write_text("{}\n")
    (staging / ".registering.lock").touch()
    unnamed = root / "datasets" / ("f" * 32)
    shutil.copytree(root / "datasets" / dataset["id"], unnamed)
    in_flight = root / "datasets" / ("e" * 32)
    in_flight.mkdir()
    held = open(in_flight / ".registering.lock", "a+")  # noqa: SIM115
    fcntl.flock(held.fileno(), fcntl.LOCK_EX)
    gone_index = root / "indexes" / ("d" * 32)
    (gone_index / "store").mkdir(parents=True)
    # A batch check's upload whose request died before its commit: a job folder no job row names.
    dead_check = root / "jobs" / ("c" * 32)
    dead_check.mkdir(parents=True)
    (dead_check / "batch.jsonl").write_text("{}\n")
    (dead_check / ".registering.lock").touch()
    try:
        removed = sweep_orphans(settings, api.session_factory)
        assert sorted(removed) == sorted([staging, unnamed, gone_index, dead_check])
        assert in_flight.exists() and (root / "datasets" / dataset["id"]).exists()
        assert (root / "indexes" / index["id"]).exists()
    finally:
        held.close()
    assert sweep_orphans(settings, api.session_factory) == [in_flight]
    # Registered datasets carry no lock file once committed.
    assert not (root / "datasets" / dataset["id"] / ".registering.lock").exists()
    assert api.client.post(f"/v1/indexes/{index['id']}/query", json=QUERY).status_code == 200
