"""Item 12: the GPU path on a CUDA machine, in one run: featurization against the floor, scoring bandwidth, FAISS
on the GPU and a library-level query.

    python bench/gpu.py --out results.json               # a CUDA GPU; without one it stops (exit status 2)
    python bench/gpu.py --cpu-smoke --out smoke.json     # the same code on tiny shapes on the CPU (the CI test)
    python bench/gpu.py --sections featurize,scoring     # a part of it (featurize, scoring, faiss, query)

Sections (figures are medians over rounds; every timing waits for the GPU to finish):

  featurize  per model shape, built from its config with random weights on the GPU: qwen2-0.5b-like (24 blocks,
             hidden 896, 14 / 2 heads, intermediate 4864, vocab 151936, tied), llama-3.2-1b-like (16 blocks,
             hidden 2048, 32 / 8 heads, intermediate 8192, vocab 128256, tied), and real weights of such models
             if the Hugging Face cache holds them (or --real FOLDER); a PEFT LoRA r = 8 (alpha 16) on q_proj and
             v_proj; rows of 256 random tokens, the first half prompt (masked out of the loss); weights in
             bfloat16 and in float32 (the service's compute_dtype). Two methods alternate on the same batches:
               floor  forward, the library's causal-LM loss (influence.per_sample_losses), backward into the
                      LoRA parameters: what LoRA fine-tuning computes
               ours   influence.Featurizer on the LoRA + head units, factorized projection dim 256
             rows/s and tokens/s of each, and ratio = ours / floor per round
  scoring    influence.scoring, grad-dot, 12 layers x d256 float16 against 1 and 8 query vectors: rows resident
             on the GPU (100k and 1M rows per layer), rows streamed from memory-mapped files (100k rows:
             score_layer_streamed, what a query on the GPU reads from a store), and the CPU path on the same
             files; GB/s of feature bytes read, against the card's theoretical memory bandwidth
  faiss      flat and ivf over 100k x d256: build seconds and single-query search p50 on the CPU and, with
             faiss-gpu, on the GPU (LayerIndex.build(device=...)); recall@10 against exact search
  query      library level, p50 and p95 of 20: featurize one 256-token query on the first shape (bfloat16),
             score it against 100k x 12 x d256 (resident on the GPU, and streamed from the files), aggregate
             (mean) and take the top 10

The card's bandwidth is 2 x memory bus width x memory clock (torch.cuda.get_device_properties), or "unknown".
Results go to --out as JSON and to stdout; progress to stderr. docs/benchmarks.md, item 12, records the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: the repository's packages (influence, bench)

from bench import common  # noqa: E402  (sets the OpenMP policy before torch loads)

# torch, transformers, peft, faiss and influence are imported in the functions that use them: --help and a bad
# --sections answer without loading them, and each section loads only what it measures.

NO_GPU_MESSAGE = (
    "bench/gpu.py measures the GPU path and needs a CUDA GPU (torch.cuda.is_available() is False here); "
    "--cpu-smoke runs the same code on tiny shapes on the CPU"
)
SECTIONS = ("featurize", "scoring", "faiss", "query")
LORA_TARGETS = ["q_proj", "v_proj"]
UNITS = ["role:lora", "head"]  # the LoRA + head units
REAL_CANDIDATES = ("Qwen/Qwen2-0.5B", "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "unsloth/Llama-3.2-1B")

# bench/llm.py's shapes, named as what they imitate (random weights, not the real models).
SHAPES = {f"{name}-like": spec for name, spec in common.LLM_SHAPES.items()}
TINY_SHAPES = {
    "qwen2-tiny": {
        "config": "Qwen2Config", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
    },
    "llama-tiny": {
        "config": "LlamaConfig", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "tie_word_embeddings": True,
    },
}  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: GPU_PLAN on a GPU, SMOKE_PLAN for --cpu-smoke (the same code, tiny)."""

    device: str
    shapes: dict[str, dict[str, Any]]  # name -> {config: transformers config class, its arguments}
    dtypes: tuple[str, ...] = ("bfloat16", "float32")
    seq_len: int = 256
    batch_size: int = 8
    batches: int = 4
    rounds: int = 3
    lora_rank: int = 8
    dim: int = 256
    layers: int = 12
    store_rows: int = 100_000
    resident_rows: tuple[int, ...] = (100_000, 1_000_000)
    query_vectors: tuple[int, ...] = (1, 8)
    faiss_rows: int = 100_000
    faiss_queries: int = 50
    query_runs: int = 20
    real: list[str] = field(default_factory=list)


GPU_PLAN = Plan(device="cuda", shapes=SHAPES)
SMOKE_PLAN = Plan(
    device="cpu", shapes=TINY_SHAPES, seq_len=16, batch_size=2, batches=1, rounds=2, lora_rank=2, dim=16,
    store_rows=3000, resident_rows=(3000,), faiss_rows=2000, faiss_queries=5, query_runs=3,
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ helpers


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    seconds, _ = common.timed(lambda: (fn(), sync(device)))
    return seconds


def gpu_info(device: str) -> dict[str, Any]:
    """The card, its memory and its theoretical bandwidth (None: unknown), the CUDA and faiss builds."""
    import faiss
    import torch

    from influence.index import faiss_gpu_count

    info: dict[str, Any] = {
        "torch_cuda": torch.version.cuda,
        "faiss": faiss.__version__,
        "faiss_gpus": faiss_gpu_count(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    if not device.startswith("cuda"):
        return {**info, "name": "cpu (smoke run)", "bandwidth_gbps": None}
    props = torch.cuda.get_device_properties(torch.device(device))
    bus, clock = getattr(props, "memory_bus_width", 0), getattr(props, "memory_clock_rate", 0)
    info.update(
        name=props.name,
        memory_gib=round(props.total_memory / 2**30, 1),
        capability=f"{props.major}.{props.minor}",
        # double data rate: two transfers per clock (kHz) over the bus (bits)
        bandwidth_gbps=2 * bus / 8 * clock * 1000 / 1e9 if bus and clock else None,
    )
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version,clocks.max.memory", "--format=csv,noheader"]
        result = subprocess.run(query, capture_output=True, text=True, check=False)
        info["nvidia_smi"] = result.stdout.strip().splitlines()[:1]
    return info


def free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- featurize


def lora_model(model: Any, rank: int) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        init_lora_weights=False,  # LoRA B not zero: every LoRA unit has a gradient
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config).eval()


def random_model(spec: dict[str, Any], dtype: str, plan: Plan) -> Any:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    arguments = {key: value for key, value in spec.items() if key != "config"}
    config = getattr(transformers, spec["config"])(**arguments, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(plan.device):  # initialised where it runs: a 1B model in seconds
        model = AutoModelForCausalLM.from_config(config)
    return lora_model(model.to(getattr(torch, dtype)), plan.lora_rank)


def real_model(folder: str, dtype: str, plan: Plan) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    return lora_model(model.to(device=plan.device, dtype=getattr(torch, dtype)), plan.lora_rank)


def cached_real_models() -> dict[str, str]:
    """Models of REAL_CANDIDATES in the local Hugging Face cache: repo id -> snapshot folder (nothing is
    downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return {}
    found = {}
    for repo in REAL_CANDIDATES:
        config = try_to_load_from_cache(repo, "config.json")
        if isinstance(config, str) and list(Path(config).parent.glob("*.safetensors")):
            found[repo] = str(Path(config).parent)
    return found


def causal_batches(vocab: int, plan: Plan, count: int, rows: int, seed: int) -> list[Any]:
    """Rows of plan.seq_len random tokens; the first half is the prompt (IGNORE_INDEX in the labels)."""
    import torch

    from influence.data import IGNORE_INDEX, Batch

    generator = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(count):
        ids = torch.randint(3, vocab, (rows, plan.seq_len), generator=generator)
        labels = ids.clone()
        labels[:, : plan.seq_len // 2] = IGNORE_INDEX
        row_ids = torch.arange(i * rows, (i + 1) * rows)
        batch = Batch(ids, torch.ones_like(ids), labels, "causal-lm", row_ids)
        batches.append(batch.to(plan.device))
    return batches


def featurizer_for(model: Any, plan: Plan) -> Any:
    from influence import Featurizer, ProjectionSpec, discover_layers, select_layers

    layers = select_layers(discover_layers(model), UNITS)
    return Featurizer(model, layers, ProjectionSpec("factorized", plan.dim, seed=0))


def measure_featurize(name: str, model: Any, dtype: str, plan: Plan) -> dict[str, Any]:
    """floor and ours alternating over the same batches, plan.rounds rounds after a warm-up of each."""
    import torch

    from influence import per_sample_losses

    featurizer = featurizer_for(model, plan)
    vocab = model.get_input_embeddings().num_embeddings
    batches = causal_batches(vocab, plan, plan.batches, plan.batch_size, seed=1)
    rows = plan.batches * plan.batch_size

    def floor() -> None:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            losses, _ = per_sample_losses(model, batch)
            losses.sum().backward()

    def ours() -> None:
        for batch in batches:
            featurizer.featurize(batch)

    methods = {"floor": floor, "ours": ours}
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    peak: dict[str, float] = {}
    for method, run in methods.items():  # warm-up (kernels picked, allocator filled); peak memory of each
        if plan.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        timed(run, plan.device)
        if plan.device.startswith("cuda"):
            peak[method] = torch.cuda.max_memory_allocated() / 2**30
    for r in range(plan.rounds):
        for method in list(methods) if r % 2 == 0 else list(methods)[::-1]:
            seconds[method].append(timed(methods[method], plan.device))
    model.zero_grad(set_to_none=True)
    rates = {method: [rows / s for s in values] for method, values in seconds.items()}
    ratios = [o / f for o, f in zip(rates["ours"], rates["floor"], strict=True)]
    out = {
        "shape": name,
        "dtype": dtype,
        "units": len(featurizer.layers),
        "rows": rows,
        "tokens_per_row": plan.seq_len,
        "rows_per_s": {method: statistics.median(values) for method, values in rates.items()},
        "tokens_per_s": {m: plan.seq_len * statistics.median(v) for m, v in rates.items()},
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "peak_memory_gib": peak or None,
    }
    common.log(
        f"featurize {name} {dtype}: ours {out['tokens_per_s']['ours']:.0f} tok/s, floor "
        f"{out['tokens_per_s']['floor']:.0f} tok/s, ratio {out['ratio']:.2f}"
    )
    return out


def featurize_section(plan: Plan, smoke: bool) -> dict[str, Any]:
    results = []
    cached = {} if smoke else cached_real_models()
    reals = {**cached, **{Path(folder).name: folder for folder in plan.real}}
    for dtype in plan.dtypes:
        for name, spec in plan.shapes.items():
            model = random_model(spec, dtype, plan)
            results.append(measure_featurize(name, model, dtype, plan))
            del model
            free(plan.device)
        for name, folder in reals.items():
            model = real_model(folder, dtype, plan)
            results.append({**measure_featurize(name, model, dtype, plan), "real_weights": folder})
            del model
            free(plan.device)
    return {"results": results, "real_weights": sorted(reals) or "none cached"}


# ------------------------------------------------------------------------------------------------ scoring


def write_store(folder: Path, plan: Plan, dims: list[int]) -> list[Any]:
    """One float16 .npy file per layer (plan.store_rows x dim), reopened read-only as a store's layers are."""
    import numpy as np

    rng = np.random.default_rng(0)
    layers = []
    for u, dim in enumerate(dims):
        path = folder / f"layer{u}.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(plan.store_rows, dim))
        for start in range(0, plan.store_rows, 65536):
            stop = min(plan.store_rows, start + 65536)
            out[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
        out.flush()
        del out
        layers.append(np.load(path, mmap_mode="r"))
    return layers


def bandwidth(layers: list[Any], queries: Any, score: Callable[..., Any], plan: Plan) -> dict[str, Any]:
    """Seconds to score every layer against the queries (median of plan.rounds after a warm-up), and GB/s of
    feature bytes read."""
    from influence.estimators import make_estimator

    estimator = make_estimator("grad-dot")

    def run() -> None:
        for features in layers:
            score(features, queries, estimator)

    timed(run, plan.device)
    seconds = statistics.median(timed(run, plan.device) for _ in range(plan.rounds))
    nbytes = sum(int(f.shape[0]) * int(f.shape[1]) * f.dtype.itemsize for f in layers)
    return {"seconds": seconds, "gbps": nbytes / seconds / 1e9}


def scoring_section(plan: Plan, card_gbps: float | None, folder: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    from influence.estimators import make_estimator
    from influence.scoring import score_layer, score_layer_streamed

    results = []

    def record(where: str, n: int, m: int, figures: dict[str, Any]) -> None:
        share = figures["gbps"] / card_gbps if card_gbps else None
        results.append({"rows": where, "n": n, "layers": plan.layers, "m": m, **figures, "of_card": share})
        common.log(
            f"scoring {where} n={n} m={m}: {figures['gbps']:.1f} GB/s ({figures['seconds'] * 1e3:.1f} ms)"
        )

    generator = torch.Generator(device=plan.device).manual_seed(0)
    for n in plan.resident_rows:
        shape = (n, plan.dim)
        resident = [
            torch.randn(shape, generator=generator, device=plan.device).half() for _ in range(plan.layers)
        ]
        for m in plan.query_vectors:
            queries = torch.randn((m, plan.dim), device=plan.device)
            record("resident", n, m, bandwidth(resident, queries, score_layer, plan))
        del resident
        free(plan.device)
    files = write_store(folder, plan, [plan.dim] * plan.layers)
    for m in plan.query_vectors:
        queries = torch.randn((m, plan.dim), generator=generator, device=plan.device)

        def streamed(features: Any, q: Any, estimator: Any) -> Any:
            return score_layer_streamed(features, q, estimator, device=plan.device)

        record("streamed", plan.store_rows, m, bandwidth(files, queries, streamed, plan))
        record("cpu", plan.store_rows, m, bandwidth(files, queries.cpu(), score_layer, plan))
    # The device's scores against the CPU's, layer 0, 8 vectors: float32 summation order only.
    estimator = make_estimator("grad-dot")
    queries = torch.randn((8, plan.dim), generator=generator, device=plan.device)
    on_device = score_layer_streamed(files[0], queries, estimator, device=plan.device).cpu().numpy()
    on_cpu = score_layer(files[0], queries.cpu(), estimator).numpy()
    agreement = float(np.abs(on_device - on_cpu).max() / np.abs(on_cpu).max())
    return {"results": results, "card_gbps": card_gbps, "max_relative_difference_vs_cpu": agreement}


# -------------------------------------------------------------------------------------------------- faiss


def faiss_section(plan: Plan) -> dict[str, Any]:
    import numpy as np

    from influence.index import LayerIndex, faiss_gpu_count

    rng = np.random.default_rng(1)
    features = rng.standard_normal((plan.faiss_rows, plan.dim), dtype=np.float32)
    queries = rng.standard_normal((plan.faiss_queries, plan.dim), dtype=np.float32)
    exact = np.argsort(-(queries @ features.T), axis=1, kind="stable")[:, :10]
    devices = ["cpu"] + (["cuda"] if plan.device.startswith("cuda") and faiss_gpu_count() else [])
    results = []
    for kind in ("flat", "ivf"):
        for device in devices:
            build_s, index = common.timed(lambda k=kind, d=device: LayerIndex.build(features, k, device=d))
            results.append({"kind": kind, "build_s": build_s, **search_figures(index, queries, exact)})
            common.log(
                f"faiss {kind} on {index.device}: build {build_s:.2f} s, "
                f"p50 {results[-1]['search_ms_p50']:.2f} ms, recall@10 {results[-1]['recall_at_10']:.3f}"
            )
            del index
    note = None if len(devices) > 1 else "no GPU rows: faiss has no GPU support here (faiss-cpu) or no GPU"
    return {"results": results, "note": note}


def search_figures(index: Any, queries: Any, exact: Any) -> dict[str, Any]:
    """Single-query search p50 (after a warm-up), one search of every query at once, recall@10."""
    import numpy as np

    index.search(queries[:1], 10)
    latencies, found = [], []
    for j in range(len(queries)):
        seconds, (_, positions) = common.timed(lambda j=j: index.search(queries[j : j + 1], 10))
        latencies.append(seconds)
        found.append(positions[0])
    batch_s, _ = common.timed(lambda: index.search(queries, 10))
    recall = float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)]))
    return {
        "device": index.device,
        "n": index.ntotal,
        "params": index.params,
        "search_ms_p50": 1000 * common.percentile(latencies, 50),
        "batch_of_queries_ms": 1000 * batch_s,
        "recall_at_10": recall,
    }


# -------------------------------------------------------------------------------------------------- query


def query_section(plan: Plan, folder: Path) -> dict[str, Any]:
    """Featurize one query row, score it against plan.store_rows x 12 layers, aggregate, top 10."""
    import numpy as np
    import torch

    from influence import aggregate, top_k
    from influence.estimators import make_estimator
    from influence.scoring import score_layer

    model = random_model(next(iter(plan.shapes.values())), plan.dtypes[0], plan)
    featurizer = featurizer_for(model, plan)
    names = [name for name, dim in featurizer.dims.items() if dim == plan.dim][: plan.layers]
    vocab = model.get_input_embeddings().num_embeddings
    (batch,) = causal_batches(vocab, plan, 1, 1, seed=2)
    estimator = make_estimator("grad-dot")
    generator = torch.Generator(device=plan.device).manual_seed(3)
    stores = {
        "resident": [
            torch.randn((plan.store_rows, plan.dim), generator=generator, device=plan.device).half()
            for _ in names
        ],
        "streamed": write_store(folder, plan, [plan.dim] * len(names)),
    }
    out: dict[str, Any] = {"units": len(names), "rows": plan.store_rows, "dtype": plan.dtypes[0]}
    for where, layers in stores.items():

        def query(layers: list[Any] = layers) -> np.ndarray:
            features = featurizer.featurize(batch).features
            columns = [
                score_layer(rows, features[name], estimator) for rows, name in zip(layers, names, strict=True)
            ]
            scores = torch.stack(columns, dim=1).cpu().numpy()  # (n, U, 1)
            return top_k(aggregate(scores, "mean"), 10, "helpful")

        timed(query, plan.device)
        seconds = [timed(query, plan.device) for _ in range(plan.query_runs)]
        out[where] = {
            "p50_ms": 1000 * common.percentile(seconds, 50),
            "p95_ms": 1000 * common.percentile(seconds, 95),
        }
        common.log(f"query ({where} store): p50 {out[where]['p50_ms']:.1f} ms")
    del model, stores
    free(plan.device)
    return out


# --------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results there as JSON")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (no GPU needed)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}")
    parser.add_argument("--rounds", type=int, help="timed rounds per figure")
    parser.add_argument("--real", action="append", default=[], help="a local model folder to featurize too")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return 2
    plan = SMOKE_PLAN if args.cpu_smoke else GPU_PLAN
    plan = replace(plan, real=list(args.real), rounds=args.rounds or plan.rounds)
    result: dict[str, Any] = {"bench": "gpu", "smoke": args.cpu_smoke, "machine": common.machine()}
    result["device"] = info = gpu_info(plan.device)
    card = f"{info['bandwidth_gbps']:.0f} GB/s" if info["bandwidth_gbps"] else "unknown"
    common.log(f"device {info['name']}: theoretical memory bandwidth {card}, faiss GPUs {info['faiss_gpus']}")
    with tempfile.TemporaryDirectory(prefix="influence-bench-gpu-") as tmp:
        if "featurize" in sections:
            result["featurize"] = featurize_section(plan, args.cpu_smoke)
        if "scoring" in sections:
            (Path(tmp) / "scoring").mkdir()
            result["scoring"] = scoring_section(
                plan, result["device"]["bandwidth_gbps"], Path(tmp) / "scoring"
            )
        if "faiss" in sections:
            result["faiss"] = faiss_section(plan)
        if "query" in sections:
            (Path(tmp) / "query").mkdir()
            result["query"] = query_section(plan, Path(tmp) / "query")
    text = json.dumps(common.rnd(result), indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        common.log(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
