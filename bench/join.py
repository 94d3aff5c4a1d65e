"""The embedding's token-row join, taken apart (issue 12): where a query's time on an exact embedding goes.

    python -m bench.join STORE_DIR          # a feature store with a `tokens` layer (e.g. bench.query's embed index)
    python -m bench.join STORE_DIR --quick  # 3 repeats; one JSON line

The query is one of the store's own rows (`--row`, default 12345) with its values in float32, as a featurized
query holds them. Per repeat, each query token's train entries (a slice of the token-order index) go through
the steps TokenRows.dot takes, each timed on its own:
  gather    the entries' vectors read from the row-major memmap through the `order` index (float16 copy)
  convert   those vectors to float32 (what an eager dot must do first)
  matmul    float32 vectors x the query's vector for the token
  kernel    the compiled float16 dot (influence.kernels), conversion fused: what TokenRows.dot uses
  scatter   the dots added into (row, query)
and the whole of TokenRows.dot with the compiled kernel and eagerly. Medians over repeats, milliseconds.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from bench import common


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser("join", __doc__)
    parser.add_argument("store", type=Path)
    parser.add_argument("--layer", default="embed")
    parser.add_argument("--row", type=int, default=12345)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    import torch

    from influence import FeatureStore
    from influence.kernels import COMPILED_DOTS, disable_compiled_scoring, enable_compiled_scoring
    from influence.tokens import TokenRows

    repeats = 3 if args.quick else args.repeats
    store = FeatureStore.open(args.store, verify=False)
    rows = store.layer(args.layer)
    picked = rows.select([args.row])
    query = TokenRows(picked.offsets, np.asarray(picked.tokens), np.asarray(picked.values, dtype=np.float32))
    order = rows.order
    sorted_tokens = np.asarray(rows.tokens)[order]
    q_tokens = np.asarray(query.tokens)
    lo = np.searchsorted(sorted_tokens, q_tokens, side="left")
    hi = np.searchsorted(sorted_tokens, q_tokens, side="right")
    q_values = torch.from_numpy(np.asarray(query.values))
    entry_rows = rows.entry_rows()
    enable_compiled_scoring(warm_up=True)
    COMPILED_DOTS.serves(torch.float16, 1)  # wait for the compile
    rows.dot(query)  # warm: sorted tokens cached, shapes compiled

    parts: dict[str, list[float]] = {k: [] for k in ("gather", "convert", "matmul", "kernel", "scatter")}
    whole: dict[str, list[float]] = {"dot (compiled kernel)": [], "dot (eager)": []}
    for _ in range(repeats):
        sums = dict.fromkeys(parts, 0.0)
        out = torch.zeros(len(rows), 1)
        for k in range(len(q_tokens)):
            entries = order[lo[k] : hi[k]]
            t0 = time.perf_counter()
            gathered = torch.from_numpy(rows.values[entries])
            t1 = time.perf_counter()
            converted = gathered.float()
            t2 = time.perf_counter()
            converted @ q_values[k : k + 1].T
            t3 = time.perf_counter()
            dots = COMPILED_DOTS(gathered, q_values[k : k + 1])
            t4 = time.perf_counter()
            out[torch.from_numpy(entry_rows[entries])[:, None], torch.zeros((1, 1), dtype=torch.long)] += dots
            t5 = time.perf_counter()
            for key, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                sums[key] += seconds
        for key, seconds in sums.items():
            parts[key].append(seconds)
        t0 = time.perf_counter()
        rows.dot(query)
        whole["dot (compiled kernel)"].append(time.perf_counter() - t0)
        disable_compiled_scoring()
        t0 = time.perf_counter()
        rows.dot(query)
        whole["dot (eager)"].append(time.perf_counter() - t0)
        enable_compiled_scoring(warm_up=False)
        COMPILED_DOTS.serves(torch.float16, 1)
    result = {
        "machine": common.machine(),
        "rows": len(rows),
        "entries": len(rows.tokens),
        "query_tokens": len(q_tokens),
        "joined_entries": int((hi - lo).sum()),
        "largest_postings": sorted((hi - lo).tolist(), reverse=True)[:5],
        "median_ms": {k: 1000 * statistics.median(v) for k, v in {**parts, **whole}.items()},
        "repeats": repeats,
    }
    headline = {"joined_entries": result["joined_entries"], **{k: round(v, 1) for k, v in result["median_ms"].items()}}
    common.emit("join", result, args.quick, headline)


if __name__ == "__main__":
    main()
