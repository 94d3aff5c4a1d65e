"""Item 4: peak RSS while featurizing all SST-2 training rows into a feature store; bytes per row per layer.

    python -m bench.memory                      # all 60,614 rows, the 25 LoRA + head units, float16 store
    python -m bench.memory --layers all         # all 63 units (word embedding included)
    python -m bench.memory --quick              # 3,072 rows: one JSON line

influence.build_store writes the store chunk by chunk (1,024 rows a chunk, each chunk one file written
atomically), so features stream to disk and the process should hold only one chunk's features at a time. A
sampler thread reads this process's RSS (psutil) every 0.5 s together with the rows done; the figures are the
RSS after the model is loaded, at 10/25/50/75/100 % of the rows, the peak, and the growth over the second half
of the run (MiB per 10k rows; flat = about 0). Then the store is finalized and FAISS indexes (flat, ivf, hnsw)
are built for one layer to measure the bytes each takes per row.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

from bench import common

CHUNK = 1024


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser("memory", __doc__)
    parser.add_argument("--rows", type=int, default=None, help="default: every training row")
    parser.add_argument("--layers", default="lora-head", choices=("lora-head", "all"))
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    import numpy as np
    import psutil

    from influence import (
        FeatureStore,
        Featurizer,
        ProjectionSpec,
        build_store,
        discover_layers,
        select_layers,
        store_manifest,
    )
    from influence.index import LayerIndex

    process = psutil.Process(os.getpid())
    rss0 = process.memory_info().rss
    load_start = common.load_average()
    examples = common.sst2_examples("train")
    if args.rows or args.quick:
        examples = examples[: args.rows or 3 * CHUNK]
    loaded = common.load_lora_model()
    layers = discover_layers(loaded.model)
    if args.layers == "lora-head":
        layers = select_layers(layers, common.LORA_HEAD_SELECTOR)
    featurizer = Featurizer(loaded.model, layers, ProjectionSpec("factorized", 256, seed=0))
    folder = common.WORK / "memory-store"
    if folder.exists():
        shutil.rmtree(folder)
    manifest = store_manifest(
        featurizer,
        model_id="minilm-lora-r4",
        revision=None,
        weights_hash=loaded.weights_hash,
        tokenizer_name="minilm",
        dataset_hash="sst2-train",
        num_rows=len(examples),
        task="classification",
        max_length=128,
        dtype="float16",
        chunk_size=CHUNK,
    )
    store = FeatureStore.create(folder, manifest)
    rss_model = process.memory_info().rss

    samples: list[tuple[float, int, int]] = []  # (seconds, rows done, rss)
    done = [0]
    stop = threading.Event()
    started = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter() - started, done[0], process.memory_info().rss))
            stop.wait(0.5)

    def progress(rows: int, total: int) -> None:
        done[0] = rows
        if rows % (10 * CHUNK) < CHUNK:
            common.log(f"{rows}/{total} rows, RSS {process.memory_info().rss / 2**20:.0f} MiB")

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    build_store(featurizer, loaded.tokenizer, examples, store, batch_size=32, progress=progress)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    samples.append((seconds, len(examples), process.memory_info().rss))
    mib = 2**20

    def rss_at(fraction: float) -> float:
        target = fraction * len(examples)
        eligible = [s for s in samples if s[1] >= target]
        return (eligible[0][2] if eligible else samples[-1][2]) / mib

    half = [s for s in samples if s[1] >= len(examples) / 2]
    if len(half) >= 2 and half[-1][1] > half[0][1]:
        slope = np.polyfit([s[1] for s in half], [s[2] / mib for s in half], 1)[0] * 10_000
    else:
        slope = float("nan")
    peak = max(s[2] for s in samples) / mib

    store.finalize()
    store = FeatureStore.open(folder)
    num_layers = len(store.layers)
    seg = folder / "segments" / "seg-000000"
    feature_bytes = sum(
        p.stat().st_size
        for p in seg.glob("*.npy")
        if not p.name.endswith(".norms.npy") and p.name != "row_ids.npy"
    )
    norm_bytes = sum(p.stat().st_size for p in seg.glob("*.norms.npy"))
    row_id_bytes = (seg / "row_ids.npy").stat().st_size
    n = store.num_rows
    per_row_layer = {
        "features_float16": feature_bytes / n / num_layers,
        "norms_float32": norm_bytes / n / num_layers,
        "row_ids_shared": row_id_bytes / n / num_layers,
    }
    per_row_layer["store_total"] = sum(per_row_layer.values())
    # FAISS, one 256-dim layer
    layer = next(name for name in store.layers if store.layer_spec(name).dim == 256)
    faiss_bytes = {}
    import faiss

    for kind in ("flat", "ivf", "hnsw"):
        index = LayerIndex.build(store.layer(layer), kind=kind)
        faiss_bytes[kind] = len(faiss.serialize_index(index.faiss_index)) / n
        del index
    result = {
        "machine": common.machine(),
        "load_at_start": load_start,
        "rows": len(examples),
        "units": len(layers),
        "layers": args.layers,
        "chunk_rows": CHUNK,
        "featurize_s": seconds,
        "rows_per_s": len(examples) / seconds,
        "rss_mib": {
            "before_model": rss0 / mib,
            "model_loaded": rss_model / mib,
            "at_10pct": rss_at(0.10),
            "at_25pct": rss_at(0.25),
            "at_50pct": rss_at(0.50),
            "at_75pct": rss_at(0.75),
            "at_100pct": rss_at(1.0),
            "peak": peak,
        },
        "rss_growth_second_half_mib_per_10k_rows": slope,
        "store_bytes_per_row_per_layer": per_row_layer,
        "store_dir_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
        "faiss_bytes_per_row_one_layer_dim256": faiss_bytes,
        "rss_samples_every_5pct": [
            (s[1], round(s[2] / mib, 1)) for s in samples[:: max(1, len(samples) // 20)]
        ],
    }
    headline = {
        "rows": len(examples),
        "units": len(layers),
        "load_1min": common.load_average()[0],
        "peak_rss_mib": peak,
        "rss_mib_at_50pct": rss_at(0.5),
        "rss_mib_at_100pct": rss_at(1.0),
        "growth_mib_per_10k_rows": slope,
        "store_bytes_per_row_per_layer": per_row_layer["store_total"],
        "faiss_flat_bytes_per_row_per_layer": faiss_bytes["flat"],
    }
    shutil.rmtree(folder, ignore_errors=True)
    common.emit("memory", result, args.quick, headline)


if __name__ == "__main__":
    main()
