"""Item 3: an audit's scoring and aggregation: n = 4,500 train x m = 500 reference x all 63 layers, rank and vote.

    python -m bench.audit            # 5 runs of each method (and of scoring alone), medians
    python -m bench.audit --quick    # 5 runs, one JSON line

The layers and their feature sizes are the MiniLM + LoRA model's 63 units under the default factorized
projection (dim 256; the LoRA A units give 4 x 64, the head 2 x 128, ...); the features are synthetic float16
arrays (as a feature store holds them; scoring cost does not depend on their values, ranking is on distinct
floats). Each run builds a fresh influence.LazyScores (grad-dot) and calls influence.aggregate(lazy, method):
the time covers every score (n x 63 x m = 142M) and the aggregation. "scoring alone" computes every layer's
(n, m) block without aggregating, in the same run, so aggregation = total - scoring.
"""

from __future__ import annotations

import argparse

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--n", type=int, default=N_TRAIN)
    parser.add_argument("--m", type=int, default=M_REF)
    parser.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
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

    runs: dict[str, list[float]] = {"scoring": [], "rank": [], "vote": []}
    fns = {
        "scoring": scoring_only,
        "rank": lambda: aggregate(fresh(), "rank"),
        "vote": lambda: aggregate(fresh(), "vote"),
    }
    for fn in fns.values():  # warm-up
        fn()
    for r in range(args.runs):
        for name, fn in fns.items():
            runs[name].append(common.timed(fn)[0])
        common.log(f"run {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in runs.items()))
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
        "target_le_10s": {k: med[k]["median"] <= 10.0 for k in ("rank", "vote")},
    }
    headline = {
        "n": args.n,
        "m": args.m,
        "layers": len(dims),
        "load_1min": common.load_average()[0],
        "scoring_s": med["scoring"]["median"],
        "rank_s": med["rank"]["median"],
        "vote_s": med["vote"]["median"],
        "target_met": all(result["target_le_10s"].values()),
    }
    common.emit("audit", result, args.quick, headline)


if __name__ == "__main__":
    main()
