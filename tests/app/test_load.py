"""A short, bounded version of bench/load_query.py: a real uvicorn process on 127.0.0.1 serving a built index,
concurrent query clients (exact and approximate) for a few seconds while rows are deleted underneath them:
zero errors, and no deleted row in any answer given after its deletion."""

from __future__ import annotations

import importlib.util
import sys

import httpx

from tests.app.conftest import ROOT_DIR, build_api, make_settings
from tests.worker.support import ApiProcess, built_index


def _load_module():
    spec = importlib.util.spec_from_file_location("bench_load_query", ROOT_DIR / "bench" / "load_query.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being made
    spec.loader.exec_module(module)
    return module


def test_concurrent_queries_under_row_deletions_make_no_errors(
    tmp_path, sqlite_url, default_roots, tiny_model_dir, sst2_rows
):
    load = _load_module()
    settings = make_settings(tmp_path, sqlite_url, default_roots)
    api = build_api(settings)
    folder = tiny_model_dir("bert", "classification", num_labels=2)
    _, _, index = built_index(api, folder, sst2_rows[:100], layers="middle", chunk_size=50)

    server = ApiProcess(settings, tmp_path / "api.log", INFLUENCE_DEVICE="cpu").start()
    base_url = server.url
    try:
        # Warm up first (the server loads the model and the FAISS indexes on its first queries).
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api.token}"}, timeout=120) as client:
            for approximate in (False, True):
                body = {"examples": [{"text": "a warm-up", "label": 1}], "layers": "middle", "approximate": approximate}
                assert client.post(f"/v1/indexes/{index['id']}/query", json=body).status_code == 200
        deleted = [3, 17, 42]
        report = load.run_load(
            base_url,
            api.token,
            index["id"],
            [(text, label) for text, label in sst2_rows[200:260]],
            clients=4,
            duration=4.5,
            max_requests=400,
            approximate_share=0.3,
            delete_rows=deleted,
            delete_every=1.0,
        )
        assert report.errors == 0, report.error_samples
        assert report.requests >= 8
        assert report.deletions == len(deleted)
        assert 0 < report.p50_ms <= report.p95_ms <= report.max_ms
        # After the run: every deleted row is gone from the answers, exact and approximate.
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api.token}"}) as client:
            for approximate in (False, True):
                body = {"examples": [{"text": "a fine film", "label": 1}], "top_k": 100, "approximate": approximate,
                        "candidates_per_layer": 100}
                answer = client.post(f"/v1/indexes/{index['id']}/query", json=body).json()
                rows = {hit["row"] for key in ("helpful", "harmful") for hit in answer["results"][0][key]}
                assert answer["num_rows"] == 100 - len(deleted) and not rows & set(deleted)
    finally:
        server.stop()
