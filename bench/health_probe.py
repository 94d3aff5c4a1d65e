"""/healthz latency with and without heavy requests running: is the API's liveness independent of its load?

    python -m bench.health_probe [--clients 8] [--duration 30] [--max-requests 2000] [--probes 1000]
                                 [--interval 0.02] [--upload-mb 3] [--rows 200] [--mixes KINDS;KINDS]
                                 [--out results.json]

Starts the embedded service (`python -m app.embedded serve`: SQLite, filesystem broker, a worker child) on
127.0.0.1 in a temporary data dir, registers the packaged MiniLM and --rows SST-2 rows with the local API key,
builds an index over the middle layers with the worker and warms a query up. Then a probe process (its own
interpreter, so the load clients' GIL does not delay it) opens a new connection for each GET /healthz, as a
liveness probe does, every --interval seconds: first alone (the baseline), then while --clients threads each
send one heavy request at a time, in turn: the catastrophic layer selectors of issue 13 on POST /v1/indexes
and on a query, an ordinary query (featurization), a dataset upload of --upload-mb MB and the model's layer
listing (--mixes: by default once with every kind, once without the uploads). Each phase stops after
--duration seconds or its bound in count (--probes, --max-requests). Prints p50 / p95 / p99 / max of /healthz
alone and loaded, and what the heavy requests answered.

Traffic goes to 127.0.0.1 only; every loop stops by itself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Issue 13, finding 1: each held the whole API for seconds to minutes when layer regexes ran on Python's re.
CATASTROPHIC_SELECTORS = (
    r"re:^(?=block\.0\.mlp\.down)(?:.*.*)*!",
    r"re:(?:.*.*)*!",
    r"re:^block\.0\.(?:a|aa|.)+!",
)


# The heavy requests, sent in turn by each client.
HEAVY_KINDS = ("index_selector", "query_selector", "query", "upload", "layers")


@dataclass
class ProbeStats:
    """Latencies of GET /healthz in milliseconds (connect + request + answer), and the failed probes."""

    probes: int
    failures: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class HealthReport:
    baseline: ProbeStats
    loaded: ProbeStats
    clients: int
    duration_s: float
    heavy_requests: int
    heavy_errors: int  # a transport error, a 5xx or a status the request should not get
    heavy_statuses: dict[str, int]  # "kind status" -> count
    heavy_max_ms: dict[str, float]  # kind -> slowest answer
    error_samples: list[str] = field(default_factory=list)

    def markdown_rows(self) -> list[str]:
        rows = []
        for phase, stats in (("alone", self.baseline), (f"{self.clients} heavy clients", self.loaded)):
            rows.append(
                f"| {phase} | {stats.probes} | {stats.failures} | {stats.p50_ms:.1f} | {stats.p95_ms:.1f} | "
                f"{stats.p99_ms:.1f} | {stats.max_ms:.1f} |"
            )
        return rows


def probe_loop(port: int, max_probes: int, duration: float, interval: float) -> tuple[list[float], int]:
    """GET /healthz on a new connection every `interval` s, up to `max_probes` times or `duration` s."""
    latencies: list[float] = []
    failures = 0
    deadline = time.monotonic() + duration
    while len(latencies) + failures < max_probes and time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            ok = response.status == 200 and json.loads(response.read()).get("status") == "ok"
            connection.close()
        except (OSError, ValueError):  # refused, timed out, or not the JSON a healthy process answers
            ok = False
        elapsed = (time.perf_counter() - started) * 1000.0
        if ok:
            latencies.append(elapsed)
        else:
            failures += 1
        time.sleep(max(0.0, interval - elapsed / 1000.0))
    return latencies, failures


def _stats(latencies: list[float], failures: int) -> ProbeStats:
    from bench.common import percentile  # here, not at the top: the probe process runs this file as a script

    return ProbeStats(
        probes=len(latencies) + failures,
        failures=failures,
        p50_ms=round(percentile(latencies, 50), 2),
        p95_ms=round(percentile(latencies, 95), 2),
        p99_ms=round(percentile(latencies, 99), 2),
        max_ms=round(max(latencies), 2) if latencies else float("nan"),
    )


def _start_probe(port: int, max_probes: int, duration: float, interval: float) -> subprocess.Popen:
    command = [sys.executable, str(Path(__file__).resolve()), "--probe-port", str(port)]
    command += ["--probes", str(max_probes), "--duration", str(duration), "--interval", str(interval)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def _finish_probe(process: subprocess.Popen, timeout: float) -> ProbeStats:
    out, _ = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"the probe process failed ({process.returncode}): {out[-500:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return _stats(result["latencies_ms"], result["failures"])


def upload_tsv(megabytes: float) -> bytes:
    """A labelled TSV of about `megabytes` MB (distinct sentences, so nothing compresses it away)."""
    lines = ["sentence\tlabel"]
    size, number = 0, 0
    while size < megabytes * 1e6:
        line = f"row {number} of a large upload that keeps the service busy for a while\t{number % 2}"
        lines.append(line)
        size += len(line) + 1
        number += 1
    return ("\n".join(lines) + "\n").encode()


def run_probe(
    base_url: str,
    token: str,
    *,
    model_id: str,
    dataset_id: str,
    index_id: str | None,
    clients: int = 8,
    duration: float = 30.0,
    max_requests: int = 2000,
    max_probes: int = 1000,
    interval: float = 0.02,
    baseline_seconds: float | None = None,
    upload_mb: float = 3.0,
    mix: Sequence[str] = HEAVY_KINDS,
) -> HealthReport:
    """The baseline phase, then `clients` heavy clients with the probe running, each phase bounded in time
    (`duration`; the baseline `baseline_seconds`, default the same) and count (`max_probes`, `max_requests`)."""
    import httpx

    port = int(base_url.rsplit(":", 1)[1])
    probe = _start_probe(port, max_probes, baseline_seconds or duration, interval)
    baseline = _finish_probe(probe, timeout=(baseline_seconds or duration) + 120)

    upload = upload_tsv(upload_mb)
    expected = {
        "index_selector": {422},
        "query_selector": {422},
        "query": {200},
        "upload": {201},
        "layers": {200},
    }
    kinds = [(kind, expected[kind]) for kind in mix if index_id is not None or not kind.startswith("query")]
    lock = threading.Lock()
    counters = {"sent": 0}
    statuses: Counter[str] = Counter()
    slowest: dict[str, float] = {}
    errors: list[str] = []
    headers = {"Authorization": f"Bearer {token}"}
    start_gate = threading.Barrier(clients + 1)
    deadline = [0.0]

    def take_ticket() -> int | None:
        with lock:
            if counters["sent"] >= max_requests or time.monotonic() >= deadline[0]:
                return None
            counters["sent"] += 1
            return counters["sent"]

    def send(client: httpx.Client, kind: str, ticket: int) -> httpx.Response:
        selector = CATASTROPHIC_SELECTORS[ticket % len(CATASTROPHIC_SELECTORS)]
        if kind == "index_selector":
            body = {"model_id": model_id, "dataset_id": dataset_id, "layers": selector}
            return client.post("/v1/indexes", json=body)
        if kind == "query_selector":
            body = {"examples": [{"text": "a gorgeous , witty movie", "label": 1}], "layers": [selector]}
            return client.post(f"/v1/indexes/{index_id}/query", json=body)
        if kind == "query":
            body = {
                "examples": [{"text": f"a gorgeous , witty movie {ticket}", "label": 1}],
                "layers": "middle",
            }
            return client.post(f"/v1/indexes/{index_id}/query", json=body)
        if kind == "upload":
            files = {"file": ("big.tsv", upload, "text/tab-separated-values")}
            data = {"name": f"big-{ticket}", "text_column": "sentence", "label_column": "label"}
            return client.post("/v1/datasets", files=files, data=data)
        return client.get(f"/v1/models/{model_id}/layers")

    def client_loop(number: int) -> None:
        with httpx.Client(base_url=base_url, headers=headers, timeout=300.0) as client:
            start_gate.wait()
            turn = number
            while (ticket := take_ticket()) is not None:
                kind, expected = kinds[turn % len(kinds)]
                turn += 1
                started = time.perf_counter()
                try:
                    response = send(client, kind, ticket)
                    status = response.status_code
                    problem = None if status in expected else f"{kind} {status}: {response.text[:300]}"
                except httpx.HTTPError as exc:
                    status, problem = 0, f"{kind} {type(exc).__name__}: {exc}"
                elapsed = (time.perf_counter() - started) * 1000.0
                with lock:
                    statuses[f"{kind} {status}"] += 1
                    slowest[kind] = max(slowest.get(kind, 0.0), round(elapsed, 1))
                    if problem is not None:
                        errors.append(problem)

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    deadline[0] = time.monotonic() + duration
    started = time.perf_counter()
    probe = _start_probe(port, max_probes, duration, interval)
    start_gate.wait()
    loaded = _finish_probe(probe, timeout=duration + 120)
    for thread in threads:
        thread.join(timeout=600.0)
    return HealthReport(
        baseline=baseline,
        loaded=loaded,
        clients=clients,
        duration_s=round(time.perf_counter() - started, 2),
        heavy_requests=sum(statuses.values()),
        heavy_errors=len(errors),
        heavy_statuses=dict(sorted(statuses.items())),
        heavy_max_ms=dict(sorted(slowest.items())),
        error_samples=errors[:5],
    )


# ------------------------------------------------------------------------------------------- the full run


def _service_run(args) -> tuple[dict[str, HealthReport], dict]:
    from bench.common import machine, served_minilm_index

    extra = {"INFLUENCE_MAX_UPLOAD_BYTES": str(int((args.upload_mb + 1) * 1e6))}
    with served_minilm_index(args.rows, prefix="influence-health-", env=extra) as served:
        with served.client() as client:
            warm = {"examples": [{"text": "a warm-up", "label": 1}], "layers": "middle"}
            client.post(f"/v1/indexes/{served.index['id']}/query", json=warm).raise_for_status()
        before = machine()
        reports = {}
        for mix in args.mixes.split(";"):
            reports[mix] = run_probe(
                served.base_url,
                served.token,
                model_id=served.model["id"],
                dataset_id=served.dataset["id"],
                index_id=served.index["id"],
                clients=args.clients,
                duration=args.duration,
                max_requests=args.max_requests,
                max_probes=args.probes,
                interval=args.interval,
                upload_mb=args.upload_mb,
                mix=mix.split(","),
            )
        after = machine()
    return reports, {"machine": before, "load_avg_after": after["load_avg"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="heavy client threads")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per phase (bound in time)")
    parser.add_argument("--max-requests", type=int, default=2000, help="heavy requests (bound in count)")
    parser.add_argument("--probes", type=int, default=1000, help="probes per phase (bound in count)")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between probes")
    parser.add_argument("--upload-mb", type=float, default=3.0, help="size of each dataset upload")
    parser.add_argument("--rows", type=int, default=200, help="SST-2 training rows in the index")
    parser.add_argument(
        "--mixes",
        default=",".join(HEAVY_KINDS) + ";" + ",".join(k for k in HEAVY_KINDS if k != "upload"),
        help="loaded phases, `;`-separated, each a comma-separated list of heavy request kinds "
        f"({', '.join(HEAVY_KINDS)})",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument("--probe-port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.probe_port is not None:  # the probe process of run_probe
        latencies, failures = probe_loop(args.probe_port, args.probes, args.duration, args.interval)
        print(json.dumps({"latencies_ms": latencies, "failures": failures}))
        return 0

    reports, context = _service_run(args)
    result = {"phases": {mix: asdict(report) for mix, report in reports.items()}, **context}
    print(json.dumps(result, indent=1))
    for mix, report in reports.items():
        print(f"\nheavy requests: {mix}")
        print("| /healthz | probes | failed | p50 ms | p95 ms | p99 ms | max ms |")
        print("|---|---|---|---|---|---|---|")
        for row in report.markdown_rows():
            print(row)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    ok = all(report.heavy_errors == 0 and report.loaded.failures == 0 for report in reports.values())
    return 0 if ok else 1


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a file (the probe process): the repository's packages importable
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
