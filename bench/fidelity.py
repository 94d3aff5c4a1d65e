"""Projection fidelity per layer unit: projected vs exact grad-dot scores (baseline for issue 12).

    python -m bench.fidelity [--out results.json]   # 64 train x 16 query SST-2 rows, 63 units, 5 settings
    python -m bench.fidelity --quick                 # 16 x 4 rows, the default (auto) only; one JSON line

The packaged MiniLM with the benchmark's deterministic LoRA r = 4 adapter (bench.common), classification,
max length 128. A seeded sample of SST-2 train rows: `--train` rows ("train", default 64) and `--queries`
other rows ("queries", default 16). For every layer unit u (discover_layers: embed, 36 base Linear, 24 LoRA
A/B, pooler, head) and every train row z_i and query x_j:

    exact      S[i, j] = g_u(z_i) . g_u(x_j), the unprojected per-sample gradients, dot in float64.
               Every unit but `embed`: the library's `identity` projection (ProjectionSpec("identity"),
               hook-based, p numbers per row). `embed` (30522 x 384 = 11.7M parameters, above
               MAX_IDENTITY_DIM): a path of this file that does not use the library's hooks: a plain forward
               hook makes the word embedding's output a leaf, autograd gives its gradient d_t per position,
               and d_t is summed per distinct token id of the row (padding excluded). The gradient is
               row-sparse, so the rows of the tokens present are the whole gradient, and grad-dot joins rows on
               token id. Checked against a dense backward of single rows (the parameters' .grad) on
               `--verify` rows, for the embedding and for every other unit's identity features.
    projected  the library's Featurizer under each `--settings` entry `kind:dim[+unit=kind:dim...]`, seed 0:
               auto:256 (the default: embed as exact token rows, LoRA and head identity, the rest factorized
               256), factorized 256 (the default before issue 12), gaussian 256, factorized 1024, and
               auto:256+embed=tokens:192 (the embedding's per-token sketch); S_proj = F(z) . F(x) in float64
               (features as float32, as featurize_examples returns them; the float16 copy a store keeps is
               scored too, in the JSON; token rows are joined on token id).

Per unit and setting: the mean over queries of Spearman's rho between the projected and the exact scores
over the train rows, the relative Frobenius error ||S_proj - S||_F / ||S||_F over the whole train x query
matrix, and the mean top-10 overlap (the share of the exact 10 highest-scoring train rows of a query that
are among the projected 10 highest). Bytes per row per unit are what a FeatureStore holds: dim float16
features (the store's default dtype) + one float32 norm; exact: p float16 numbers + a norm, and for the
embedding the distinct tokens of a row x (one int32 id + 384 float16 values) + a norm, averaged over the sample.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import common

SETTINGS = ("auto:256", "factorized:256", "gaussian:256", "factorized:1024", "auto:256+embed=tokens:192")
TOP_K = 10
MAX_LENGTH = 128
TASK = "classification"
# Roles of the table, in its order.
ROLE_ORDER = ("embed", "LoRA A", "LoRA B", "head", "base attention", "base mlp", "pooler")


def role_of(layer) -> str:
    if layer.kind == "embedding":
        return "embed"
    if layer.is_lora:
        return "LoRA A" if layer.name.endswith("lora_A") else "LoRA B"
    if layer.name == "head":
        return "head"
    if layer.name == "pooler":
        return "pooler"
    return f"base {layer.role}"


def sample_rows(n_train: int, n_query: int, seed: int):
    """A seeded sample of SST-2 train rows: (train examples, query examples, their row numbers in train.tsv)."""
    examples = common.sst2_examples("train")
    chosen = random.Random(seed).sample(range(len(examples)), n_train + n_query)
    return [examples[i] for i in chosen[:n_train]], [examples[i] for i in chosen[n_train:]], chosen


# ------------------------------------------------------------------------------------------- exact scores


def _losses(model, batch):
    """Per-sample cross-entropy of a batch, written out here (independent of influence.gradients)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return F.cross_entropy(logits, batch.labels, reduction="none")


def embedding_rows(model, tokenizer, examples, embed_layer, batch_size: int = 16):
    """Exact per-sample word-embedding gradients, row-sparse: per example (token ids (U,), rows (U, dim) float64).

    Plain torch: a forward hook replaces the embedding's output with a leaf, autograd.grad gives d_t (B, T, dim)
    of the summed per-sample losses (samples do not interact in eval mode), and G[id] = sum of d_t over the
    positions t holding that id; padding positions (and the padding_idx row) get no gradient, as nn.Embedding.
    """
    import torch

    from influence.data import encode_examples, iter_batches, pad_token_id
    from influence.layers import get_module

    module = get_module(model, embed_layer)
    padding_idx = module.padding_idx
    captured: list[torch.Tensor] = []

    def hook(_module, _args, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    out: list[Any] = [None] * len(examples)
    encoded = encode_examples(tokenizer, examples, TASK, MAX_LENGTH)
    handle = module.register_forward_hook(hook)
    try:
        model.eval()
        for batch in iter_batches(encoded, pad_token_id(tokenizer), TASK, batch_size, sort_by_length=True):
            captured.clear()
            with torch.enable_grad():
                losses = _losses(model, batch)
                (d,) = torch.autograd.grad(losses.sum(), captured[0])
            for b, row in enumerate(batch.row_ids.tolist()):
                keep = batch.attention_mask[b].bool()
                ids = batch.input_ids[b][keep]
                grads = d[b][keep].double()
                if padding_idx is not None:
                    real = ids != padding_idx
                    ids, grads = ids[real], grads[real]
                present, inverse = torch.unique(ids, return_inverse=True)
                rows = torch.zeros(len(present), grads.shape[1], dtype=torch.float64)
                rows.index_add_(0, inverse, grads)
                out[row] = (present, rows)
    finally:
        handle.remove()
    return out


def embedding_scores(train_rows, query_rows) -> np.ndarray:
    """S[i, j] = sum over token ids present in both rows of G_i[id] . G_j[id] (float64)."""
    import torch

    vocab = torch.unique(torch.cat([ids for ids, _ in train_rows + query_rows]))
    width = train_rows[0][1].shape[1]

    def compact(rows):
        dense = torch.zeros(len(rows), len(vocab), width, dtype=torch.float64)
        for k, (ids, values) in enumerate(rows):
            dense[k, torch.searchsorted(vocab, ids)] = values
        return dense.reshape(len(rows), -1)

    return (compact(train_rows) @ compact(query_rows).T).numpy()


def identity_scores(loaded, layers, train, queries, chunk: int) -> tuple[dict[str, np.ndarray], dict, dict]:
    """Exact scores {unit: (n_train, n_query)} from the library's identity projection, train in chunks; the
    queries' identity features (kept for the verification); the exact gradient norms {unit: (n_train + n_query,)}."""
    from influence import Featurizer, ProjectionSpec, featurize_examples

    featurizer = Featurizer(loaded.model, layers, ProjectionSpec("identity"))
    query_set = featurize_examples(
        featurizer, loaded.tokenizer, queries, TASK, batch_size=chunk, max_length=MAX_LENGTH
    )
    q64 = {name: value.astype(np.float64) for name, value in query_set.features.items()}
    scores = {name: np.zeros((len(train), len(queries))) for name in featurizer.dims}
    norms = {name: np.zeros(len(train) + len(queries)) for name in featurizer.dims}
    for name, value in q64.items():
        norms[name][len(train) :] = np.linalg.norm(value, axis=1)
    for start in range(0, len(train), chunk):
        part = featurize_examples(
            featurizer,
            loaded.tokenizer,
            train[start : start + chunk],
            TASK,
            batch_size=chunk,
            max_length=MAX_LENGTH,
        )
        for name, value in part.features.items():
            value = value.astype(np.float64)
            scores[name][start : start + chunk] = value @ q64[name].T
            norms[name][start : start + len(value)] = np.linalg.norm(value, axis=1)
        del part
        common.log(f"exact (identity): train rows {start}-{min(start + chunk, len(train))} done")
    return scores, query_set.features, norms


def verify(loaded, layers, examples, embed_exact, identity_features) -> dict[str, Any]:
    """The exact paths against a dense backward of each row alone (all parameters' .grad, float32).

    embed_exact: this file's row-sparse gradients of `examples`; identity_features: {unit: (n, p)} of the same
    rows from the library's identity projection (computed batched, with padding). Relative difference =
    max |a - b| / max |b| per unit and row; for the embedding also the grad-dot of every pair of rows.
    """
    import torch

    from influence.data import encode_examples, iter_batches, pad_token_id
    from influence.layers import layer_weight

    model = loaded.model.eval()
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    embed = next(layer for layer in layers if layer.kind == "embedding")
    others = [layer for layer in layers if layer.kind != "embedding"]
    encoded = encode_examples(loaded.tokenizer, examples, TASK, MAX_LENGTH)
    embed_rel, unit_rel, dense_embeds = [], {layer.name: 0.0 for layer in others}, []
    # The same path on each row alone: separates the path's error from batched-vs-single float32 rounding.
    alone = [embedding_rows(model, loaded.tokenizer, [e], embed, batch_size=1)[0] for e in examples]
    alone_rel = []
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        for k in range(len(examples)):
            (batch,) = iter_batches(
                [encoded[k]], pad_token_id(loaded.tokenizer), TASK, 1, sort_by_length=False
            )
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                _losses(model, batch).sum().backward()
            weight, _ = layer_weight(model, embed)
            dense = weight.grad.detach().double()
            ids, rows = embed_exact[k]
            mine = torch.zeros_like(dense)
            mine[ids] = rows
            embed_rel.append(float((mine - dense).abs().max() / dense.abs().max()))
            mine_alone = torch.zeros_like(dense)
            mine_alone[alone[k][0]] = alone[k][1]
            alone_rel.append(float((mine_alone - dense).abs().max() / dense.abs().max()))
            dense_embeds.append(dense.reshape(-1))
            for layer in others:
                w, b = layer_weight(model, layer)
                parts = [w.grad.reshape(-1)] + ([b.grad.reshape(-1)] if b is not None else [])
                reference = torch.cat(parts).double()
                ours = torch.from_numpy(identity_features[layer.name][k]).double()
                rel = float((ours - reference).abs().max() / reference.abs().max())
                unit_rel[layer.name] = max(unit_rel[layer.name], rel)
    finally:
        model.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
    dense_dots = torch.stack(dense_embeds) @ torch.stack(dense_embeds).T
    sparse = embedding_scores(embed_exact, embed_exact)
    dot_rel = float(np.abs(sparse - dense_dots.numpy()).max() / np.abs(dense_dots.numpy()).max())
    worst = max(unit_rel, key=unit_rel.get)
    return {
        "rows": len(examples),
        "embed_gradient_max_rel_diff": max(embed_rel),
        "embed_gradient_rel_diff_per_row": embed_rel,
        "embed_gradient_max_rel_diff_row_alone": max(alone_rel),
        "embed_grad_dot_max_rel_diff": dot_rel,
        "identity_max_rel_diff": unit_rel[worst],
        "identity_worst_unit": worst,
        "identity_rel_diff_per_unit": unit_rel,
    }


def verification_line(v: dict[str, Any]) -> str:
    return (
        f"verification ({v['rows']} rows, dense backward of each row alone): embed gradient max rel diff "
        f"{v['embed_gradient_max_rel_diff']:.2e} (batched as in the run; "
        f"each row alone: {v['embed_gradient_max_rel_diff_row_alone']:.2e}), "
        f"embed grad-dot {v['embed_grad_dot_max_rel_diff']:.2e}, "
        f"identity max rel diff {v['identity_max_rel_diff']:.2e} ({v['identity_worst_unit']})"
    )


# ------------------------------------------------------------------------------------------- agreement


def agreement(projected: np.ndarray, exact: np.ndarray, k: int = TOP_K) -> dict[str, float]:
    """Mean Spearman over query columns, relative Frobenius error, mean top-k overlap (highest scores)."""
    from scipy.stats import spearmanr

    rhos, overlaps = [], []
    for j in range(exact.shape[1]):
        if np.ptp(exact[:, j]) == 0 or np.ptp(projected[:, j]) == 0:
            rhos.append(float("nan"))
        else:
            rhos.append(float(spearmanr(projected[:, j], exact[:, j]).statistic))
        top_exact = set(np.argsort(-exact[:, j], kind="stable")[:k].tolist())
        top_proj = set(np.argsort(-projected[:, j], kind="stable")[:k].tolist())
        overlaps.append(len(top_exact & top_proj) / k)
    valid = [r for r in rhos if r == r]
    norm = float(np.linalg.norm(exact))
    return {
        "spearman": statistics.fmean(valid) if valid else float("nan"),
        "spearman_min_query": min(valid) if valid else float("nan"),
        "spearman_nan_queries": len(rhos) - len(valid),
        "rel_error": float(np.linalg.norm(projected - exact)) / norm if norm > 0 else float("nan"),
        "top10_overlap": statistics.fmean(overlaps),
    }


def store_bytes(dim: int, value: Any = None) -> float:
    """Bytes per row per unit in a FeatureStore: dim float16 features + one float32 norm; token rows: per
    entry an int32 token, an int64 order entry and dim float16 values, per row an int64 offset and the norm."""
    from influence.tokens import TokenRows

    if isinstance(value, TokenRows):
        return len(value.tokens) / len(value) * (4 + 8 + 2 * dim) + 8 + 4
    return 2 * dim + 4


def parse_setting(setting: str):
    """`kind:dim[+unit=kind:dim...]` -> ProjectionSpec (seed 0): e.g. auto:256+embed=tokens:128."""
    from influence import ProjectionSpec

    head, *overrides = setting.split("+")
    kind, dim = head.split(":")
    units = {}
    for override in overrides:
        unit, choice = override.split("=")
        unit_kind, unit_dim = choice.split(":")
        units[unit] = {"kind": unit_kind, "dim": int(unit_dim)}
    return ProjectionSpec(kind, int(dim), seed=0, units=units)


def projected_scores(value: Any, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train x query scores in float64, the same from float16 values, squared norms of all rows)."""
    import torch

    from influence.tokens import TokenRows

    if isinstance(value, TokenRows):
        rows64 = TokenRows(
            value.offsets, value.tokens, np.asarray(value.values, dtype=np.float64), check=False
        )
        rows16 = TokenRows(
            value.offsets,
            value.tokens,
            np.asarray(value.values).astype(np.float16).astype(np.float64),
            check=False,
        )
        scores = rows64[:n].dot(rows64[n:], torch.float64).numpy()
        scores16 = rows16[:n].dot(rows16[n:], torch.float64).numpy()
        return scores, scores16, rows64.norms().double().numpy() ** 2
    f = value.astype(np.float64)
    f16 = value.astype(np.float16).astype(np.float64)
    return f[:n] @ f[n:].T, f16[:n] @ f16[n:].T, np.einsum("ij,ij->i", f, f)


# ------------------------------------------------------------------------------------------------ tables


def role_table(units: list[dict], settings: list[str]) -> list[dict]:
    rows = []
    for role in ROLE_ORDER:
        members = [u for u in units if u["role"] == role]
        if not members:
            continue
        exact_bytes = [u["exact_bytes_per_row"] for u in members]
        for setting in settings:
            got = [u["settings"][setting] for u in members if setting in u["settings"]]
            if not got:
                continue
            rho = [g["spearman"] for g in got]
            rows.append(
                {
                    "role": role,
                    "units": len(members),
                    "setting": setting,
                    "spearman_min": min(rho),
                    "spearman_median": statistics.median(rho),
                    "rel_error_median": statistics.median(g["rel_error"] for g in got),
                    "top10_median": statistics.median(g["top10_overlap"] for g in got),
                    "bytes": sorted({g["bytes_per_row"] for g in got}),
                    "exact_bytes": sorted({round(b) for b in exact_bytes}),
                    "exact_cosine_median": statistics.median(u["exact_mean_abs_cosine"] for u in members),
                }
            )
    return rows


def _span(values: list[int]) -> str:
    return f"{values[0]:,}" if len(values) == 1 else f"{values[0]:,}-{values[-1]:,}"


def markdown(units: list[dict], settings: list[str]) -> str:
    lines = [
        "| role (units) | setting | Spearman min | Spearman median | rel. error median | top-10 overlap median "
        "| B/row/unit | exact B/row/unit | exact mean abs cos (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in role_table(units, settings):
        lines.append(
            f"| {row['role']} ({row['units']}) | {row['setting']} | {row['spearman_min']:.3f} "
            f"| {row['spearman_median']:.3f} | {row['rel_error_median']:.3f} | {row['top10_median']:.2f} "
            f"| {_span(row['bytes'])} | {_span(row['exact_bytes'])} | {row['exact_cosine_median']:.3f} |"
        )
    lines += ["", "| unit | role | p | " + " | ".join(f"{s} rho / err / top-10" for s in settings) + " |"]
    lines.append("|---|---|---|" + "---|" * len(settings))
    for unit in units:
        cells = []
        for s in settings:
            g = unit["settings"].get(s)
            cells.append(
                "-" if g is None else f"{g['spearman']:.3f} / {g['rel_error']:.3f} / {g['top10_overlap']:.2f}"
            )
        lines.append(
            f"| {unit['name']} | {unit['role']} | {unit['num_params']:,} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="16 train x 4 query rows, the default auto:256; one JSON line"
    )
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="the row sample's seed (projections use seed 0)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="kind:dim,... (default: %(default)s)")
    parser.add_argument("--verify", type=int, default=3, help="rows checked against a dense backward")
    parser.add_argument(
        "--chunk", type=int, default=16, help="rows per identity batch (memory: ~0.7 GB/16 rows)"
    )
    parser.add_argument(
        "--budget", type=float, default=600.0, help="seconds; settings not started by then are dropped"
    )
    parser.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file (default $INFLUENCE_BENCH_DIR/results/fidelity.json)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.train, args.queries, args.settings, args.verify = 16, 4, "auto:256", 1
    common.set_threads(args.threads)
    started = time.perf_counter()
    machine_start = common.machine()

    from influence import Featurizer, discover_layers, featurize_examples
    from influence.data import encode_examples

    loaded = common.load_lora_model()
    layers = discover_layers(loaded.model)
    embed = next(layer for layer in layers if layer.kind == "embedding")
    others = [layer for layer in layers if layer.kind != "embedding"]
    train, queries, chosen = sample_rows(args.train, args.queries, args.seed)
    common.log(f"{len(layers)} units; {len(train)} train, {len(queries)} query rows")

    # Exact scores.
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    embed_train = embedding_rows(loaded.model, loaded.tokenizer, train, embed)
    embed_query = embedding_rows(loaded.model, loaded.tokenizer, queries, embed)
    exact = {embed.name: embedding_scores(embed_train, embed_query)}
    embed_norms = np.array([float(rows.norm()) for _, rows in embed_train + embed_query])
    seconds["exact embed"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    identity, query_identity, exact_norms = identity_scores(loaded, others, train, queries, args.chunk)
    exact.update(identity)
    exact_norms[embed.name] = embed_norms
    seconds["exact identity"] = time.perf_counter() - t0
    common.log(
        f"exact scores: embed {seconds['exact embed']:.1f}s, identity {seconds['exact identity']:.1f}s"
    )

    t0 = time.perf_counter()
    n_verify = min(args.verify, len(queries))
    verification = verify(
        loaded,
        layers,
        queries[:n_verify],
        embed_query[:n_verify],
        {name: value[:n_verify] for name, value in query_identity.items()},
    )
    del query_identity
    seconds["verification"] = time.perf_counter() - t0
    common.log(verification_line(verification))

    # Exact storage cost.
    encoded = encode_examples(loaded.tokenizer, train + queries, TASK, MAX_LENGTH)
    pad = loaded.model.get_submodule(embed.module_path).padding_idx
    distinct = [len(set(e.input_ids) - {pad}) for e in encoded]
    mean_distinct = statistics.fmean(distinct)
    exact_bytes = {layer.name: store_bytes(layer.num_params) for layer in others}
    exact_bytes[embed.name] = mean_distinct * (4 + 2 * embed.cols) + 4

    # Projected scores.
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    done_settings, dropped, projected = [], [], {}
    for setting in settings:
        elapsed = time.perf_counter() - started
        if elapsed > args.budget:
            dropped.append(
                {"setting": setting, "why": f"time box: {elapsed:.0f}s spent of {args.budget:.0f}s"}
            )
            common.log(f"dropping {setting}: time box")
            continue
        spec = parse_setting(setting)
        t0 = time.perf_counter()
        featurizer = Featurizer(loaded.model, layers, spec)
        features = featurize_examples(
            featurizer,
            loaded.tokenizer,
            train + queries,
            TASK,
            batch_size=len(train) + len(queries),
            max_length=MAX_LENGTH,
        ).features
        seconds[setting] = time.perf_counter() - t0
        kinds = {name: p.kind for name, p in featurizer.projectors.items()}
        projected[setting] = {"dims": featurizer.dims, "features": features, "kinds": kinds}
        done_settings.append(setting)
        common.log(
            f"{setting}: featurized {len(train) + len(queries)} rows x {len(layers)} units in {seconds[setting]:.1f}s"
        )

    units = []
    n = len(train)
    for layer in layers:
        norm = exact_norms[layer.name]
        cosine = np.abs(exact[layer.name]) / np.maximum(np.outer(norm[:n], norm[n:]), 1e-300)
        entry = {
            "name": layer.name,
            "role": role_of(layer),
            "num_params": layer.num_params,
            "exact_bytes_per_row": exact_bytes[layer.name],
            "exact_score_norm": float(np.linalg.norm(exact[layer.name])),
            # How near-orthogonal the rows' exact gradients are: mean |cos(g(z_i), g(x_j))| over the matrix.
            "exact_mean_abs_cosine": float(cosine.mean()),
            "settings": {},
        }
        for setting in done_settings:
            value = projected[setting]["features"][layer.name]
            dim = projected[setting]["dims"][layer.name]
            scores, scores16, squared = projected_scores(value, n)
            # Squared norms, projected over exact, over all rows: 1 in expectation for these projections.
            ratio = squared / np.maximum(norm**2, 1e-300)
            entry["settings"][setting] = {
                "dim": dim,
                "kind": projected[setting]["kinds"][layer.name],
                "bytes_per_row": store_bytes(dim, value),
                "sq_norm_ratio_median": float(np.median(ratio)),
                **agreement(scores, exact[layer.name]),
                "float16": agreement(scores16, exact[layer.name]),
            }
        units.append(entry)

    total = time.perf_counter() - started
    result = {
        "bench": "fidelity",
        "machine": machine_start,
        "machine_end": common.machine(),
        "rows": {"train": len(train), "queries": len(queries), "seed": args.seed, "sst2_train_rows": chosen},
        "max_length": MAX_LENGTH,
        "mean_distinct_tokens_per_row": mean_distinct,
        "settings": done_settings,
        "dropped_settings": dropped,
        "verification": verification,
        "seconds": {**seconds, "total": total},
        "roles": role_table(units, done_settings),
        "units": units,
    }
    headline = {
        "units": len(units),
        "verify_embed_rel": verification["embed_gradient_max_rel_diff"],
        "verify_identity_rel": verification["identity_max_rel_diff"],
        **{
            f"{r['role']} {r['setting']} rho min/med": [
                round(r["spearman_min"], 3),
                round(r["spearman_median"], 3),
            ]
            for r in result["roles"]
        },
        "seconds": round(total, 1),
    }
    if args.quick:
        print(json.dumps({"bench": "fidelity", **common.rnd(headline)}))
        return
    out = args.out or common.WORK / "results" / "fidelity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(common.rnd(result, 6), indent=2))
    print(markdown(units, done_settings))
    print("\n" + verification_line(verification))
    print(f"dropped: {dropped or 'none'}; seconds: {common.rnd(result['seconds'], 1)}")
    print(f"saved {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
