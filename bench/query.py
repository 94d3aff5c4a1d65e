# Over 600 lines: one benchmark and its harness (a synthetic index in the real service, time splits, FAISS).
"""Item 2: query latency over HTTP for one example, 12 layers at dimension 256, rank aggregation, top-10.

    python -m bench.query                          # n = 10k, 100k, 1M; 20 queries each after 2 warm-ups; FAISS
    python -m bench.query --sizes 10000,100000     # what fits
    python -m bench.query --quick                  # n = 10k, 7 queries, no FAISS: one JSON line
    python -m bench.query --sizes 100000 --compare-eager --no-faiss    # item 6, third round: compiled scoring
                                                                       # and joined ranking vs eager, alternating
    python -m bench.query --sizes 100000 --compare-threads --no-faiss  # item 6, fourth round: the query gradient
                                                                       # on one intra-op thread vs on all
    python -m bench.query --sizes 100000 --variants old,new,embed,both --no-faiss   # issue 12: projections

The service is the real one: app.main.create_app over SQLite in a bench data folder, served by uvicorn in a
thread of this process on 127.0.0.1, queried with httpx (POST /v1/indexes/{id}/query, exact, grad-dot, rank,
top_k 10, direction both). The model is the packaged MiniLM + LoRA r = 4 (bench/common.py), registered over
HTTP; the dataset is n SST-2 training sentences (cycled) registered from a server-side TSV; the index holds the
12 LoRA B units (query and value of the 6 blocks; factorized dim 256 each) in float16. Its features are
synthetic (a build job would need n featurizations): the build job is the service's own (plan_build and
finalize_build: consolidation, DataInf statistics, FAISS flat indexes, ready), except that each chunk's
features are written from a seeded low-rank + noise generator instead of the model.

Time split per query (wrapping app.services.queries functions in this process, nothing in app/ changes):
  gradient       featurize_examples of the query example (tokenise, forward, backward, projections)
  prepare-other  the rest of `prepare` (cached model and store, manifest checks, estimators)
  scoring        exact_scores: every row of every layer read from the store's memmaps and dotted
  aggregation    influence.aggregate (rank) + top-k selection
  answer         hit rows read from the dataset artifact, per-layer ranks of the shown rows, the answer dict
                 (of which answer-ranks: queries.shown_layer_ranks, answer-rows: queries._read_hit_rows)
  http+json      client latency minus run_query: pydantic validation, JSON encoding, HTTP, uvicorn

Scoring floor: the feature bytes (n x 12 x 256 x 2) read once at this machine's memory read bandwidth,
measured here (the best of numpy and torch sums over a 1 GiB float32 array, medians of 5).

Variants (`--variants`, issue 12; every variant its own index, queried in turn in the same run):
  old    the 12 units factorized to 256 numbers (the default before issue 12, and this bench's usual index)
  new    the same 12 units at the new default `auto`: exact (identity, 1,536 numbers each)
  embed  the word embedding alone as exact token rows (`tokens`): each row's real distinct tokens (the
         MiniLM tokenizer on the row's sentence, max length 128), with synthetic 384-wide values
  both   new + embed (13 units)
The time of the embedding's join (TokenRows.dot) is split out as `join`.

FAISS: flat vs IVF vs HNSW (influence.index, default parameters) on one layer's synthetic features, recall@10
of the top inner products against exact (numpy), single-query search latency, build time.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bench import common

LAYERS = [f"block.{b}.attn.{p}.lora_B" for b in range(6) for p in ("q", "v")]
AUTO = {"kind": "auto", "dim": 256, "seed": 0}
VARIANTS = {
    "old": (LAYERS, {"kind": "factorized", "dim": 256, "seed": 0}),
    "new": (LAYERS, AUTO),
    "embed": (["embed"], AUTO),
    "both": ([*LAYERS, "embed"], AUTO),
}
DIM = 256
RANK = 32
CHUNK_ROWS = 65536
SERVICE_DIR = common.WORK / "query-service"


# ------------------------------------------------------------------------------------- synthetic features


def synthetic_block(seed: int, layer: int, start: int, stop: int, dim: int = DIM) -> np.ndarray:
    """Rows start:stop of a layer's synthetic features (float32): low rank (32) + noise, log-normal row scales.
    Deterministic per (seed, layer, start); the basis depends on (seed, layer) only."""
    basis = np.random.default_rng([seed, layer, 0]).standard_normal((RANK, dim), dtype=np.float32)
    basis /= np.sqrt(RANK)
    rng = np.random.default_rng([seed, layer, 1, start])
    rows = stop - start
    x = rng.standard_normal((rows, RANK), dtype=np.float32) @ basis
    x += 0.3 * rng.standard_normal((rows, dim), dtype=np.float32)
    x *= np.exp(0.5 * rng.standard_normal((rows, 1), dtype=np.float32))
    return x


_ROW_TOKENS: list[np.ndarray] = []


def row_tokens() -> list[np.ndarray]:
    """Distinct token ids (pad excluded) of every SST-2 training sentence, as the MiniLM tokenizer gives them at
    max length 128; row i of a cycled dataset holds those of sentence i % len."""
    if not _ROW_TOKENS:
        from transformers import AutoTokenizer

        from influence import packaged_minilm_path
        from influence.data import encode_examples

        tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
        encoded = encode_examples(tokenizer, common.sst2_examples("train"), "classification", 128)
        _ROW_TOKENS.extend(np.unique(np.asarray(e.input_ids, dtype=np.int64)) for e in encoded)
    return _ROW_TOKENS


def synthetic_token_rows(seed: int, start: int, stop: int, width: int):
    """Token rows of rows start:stop: each row's real distinct tokens, synthetic values (log-normal row scale)."""
    from influence.tokens import TokenRows

    tokens = row_tokens()
    held = [tokens[i % len(tokens)] for i in range(start, stop)]
    offsets = np.zeros(len(held) + 1, dtype=np.int64)
    np.cumsum([len(h) for h in held], out=offsets[1:])
    rng = np.random.default_rng([seed, 10_000, start])
    values = rng.standard_normal((int(offsets[-1]), width), dtype=np.float32)
    values *= np.repeat(np.exp(0.5 * rng.standard_normal(len(held), dtype=np.float32)), np.diff(offsets))[
        :, None
    ]
    return TokenRows(offsets, np.concatenate(held).astype(np.int32), values)


# ----------------------------------------------------------------------------------------- the service


class _Dispatcher:
    """Keeps the steps a build sends (app.jobs.dispatch.Dispatcher): the chunks to write, whether to finalize."""

    def __init__(self) -> None:
        self.chunks: list[int] = []
        self.finalize_asked = False

    def send(self, step: str, job_id: str, *args) -> None:
        if step == "chunk":
            self.chunks.append(int(args[0]))
        elif step == "finalize":
            self.finalize_asked = True


class SyntheticBuildQueue:
    """A JobQueue whose index builds are the service's own steps with synthetic chunk features."""

    def __init__(self, settings, seed: int = 0):
        self.settings = settings
        self.seed = seed
        self.session_factory = None
        self.errors: list[str] = []
        self.threads: list[threading.Thread] = []

    def enqueue(self, job) -> None:
        thread = threading.Thread(target=self._run, args=(job.id,), daemon=True)
        self.threads.append(thread)
        thread.start()

    def _run(self, job_id: str) -> None:
        from app.jobs.context import WorkerContext
        from app.jobs.index_build import finalize_build, plan_build
        from app.jobs.model_cache import ModelCache
        from app.jobs.steps import fail_job
        from influence import FeatureStore

        dispatcher = _Dispatcher()
        ctx = WorkerContext(self.settings, self.session_factory, ModelCache(), dispatcher)
        try:
            plan_build(ctx, job_id)
            from app.models import Index, Job

            with self.session_factory() as session:
                job = session.get(Job, job_id)
                index = session.get(Index, job.target_id)
                path = self.settings.resolved_artifacts_dir / index.store_path
                layers = list(index.layers)
            store = FeatureStore.open(path, verify=False)
            ranges = store.chunk_ranges()
            for chunk in dispatcher.chunks:
                start, stop = ranges[chunk]
                features = {}
                for u, name in enumerate(layers):
                    spec = store.layer_spec(name)
                    if spec.layout == "tokens":
                        features[name] = synthetic_token_rows(self.seed, start, stop, spec.dim)
                    else:
                        features[name] = synthetic_block(self.seed, u, start, stop, spec.dim)
                store.write_chunk(chunk, np.arange(start, stop, dtype=np.int64), features)
                common.log(f"synthetic chunk {chunk + 1}/{len(ranges)} written")
            finalize_build(ctx, job_id)
        except Exception as exc:  # the job is marked failed; the bench reports it
            self.errors.append(f"{type(exc).__name__}: {exc}")
            fail_job(ctx, job_id, str(exc))


class Service:
    """The API in a uvicorn thread, a bench tenant's API key, an httpx client."""

    def __init__(self, data_dir: Path):
        import httpx
        import uvicorn

        from app.config import Settings
        from app.main import create_app
        from app.migrate import upgrade
        from influence import packaged_minilm_path

        data_dir.mkdir(parents=True, exist_ok=True)
        self.settings = Settings(
            _env_file=None,
            data_dir=data_dir,
            allowed_roots=[common.WORK, packaged_minilm_path()],
            max_rows=2_000_000,
        )
        upgrade(self.settings.resolved_database_url)
        self.queue = SyntheticBuildQueue(self.settings)
        self.app = create_app(self.settings, job_queue=self.queue)
        self.queue.session_factory = self.app.state.session_factory
        headers = {}
        try:
            from app.services import tenancy
        except ImportError:  # a service without API keys
            tenancy = None
        if tenancy is not None:
            with self.app.state.session_factory() as session:
                key_path, _ = tenancy.ensure_local_key(session, data_dir)
                session.commit()
            headers["Authorization"] = f"Bearer {key_path.read_text().strip()}"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers=headers, timeout=3600)

    def call(self, method: str, path: str, **kwargs) -> Any:
        response = self.client.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json()

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _dataset_file(n: int) -> Path:
    path = common.WORK / "datasets" / f"sst2-cycled-{n}.tsv"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    examples = common.sst2_examples("train")
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write("sentence\tlabel\n")
        for i in range(n):
            example = examples[i % len(examples)]
            handle.write(f"{example.text}\t{example.label}\n")
    tmp.rename(path)
    return path


def ready_index(service: Service, n: int, variant: str = "old") -> tuple[str, dict]:
    """An index of n rows for a variant (made once per bench data folder; reused while ready)."""
    from influence import packaged_minilm_path

    layers, projection = VARIANTS[variant]
    key = str(n) if variant == "old" else f"{n}:{variant}"
    state_path = SERVICE_DIR / "bench-state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    known = state.get(key)
    if known:
        try:
            index = service.call("GET", f"/v1/indexes/{known}")
            if index["status"] == "ready":
                return known, {"reused": True}
        except RuntimeError:
            pass
    info: dict[str, Any] = {"reused": False}
    if "model_id" not in state:
        started = time.perf_counter()
        model = service.call(
            "POST",
            "/v1/models",
            json={
                "name": "minilm-lora-r4",
                "source": str(packaged_minilm_path()),
                "adapter": str(common.lora_adapter()),
                "task": "classification",
                "num_labels": 2,
            },
        )
        state["model_id"] = model["id"]
        info["model_register_s"] = time.perf_counter() - started
    started = time.perf_counter()
    dataset = service.call(
        "POST", "/v1/datasets", data={"path": str(_dataset_file(n)), "text_column": "sentence"}
    )
    info["dataset_register_s"] = time.perf_counter() - started
    started = time.perf_counter()
    index = service.call(
        "POST",
        "/v1/indexes",
        json={
            "model_id": state["model_id"],
            "dataset_id": dataset["id"],
            "layers": layers,
            "projection": projection,
            "dtype": "float16",
            "faiss_kind": "flat",
            "chunk_size": CHUNK_ROWS,
        },
    )
    while True:
        current = service.call("GET", f"/v1/indexes/{index['id']}")
        if current["status"] in ("ready", "failed", "cancelled"):
            break
        time.sleep(2)
    if current["status"] != "ready":
        raise RuntimeError(f"synthetic build of n={n} ended {current['status']}: {service.queue.errors}")
    info["build_s"] = time.perf_counter() - started
    info["size_bytes"] = current["size_bytes"]
    state[key] = index["id"]
    state_path.write_text(json.dumps(state))
    return index["id"], info


# -------------------------------------------------------------------------------------------- timing


class Splits:
    """Wraps app.services.queries functions (module attributes) and influence.featurize_examples."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self._originals: list[tuple[Any, str, Any]] = []

    def timed(self, original: Any, bucket: str) -> Any:
        """`original` wrapped so that its time adds to `bucket`."""
        splits = self

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                splits.current[bucket] += time.perf_counter() - start

        return wrapper

    def wrap(self, owner: Any, name: str, bucket: str) -> None:
        original = getattr(owner, name)
        self._originals.append((owner, name, original))
        setattr(owner, name, self.timed(original, bucket))

    def install(self) -> None:
        import influence
        from app.services.queries import compute as queries

        # The query's examples are featurized by app.services.references, which calls influence.featurize_examples.
        self.wrap(influence, "featurize_examples", "gradient")
        self.wrap(queries, "prepare", "prepare")
        self.wrap(queries, "exact_scores", "scoring")
        self.wrap(queries, "_aggregate", "aggregation")
        self.wrap(queries, "_pick", "aggregation")
        self.wrap(queries, "shown_layer_ranks", "answer-ranks")
        self.wrap(queries, "_read_hit_rows", "answer-rows")
        self.wrap(queries, "run_query", "run_query")
        from influence.tokens import TokenRows

        self.wrap(TokenRows, "dot", "join")

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)
        self._originals.clear()

    def take(self) -> dict[str, float]:
        out = dict(self.current)
        self.current = defaultdict(float)
        return out


def memory_bandwidth(repeats: int = 5) -> dict[str, float]:
    """Read bandwidth (GB/s): sums over a 1 GiB float32 array, numpy (1 thread) and torch (its threads)."""
    import torch

    a = np.ones(1 << 28, dtype=np.float32)
    t = torch.from_numpy(a)
    out = {}
    for name, fn in (("numpy_sum", lambda: a.sum()), ("torch_sum", lambda: t.sum())):
        fn()
        times = [common.timed(fn)[0] for _ in range(repeats)]
        out[name] = a.nbytes / float(np.median(times)) / 1e9
    out["best"] = max(out.values())
    return out


class EagerPatches:
    """While active, the query path of the round before the compiled kernel (module attributes looked up at
    call time): scoring through BLAS only, rank aggregation through aggregate() sorting each layer's column on
    its own, and the shown rows' ranks counted afterwards. (The layer-major score tensor and the sparse tie
    fix-up of average ranks stay: they are not switchable.)"""

    class _KernelOff:
        @staticmethod
        def serves(dtype, num_queries) -> bool:
            return False

    @staticmethod
    def _aggregate_without_ranks(scores, request):
        from influence import aggregate

        return aggregate(scores[:, :, None], request.aggregation, vote_k=request.vote_k), None

    def __init__(self, splits: Splits) -> None:
        self.splits = splits

    @staticmethod
    def _voter_rows_one_by_one(source):
        from influence.aggregation import _on_cpu, _rows_first

        for block in source.voter_blocks():
            yield _rows_first(block) if _on_cpu(block) else block

    def __enter__(self):
        import influence.aggregation as aggregation
        import influence.scoring as scoring
        from app.services.queries import compute as queries

        self._saved = [
            (scoring, "COMPILED_DOTS", scoring.COMPILED_DOTS),
            (aggregation, "_voter_rows", aggregation._voter_rows),
            (queries, "_aggregate", queries._aggregate),
        ]
        scoring.COMPILED_DOTS = self._KernelOff()
        aggregation._voter_rows = self._voter_rows_one_by_one
        queries._aggregate = self.splits.timed(self._aggregate_without_ranks, "aggregation")
        return self

    def __exit__(self, *exc):
        for owner, name, value in self._saved:
            setattr(owner, name, value)
        return False


def run_queries(
    service: Service,
    index_id: str,
    n: int,
    repeats: int,
    warmups: int,
    modes: tuple[str, ...] = ("after",),
    indexes: dict[str, str] | None = None,
) -> dict:
    """`repeats` timed queries per mode after `warmups`; with modes ("eager", "after") every repeat runs both,
    in alternating order, "eager" under EagerPatches (the code before the compiled kernel), "all-threads" under
    AllThreadsPatches. `indexes`: mode -> its own index (variants)."""
    import contextlib

    validation = common.sst2_examples("validation")
    splits = Splits()
    splits.install()
    rows: dict[str, list[dict]] = {mode: [] for mode in modes}
    cold = None
    try:
        for i in range(warmups + repeats):
            example = validation[i % len(validation)]
            body = {
                "examples": [{"text": example.text, "label": int(example.label)}],
                "estimator": "grad-dot",
                "aggregation": "rank",
                "top_k": 10,
                "direction": "both",
            }
            order = list(modes) if i % 2 == 0 else list(reversed(modes))
            for mode in order:
                patches = {
                    "eager": lambda: EagerPatches(splits),
                    "all-threads": AllThreadsPatches,
                }
                patch = patches[mode]() if mode in patches else contextlib.nullcontext()
                with patch:
                    start = time.perf_counter()
                    target = (indexes or {}).get(mode, index_id)
                    answer = service.call("POST", f"/v1/indexes/{target}/query", json=body)
                    total = time.perf_counter() - start
                parts = splits.take()
                assert answer["num_rows"] == n and len(answer["results"][0]["helpful"]) == 10
                if cold is None:
                    cold = total
                if i < warmups:
                    continue
                run = parts.get("run_query", 0.0)
                rows[mode].append(
                    {
                        "total": total,
                        "gradient": parts.get("gradient", 0.0),
                        "prepare-other": parts.get("prepare", 0.0) - parts.get("gradient", 0.0),
                        "scoring": parts.get("scoring", 0.0),
                        "aggregation": parts.get("aggregation", 0.0),
                        "answer": run
                        - parts.get("prepare", 0.0)
                        - parts.get("scoring", 0.0)
                        - parts.get("aggregation", 0.0),
                        "answer-ranks": parts.get("answer-ranks", 0.0),
                        "answer-rows": parts.get("answer-rows", 0.0),
                        "join": parts.get("join", 0.0),
                        "http+json": total - run,
                    }
                )
    finally:
        splits.uninstall()
    out: dict[str, Any] = {"first_query_s": cold}
    for mode, measured in rows.items():
        totals = [r["total"] for r in measured]
        entry = {
            "queries": len(measured),
            "p50_s": common.percentile(totals, 50),
            "p95_s": common.percentile(totals, 95),
            "split_median_s": {
                key: float(np.median([r[key] for r in measured])) for key in measured[0] if key != "total"
            },
        }
        if mode == "after" and not indexes:
            out.update(entry)
        else:
            out[mode] = entry
    for mode in ("eager", "all-threads"):
        if mode in rows:
            out[f"p50_speedup_vs_{mode}"] = out[mode]["p50_s"] / out["p50_s"]
    return out


# ---------------------------------------------------------------------------------------------- FAISS


def faiss_compare(
    sizes: list[int], num_queries: int = 50, top: int = 10, hnsw_max: int = 200_000
) -> list[dict]:
    from influence.index import LayerIndex

    out = []
    for n in sizes:
        features = synthetic_block(1, 0, 0, n)
        queries = synthetic_block(2, 0, 0, num_queries)
        # exact top-10 by inner product
        scores = features @ queries.T
        exact = np.argsort(-scores, axis=0)[:top].T
        for kind in ("flat", "ivf", "hnsw"):
            if kind == "hnsw" and n > hnsw_max:
                out.append(
                    {"n": n, "kind": kind, "skipped": f"build over {hnsw_max} rows too slow on 2 cores"}
                )
                continue
            if kind == "ivf" and n > 200_000:
                out.append({"n": n, "kind": kind, "skipped": "k-means training over 200k rows too slow here"})
                continue
            build_s, index = common.timed(lambda f=features, kind=kind: LayerIndex.build(f, kind=kind))
            latencies = []
            found = []
            for j in range(num_queries):
                seconds, (_, positions) = common.timed(
                    lambda j=j, ix=index, q=queries: ix.search(q[j : j + 1], top)
                )
                latencies.append(seconds)
                found.append(positions[0])
            recall = float(np.mean([len(set(f) & set(e)) / top for f, e in zip(found, exact, strict=True)]))
            out.append(
                {
                    "n": n,
                    "kind": kind,
                    "params": index.params,
                    "build_s": build_s,
                    "search_ms_p50": 1000 * common.percentile(latencies, 50),
                    "search_ms_p95": 1000 * common.percentile(latencies, 95),
                    "recall_at_10": recall,
                }
            )
            common.log(f"faiss n={n} {kind}: recall@10 {recall:.3f}, {out[-1]['search_ms_p50']:.2f} ms")
            index = None  # free it before the next build
    return out


# ------------------------------------------------------------------------------------------------- main


class AllThreadsPatches:
    """While active, the query gradient as before item 6's fourth round: small batches on all of torch's
    intra-op threads instead of influence.threads' one-thread worker."""

    def __enter__(self):
        import influence.gradients as gradients

        self._saved = gradients.is_small_batch
        gradients.is_small_batch = lambda rows, length: False
        return self

    def __exit__(self, *exc):
        import influence.gradients as gradients

        gradients.is_small_batch = self._saved
        return False


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser("query", __doc__)
    parser.add_argument("--sizes", default=None, help="comma-separated n (default 10000,100000,1000000)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmups", type=int, default=2)
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--faiss-sizes", default="10000,100000,1000000")
    parser.add_argument("--fresh", action="store_true", help="delete the bench service folder first")
    parser.add_argument(
        "--compare-eager",
        action="store_true",
        help="also run each query with eager scoring and per-layer ranking (before the compiled kernel)",
    )
    parser.add_argument(
        "--compare-threads",
        action="store_true",
        help="also run each query with the query gradient on all intra-op threads (before the one-thread worker)",
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated of " + ", ".join(VARIANTS) + " (issue 12; module doc)",
    )
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    sizes = [int(s) for s in (args.sizes or ("10000" if args.quick else "10000,100000,1000000")).split(",")]
    repeats = args.repeats or (7 if args.quick else 20)
    if args.fresh and SERVICE_DIR.exists():
        shutil.rmtree(SERVICE_DIR)
    load_start = common.load_average()
    bandwidth = memory_bandwidth()
    common.log(f"memory read bandwidth {bandwidth}")
    service = Service(SERVICE_DIR)
    results = {}
    try:
        for n in sizes:
            need = n * len(LAYERS) * DIM * (2 + 4) * 1.3  # float16 store + float32 flat FAISS, with slack
            if {"new", "both"} & set((args.variants or "").split(",")):
                need = n * len(LAYERS) * 1536 * (2 + 4) * 2.3  # the exact LoRA units in two variants
            free = shutil.disk_usage(common.WORK).free
            if need > free:
                results[str(n)] = {"skipped": f"needs ~{need / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free"}
                continue
            common.log(f"n={n}: preparing the index")
            if args.variants:
                variants = tuple(args.variants.split(","))
                built = {variant: ready_index(service, n, variant) for variant in variants}
                common.log(f"n={n}: indexes ready ({built}); querying")
                indexes = {variant: index_id for variant, (index_id, _) in built.items()}
                measured = run_queries(service, "", n, repeats, args.warmups, variants, indexes)
                measured["indexes"] = {variant: info for variant, (_, info) in built.items()}
                results[str(n)] = measured
                common.log(
                    f"n={n}: " + ", ".join(f"{v} p50 {measured[v]['p50_s'] * 1000:.0f} ms" for v in variants)
                )
                continue
            index_id, info = ready_index(service, n)
            common.log(f"n={n}: index {index_id} ready ({info}); querying")
            modes = ("eager",) if args.compare_eager else ()
            modes += ("all-threads",) if args.compare_threads else ()
            modes += ("after",)
            measured = run_queries(service, index_id, n, repeats, args.warmups, modes)
            feature_bytes = n * len(LAYERS) * DIM * 2
            floor_s = feature_bytes / (bandwidth["best"] * 1e9)
            measured["feature_bytes"] = feature_bytes
            measured["scoring_floor_s"] = floor_s
            measured["scoring_over_floor"] = measured["split_median_s"]["scoring"] / floor_s
            measured["index"] = info
            measured["load_1min"] = common.load_average()[0]
            results[str(n)] = measured
            common.log(f"n={n}: p50 {measured['p50_s'] * 1000:.0f} ms, split {measured['split_median_s']}")
    finally:
        service.close()
    from influence.threads import ONE_THREAD

    faiss_results = []
    if not args.no_faiss and not args.quick:
        faiss_results = faiss_compare([int(s) for s in args.faiss_sizes.split(",")])
    result = {
        "machine": common.machine(),
        "load_at_start": load_start,
        "layers": LAYERS,
        "dim": DIM,
        "dtype": "float16",
        "memory_bandwidth_gb_s": bandwidth,
        "sizes": results,
        "faiss": faiss_results,
        "small_batches": ONE_THREAD.status(),  # the service process' choice for query gradients (influence.threads)
    }
    measured_sizes = {n: r for n, r in results.items() if "p50_s" in r}
    headline: dict[str, Any] = {"load_1min": common.load_average()[0], "bandwidth_gb_s": bandwidth["best"]}
    headline["small_batches_one_thread"] = result["small_batches"]["one_thread"]
    for n, r in results.items():
        for variant in VARIANTS:
            if variant in r:
                headline[f"p50_ms_{variant}_{n}"] = 1000 * r[variant]["p50_s"]
                headline[f"join_ms_{variant}_{n}"] = 1000 * r[variant]["split_median_s"]["join"]
    for n, r in measured_sizes.items():
        headline[f"p50_ms_{n}"] = 1000 * r["p50_s"]
        headline[f"p95_ms_{n}"] = 1000 * r["p95_s"]
        headline[f"scoring_over_floor_{n}"] = r["scoring_over_floor"]
        for mode in ("eager", "all-threads"):
            if mode in r:
                headline[f"p50_ms_{mode}_{n}"] = 1000 * r[mode]["p50_s"]
    if "100000" in measured_sizes:
        result["target_p50_le_150ms_at_100k"] = measured_sizes["100000"]["p50_s"] <= 0.150
        headline["target_met_100k"] = result["target_p50_le_150ms_at_100k"]
    name = "query" + ("-compare-eager" if args.compare_eager else "")
    name += "-compare-threads" if args.compare_threads else ""
    name += "-variants" if args.variants else ""
    common.emit(name, result, args.quick, headline)


if __name__ == "__main__":
    main()
