"""Loopback load test of the query route: concurrent clients against a built index, bounded in count and time.

    python bench/load_query.py [--clients 1,8] [--duration 60] [--max-requests 20000] [--rows 2000]
                               [--approximate-share 0.25] [--delete-every 0] [--out results.json]

Starts the embedded service (`python -m app.embedded serve`: SQLite, filesystem broker, a worker child) on
127.0.0.1 in a temporary data dir, registers the packaged MiniLM (classification head, no adapter) and the
first --rows rows of SST-2 train over HTTP with the local API key, builds an index over the middle layers
(factorized projection, dim 256, float16, flat FAISS) with the worker. Then, for each number in --clients (one
phase after the other, on the same index), it runs that many threads, each with its own keep-alive
connection, sending one query at a time (one SST-2 validation sentence, middle layers, grad-dot, rank
aggregation, top_k 10; a share of them approximate) until --duration seconds or --max-requests requests have
passed. With --delete-every S, a row is deleted from the index every S seconds while the clients run (each
deletion swaps the store snapshot the queries read). Any non-200 answer or transport error is an error.
Prints throughput and latency percentiles (and writes them as JSON with --out).

Traffic goes to 127.0.0.1 only; every loop stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class LoadReport:
    """What a load run measured. Latencies in milliseconds, throughput in requests per second."""

    clients: int
    duration_s: float
    requests: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    approximate_requests: int
    deletions: int
    error_samples: list[str] = field(default_factory=list)

    def markdown_row(self) -> str:
        return (
            f"| {self.clients} | {self.duration_s:.1f} | {self.requests} | {self.errors} | "
            f"{self.throughput_rps:.2f} | {self.p50_ms:.0f} | {self.p95_ms:.0f} | {self.p99_ms:.0f} | "
            f"{self.max_ms:.0f} |"
        )


def run_load(
    base_url: str,
    token: str,
    index_id: str,
    sentences: Sequence[tuple[str, int]],
    *,
    clients: int = 8,
    duration: float = 60.0,
    max_requests: int = 20_000,
    approximate_share: float = 0.25,
    delete_rows: Sequence[int] = (),
    delete_every: float = 0.0,
    layers: str = "middle",
    top_k: int = 10,
    seed: int = 0,
) -> LoadReport:
    """Hit POST /v1/indexes/{id}/query from `clients` threads until `duration` s or `max_requests` requests.

    `delete_rows` are deleted one by one, every `delete_every` seconds, while the clients run (0: never).
    """
    import httpx

    from bench.common import percentile

    if not sentences:
        raise ValueError("no sentences to query with")
    deadline = time.monotonic() + duration
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    counters = {"sent": 0, "approximate": 0, "deletions": 0}
    headers = {"Authorization": f"Bearer {token}"}
    url = f"/v1/indexes/{index_id}/query"

    def take_ticket() -> bool:
        with lock:
            if counters["sent"] >= max_requests or time.monotonic() >= deadline:
                return False
            counters["sent"] += 1
            return True

    def client_loop(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        with httpx.Client(base_url=base_url, headers=headers, timeout=120.0) as client:
            while take_ticket():
                text, label = sentences[rng.randrange(len(sentences))]
                approximate = rng.random() < approximate_share
                body = {
                    "examples": [{"text": text, "label": label}],
                    "layers": layers,
                    "estimator": "grad-dot",
                    "aggregation": "rank",
                    "top_k": top_k,
                    "approximate": approximate,
                }
                started = time.perf_counter()
                try:
                    response = client.post(url, json=body)
                    ok = response.status_code == 200
                    detail = f"{response.status_code}: {response.text[:300]}"
                except httpx.HTTPError as exc:
                    ok, detail = False, f"{type(exc).__name__}: {exc}"
                elapsed = (time.perf_counter() - started) * 1000.0
                with lock:
                    if ok:
                        latencies.append(elapsed)
                        counters["approximate"] += int(approximate)
                    else:
                        errors.append(detail)

    def deleter() -> None:
        with httpx.Client(base_url=base_url, headers=headers, timeout=120.0) as client:
            for row in delete_rows:
                if time.monotonic() + delete_every >= deadline:
                    return
                time.sleep(delete_every)
                response = client.post(f"/v1/indexes/{index_id}/rows/delete", json={"row_ids": [int(row)]})
                with lock:
                    if response.status_code == 200:
                        counters["deletions"] += 1
                    else:
                        errors.append(f"row deletion {response.status_code}: {response.text[:300]}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    if delete_rows and delete_every > 0:
        threads.append(threading.Thread(target=deleter, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration + 300.0)
    wall = time.perf_counter() - started
    done = len(latencies)
    return LoadReport(
        clients=clients,
        duration_s=round(wall, 3),
        requests=done + len(errors),
        errors=len(errors),
        throughput_rps=round(done / wall, 3) if wall > 0 else 0.0,
        p50_ms=round(percentile(latencies, 50), 1),
        p95_ms=round(percentile(latencies, 95), 1),
        p99_ms=round(percentile(latencies, 99), 1),
        max_ms=round(max(latencies), 1) if latencies else float("nan"),
        approximate_requests=counters["approximate"],
        deletions=counters["deletions"],
        error_samples=errors[:5],
    )


# ------------------------------------------------------------------------------------------- the full run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8", help="client threads per phase, comma-separated")
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds of load per phase (bound in time)"
    )
    parser.add_argument(
        "--max-requests", type=int, default=20_000, help="requests per phase (bound in count)"
    )
    parser.add_argument("--rows", type=int, default=2000, help="SST-2 training rows in the index")
    parser.add_argument("--approximate-share", type=float, default=0.25)
    parser.add_argument(
        "--delete-every", type=float, default=0.0, help="delete a row every S seconds (0: never)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)

    from bench.common import SST2, read_tsv, served_minilm_index

    validation = read_tsv(SST2 / "validation.tsv", 400)
    extra = {"INFLUENCE_CHUNK_SIZE": "500"}
    with served_minilm_index(args.rows, prefix="influence-load-", env=extra) as served:
        index = served.index
        with served.client() as client:
            warm = {
                "examples": [{"text": validation[0][0], "label": validation[0][1]}],
                "layers": "middle",
            }
            for approximate in (False, True):  # loads the model and the FAISS indexes in the API
                body = {**warm, "approximate": approximate}
                client.post(f"/v1/indexes/{index['id']}/query", json=body).raise_for_status()
        phases = [int(value) for value in str(args.clients).split(",") if value.strip()]
        print(
            f"index {index['id']}: {args.rows} rows x {len(index['layers'])} layers built in "
            f"{served.build_seconds:.1f}s; phases of {phases} clients, each up to {args.duration:.0f}s / "
            f"{args.max_requests} requests",
            flush=True,
        )
        reports = []
        victims = iter(range(0, args.rows, 7))
        for clients in phases:
            reports.append(
                run_load(
                    served.base_url,
                    served.token,
                    index["id"],
                    validation,
                    clients=clients,
                    duration=args.duration,
                    max_requests=args.max_requests,
                    approximate_share=args.approximate_share,
                    delete_rows=[
                        next(victims) for _ in range(int(args.duration // max(args.delete_every, 1)))
                    ]
                    if args.delete_every > 0
                    else [],
                    delete_every=args.delete_every,
                )
            )
    result = {
        "phases": [asdict(report) for report in reports],
        "rows": args.rows,
        "layers": len(index["layers"]),
        "build_seconds": round(served.build_seconds, 1),
        "approximate_share": args.approximate_share,
        "cpu_count": os.cpu_count(),
    }
    print("| clients | seconds | requests | errors | req/s | p50 ms | p95 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for report in reports:
        print(report.markdown_row())
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(r.errors == 0 and r.requests > 0 for r in reports) else 1


if __name__ == "__main__":
    # run as a file (`python bench/load_query.py`): the repository's packages importable
    if __package__ in (None, ""):
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
