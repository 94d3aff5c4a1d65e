"""Item 13: the query hop (issue 16): query latency at n rows x 12 layers x d256, computed in the API process, by
a query worker over Redis, and by a query worker over the embedded filesystem broker, in the same run.

    python -m bench.query_hop                          # n = 100k; 5 rounds x 10 queries per path, 3 warm-ups
    python -m bench.query_hop --sizes 10000 --quick    # a short run: one JSON line
    python -m bench.query_hop --redis-url redis://127.0.0.1:6379/14     # the Redis database (flushed)

The index is bench/query.py's (item 2: the packaged MiniLM + LoRA r = 4, the 12 LoRA B units factorized to 256
numbers, float16, features from a seeded generator), made once under its service folder and reused. Over that
folder's SQLite database and artifacts run five processes:
  api-inproc     uvicorn app.embedded:create_service_app with INFLUENCE_QUERY_ON_WORKERS=false (the path before
                 issue 16: the API computes)
  api-redis      the same with query_on_workers and the Redis broker      -> worker-redis
  api-embedded   the same with query_on_workers and the filesystem broker -> worker-embedded
  worker-redis, worker-embedded: `python -m worker --queues query`
Every query (one SST-2 validation sentence, grad-dot, rank, top-10, both directions, exact) goes to the three APIs
in turn, the order rotating, so that the three share the machine's state. Per path and round: p50 of `--queries`
client latencies (HTTP request to parsed answer); reported: the median of the rounds' p50s, and the hop: a worker
path's p50 minus the in-process p50 of the same round (median over rounds), and the median over queries of a
query's latency on the worker path minus the same query's in-process latency, asked right before or after it.
Where the time goes: the API's own `seconds` (it times the whole query, the wait for the worker included) and the
worker's task time (Celery's `succeeded in` log lines).

Also measured: each API process's resident memory after the run (VmRSS) and whether libtorch is mapped in it (an
API that forwards loads no model and no torch; the in-process one loads both), and an idle query
worker's CPU over 10 s, filesystem broker (polls every query_polling_interval_s) and Redis (blocks). All
processes use INFLUENCE_SMALL_BATCH_THREADS=one unless set (the query gradient computed the same way in each),
and no request-isolation processes (INFLUENCE_REQUEST_PROCESSES=0).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.harness import REPO, free_port
from bench.query import SERVICE_DIR, Service, ready_index

PATHS = ("inproc", "redis", "embedded")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
TARGET_HOP_MS = {"redis": 10.0, "embedded": 25.0}
TARGET_P50_MS = 80.0
STARTUP_S = 300.0
TASK_TIME = re.compile(r"influence\.query\[[0-9a-f-]+\] succeeded in ([0-9.]+)s")


def _env(extra: dict[str, str | None]) -> dict[str, str]:
    from influence import packaged_minilm_path

    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "INFLUENCE_DATA_DIR": str(SERVICE_DIR),
        "INFLUENCE_ALLOWED_ROOTS": json.dumps([str(common.WORK), str(packaged_minilm_path())]),
        "INFLUENCE_DEVICE": os.environ.get("INFLUENCE_DEVICE", "cpu"),
        "INFLUENCE_REQUEST_PROCESSES": "0",
        "INFLUENCE_SMALL_BATCH_THREADS": os.environ.get("INFLUENCE_SMALL_BATCH_THREADS", "one"),
        # A cold worker's first query loads the model and waits for the kernel's compile: the warm-ups wait.
        "INFLUENCE_QUERY_TIMEOUT_S": "600",
        **extra,
    }
    return {name: value for name, value in env.items() if value is not None}


class Child:
    """A process of this bench, in its own process group, its output in a log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]):
        self.name = name
        self.log = common.WORK / "query-hop" / f"{name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_bytes(b"")
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def alive(self) -> bool:
        if self.process.poll() is not None:
            raise SystemExit(
                f"{self.name} exited ({self.process.returncode}): {self.log.read_text()[-3000:]}"
            )
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def maps_torch(self) -> bool:
        return "libtorch" in Path(f"/proc/{self.process.pid}/maps").read_text()

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def task_seconds(self) -> list[float]:
        return [float(m) for m in TASK_TIME.findall(self.log.read_text(errors="replace"))]


def start_api(name: str, extra: dict[str, str | None]) -> tuple[Child, str]:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--factory", "app.embedded:create_service_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"]
    return Child(name, command, _env(extra)), f"http://127.0.0.1:{port}"


def start_worker(name: str, extra: dict[str, str | None]) -> Child:
    command = [sys.executable, "-m", "worker", "--queues", "query", "--hostname", f"{name}@%h"]
    return Child(name, command, _env(extra))


def wait_alive(child: Child, settings) -> None:
    from app.jobs.query_heartbeat import heartbeat_for

    heartbeat = heartbeat_for(settings)
    common.wait_for(lambda: child.alive() and heartbeat.alive(), STARTUP_S, f"{child.name}'s heartbeat")


def query_body(i: int) -> dict[str, Any]:
    example = common.sst2_examples("validation")[i % 872]
    return {
        "examples": [{"text": example.text, "label": int(example.label)}],
        "estimator": "grad-dot",
        "aggregation": "rank",
        "top_k": 10,
        "direction": "both",
    }


def ask(client, index_id: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = client.post(f"/v1/indexes/{index_id}/query", json=body)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"query: {response.status_code} {response.text[:500]}")
    return seconds, response.json()


def idle_cpu(child: Child, seconds: float = 10.0) -> float:
    """Percent of one core the process used while idle for `seconds`."""
    before = child.cpu_seconds()
    time.sleep(seconds)
    return 100.0 * (child.cpu_seconds() - before) / seconds


def measure(n: int, rounds: int, queries: int, warmups: int, redis_url: str) -> dict[str, Any]:
    import httpx
    import redis

    from app.config import Settings

    service = Service(SERVICE_DIR)
    try:
        index_id, info = ready_index(service, n)
        token = service.client.headers["Authorization"]
    finally:
        service.close()
    common.log(f"n={n}: index {index_id} ready ({info})")
    redis.Redis.from_url(redis_url).flushdb()
    fs = {"INFLUENCE_BROKER_URL": None}
    over_redis = {"INFLUENCE_BROKER_URL": redis_url}
    settings = {
        "redis": Settings(_env_file=None, data_dir=SERVICE_DIR, broker_url=redis_url),
        "embedded": Settings(_env_file=None, data_dir=SERVICE_DIR),
    }
    children: list[Child] = []
    try:
        workers = {
            "redis": start_worker("worker-redis", over_redis),
            "embedded": start_worker("worker-embedded", fs),
        }
        children += workers.values()
        apis: dict[str, tuple[Child, str]] = {
            "inproc": start_api("api-inproc", {**fs, "INFLUENCE_QUERY_ON_WORKERS": "false"}),
            "redis": start_api("api-redis", {**over_redis, "INFLUENCE_QUERY_ON_WORKERS": "true"}),
            "embedded": start_api("api-embedded", {**fs, "INFLUENCE_QUERY_ON_WORKERS": "true"}),
        }
        children += [child for child, _ in apis.values()]
        clients = {
            path: httpx.Client(base_url=url, headers={"Authorization": token}, timeout=900)
            for path, (_, url) in apis.items()
        }

        def healthy(path: str) -> bool:
            try:
                return apis[path][0].alive() and clients[path].get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        for path in PATHS:
            common.wait_for(lambda path=path: healthy(path), STARTUP_S, f"api-{path}")
        for path, child in workers.items():
            wait_alive(child, settings[path])
        rss_before = {path: child.status("VmRSS") for path, (child, _) in apis.items()}
        common.log("processes up; warming up")
        for i in range(warmups):
            for path in PATHS:
                seconds, _ = ask(clients[path], index_id, query_body(i))
                common.log(f"warm-up {i} {path}: {seconds * 1000:.0f} ms")
        tasks_before = {path: len(child.task_seconds()) for path, child in workers.items()}
        rows: dict[str, list[list[dict[str, float]]]] = {path: [] for path in PATHS}
        for r in range(rounds):
            for path in PATHS:
                rows[path].append([])
            for q in range(queries):
                i = warmups + r * queries + q
                order = PATHS[i % 3 :] + PATHS[: i % 3]
                answers = {}
                for path in order:
                    seconds, answer = ask(clients[path], index_id, query_body(i))
                    answers[path] = answer
                    rows[path][-1].append({"client_s": seconds, "api_s": float(answer["seconds"])})
                first = {k: v for k, v in answers["inproc"].items() if k != "seconds"}
                for path in ("redis", "embedded"):
                    assert {k: v for k, v in answers[path].items() if k != "seconds"} == first, path
            common.log(
                f"round {r}: "
                + ", ".join(
                    f"{p} p50 {1000 * common.percentile([x['client_s'] for x in rows[p][-1]], 50):.1f} ms"
                    for p in PATHS
                )
            )
        task_times = {path: child.task_seconds()[tasks_before[path] :] for path, child in workers.items()}
        idle = {f"worker-{path}": idle_cpu(child) for path, child in workers.items()}
        idle["api-embedded"] = idle_cpu(apis["embedded"][0])
        memory = {
            f"api-{path}": {
                "rss_mib_at_start": rss_before[path] / 2**20,
                "rss_mib_after": child.status("VmRSS") / 2**20,
                "libtorch_mapped": child.maps_torch(),
            }
            for path, (child, _) in apis.items()
        }
        memory.update(
            {
                f"worker-{path}": {"rss_mib_after": child.status("VmRSS") / 2**20}
                for path, child in workers.items()
            }
        )
        for client in clients.values():
            client.close()
    finally:
        for child in reversed(children):
            child.stop()
        redis.Redis.from_url(redis_url).flushdb()
    return summarize(rows, task_times) | {"idle_cpu_percent_of_a_core": idle, "memory": memory, "index": info}


def summarize(
    rows: dict[str, list[list[dict[str, float]]]], task_times: dict[str, list[float]]
) -> dict[str, Any]:
    """Per path: the rounds' p50s and their median, p95 over every query, the API's own `seconds` and the
    worker's task time (medians), and the hop: each round's p50 minus the in-process p50 of that round."""
    p50s = {
        path: [common.percentile([x["client_s"] for x in round_], 50) for round_ in rows[path]]
        for path in PATHS
    }
    out: dict[str, Any] = {"paths": {}}
    for path in PATHS:
        everything = [x for round_ in rows[path] for x in round_]
        entry = {
            "p50_ms_per_round": [1000 * p for p in p50s[path]],
            "p50_ms": 1000 * common.summary(p50s[path])["median"],
            "p95_ms": 1000 * common.percentile([x["client_s"] for x in everything], 95),
            "api_seconds_median_ms": 1000 * common.summary([x["api_s"] for x in everything])["median"],
        }
        if task_times.get(path):
            entry["worker_task_median_ms"] = 1000 * common.summary(task_times[path])["median"]
        if path != "inproc":
            hops = [1000 * (a - b) for a, b in zip(p50s[path], p50s["inproc"], strict=True)]
            entry["hop_ms_per_round"] = hops
            entry["hop_ms"] = common.summary(hops)["median"]
            # The same query on both paths, one right after the other: the steadier estimate under load.
            local = [x["client_s"] for round_ in rows["inproc"] for x in round_]
            paired = [1000 * (x["client_s"] - y) for x, y in zip(everything, local, strict=True)]
            entry["hop_ms_paired_median"] = common.summary(paired)["median"]
        out["paths"][path] = entry
    return out


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser("query_hop", __doc__)
    parser.add_argument("--sizes", default=None, help="comma-separated n (default 100000; quick: 10000)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--queries", type=int, default=None, help="queries per path and round")
    parser.add_argument("--warmups", type=int, default=3)
    parser.add_argument(
        "--redis-url", default=DEFAULT_REDIS_URL, help="a Redis database this bench may flush"
    )
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    sizes = common.sizes(args.sizes or ("10000" if args.quick else "100000"))
    rounds = args.rounds or (2 if args.quick else 5)
    queries = args.queries or (5 if args.quick else 10)
    load_start = common.load_average()
    results = {}
    for n in sizes:
        results[str(n)] = measure(n, rounds, queries, args.warmups, args.redis_url)
        results[str(n)]["load_1min"] = common.load_average()[0]
    headline: dict[str, Any] = {"load_1min": common.load_average()[0]}
    for n, r in results.items():
        for path, entry in r["paths"].items():
            headline[f"p50_ms_{path}_{n}"] = entry["p50_ms"]
            if "hop_ms" in entry:
                headline[f"hop_ms_{path}_{n}"] = entry["hop_ms"]
                headline[f"hop_ms_paired_{path}_{n}"] = entry["hop_ms_paired_median"]
    if "100000" in results:
        paths = results["100000"]["paths"]
        targets = {
            **{f"hop_{p}_le_{int(t)}ms": paths[p]["hop_ms"] <= t for p, t in TARGET_HOP_MS.items()},
            **{f"p50_{p}_le_{int(TARGET_P50_MS)}ms": paths[p]["p50_ms"] <= TARGET_P50_MS for p in PATHS},
        }
        results["100000"]["targets"] = targets
        headline.update(targets)
    result = {
        "machine": common.machine(),
        "load_at_start": load_start,
        "rounds": rounds,
        "queries_per_round": queries,
        "sizes": results,
    }
    common.emit("query-hop", result, args.quick, headline)


if __name__ == "__main__":
    main()
