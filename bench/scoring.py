"""Item 6: the slowest stage of a query, exact scoring over the store, against the naive method, side by side.

    python -m bench.scoring            # n = 100k and 1M x 12 layers x dim 256 float16 memmaps; 5 runs each
    python -m bench.scoring --quick    # n = 100k only: one JSON line

Each comparison alternates a naive reference implementation written below (`baseline`) with the library's
function (`library`) in one process, on the same inputs, and checks that their answers agree. The figure of a
comparison is `speedup`, baseline time / library time per alternating pair, median (min, max) over the runs:

  scoring_n{n}_m{m}         12 layers of n x 256 float16 memmaps (bench.growth's synthetic features) against m
                            query vectors, grad-dot, the compiled kernel off: naive_scores vs influence.score_layer
  top_k_n{n}                the 10 most helpful and the 10 most harmful of n scores: naive_top_k vs influence.top_k
  scoring_audit_4500x500_one_layer   the audit's shape (4,500 rows, 500 query vectors; compute-bound)
  kernel_n{n}_m{m}          scoring_n{n}_m{m} with the compiled kernel enabled (influence.kernels), m = 1 to 16:
                            the kernel serves up to COMPILED_MAX_QUERIES vectors, BLAS the rest
  aggregate_{rank,vote}_n{n}  a query-shaped (n, 12 layers, 1) score tensor: naive_aggregate vs influence.aggregate
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench import common

# torch, scipy and influence (which loads torch) are imported inside the functions: bench.common sets torch's
# OpenMP policy as it is imported, and that has to happen before torch loads.

AUDIT_ROWS, AUDIT_QUERIES = 4500, 500
DIRECTIONS = ("helpful", "harmful")
TOP = 10

# ------------------------------------------------------------------------------- the naive baselines


def naive_scores(features: Any, queries: Any) -> Any:
    """grad-dot scores (n, m), the naive way: the whole layer read into memory, converted to float32, and one
    eager torch matmul with the queries."""
    import torch

    return torch.from_numpy(np.array(features)).float() @ queries.T


def naive_top_k(values: np.ndarray, k: int, direction: str) -> np.ndarray:
    """The first k rows of a full stable sort: most harmful = lowest score first, most helpful = highest first
    (ties to the lower row either way)."""
    keys = values if direction == "harmful" else -values.astype(np.float64)
    return np.argsort(keys, kind="stable")[:k]


def naive_aggregate(scores: np.ndarray, method: str, vote_k: float = 0.2) -> np.ndarray:
    """method.md §3 on a (n, U, m) tensor, each voter (layer, test column) ranked by scipy on its own, 0-based
    average ranks: rank = their mean over voters; vote = minus the truncated Borda points max(0, K - rank)
    summed over voters, K = vote_k * n rounded half up."""
    from scipy.stats import rankdata

    voters = scores.reshape(scores.shape[0], -1)
    ranks = rankdata(voters, method="average", axis=0) - 1.0
    if method == "rank":
        return ranks.sum(axis=1) / voters.shape[1]
    k = max(1, int(np.floor(vote_k * len(scores) + 0.5)))
    return -np.maximum(k - ranks, 0.0).sum(axis=1)


# --------------------------------------------------------------------------------------------------- run


def compare(name: str, baseline, library, runs: int) -> dict:
    """Alternate baseline and library `runs` times (after a warm-up of each): medians and the per-pair ratio."""
    baseline()
    library()
    baseline_times, library_times, ratios = [], [], []
    for _ in range(runs):
        baseline_s, _ = common.timed(baseline)
        library_s, _ = common.timed(library)
        baseline_times.append(baseline_s)
        library_times.append(library_s)
        ratios.append(baseline_s / library_s)
    out = {
        "baseline_s": common.summary(baseline_times),
        "library_s": common.summary(library_times),
        "speedup": common.summary(ratios),
    }
    common.log(
        f"{name}: baseline {out['baseline_s']['median']:.4f}s library {out['library_s']['median']:.4f}s "
        f"speedup x{out['speedup']['median']:.1f}"
    )
    return out


def compare_scoring(name: str, features: list, queries: list, runs: int) -> dict:
    """naive_scores vs influence.score_layer (grad-dot) over the layers, and how far apart their scores are."""
    from influence import make_estimator, score_layer

    estimator = make_estimator("grad-dot")

    def baseline():
        return [naive_scores(f, q) for f, q in zip(features, queries, strict=True)]

    def library():
        return [score_layer(f, q, estimator) for f, q in zip(features, queries, strict=True)]

    expected, got = baseline(), library()
    entry = compare(name, baseline, library, runs)
    diff = max(float((a - b).abs().max()) for a, b in zip(expected, got, strict=True))
    entry["max_abs_diff_over_max_abs"] = diff / max(float(a.abs().max()) for a in expected)
    return entry


def random_queries(rng, count: int, m: int) -> list:
    import torch

    return [torch.from_numpy(rng.standard_normal((m, 256), dtype=np.float32)) for _ in range(count)]


def scoring_and_top_k(sizes: list[int], runs: int, rng) -> dict[str, Any]:
    """The exact path as the eager library runs it (kernel off): scoring per size, top-k, the audit's shape."""
    from bench.growth import feature_files
    from influence import top_k

    out: dict[str, Any] = {}
    for n in sizes:
        files = feature_files(n, 12)
        for m in (1, 16):
            entry = compare_scoring(f"scoring n={n} m={m}", files, random_queries(rng, len(files), m), runs)
            entry["bytes_read"] = n * 12 * 256 * 2
            out[f"scoring_n{n}_m{m}"] = entry
        agg = rng.standard_normal(n)
        entry = compare(
            f"top_k n={n}",
            lambda agg=agg: [naive_top_k(agg, TOP, d) for d in DIRECTIONS],
            lambda agg=agg: [top_k(agg, TOP, d) for d in DIRECTIONS],
            runs,
        )
        entry["identical"] = all(np.array_equal(top_k(agg, TOP, d), naive_top_k(agg, TOP, d)) for d in DIRECTIONS)
        out[f"top_k_n{n}"] = entry
    train = rng.standard_normal((AUDIT_ROWS, 256), dtype=np.float32).astype(np.float16)
    queries = random_queries(rng, 1, AUDIT_QUERIES)
    out["scoring_audit_4500x500_one_layer"] = compare_scoring("audit layer", [train], queries, runs)
    # Tie-heavy inputs: the partial selection keeps the full sort's tie rule exactly.
    for _trial in range(200):
        values = rng.integers(-3, 4, int(rng.integers(1000, 20000))).astype(np.float32)
        for d in DIRECTIONS:
            for k in (1, 10, 100):
                assert np.array_equal(top_k(values, k, d), naive_top_k(values, k, d))
    out["top_k_tie_heavy_checks"] = "200 arrays x 2 directions x k in (1, 10, 100): identical"
    return out


def with_kernel(sizes: list[int], runs: int, rng) -> dict[str, Any]:
    """Scoring with the compiled kernel enabled, for query counts on both sides of its crossover with BLAS."""
    from bench.growth import feature_files
    from influence.kernels import (
        COMPILED_MAX_QUERIES,
        compiled_scoring_status,
        enable_compiled_scoring,
        wait_for_compile_in_progress,
    )

    compile_s, _ = common.timed(lambda: (enable_compiled_scoring(warm_up=True), wait_for_compile_in_progress()))
    common.log(f"compiled kernel: {compiled_scoring_status()} after {compile_s:.1f}s")
    out: dict[str, Any] = {"kernel_compile_s": compile_s, "kernel_status": compiled_scoring_status()}
    for n in sizes:
        files = feature_files(n, 12)
        for m in (1, 2, 4, 8, 16):
            queries = random_queries(rng, len(files), m)
            entry = compare_scoring(f"kernel n={n} m={m}", files, queries, runs)
            entry["kernel_used"] = m <= COMPILED_MAX_QUERIES and compiled_scoring_status()["state"] == "ready"
            out[f"kernel_n{n}_m{m}"] = entry
    return out


def aggregation(sizes: list[int], runs: int) -> dict[str, Any]:
    """rank and vote of a query's score tensor (one test column in each of 12 layers)."""
    from influence import aggregate

    out: dict[str, Any] = {}
    for n in sizes:
        scores = np.random.default_rng(5).standard_normal((12, 1, n), dtype=np.float32).transpose(2, 0, 1)
        for method in ("rank", "vote"):
            entry = compare(
                f"aggregate {method} n={n} x 12 layers x 1 column",
                lambda method=method, scores=scores: naive_aggregate(scores, method),
                lambda method=method, scores=scores: aggregate(scores, method),
                runs,
            )
            entry["identical"] = bool(np.array_equal(naive_aggregate(scores, method), aggregate(scores, method)))
            out[f"aggregate_{method}_n{n}"] = entry
    return out


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser("scoring", __doc__)
    parser.add_argument("--sizes", default=None, help="comma-separated n (default 100000,1000000)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    sizes = common.sizes(args.sizes or ("100000" if args.quick else "100000,1000000"))
    load_start = common.load_average()
    rng = np.random.default_rng(3)
    results = scoring_and_top_k(sizes, args.runs, rng)
    results.update(with_kernel(sizes, args.runs, rng))  # after the eager runs: the kernel stays enabled
    results.update(aggregation(sizes, args.runs))
    result = {"machine": common.machine(), "load_at_start": load_start, "results": results}
    headline = {"load_1min": common.load_average()[0]}
    for key, entry in results.items():
        if isinstance(entry, dict) and "speedup" in entry:
            headline[f"{key}_baseline_s"] = entry["baseline_s"]["median"]
            headline[f"{key}_library_s"] = entry["library_s"]["median"]
            headline[f"{key}_speedup"] = entry["speedup"]["median"]
    checks = [entry for entry in results.values() if isinstance(entry, dict)]
    headline["identical_where_exact"] = all(entry.get("identical", True) for entry in checks)
    headline["max_abs_diff_over_max_abs"] = max(entry.get("max_abs_diff_over_max_abs", 0.0) for entry in checks)
    common.emit("scoring", result, args.quick, headline)


if __name__ == "__main__":
    main()
