"""Per-unit projections over HTTP (issue 12): the default `auto` keeps small units (LoRA matrices, the
classification head) exact and factorizes the rest; per-unit overrides are honoured from the request to the
manifest and back into queries; bad choices are 422s that name the field and leave nothing behind; an explicit
old-style projection still gives the old manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.jobs.steps import run_build_inline
from app.models import Index, Job
from influence.projection import AUTO_EXACT_MAX_PARAMS
from tests.app.conftest import build_api, fresh_api, make_settings
from tests.worker.support import assert_problem, register_dataset, register_model

EXAMPLES = [
    {"text": "it 's a charming and often affecting journey . ", "label": 1},
    {"text": "unflinchingly bleak and desperate ", "label": 0},
]
# hidden 128, intermediate 256: attention and MLP units have more than 4,096 parameters (projected under auto),
# the head 258 and each LoRA matrix (r = 4) 512 (exact).
WIDE = {"hidden_size": 128, "intermediate_size": 256}
LORA_UNITS = {f"block.{b}.attn.{m}.lora_{s}" for b in range(3) for m in ("q", "v") for s in ("A", "B")}


@pytest.fixture(scope="module")
def wide_lora(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(base folder, LoRA adapter folder): the wide tiny BERT classifier with r = 4 adapters on query and value."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = tiny_model_dir("bert", "classification", num_labels=2, **WIDE)
    folder = tmp_path_factory.mktemp("units-adapter") / "lora"
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    config = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    get_peft_model(model, config).save_pretrained(folder)
    return base, folder


@pytest.fixture(scope="module")
def served(tmp_path_factory, sqlite_template, wide_lora, sst2_rows):
    """An API with the LoRA model and 40 SST-2 rows registered (no index yet)."""
    built = fresh_api(tmp_path_factory, sqlite_template, "units")
    base, adapter = wide_lora
    model = register_model(built.client, base, adapter=adapter)
    dataset = register_dataset(built.client, sst2_rows[:40], name="train")
    yield built, model, dataset
    built.close()


def _create(client, model, dataset, **body):
    return client.post(
        "/v1/indexes", json={"model_id": model["id"], "dataset_id": dataset["id"], "chunk_size": 20, **body}
    )


def _build(api, model, dataset, **body) -> tuple[dict, dict]:
    """(the 202 answer, the index once built in this process)."""
    created = _create(api.client, model, dataset, **body)
    assert created.status_code == 202, created.text
    run_build_inline(api.settings, api.session_factory, created.json()["job"]["id"])
    index = api.client.get(f"/v1/indexes/{created.json()['id']}").json()
    assert index["status"] == "ready", index
    return created.json(), index


def _query(api, index_id, **body):
    response = api.client.post(
        f"/v1/indexes/{index_id}/query", json={"examples": EXAMPLES, "top_k": 3, **body}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_default_auto_keeps_lora_and_head_exact_and_factorizes_the_rest(served):
    api, model, dataset = served
    created, index = _build(api, model, dataset)
    manifest = index["manifest"]
    projection = manifest["projection"]
    assert {key: projection[key] for key in ("kind", "dim", "seed", "exact_max_params")} == {
        "kind": "auto",
        "dim": 256,
        "seed": 0,
        "exact_max_params": 4096,
    }
    layers = {layer["name"]: layer for layer in manifest["layers"]}
    assert set(projection["units"]) == set(layers) == set(index["layers"])
    assert set(layers) >= LORA_UNITS and "head" in layers
    for name, layer in layers.items():
        unit = projection["units"][name]
        if name in LORA_UNITS or name == "head":
            assert unit == {"kind": "identity", "dim": layer["num_params"]}, name
            assert layer["dim"] == layer["num_params"] <= 4096, name
        elif name == "embed":  # exact token rows: per row its tokens, each with a full-width gradient row
            width = WIDE["hidden_size"]
            assert unit == {"kind": "tokens", "dim": width} and layer == {**layer, "dim": width, "layout": "tokens"}
        else:
            assert unit == {"kind": "factorized", "dim": 256}, name
            assert layer["num_params"] > 4096, name
            assert layer["dim"] <= 256, name
    # The answer shows every unit's choice: resolved from the request before the build, as built after it.
    shown = {name: {"kind": u["kind"], "dim": u["dim"]} for name, u in index["projection"]["units"].items()}
    assert shown == projection["units"]
    assert created["projection"]["units"] == index["projection"]["units"]
    assert all(index["projection"]["units"][name]["features"] == layers[name]["dim"] for name in layers)
    assert (index["projection"]["kind"], index["projection"]["exact_max_params"]) == ("auto", 4096)
    assert index["feature_bytes_estimate"] == 40 * 2 * sum(layer["dim"] for layer in layers.values())
    answer = _query(api, index["id"], layers=["head", "block.1.attn.q.lora_B", "block.1.mlp.up"])
    assert answer["layers"] == ["block.1.attn.q.lora_B", "block.1.mlp.up", "head"]
    assert all(len(result["helpful"]) == 3 for result in answer["results"])


def test_a_unit_override_is_honoured_end_to_end(served):
    """Overrides reach the row, the manifest, the answer, and the query's featurizer (built from the manifest:
    a query whose projection differed would be refused as a manifest mismatch)."""
    from app.services.indexes import projection_of

    api, model, dataset = served
    units = {"head": {"kind": "gaussian", "dim": 64}, "block.0.attn.q": {"kind": "rademacher", "dim": 32}}
    _, index = _build(api, model, dataset, projection={"units": units})
    projection = index["manifest"]["projection"]
    assert projection["units"]["head"] == {"kind": "gaussian", "dim": 64}
    assert projection["units"]["block.0.attn.q"] == {"kind": "rademacher", "dim": 32}
    assert projection["units"]["block.0.attn.k"] == {"kind": "factorized", "dim": 256}  # not overridden: auto
    assert projection["units"]["block.0.attn.q.lora_A"] == {"kind": "identity", "dim": 512}
    dims = {layer["name"]: layer["dim"] for layer in index["manifest"]["layers"]}
    assert dims["head"] == 64 and dims["block.0.attn.q"] == 32
    assert index["projection"]["units"]["head"] == {"kind": "gaussian", "dim": 64, "features": 64}
    with api.session_factory() as session:
        row = session.get(Index, index["id"])
        assert row.projection_units == {
            "block.0.attn.q": {"kind": "rademacher", "dim": 32},
            "head": {"kind": "gaussian", "dim": 64},
        }
        assert row.exact_max_params == 4096
        assert projection_of(row)["units"] == row.projection_units
    for layers in (["head", "block.0.attn.q"], None):
        answer = _query(api, index["id"], **({"layers": layers} if layers else {}))
        assert answer["layers"] == (["block.0.attn.q", "head"] if layers else index["layers"])
        assert all(
            len(result["helpful"]) == 3 and len(result["harmful"]) == 3 for result in answer["results"]
        )


def test_an_old_style_projection_gives_the_old_manifest(served):
    """An explicit {kind, dim, seed} keeps the manifest form stores built before per-unit projections have."""
    from influence.projection import PROJECTION_FORMAT

    api, model, dataset = served
    old = {"kind": "factorized", "dim": 256, "seed": 0}
    _, index = _build(api, model, dataset, layers="middle", projection=old)
    assert index["manifest"]["projection"] == {**old, "format": PROJECTION_FORMAT}
    assert index["projection"]["exact_max_params"] is None
    assert all(
        unit["kind"] == "factorized" and unit["dim"] == 256 for unit in index["projection"]["units"].values()
    )
    with api.session_factory() as session:
        row = session.get(Index, index["id"])
        assert (row.projection_units, row.exact_max_params) == (None, None)
    _query(api, index["id"])


def _problem_names(response, *paths: str) -> None:
    body = assert_problem(response, 422)
    for path in paths:
        assert path in body["detail"], body["detail"]


def _nothing_written(api, before: tuple[int, int]) -> None:
    assert (api.count(Index), api.count(Job)) == before
    assert api.client.get("/v1/indexes").json()["total"] == before[0]
    assert api.client.get("/v1/jobs").json()["total"] == before[1]


@pytest.mark.parametrize(
    "projection, paths",
    [
        ({"units": {"block.9.attn.q": {"kind": "identity"}}}, ("projection.units", "block.9.attn.q")),
        ({"units": {"head": {"kind": "auto", "dim": 8}}}, ("projection.units.head.kind",)),
        ({"units": {"head": {"kind": "gaussian", "dim": 0}}}, ("projection.units.head.dim",)),
        ({"units": {"head": {"kind": "gaussian", "dim": "7"}}}, ("projection.units.head.dim",)),
        ({"units": {"head": {"kind": "gaussian", "size": 7}}}, ("projection.units.head.size",)),
        ({"units": ["head"]}, ("projection.units",)),
        ({"exact_max_params": 0}, ("projection.exact_max_params",)),
        ({"exact_max_params": 2**24 + 1}, ("projection.exact_max_params",)),
        ({"kind": "fourier"}, ("projection.kind",)),
        ({"dim": 0}, ("projection.dim",)),
    ],
)
def test_bad_projection_choices_are_422_naming_the_field(served, projection, paths):
    api, model, dataset = served
    before = (api.count(Index), api.count(Job))
    _problem_names(_create(api.client, model, dataset, projection=projection), *paths)
    _nothing_written(api, before)


def test_an_override_of_a_unit_outside_the_selected_layers_is_422(served):
    api, model, dataset = served
    before = (api.count(Index), api.count(Job))
    response = _create(
        api.client,
        model,
        dataset,
        layers="head",
        projection={"units": {"block.0.attn.q": {"kind": "identity"}}},
    )
    _problem_names(response, "projection.units", "block.0.attn.q", "head")
    _nothing_written(api, before)


def test_a_budget_that_cannot_hold_the_exact_units_is_422(
    tmp_path, sqlite_url, default_roots, wide_lora, sst2_rows
):
    """max_feature_bytes_per_row bounds every unit together at the index's dtype; the refusal says what the
    choice needs, the limit and the largest units, and writes nothing."""
    base, adapter = wide_lora
    api = build_api(make_settings(tmp_path, sqlite_url, default_roots, max_feature_bytes_per_row=96 * 1024))
    try:
        model = register_model(api.client, base, adapter=adapter)
        dataset = register_dataset(api.client, sst2_rows[:20], name="train")
        everything_exact = {"exact_max_params": 2**24}
        response = _create(api.client, model, dataset, projection=everything_exact)
        body = assert_problem(
            response,
            422,
            "projection",
            # 837,636 bytes of dense units and the embedding's token rows at their most: 128 distinct tokens x
            # (128 float16 values + an int32 id + an int64 order entry) = 34,304 bytes.
            "takes up to 871940 bytes of features per row",
            f"max_feature_bytes_per_row = {96 * 1024}",
        )
        # The largest units are the MLP matrices (33,024 numbers each, exact here).
        assert "largest units: block.0.mlp.up (identity, 66048 bytes)" in body["detail"], body["detail"]
        assert "dropped" not in body["detail"]
        one_big = {"units": {"block.1.mlp.up": {"kind": "identity"}}}
        body = assert_problem(_create(api.client, model, dataset, projection=one_big), 422, "block.1.mlp.up")
        assert "float16" in body["detail"]  # bytes are counted at the index's dtype
        _nothing_written(api, (0, 0))
        # The default (LoRA and head exact, the rest factorized) fits the same budget.
        assert _create(api.client, model, dataset).status_code == 202
    finally:
        api.close()


def test_statistics_that_the_budget_cannot_hold_are_422(served):
    """An exact (identity) override of a 16,512-number unit would make DataInf fit a 16,512 x 16,512 float64
    matrix at build time (2.2 GB, above max_statistics_bytes = 2 GiB): refused up front, naming the unit."""
    api, model, dataset = served
    before = (api.count(Index), api.count(Job))
    response = _create(api.client, model, dataset, projection={"units": {"block.0.attn.q": {"kind": "identity"}}})
    body = assert_problem(response, 422, "projection", "max_statistics_bytes", "block.0.attn.q (16512 features")
    assert "DataInf" in body["detail"]
    _nothing_written(api, before)


def test_the_default_projection_makes_fewer_units_exact_until_the_budgets_hold(
    tmp_path, sqlite_url, default_roots, wide_lora, sst2_rows
):
    """A request that leaves `auto`'s exact_max_params at its default gets the largest threshold under which the
    feature and statistics budgets hold (the default must build on an LLM); one that names it is held to it."""
    from influence.estimators import estimator_class

    base, adapter = wide_lora
    api = build_api(make_settings(tmp_path, sqlite_url, default_roots))
    try:
        model = register_model(api.client, base, adapter=adapter)
        dataset = register_dataset(api.client, sst2_rows[:20], name="train")
        layers = api.client.get(f"/v1/models/{model['id']}/layers").json()["layers"]
        sizes = {layer["name"]: layer["num_params"] for layer in layers if layer["kind"] != "embedding"}
        exact = {name: n for name, n in sizes.items() if n <= AUTO_EXACT_MAX_PARAMS}
        assert len(set(exact.values())) >= 2, exact  # something to drop and something to keep
        datainf = estimator_class("datainf")
        # A statistics budget one byte short of the default's exact units: the largest of them must go.
        needed = sum(datainf.statistics_nbytes(n) for n in exact.values())
        api.settings.max_statistics_bytes = needed - 1
        largest = max(exact.values())
        created = _create(api.client, model, dataset)
        assert created.status_code == 202, created.text
        index = api.client.get(f"/v1/indexes/{created.json()['id']}").json()
        assert index["projection"]["exact_max_params"] == largest - 1
        kept = sum(datainf.statistics_nbytes(n) for n in exact.values() if n < largest)
        assert kept <= api.settings.max_statistics_bytes
        # Named, the threshold is the caller's: refused, with what it would take.
        named = {"kind": "auto", "exact_max_params": AUTO_EXACT_MAX_PARAMS}
        assert_problem(_create(api.client, model, dataset, projection=named), 422, "max_statistics_bytes")
        # No threshold fits (not even the head alone): the default's own refusal.
        api.settings.max_statistics_bytes = 1
        assert_problem(_create(api.client, model, dataset), 422, "max_statistics_bytes")
    finally:
        api.close()


def test_projection_of_an_index_row_from_before_per_unit_projections():
    """Rows migrated from before 0004 have null overrides and threshold: the old {kind, dim, seed}."""
    from app.services.indexes import projection_of

    row = Index(
        projection_kind="factorized",
        projection_dim=64,
        projection_seed=3,
        projection_units=None,
        exact_max_params=None,
    )
    assert projection_of(row) == {"kind": "factorized", "dim": 64, "seed": 3}


def test_cli_unit_overrides_parse():
    import argparse

    from influence_client.cli.indexes import _unit_projection

    assert _unit_projection("head=gaussian:64") == ("head", {"kind": "gaussian", "dim": 64})
    assert _unit_projection("block.0.attn.q=identity") == ("block.0.attn.q", {"kind": "identity"})
    for bad in ("head", "=identity", "head=", "head=gaussian:sixty"):
        with pytest.raises(argparse.ArgumentTypeError):
            _unit_projection(bad)
