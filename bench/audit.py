"""Item 3: an audit's scoring and aggregation: n = 4,500 train x m = 500 reference x all 63 layers, rank and vote.

    python -m bench.audit            # 5 runs of each method (and of scoring alone), medians
    python -m bench.audit --quick    # 5 runs, one JSON line

The layers and their feature sizes are the MiniLM + LoRA model's 63 units under the default factorized
projection (dim 256; the LoRA A units give 4 x 64, the head 2 x 128, ...); the features are synthetic float16
arrays (as a feature store holds them; scoring cost does not depend on their values, ranking is on distinct
floats). Each run builds a fresh influence.LazyScores (grad-dot) and calls influence.aggregate(lazy, method):
the time covers every score (n x 63 x m = 142M) and the aggregation. "scoring alone" computes every layer's
(n, m) block without aggregating, in the same run, so aggregation = total - scoring.

"service rank / vote" time the audit job's own scoring-and-aggregation step (app/services/audits.py
`_score_layers`) on the same features held in a real FeatureStore (float16 memmaps): it also writes the whole
(n, U, m) float32 tensor to a safetensors file (what GET /v1/audits/{id}/scores serves) and keeps every layer's
own aggregate and mean score (the per-layer contributions of each row); rank and vote over all layers then
follow from the per-layer aggregates exactly (influence.aggregation.combine_layer_aggregates).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from bench import common

N_TRAIN, M_REF = 4500, 500


def layer_dims() -> dict[str, int]:
    from influence import discover_layers, make_projector
    from influence.projection import ProjectionSpec

    loaded = common.load_lora_model()
    layers = discover_layers(loaded.model)
    spec = ProjectionSpec("factorized", 256, seed=0)
    return {layer.name: make_projector(spec, layer).dim for layer in layers}


def feature_store(folder: Path, train: dict[str, np.ndarray]):
    """A finalized FeatureStore holding `train` (float16), as an index build leaves it."""
    from influence import FeatureStore
    from influence.store import LayerSpec, StoreManifest

    n = len(next(iter(train.values())))
    manifest = StoreManifest(
        model_id="bench", revision="", weights_hash="w", tokenizer="t", dataset_hash="d",
        layers=[LayerSpec(name, a.shape[1], a.shape[1]) for name, a in train.items()],
        projection={"kind": "factorized", "dim": 256, "seed": 0}, dtype="float16", library_version="bench",
        num_rows=n, chunk_size=n,
    )  # fmt: skip
    store = FeatureStore.create(folder, manifest)
    store.write_chunk(0, np.arange(n), train)
    store.finalize()
    store.map_all()
    return store


def service_step(store, queries: dict[str, np.ndarray], method: str, folder: Path) -> None:
    """The audit runner's scoring + aggregation step over `store`, writing its tensor into `folder`."""
    from app.workflows.audit.runner import _score_layers

    layers = list(queries)
    m = len(next(iter(queries.values())))
    run = SimpleNamespace(
        params={"aggregation": method, "vote_k": 0.2, "estimator": "grad-dot"}, progress=lambda *_: None
    )
    reference = SimpleNamespace(features=queries, examples=[None] * m, correct=None)
    _score_layers(run, store, reference, layers, None, 0, folder / f"scores-{method}.safetensors", {})


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser("audit", __doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--n", type=int, default=N_TRAIN)
    parser.add_argument("--m", type=int, default=M_REF)
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    import torch

    from influence import LazyScores, aggregate, make_estimator

    load_start = common.load_average()
    dims = layer_dims()
    rng = np.random.default_rng(0)
    train = {
        name: rng.standard_normal((args.n, k), dtype=np.float32).astype(np.float16)
        for name, k in dims.items()
    }
    queries = {
        name: torch.from_numpy(rng.standard_normal((args.m, k), dtype=np.float32)) for name, k in dims.items()
    }
    estimators = {name: make_estimator("grad-dot") for name in dims}

    def fresh() -> LazyScores:
        return LazyScores(train, queries, estimators)

    def scoring_only() -> None:
        lazy = fresh()
        for u in range(lazy.shape[1]):
            lazy.layer_scores(u)

    work = Path(tempfile.mkdtemp(prefix="audit-", dir=common.WORK if common.WORK.exists() else None))
    store = feature_store(work / "store", train)
    numpy_queries = {name: q.numpy() for name, q in queries.items()}

    runs: dict[str, list[float]] = {"scoring": [], "rank": [], "vote": [], "service rank": [], "service vote": []}
    fns = {
        "scoring": scoring_only,
        "rank": lambda: aggregate(fresh(), "rank"),
        "vote": lambda: aggregate(fresh(), "vote"),
        "service rank": lambda: service_step(store, numpy_queries, "rank", work),
        "service vote": lambda: service_step(store, numpy_queries, "vote", work),
    }
    for fn in fns.values():  # warm-up
        fn()
    for r in range(args.runs):
        for name, fn in fns.items():
            runs[name].append(common.timed(fn)[0])
        common.log(f"run {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in runs.items()))
    shutil.rmtree(work, ignore_errors=True)
    med = {name: common.summary(v) for name, v in runs.items()}
    result = {
        "machine": common.machine(),
        "load_at_start": load_start,
        "n": args.n,
        "m": args.m,
        "layers": len(dims),
        "feature_dims_total": sum(dims.values()),
        "scores": args.n * args.m * len(dims),
        "seconds": med,
        "aggregation_only_median_s": {
            "rank": med["rank"]["median"] - med["scoring"]["median"],
            "vote": med["vote"]["median"] - med["scoring"]["median"],
        },
        "target_le_10s": {
            k: med[k]["median"] <= 10.0 for k in ("rank", "vote", "service rank", "service vote")
        },
    }
    headline = {
        "n": args.n,
        "m": args.m,
        "layers": len(dims),
        "load_1min": common.load_average()[0],
        "scoring_s": med["scoring"]["median"],
        "rank_s": med["rank"]["median"],
        "vote_s": med["vote"]["median"],
        "service_rank_s": med["service rank"]["median"],
        "service_vote_s": med["service vote"]["median"],
        "target_met": all(result["target_le_10s"].values()),
    }
    common.emit("audit", result, args.quick, headline)


if __name__ == "__main__":
    main()
