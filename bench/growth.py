"""Item 5: how featurization and query cost grow with n (10k to 1M rows) and with the number of layers.

    python -m bench.growth            # query: n = 10k, 100k, 1M at 12 layers; U = 1, 3, 6, 12, 24 at 100k;
                                      # featurize: 1, 6, 12, 25, 63 units and 128, 512, 1024 rows; 5 runs each
    python -m bench.growth --quick    # n = 10k, 100k; U = 1, 12; units 1, 25; one JSON line

Query cost is the library's exact path as the service runs it for one example (influence.score_tensor over
float16 memmapped per-layer feature files, dim 256, grad-dot; influence.aggregate rank; influence.top_k),
on synthetic features written once under the bench folder (n = 1M x 12 layers is 6.3 GB). Featurization cost
is influence.Featurizer on SST-2 rows (batches of 32 sorted by length, max length 128) for growing unit
selections, each as a ratio to the forward + backward floor measured in the same round.

Growth exponents are the slopes of log(time) against log(n) (or log(layers)) between consecutive points:
1.0 = linear; below 1 = fixed costs still dominate; above 1 = superlinear.
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np

from bench import common
from bench.query import DIM, synthetic_block

GROWTH_DIR = common.WORK / "growth"


def feature_files(n: int, layers: int) -> list[np.ndarray]:
    """float16 (n, 256) memmaps of synthetic features, one per layer (written once)."""
    folder = GROWTH_DIR / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for u in range(layers):
        path = folder / f"layer{u:02d}.npy"
        if not path.is_file():
            tmp = folder / f"layer{u:02d}.partial.npy"
            matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, DIM))
            for start in range(0, n, 65536):
                stop = min(n, start + 65536)
                matrix[start:stop] = synthetic_block(0, u, start, stop)
            matrix.flush()
            del matrix
            tmp.rename(path)
        out.append(np.load(path, mmap_mode="r"))
    return out


def query_once(features: list[np.ndarray], query: dict) -> None:
    from influence import aggregate, make_estimator, score_tensor, top_k

    names = [f"l{u}" for u in range(len(features))]
    scores = score_tensor(
        dict(zip(names, features, strict=True)),
        {name: query[name] for name in names},
        {name: make_estimator("grad-dot") for name in names},
    )
    agg = aggregate(scores, "rank")
    top_k(agg, 10, "helpful")
    top_k(agg, 10, "harmful")


def exponents(points: list[tuple[float, float]]) -> list[float]:
    return [
        math.log(t1 / t0) / math.log(x1 / x0)
        for (x0, t0), (x1, t1) in itertools.pairwise(points)
        if t0 > 0 and t1 > 0 and x0 > 0 and x1 > 0 and x0 != x1
    ]


def query_growth(sizes: list[int], layer_counts: list[int], runs: int) -> dict:
    import torch

    rng = np.random.default_rng(5)
    max_layers = max([*layer_counts, 12])
    query = {
        f"l{u}": torch.from_numpy(rng.standard_normal((1, DIM), dtype=np.float32)) for u in range(max_layers)
    }
    by_n = []
    for n in sizes:
        files = feature_files(n, 12)
        query_once(files, query)  # page the files in
        times = [common.timed(lambda f=files: query_once(f, query))[0] for _ in range(runs)]
        by_n.append(
            {
                **common.summary(times),
                "n": n,
                "layers": 12,
                "us_per_row_layer": 1e6 * float(np.median(times)) / n / 12,
            }
        )
        common.log(f"query n={n}: {by_n[-1]['median']:.3f}s")
    by_layers = []
    n_layers = 100_000 if 100_000 in sizes or not sizes else sizes[min(1, len(sizes) - 1)]
    files = feature_files(n_layers, max(layer_counts))
    for count in layer_counts:
        subset = files[:count]
        query_once(subset, query)
        times = [common.timed(lambda s=subset: query_once(s, query))[0] for _ in range(runs)]
        by_layers.append({**common.summary(times), "n": n_layers, "layers": count})
        common.log(f"query layers={count}: {by_layers[-1]['median']:.3f}s")
    return {
        "by_n": by_n,
        "by_n_exponents": exponents([(r["n"], r["median"]) for r in by_n]),
        "by_layers": by_layers,
        "by_layers_exponents": exponents([(r["layers"], r["median"]) for r in by_layers]),
    }


def featurize_growth(unit_counts: list[int], row_counts: list[int], runs: int) -> dict:
    from bench import featurize as fz
    from influence import Featurizer, ProjectionSpec, select_layers

    model, encoded, _batches, layers, lora_head, _ = fz.prepare(max(row_counts))
    common.training_trainables(model)
    lora = select_layers(layers, "role:lora")
    # selections: a growing prefix of the LoRA units, then LoRA + head (25), then everything (63)
    selections = {}
    for count in unit_counts:
        if count <= len(lora):
            selections[count] = lora[:count]
        elif count == len(lora_head):
            selections[count] = lora_head
        else:
            selections[count] = layers[:count] if count < len(layers) else layers
    featurizers = {
        c: Featurizer(model, sel, ProjectionSpec("factorized", 256, seed=0)) for c, sel in selections.items()
    }

    def batches_for(rows: int):
        from influence.data import iter_batches

        return list(iter_batches(encoded[:rows], 0, "classification", fz.BATCH_SIZE, sort_by_length=True))

    full = batches_for(max(row_counts))
    by_units = []
    rng = random.Random(0)
    ratios = {c: [] for c in featurizers}
    rates = {c: [] for c in featurizers}
    floor_rates = []
    for fn in [lambda: fz.run_floor(model, full)] + [
        lambda f=f: [f.featurize(b) for b in full] for f in featurizers.values()
    ]:
        fn()
    for _ in range(runs):
        order = ["floor", *featurizers]
        rng.shuffle(order)
        this = {}
        for key in order:
            if key == "floor":
                seconds, _ = common.timed(lambda: fz.run_floor(model, full))
            else:
                seconds, _ = common.timed(lambda k=key: [featurizers[k].featurize(b) for b in full])
            this[key] = len(encoded[: max(row_counts)]) / seconds
        floor_rates.append(this["floor"])
        for c in featurizers:
            rates[c].append(this[c])
            ratios[c].append(this[c] / this["floor"])
    for c in featurizers:
        by_units.append(
            {
                "units": c,
                "rows_per_s": float(np.median(rates[c])),
                "ratio_to_floor": float(np.median(ratios[c])),
                "ms_per_row": 1000 / float(np.median(rates[c])),
            }
        )
    by_rows = []
    featurizer = featurizers[max(c for c in featurizers if c <= 25)]
    for rows in row_counts:
        bs = batches_for(rows)
        times = [common.timed(lambda b=bs: [featurizer.featurize(x) for x in b])[0] for _ in range(runs)]
        by_rows.append({**common.summary(times), "rows": rows})
    return {
        "floor_rows_per_s": float(np.median(floor_rates)),
        "by_units": by_units,
        "by_units_exponents": exponents([(r["units"], r["ms_per_row"]) for r in by_units]),
        "by_rows": by_rows,
        "by_rows_exponents": exponents([(r["rows"], r["median"]) for r in by_rows]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser("growth", __doc__)
    parser.add_argument("--sizes", default=None, help="comma-separated n (default 10000,100000,1000000)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-featurize", action="store_true")
    parser.add_argument("--skip-query", action="store_true")
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    sizes = common.sizes(args.sizes or ("10000,100000" if args.quick else "10000,100000,1000000"))
    layer_counts = [1, 12] if args.quick else [1, 3, 6, 12, 24]
    unit_counts = [1, 25] if args.quick else [1, 6, 12, 25, 63]
    row_counts = [128, 256] if args.quick else [128, 512, 1024]
    load_start = common.load_average()
    query = {} if args.skip_query else query_growth(sizes, layer_counts, args.runs)
    feat = {} if args.skip_featurize else featurize_growth(unit_counts, row_counts, args.runs)
    result = {"machine": common.machine(), "load_at_start": load_start, "query": query, "featurize": feat}
    headline = {"load_1min": common.load_average()[0]}
    if query:
        headline["query_s_by_n"] = {r["n"]: r["median"] for r in query["by_n"]}
        headline["query_exponents_n"] = query["by_n_exponents"]
        headline["query_s_by_layers"] = {r["layers"]: r["median"] for r in query["by_layers"]}
    if feat:
        headline["featurize_ratio_by_units"] = {r["units"]: r["ratio_to_floor"] for r in feat["by_units"]}
        headline["featurize_exponents_rows"] = feat["by_rows_exponents"]
    common.emit("growth", result, args.quick, headline)


if __name__ == "__main__":
    main()
