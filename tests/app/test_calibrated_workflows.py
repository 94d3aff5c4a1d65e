"""Calibrated checks and audit review prefixes over HTTP (issue 17): the threshold a check derives for a target
precision or recall equals influence.calibration.calibrate on the existing rows' aggregated scores (recomputed
with the library, bit for bit) and the noisy mask; a batch of copies of the indexed rows is flagged exactly at
that cut; a target no threshold reaches, or a mask that became too small, fails the job with the library's
message; an audit's review prefix is the brute-force shortest head of its ranking holding the target recall."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.jobs.model_cache import ModelCache
from app.jobs.steps import run_build_inline, run_job_inline
from influence import aggregate, load_model, make_estimator, score_tensor
from influence.calibration import ASSUMPTION, calibrate, wilson_interval
from influence.errors import InvalidInputError
from tests.app.conftest import fresh_api
from tests.app.library import featurize_as_indexed, index_store
from tests.worker.support import register_dataset, register_model, tsv

ROWS = 120
# Every 4th training row has its label flipped and is flagged noisy: 30 known-noisy rows among 120.
NOISY = np.arange(ROWS) % 4 == 0
LAYERS = ["block.1.attn.v", "block.1.mlp.down", "head"]
REFERENCE = slice(250, 270)
MODELS = ModelCache()
# What a check over the head layer with grad-dot and `mean` ranks by: a row's mean score does not depend on the
# other rows, so copies of indexed rows land next to their originals.
SCORED = {"layers": "head", "estimator": "grad-dot", "aggregation": "mean"}


class Env:
    def __init__(self, api, folder, model, dataset, reference, index, train, rows):
        self.api, self.folder, self.model, self.dataset = api, folder, model, dataset
        self.reference, self.index, self.train, self.rows = reference, index, train, rows
        self.loaded = None  # the library's own copy of the model, for the brute force

    @property
    def client(self):
        return self.api.client


def _build(api, dataset, model, **fields) -> dict:
    body = {
        "model_id": model["id"],
        "dataset_id": dataset["id"],
        "layers": LAYERS,
        "chunk_size": 60,
        **fields,
    }
    created = api.client.post("/v1/indexes", json=body)
    assert created.status_code == 202, created.text
    run_build_inline(api.settings, api.session_factory, created.json()["job"]["id"], models=MODELS)
    index = api.client.get(f"/v1/indexes/{created.json()['id']}").json()
    assert index["status"] == "ready", index
    return index


@pytest.fixture(scope="module")
def env(tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows):
    """A tiny-BERT index (3 layers) over 120 SST-2 rows, every 4th with a flipped label and flagged noisy, and a
    reference dataset of 20 other SST-2 rows."""
    api = fresh_api(tmp_path_factory, sqlite_template, "calibrated", max_active_jobs_per_tenant=50)
    folder = tiny_model_dir("bert", "classification", num_labels=2)
    train = [(text, 1 - label if NOISY[i] else label) for i, (text, label) in enumerate(sst2_rows[:ROWS])]
    model = register_model(api.client, folder)
    dataset = register_dataset(api.client, train, noisy=NOISY.tolist())
    reference = register_dataset(api.client, sst2_rows[REFERENCE], name="reference")
    index = _build(api, dataset, model)
    built = Env(api, folder, model, dataset, reference, index, train, sst2_rows)
    yield built
    api.close()


def _run(env: Env, job_id: str, fails: str | None = None) -> None:
    """Run a job in this process; `fails`: the start of the library error it must fail with (inline, the error
    also propagates to the caller)."""
    if fails is None:
        run_job_inline(env.api.settings, env.api.session_factory, job_id, models=MODELS)
        return
    with pytest.raises(InvalidInputError) as caught:
        run_job_inline(env.api.settings, env.api.session_factory, job_id, models=MODELS)
    assert str(caught.value).startswith(fails), str(caught.value)


def _submit_check(env: Env, rows, index_id: str | None = None, **form):
    data = {
        "text_column": "sentence",
        "label_column": "label",
        "reference": json.dumps({"dataset_id": env.reference["id"]}),
        "max_flagged": str(len(rows)),
    }
    for key, value in {**SCORED, **form}.items():
        data[key] = value if isinstance(value, str) else json.dumps(value)
    response = env.client.post(
        f"/v1/indexes/{index_id or env.index['id']}/checks",
        files={"file": ("batch.tsv", tsv(rows))},
        data=data,
    )
    assert response.status_code == 202, response.text
    return response.json()


def _check(env: Env, rows, **form) -> dict:
    created = _submit_check(env, rows, **form)
    _run(env, created["id"])
    response = env.client.get(f"/v1/checks/{created['id']}", params={"limit": 10_000})
    assert response.status_code == 200, response.text
    return response.json()


def _union_scores(env: Env, batch, index_id: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(existing live rows' aggregated scores, batch rows' aggregated scores, live rows' dataset ids), recomputed
    with the library as a check scores them: the store's live rows followed by the batch rows as the store would
    hold them (its dtype, norms from the float32 values), grad-dot on the head layer, aggregated with `mean`."""
    store = index_store(env.api, index_id or env.index["id"])
    if env.loaded is None:
        env.loaded = load_model(env.folder, num_labels=2)
    size = env.api.settings.batch_size
    train = featurize_as_indexed(store, env.loaded, ["head"], batch, batch_size=size)
    test = featurize_as_indexed(store, env.loaded, ["head"], env.rows[REFERENCE], batch_size=size)
    live = store.live_positions()
    new32 = train.features["head"].astype(np.float32)
    features = np.concatenate([np.asarray(store.layer("head"))[live], new32.astype(store.manifest.dtype)])
    norms = np.concatenate(
        [
            np.asarray(store.norms("head"))[live],
            np.linalg.norm(new32.astype(np.float64), axis=1).astype(np.float32),
        ]
    )
    scores = score_tensor(
        {"head": features},
        {"head": test.features["head"]},
        {"head": make_estimator("grad-dot")},
        {"head": norms},
    )
    aggregated = aggregate(scores, "mean")
    n = len(live)
    return aggregated[:n], aggregated[n:], np.asarray(store.row_ids()[live])


def _derived(summary: dict) -> dict:
    calibration = dict(summary["calibration"])
    calibration.pop("noisy"), calibration.pop("assumes")
    return calibration


# ------------------------------------------------------------------------------------------------- checks


def _planted(env: Env) -> np.ndarray:
    """Row ids of a mask that a precision target can use (the untrained model's scores do not single out the
    flipped rows): two of every three of the 45 lowest-scoring rows, by the library's scores."""
    existing, _, row_ids = _union_scores(env, env.train[:2])
    lowest = row_ids[np.argsort(existing, kind="stable")[:45]]
    return np.sort(lowest[np.arange(45) % 3 != 2])


def test_a_calibrated_check_flags_copies_exactly_at_the_derived_cut(env):
    """Target precision on a mask of row ids; the batch is a copy of every indexed row."""
    planted = _planted(env)
    check = _check(env, env.train, target_precision="0.6", noisy={"rows": planted.tolist()})
    assert check["status"] == "succeeded", check["job"]
    assert check["params"]["threshold_percentile"] is None
    assert check["params"]["calibration"] == {
        "target": "precision",
        "value": 0.6,
        "noisy": {"source": "rows", "rows": planted.tolist()},
    }
    existing, new, row_ids = _union_scores(env, env.train)
    assert row_ids.tolist() == list(range(ROWS))
    expected = calibrate(existing, np.isin(row_ids, planted), target_precision=0.6)
    summary = check["summary"]
    assert _derived(summary) == expected.to_dict()
    assert summary["calibration"]["noisy"] == {"source": "rows", "given": 30, "deleted_rows_left_out": 0}
    assert summary["calibration"]["assumes"] == ASSUMPTION
    assert summary["threshold_percentile"] == expected.threshold_percentile
    assert (expected.known_noisy, expected.rows) == (30, ROWS)
    assert expected.precision >= 0.6 and 10 < expected.cutoff_rows < ROWS  # a real cut, not a trivial one
    rows = check["rows"]
    assert [row["score"] for row in rows] == [float(s) for s in new]  # the library's numbers, bit for bit

    # Every row is flagged by the percentile rule at the derived threshold, i.e. exactly when it scores at or
    # below the cut's score (the cut is never inside a run of ties).
    cutoff = expected.score_cutoff
    for row in rows:
        assert (
            row["flagged"] == (row["percentile"] < expected.threshold_percentile) == (row["score"] <= cutoff)
        )
    # A copy scores as its original (up to the featurization's rounding, if any), so the copies flagged are the
    # copies of the m lowest existing rows: all but those whose original lies within that rounding of the cut.
    rounding = np.abs(new - existing)
    assert rounding.max() <= 1e-3 * np.abs(existing).max()
    lowest = existing <= cutoff
    clear = (rounding == 0) | (np.abs(existing - cutoff) > rounding)
    assert clear.sum() >= ROWS - 2
    assert [row["flagged"] for row in rows if clear[row["row"]]] == lowest[clear].tolist()
    assert summary["flagged"] == sum(row["flagged"] for row in rows)

    # The reasons say how the threshold was derived.
    c = expected
    assert check["reasons"][1] == (
        f"threshold: {c.threshold_percentile:.4g}th percentile (the {c.cutoff_rows} lowest existing "
        f"rows), derived for precision >= 0.6 on {ROWS} existing rows with 30 known noisy: expected precision "
        f"{c.precision:.2f} [{c.precision_interval[0]:.2f}, {c.precision_interval[1]:.2f}], recall "
        f"{c.recall:.2f} [{c.recall_interval[0]:.2f}, {c.recall_interval[1]:.2f}], clean rows flagged "
        f"{c.clean_flag_rate:.1%} [{c.clean_flag_rate_interval[0]:.1%}, {c.clean_flag_rate_interval[1]:.1%}] "
        "(95% intervals)"
    )
    # A clean batch is expected to flag the clean rows' share below the cut: brute force on the index's rows.
    assert c.clean_flag_rate == (c.cutoff_rows - c.found) / (ROWS - 30)
    assert check["reasons"][-1] == f"pass: at most {ROWS} may be flagged (max_flagged)"


def test_a_target_recall_on_the_dataset_noisy_column(env):
    batch = env.train[:12]
    check = _check(env, batch, target_recall="0.5", noisy="dataset")
    assert check["status"] == "succeeded", check["job"]
    existing, new, row_ids = _union_scores(env, batch)
    mask = NOISY[row_ids]
    expected = calibrate(existing, mask, target_recall=0.5)
    assert _derived(check["summary"]) == expected.to_dict()
    assert check["summary"]["calibration"]["noisy"] == {
        "source": "dataset",
        "rows_without_flag": 0,
        "deleted_rows_left_out": 0,
    }
    # The brute force: the smallest cut the rule can express holding half of the 30 noisy rows.
    order = np.sort(existing)
    m = next(
        m
        for m in range(1, ROWS + 1)
        if (m == ROWS or order[m - 1] < order[m]) and mask[existing <= order[m - 1]].sum() >= 15
    )
    assert (expected.cutoff_rows, expected.found) == (m, int(mask[existing <= order[m - 1]].sum()))
    assert expected.recall_interval == wilson_interval(expected.found, 30)
    assert [row["flagged"] for row in check["rows"]] == [bool(s <= order[m - 1]) for s in new]
    assert check["reasons"][1].startswith(
        f"threshold: {round(100 * m / ROWS, 1):g}th percentile (the {m} lowest"
    )
    assert "derived for recall >= 0.5 on 120 existing rows with 30 known noisy" in check["reasons"][1]


def test_without_a_target_the_check_is_unchanged(env):
    check = _check(env, env.train[:6], threshold_percentile="5")
    assert check["status"] == "succeeded", check["job"]
    assert "calibration" not in check["summary"] and check["summary"]["threshold_percentile"] == 5.0
    assert not any(reason.startswith("threshold:") for reason in check["reasons"])
    assert [row["flagged"] for row in check["rows"]] == [row["percentile"] < 5 for row in check["rows"]]


def test_an_unreachable_precision_fails_the_check_with_the_best_one(env):
    """A mask of the 10 highest-scoring rows: every cut below the top holds none of them, so the best precision
    is the mask's share of all rows, at the 100th percentile."""
    batch = env.train[:4]
    existing, _, row_ids = _union_scores(env, batch)
    top = row_ids[np.argsort(existing, kind="stable")[-10:]]
    created = _submit_check(env, batch, target_precision="0.5", noisy={"rows": top.tolist()})
    _run(env, created["id"], fails="no threshold reaches precision 0.5 on these rows; the best is ")
    check = env.client.get(f"/v1/checks/{created['id']}").json()
    assert check["status"] == "failed" and check["verdict"] is None
    assert check["job"]["error"].startswith(
        "InvalidInputError: no threshold reaches precision 0.5 on these rows; the best is "
    )
    with pytest.raises(InvalidInputError, match=r"no threshold reaches precision 0\.5"):
        calibrate(existing, np.isin(row_ids, top), target_precision=0.5)


def test_a_mask_that_became_too_small_fails_before_scoring(env):
    """10 noisy rows named (the least the API accepts), one of them deleted from the index before the check
    runs: the job fails with the library's refusal, before featurizing anything."""
    index = _build(env.api, env.dataset, env.model)
    marked = np.flatnonzero(NOISY)[:10].tolist()
    created = _submit_check(
        env, env.train[:5], index_id=index["id"], target_precision="0.5", noisy={"rows": marked}
    )
    deleted = env.client.post(f"/v1/indexes/{index['id']}/rows/delete", json={"row_ids": [marked[0]]})
    assert deleted.status_code == 200, deleted.text
    _run(env, created["id"], fails="too small to calibrate")
    check = env.client.get(f"/v1/checks/{created['id']}").json()
    assert check["status"] == "failed"
    assert check["job"]["error"] == (
        "InvalidInputError: too small to calibrate: 9 known noisy and 110 clean rows among 119 (at least 10 noisy "
        "and 10 clean rows are needed)"
    )
    assert check["job"]["done"] == 0


# ------------------------------------------------------------------------------------------------- audits


def _audit(env: Env, fails: str | None = None, **body) -> dict:
    body = {"reference": {"dataset_id": env.reference["id"]}, "layers": LAYERS, "aggregation": "rank", **body}
    response = env.client.post(f"/v1/indexes/{env.index['id']}/audits", json=body)
    assert response.status_code == 202, response.text
    _run(env, response.json()["id"], fails)
    return env.client.get(f"/v1/audits/{response.json()['id']}").json()


@pytest.mark.parametrize(("target", "noisy"), [(0.7, None), (1.0, "dataset"), (0.5, "rows")])
def test_the_review_prefix_is_the_shortest_head_of_the_ranking(env, target, noisy):
    review = {"target_recall": target}
    marked = np.flatnonzero(NOISY)[1::2]  # 15 of the 30
    if noisy == "rows":
        review["noisy"] = {"rows": marked.tolist()}
    elif noisy is not None:
        review["noisy"] = noisy
    audit = _audit(env, review=review)
    assert audit["status"] == "succeeded", audit["job"]
    page = env.client.get(f"/v1/audits/{audit['id']}/rows", params={"limit": 1000}).json()
    ranked = np.array([row["row"] for row in page["items"]])
    assert len(ranked) == ROWS
    mask = np.isin(ranked, marked) if noisy == "rows" else NOISY[ranked]
    known = int(mask.sum())
    m = next(m for m in range(1, ROWS + 1) if mask[:m].sum() / known >= target)
    k = int(mask[:m].sum())
    got = audit["summary"]["review"]
    assert {key: got[key] for key in ("rows", "total_rows", "found", "known_noisy", "target_recall")} == {
        "rows": m,
        "total_rows": ROWS,
        "found": k,
        "known_noisy": known,
        "target_recall": target,
    }
    assert got["share"] == m / ROWS and got["recall"] == k / known and got["precision"] == k / m
    assert got["recall_interval"] == list(wilson_interval(k, known))
    assert got["precision_interval"] == list(wilson_interval(k, m))
    assert got["noisy"] == (
        {"source": "rows", "given": 15, "deleted_rows_left_out": 0}
        if noisy == "rows"
        else {"source": "dataset", "rows_without_flag": 0, "deleted_rows_left_out": 0}
    )
    assert f"the first {m} rows of the ranking" in got["read"]
    # The ranking's own noise block is the audit's as before.
    assert audit["summary"]["noise"]["noisy_rows"] == int(NOISY.sum())
    prefix = env.client.get(f"/v1/audits/{audit['id']}/rows", params={"review": "true", "limit": 1000}).json()
    assert prefix["total"] == m and [row["row"] for row in prefix["items"]] == ranked[:m].tolist()


def test_an_audit_without_review_has_none(env):
    audit = _audit(env)
    assert audit["status"] == "succeeded", audit["job"]
    assert audit["summary"]["review"] is None and audit["summary"]["noise"]["noisy_rows"] == int(NOISY.sum())


def test_a_review_mask_too_small_fails_the_audit_before_scoring(env):
    audit = _audit(env, "too small to calibrate", review={"target_recall": 0.5, "noisy": {"rows": [0, 4, 8]}})
    assert audit["status"] == "failed" and audit["summary"] is None
    assert audit["job"]["error"] == (
        "InvalidInputError: too small to calibrate: 3 known noisy and 117 clean rows among 120 (at least 10 noisy "
        "rows are needed)"
    )
    assert audit["job"]["done"] == 0
