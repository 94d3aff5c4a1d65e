"""Item 6: the slowest stage of a query, exact scoring over the store, before and after, side by side.

    python -m bench.scoring            # n = 100k and 1M x 12 layers x dim 256 float16 memmaps; 5 runs each
    python -m bench.scoring --quick    # n = 100k only: one JSON line

Third round: the compiled kernel (influence.kernels) against the blocked BLAS path ("eager"), m = 1..16 query
vectors, same process, alternating (results "kernel_n{n}_m{m}"; "before" = eager, "after" = compiled).

Profiling bench.query at n = 100k put 80 % of a query in `exact_scores` (1.46 s of 1.81 s, 45x its
memory-bandwidth floor). The cause: influence.scoring converted each 65,536-row chunk of a read-only float16
memmap by copying it (np.copy, because torch refuses read-only memory), then converting the copy to a fresh
float32 tensor, then multiplying: three passes over 64 MiB temporaries that miss every cache and are
page-faulted anew for each chunk. The fix converts 4 MiB blocks straight from the memmap into one reused
float32 buffer (a non-copying, read-only view; `Tensor.copy_` converts) and scores each block while it is in
cache. The second fix is influence.top_k: a partial selection (np.partition) instead of a full stable argsort,
with the same tie rule. (A third change, stacking a query's per-layer rank sorts so that both threads share
them, measured x1.1 at 100k and x0.9 at 1M on the busy machine and was withdrawn; session 3 brought it back,
measured x1.3-1.8 at 100k and 1M on a quiet machine: "joined_voters_*" below.)

"before" is the previous code, kept verbatim below; "after" is influence as it is now. Both run in the same
process, alternating, on the same memmaps (synthetic features of bench.growth); outputs are compared.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from bench import common

# ------------------------------------------------------------------------------ before (verbatim, old code)


def _rows_as_tensor_before(features: Any, i0: int, i1: int, device):
    import torch

    if isinstance(features, torch.Tensor):
        rows = features[i0:i1]
    else:
        block = np.asarray(features[i0:i1])
        if not block.flags.writeable:
            block = block.copy()  # torch refuses read-only memory (a memmap opened with mode "r")
        rows = torch.from_numpy(block)
    return rows.to(device=device, dtype=torch.float32)


def score_layer_before(train, queries, estimator, chunk_rows: int = 65536):
    import torch

    n, _ = train.shape
    query_tensor = queries
    device = query_tensor.device
    transformed = estimator.transform_query(query_tensor).to(torch.float32)
    out = torch.empty((n, query_tensor.shape[0]), dtype=torch.float32, device=device)
    for i0 in range(0, n, int(chunk_rows)):
        i1 = min(n, i0 + int(chunk_rows))
        rows = _rows_as_tensor_before(train, i0, i1, device)
        out[i0:i1] = estimator.score_transformed(rows, transformed, None)
    return out


def score_layer_before_full(train, queries, estimator, norms=None, chunk_rows: int = 65536):
    """The previous influence.scoring.score_layer (the same loop as score_layer_before, with norms)."""
    import torch

    from influence.scoring import _as_queries, _norms_as_tensor

    n, _ = train.shape
    query_tensor = _as_queries(queries)
    norm_tensor = _norms_as_tensor(norms, n)
    device = query_tensor.device
    if query_tensor.dtype in (torch.float16, torch.bfloat16):
        query_tensor = query_tensor.float()
    transformed = estimator.transform_query(query_tensor).to(torch.float32)
    out = torch.empty((n, query_tensor.shape[0]), dtype=torch.float32, device=device)
    for i0 in range(0, n, int(chunk_rows)):
        i1 = min(n, i0 + int(chunk_rows))
        rows = _rows_as_tensor_before(train, i0, i1, device)
        chunk_norms = None if norm_tensor is None else norm_tensor[i0:i1]
        out[i0:i1] = estimator.score_transformed(rows, transformed, chunk_norms)
    return out


class BeforePatches:
    """Puts the previous score_layer and top_k back into influence while active
    (module attributes that the service looks up at call time), for side-by-side runs."""

    def __enter__(self):
        import influence
        import influence.scoring as scoring

        self._saved = [
            (scoring, "score_layer", scoring.score_layer),
            (influence, "top_k", influence.top_k),
        ]
        scoring.score_layer = score_layer_before_full
        influence.top_k = top_k_before_checked
        return self

    def __exit__(self, *exc):
        for owner, name, value in self._saved:
            setattr(owner, name, value)
        return False


def top_k_before_checked(agg, k, direction):
    values = agg.detach().cpu().numpy() if hasattr(agg, "detach") else np.asarray(agg)
    return top_k_before(values, int(k), direction)


def top_k_before(values: np.ndarray, k: int, direction: str) -> np.ndarray:
    if direction == "harmful":
        order = np.argsort(values, kind="stable")
    else:
        order = np.argsort(-values.astype(np.float64), kind="stable")
    return order[:k].astype(np.int64)


# --------------------------------------------------------------------------------------------------- run


def compare(name: str, before, after, runs: int) -> dict:
    """Alternate before / after `runs` times (after a warm-up of each); medians and the per-pair ratio."""
    before()
    after()
    b_times, a_times, ratios = [], [], []
    for _ in range(runs):
        tb, _ = common.timed(before)
        ta, _ = common.timed(after)
        b_times.append(tb)
        a_times.append(ta)
        ratios.append(tb / ta)
    out = {
        "before_s": common.summary(b_times),
        "after_s": common.summary(a_times),
        "speedup": common.summary(ratios),
    }
    common.log(
        f"{name}: before {out['before_s']['median']:.4f}s after {out['after_s']['median']:.4f}s "
        f"speedup x{out['speedup']['median']:.1f}"
    )
    return out


def kernel_compare(sizes: list[int], runs: int, rng) -> dict[str, Any]:
    """The compiled kernel vs BLAS over the 12 memmaps, for a few query counts (its crossover with BLAS)."""
    import torch

    import influence.scoring as scoring
    from bench.growth import feature_files
    from influence import make_estimator, score_layer
    from influence.kernels import COMPILED_DOTS, compiled_scoring_status, enable_compiled_scoring

    class KernelOff:
        @staticmethod
        def serves(dtype, num_queries) -> bool:
            return False

    started = common.timed(lambda: (enable_compiled_scoring(warm_up=False), COMPILED_DOTS.serves(torch.float16, 1)))
    common.log(f"compiled kernel: {compiled_scoring_status()} after {started[0]:.1f}s")
    estimator = make_estimator("grad-dot")
    out: dict[str, Any] = {"kernel_compile_s": started[0], "kernel_status": compiled_scoring_status()}
    for n in sizes:
        files = feature_files(n, 12)
        for m in (1, 2, 4, 8, 16):
            queries = [torch.from_numpy(rng.standard_normal((m, 256), dtype=np.float32)) for _ in files]

            def compiled(files=files, queries=queries):
                return [score_layer(f, q, estimator) for f, q in zip(files, queries, strict=True)]

            def eager(files=files, queries=queries):
                saved, scoring.COMPILED_DOTS = scoring.COMPILED_DOTS, KernelOff()
                try:
                    return compiled(files, queries)
                finally:
                    scoring.COMPILED_DOTS = saved

            diff = max(float((a - b).abs().max()) for a, b in zip(eager(), compiled(), strict=True))
            scale = max(float(b.abs().max()) for b in eager())
            entry = compare(f"kernel n={n} m={m} (before = BLAS, after = compiled)", eager, compiled, runs)
            entry["max_abs_diff_over_max_abs"] = diff / scale
            entry["kernel_used"] = m <= 8
            out[f"kernel_n{n}_m{m}"] = entry
    return out


def joined_voters_compare(sizes: list[int], runs: int) -> dict[str, Any]:
    """aggregate() of a query-shaped (n, 12, 1) tensor: voter blocks ranked one layer at a time ("before") vs
    joined across layers so both threads share them (influence.aggregation._voter_rows); results identical."""
    import influence.aggregation as aggregation
    from influence import aggregate

    joined = aggregation._voter_rows

    def one_by_one(source):
        for block in source.voter_blocks():
            yield aggregation._rows_first(block) if aggregation._on_cpu(block) else block

    out: dict[str, Any] = {}
    for n in sizes:
        scores = np.random.default_rng(5).standard_normal((12, 1, n), dtype=np.float32).transpose(2, 0, 1)
        for method in ("rank", "vote"):

            def before(method=method, scores=scores):
                aggregation._voter_rows = one_by_one
                try:
                    return aggregate(scores, method)
                finally:
                    aggregation._voter_rows = joined

            def after(method=method, scores=scores):
                return aggregate(scores, method)

            entry = compare(f"aggregate {method} n={n} x 12 layers x 1 column (joined voters)", before, after, runs)
            entry["identical"] = bool(np.array_equal(before(), after()))
            out[f"joined_voters_{method}_n{n}"] = entry
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    import torch

    from bench.growth import feature_files
    from influence import make_estimator, score_layer, top_k

    sizes = [int(s) for s in (args.sizes or ("100000" if args.quick else "100000,1000000")).split(",")]
    load_start = common.load_average()
    estimator = make_estimator("grad-dot")
    rng = np.random.default_rng(3)
    results: dict[str, Any] = {}
    for n in sizes:
        files = feature_files(n, 12)
        for m in (1, 16):
            queries = [torch.from_numpy(rng.standard_normal((m, 256), dtype=np.float32)) for _ in files]

            def before(files=files, queries=queries):
                return [score_layer_before(f, q, estimator) for f, q in zip(files, queries, strict=True)]

            def after(files=files, queries=queries):
                return [score_layer(f, q, estimator) for f, q in zip(files, queries, strict=True)]

            diff = max(float((a - b).abs().max()) for a, b in zip(before(), after(), strict=True))
            scale = max(float(b.abs().max()) for b in before())
            entry = compare(f"scoring n={n} m={m}", before, after, args.runs)
            entry["max_abs_diff_over_max_abs"] = diff / scale
            entry["bytes_read"] = n * 12 * 256 * 2
            results[f"scoring_n{n}_m{m}"] = entry
        agg = rng.standard_normal(n)
        same = all(
            np.array_equal(top_k(agg, 10, d), top_k_before(agg, 10, d)) for d in ("helpful", "harmful")
        )
        entry = compare(
            f"top_k n={n}",
            lambda agg=agg: [top_k_before(agg, 10, d) for d in ("helpful", "harmful")],
            lambda agg=agg: [top_k(agg, 10, d) for d in ("helpful", "harmful")],
            args.runs,
        )
        entry["identical"] = same
        results[f"top_k_n{n}"] = entry
    # the audit's shape (compute-bound): no regression wanted
    train = rng.standard_normal((4500, 256), dtype=np.float32).astype(np.float16)
    queries = torch.from_numpy(rng.standard_normal((500, 256), dtype=np.float32))
    results["scoring_audit_4500x500_one_layer"] = compare(
        "audit layer",
        lambda: score_layer_before(train, queries, estimator),
        lambda: score_layer(train, queries, estimator),
        args.runs,
    )
    # tie-heavy inputs: top_k after == before, exactly
    for _trial in range(200):
        values = rng.integers(-3, 4, int(rng.integers(1000, 20000))).astype(np.float32)
        for d in ("helpful", "harmful"):
            for k in (1, 10, 100):
                assert np.array_equal(top_k(values, k, d), top_k_before(values, k, d))
    results["top_k_tie_heavy_checks"] = "200 arrays x 2 directions x k in (1, 10, 100): identical"
    results.update(kernel_compare(sizes, args.runs, rng))
    results.update(joined_voters_compare(sizes, args.runs))
    result = {"machine": common.machine(), "load_at_start": load_start, "results": results}
    headline = {"load_1min": common.load_average()[0]}
    for key, entry in results.items():
        if isinstance(entry, dict) and "before_s" in entry:
            headline[f"{key}_before_s"] = entry["before_s"]["median"]
            headline[f"{key}_after_s"] = entry["after_s"]["median"]
            headline[f"{key}_speedup"] = entry["speedup"]["median"]
    common.emit("scoring", result, args.quick, headline)


if __name__ == "__main__":
    main()
