"""A causal LM end to end through HTTP with the code path of the billion-parameter shapes (bench/llm.py): a tiny
Qwen2 (tied head) saved from its config with the synthetic byte-level BPE tokenizer, a LoRA r = 8 adapter on
q_proj / v_proj, 64-token completion rows with the prompt masked and a noisy column; the service featurizes in
bfloat16, in batches cut by tokens (max_tokens_per_batch), with the head's loss in chunks smaller than a batch.
Register, build, query, audit and layer report, each held to what the library computes or to a known answer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from app.jobs.steps import run_build_inline, run_job_inline
from bench.harness import FIRST_WORD_ID, save_random_causal_lm, synthetic_text
from tests.app.conftest import fresh_api
from tests.app.library import index_store

VOCAB = 2000
ROW_TOKENS = 64  # <s>, 31 prompt words, 31 completion words, </s>
WORDS = (ROW_TOKENS - 2) // 2
N_TRAIN = 40
NOISY = {3, 8, 15, 21, 27, 34}
# 4 rows of 64 tokens per batch; the head's loss over 48 tokens at a time, 12 positions of the 4 rows.
MAX_TOKENS = 256
HEAD_CHUNK = 48
DUPLICATE = 11  # the training row that queries and the audit repeat


def _rows(n: int, seed: int, noisy=frozenset()) -> list[tuple[str, str, bool]]:
    """(prompt, completion, noisy): a clean completion is the prompt's first words reversed, a noisy one random."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt = rng.integers(FIRST_WORD_ID, VOCAB, WORDS)
        completion = rng.integers(FIRST_WORD_ID, VOCAB, WORDS) if i in noisy else prompt[::-1]
        rows.append((synthetic_text(prompt), synthetic_text(completion), i in noisy))
    return rows


TRAIN = _rows(N_TRAIN, seed=0, noisy=NOISY)
HELD_OUT = _rows(4, seed=1)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(model folder, adapter folder) of a tiny Qwen2 shaped like Qwen2-0.5B (GQA, tied head), random weights."""
    from transformers import Qwen2Config

    root = tmp_path_factory.mktemp("tiny-qwen2-lora")
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    save_random_causal_lm(
        config, root / "model", root / "adapter", lora_rank=8, lora_targets=("q_proj", "v_proj")
    )
    return root / "model", root / "adapter"


@pytest.fixture(scope="module")
def loss_calls():
    """(rows, positions, logits dtype) of every causal-LM loss computed while this module runs: what the head's
    logits held at once."""
    import influence.gradients as gradients

    calls = []
    original = gradients._causal_lm_loss

    def spy(logits, targets, counts):
        calls.append((logits.shape[0], logits.shape[1], logits.dtype))
        return original(logits, targets, counts)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gradients, "_causal_lm_loss", spy)
        yield calls


@pytest.fixture(scope="module")
def served(tmp_path_factory, sqlite_template, qwen, loss_calls):
    """The API with the model, the rows (JSONL, noisy column) and an index over the LoRA units and the head,
    built in this process under the LLM settings; and the losses the build computed."""
    api = fresh_api(
        tmp_path_factory,
        sqlite_template,
        "llm-e2e",
        max_tokens_per_batch=MAX_TOKENS,
        head_chunk_tokens=HEAD_CHUNK,
        compute_dtype="bfloat16",
        max_length=ROW_TOKENS,
        fidelity_train_rows=8,
        fidelity_query_rows=4,
        max_top_k=N_TRAIN,
    )
    model_folder, adapter = qwen
    body = {"name": "qwen2-lora", "source": str(model_folder), "adapter": str(adapter), "task": "causal-lm"}
    response = api.client.post("/v1/models", json=body)
    assert response.status_code == 201, response.text
    model = response.json()
    records = "".join(json.dumps({"prompt": p, "completion": c, "noisy": n}) + "\n" for p, c, n in TRAIN)
    response = api.client.post(
        "/v1/datasets",
        files={"file": ("rows.jsonl", records.encode())},
        data={
            "task": "causal-lm",
            "text_column": "prompt",
            "label_column": "completion",
            "noisy_column": "noisy",
        },
    )
    assert response.status_code == 201, response.text
    dataset = response.json()
    body = {
        "model_id": model["id"],
        "dataset_id": dataset["id"],
        "layers": ["role:lora", "head"],
        "chunk_size": 16,
    }
    response = api.client.post("/v1/indexes", json=body)
    assert response.status_code == 202, response.text
    run_build_inline(api.settings, api.session_factory, response.json()["job"]["id"])
    index = api.client.get(f"/v1/indexes/{response.json()['id']}").json()
    yield api, model, dataset, index, list(loss_calls)
    api.close()


def _library(folder, adapter, layers, projection, rows, dtype, **options):
    """Features and losses of (prompt, completion) rows computed by the library straight from the folders."""
    from influence import Featurizer, ProjectionSpec, discover_layers, featurize_examples, load_model
    from influence.data import Example

    loaded = load_model(folder, task="causal-lm", adapter=adapter, dtype=dtype)
    chosen = [layer for layer in discover_layers(loaded.model) if layer.name in layers]
    featurizer = Featurizer(loaded.model, chosen, ProjectionSpec.from_dict(projection))
    examples = [Example(prompt, completion) for prompt, completion, *_ in rows]
    return featurize_examples(
        featurizer, loaded.tokenizer, examples, "causal-lm", max_length=ROW_TOKENS, **options
    )


def test_the_model_registers_with_its_llm_memory_estimate(served):
    _, model, dataset, index, _ = served
    assert model["task"] == "causal-lm" and model["num_blocks"] == 2
    estimate = model["memory_estimate"]
    assert estimate["dtype"] == "bfloat16" and estimate["tokens_per_batch"] == MAX_TOKENS and estimate["fits"]
    assert estimate["head_bytes"] > 0 and estimate["weights_from"] == "safetensors"
    assert dataset["row_count"] == N_TRAIN
    # 2 blocks x (q, v) x (A, B) and the tied head.
    assert index["status"] == "ready" and len(index["layers"]) == 9 and index["layers"][-1] == "head"
    assert all(".lora_" in name for name in index["layers"][:-1])


def test_the_build_cut_batches_by_tokens_and_held_the_head_in_chunks(served):
    """Every loss of the build (its chunks and its fidelity sample) saw at most 4 rows (256 tokens of 64-token
    rows) and at most 48 tokens of bfloat16 logits at once, and every row's completion was reached."""
    *_, calls = served
    assert calls
    assert all(rows <= MAX_TOKENS // ROW_TOKENS for rows, _, _ in calls)
    assert all(rows * positions <= HEAD_CHUNK for rows, positions, _ in calls)
    assert {dtype for *_, dtype in calls} == {torch.bfloat16}
    # The chunks of one batch cover its completion positions (the last WORDS + 1 of its 63 predictions).
    assert sum(rows * positions for rows, positions, _ in calls) >= N_TRAIN * (WORDS + 1)


def test_the_build_featurized_in_bfloat16_with_token_batches_and_head_chunks(served, qwen):
    """The stored features are the library's under the same settings (bfloat16 weights, 4-row batches, the head
    in 12-position chunks), and stay close to plain float32 whole-batch features: the switches change memory and
    precision, not what is computed."""
    api, _, _, index, _ = served
    store = index_store(api, index["id"])
    manifest = store.manifest
    assert manifest.task == "causal-lm" and manifest.max_length == ROW_TOKENS
    assert manifest.extra.get("compute_dtype") == "bfloat16"
    options = {"batch_size": 32, "max_tokens": MAX_TOKENS, "head_chunk_tokens": HEAD_CHUNK}
    same = _library(*qwen, index["layers"], manifest.projection, TRAIN, torch.bfloat16, **options)
    plain = _library(
        *qwen, index["layers"], manifest.projection, TRAIN, torch.float32, head_chunk_tokens=None
    )
    order = np.argsort(np.asarray(store.row_ids()))
    for name in index["layers"]:
        stored = np.asarray(store.layer(name), dtype=np.float32)[order]
        np.testing.assert_allclose(stored, same.features[name], rtol=2e-3, atol=2e-3 * np.abs(stored).max())
        exact = plain.features[name]
        cosine = (stored * exact).sum(1) / (np.linalg.norm(stored, axis=1) * np.linalg.norm(exact, axis=1))
        assert cosine.min() > 0.98, (name, cosine.min())


def test_a_query_repeating_a_training_row_finds_that_row_and_scores_as_the_library(served, qwen):
    api, _, _, index, _ = served
    prompt, completion, _ = TRAIN[DUPLICATE]
    examples = [{"text": prompt, "label": completion}, {"text": HELD_OUT[0][0], "label": HELD_OUT[0][1]}]
    body = {
        "examples": examples,
        "estimator": "cosine",
        "aggregation": "rank",
        "top_k": 5,
        "direction": "both",
    }
    response = api.client.post(f"/v1/indexes/{index['id']}/query", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["layers"] == index["layers"]
    duplicate, other = answer["results"]
    # Cosine 1 with itself in every layer: the top helpful row, ranked first by every layer.
    assert duplicate["helpful"][0]["row"] == DUPLICATE
    assert all(entry["rank"] == N_TRAIN - 1 for entry in duplicate["helpful"][0]["layers"])
    assert all(abs(entry["score"] - 1) < 5e-3 for entry in duplicate["helpful"][0]["layers"])

    # Every shown score is the library's cosine of the stored row and the example's features.
    store = index_store(api, index["id"])
    options = {"max_tokens": MAX_TOKENS, "head_chunk_tokens": HEAD_CHUNK}
    rows = [TRAIN[DUPLICATE], HELD_OUT[0]]
    features = _library(*qwen, index["layers"], store.manifest.projection, rows, torch.bfloat16, **options)
    position = {int(row): i for i, row in enumerate(store.row_ids())}
    for j, result in enumerate((duplicate, other)):
        assert result["loss"] == pytest.approx(features.losses[j], rel=1e-3)
        for hit in result["helpful"] + result["harmful"]:
            for u, name in enumerate(index["layers"]):
                stored = np.asarray(store.layer(name)[position[hit["row"]]], dtype=np.float64)
                query = features.features[name][j].astype(np.float64)
                cosine = stored @ query / (np.linalg.norm(stored) * np.linalg.norm(query))
                assert hit["layers"][u]["score"] == pytest.approx(cosine, abs=2e-3)


def test_an_audit_against_a_repeated_row_ranks_it_most_helpful(served):
    api, _, _, index, _ = served
    prompt, completion, _ = TRAIN[DUPLICATE]
    body = {"reference": {"examples": [{"text": prompt, "label": completion}]}, "estimator": "cosine"}
    response = api.client.post(f"/v1/indexes/{index['id']}/audits", json=body)
    assert response.status_code == 202, response.text
    run_job_inline(api.settings, api.session_factory, response.json()["id"])
    audit = api.client.get(f"/v1/audits/{response.json()['id']}").json()
    assert audit["status"] == "succeeded", audit
    summary = audit["summary"]
    assert summary["num_rows"] == N_TRAIN and summary["num_reference"] == 1
    assert summary["layers"] == index["layers"] and summary["reference_accuracy"] is None
    assert summary["noise"] is not None  # the dataset's noisy column
    page = api.client.get(f"/v1/audits/{audit['id']}/rows", params={"offset": N_TRAIN - 1, "limit": 1}).json()
    (last,) = page["items"]
    assert last["row"] == DUPLICATE and last["rank"] == N_TRAIN - 1
    assert last["noisy"] is False and last["label"] == completion


def test_a_layer_report_measures_the_noisy_rows_and_cancellation(served):
    api, _, _, index, _ = served
    examples = [{"text": p, "label": c} for p, c, _ in HELD_OUT]
    body = {"reference": {"examples": examples}, "cancellation_rows": 8, "estimators": ["grad-dot", "cosine"]}
    response = api.client.post(f"/v1/indexes/{index['id']}/reports", json=body)
    assert response.status_code == 202, response.text
    run_job_inline(api.settings, api.session_factory, response.json()["id"])
    out = api.client.get(f"/v1/reports/{response.json()['id']}").json()
    assert out["status"] == "succeeded", out
    report = out["report"]
    assert out["params"]["noisy"] == {"source": "dataset"}
    # A causal LM predicts no class: the correct-only aggregations are unavailable, the rest is measured.
    assert {"rank-c", "vote-c"} <= set(report["unavailable"])
    layers = report["cancellation"]["layers"]
    assert [row["layer"] for row in layers] == index["layers"]
    assert all(row["num_samples"] == 8 for row in layers)
    measured = [entry for entry in report["entries"] if entry.get("auc_ndr") is not None]
    assert measured and all(0 <= entry["auc_ndr"] <= 1 for entry in measured)
    detrimental = {(row["estimator"], row["row_id"]) for row in report["detrimental"]}
    assert {row for _, row in detrimental} <= set(range(N_TRAIN))
