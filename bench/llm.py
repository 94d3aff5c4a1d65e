# Over 600 lines: one benchmark in three parts (the library against its floor, the peak-RSS child process, the
# service end to end) that share the shapes, rows and settings defined here.
"""Issue 16, item 2: causal LMs in real shapes (random weights), LoRA r = 8 on q / v, 256-token completion rows.

    python -m bench.llm                     # the Qwen2 shape, float32: library, rss, e2e (16 min on 2 quiet
                                            # cores, 29 at load 5-16)
    python -m bench.llm --shapes llama-3.2-1b --parts library,rss --budgets 1024,2048    # the Llama shape
    python -m bench.llm --quick             # the Qwen2 shape, 1 round, 16-row e2e, no rss: one JSON line
    python -m bench.llm --parts e2e --e2e-rows 256      # one part, other sizes (options below)
    python -m bench.llm peak ...            # internal: one fresh process measuring one batch (the `rss` part)

Shapes (transformers configs, seeded random weights, saved as safetensors under var/llm-shapes/<shape>/model
with a byte-level BPE tokenizer of the full vocabulary (bench.harness.save_synthetic_tokenizer), a PEFT LoRA
adapter r = 8, alpha 16 on q_proj and v_proj, B not zero, under .../adapter; built once, then reused):
  qwen2-0.5b    Qwen2Config: 24 blocks, hidden 896, 14 heads / 2 KV heads, intermediate 4,864, vocab 151,936,
                tied embeddings, max positions 32,768
  llama-3.2-1b  LlamaConfig: 16 blocks, hidden 2,048, 32 heads / 8 KV heads, intermediate 8,192, vocab 128,256,
                tied embeddings, rope_theta 500,000
Rows: completion rows (task causal-lm) of exactly 256 tokens: a prompt of random words (masked: no loss) and a
completion (the loss), half and half; `e2e` rows complete their prompt with its first words reversed, and a
share of them (the noisy column) with random words instead.

Parts:
  library  per shape and compute dtype: featurization of the same rows in token-budget batches
           (--ratio-tokens, default 1,024: 4 rows a batch; head_chunk_tokens 1,024, the service's default) by
             floor     forward + model(labels=...).loss.backward() on the same model, no hooks, LoRA parameters
                       requiring grad (what LoRA training computes)
             lora-head influence.featurize_examples, the LoRA units and the head, projection auto
             all       the same over every unit (embedding as token rows, every Linear, LoRA, head)
           in a shuffled order each round; rows/s, tokens/s and each method's ratio to the floor of its round
           (medians over --rounds); then the bytes per row of each unit in a float16 store written from the
           `all` features (what an index build writes).
  rss      per shape, dtype and --budgets value: a fresh process (`python -m bench.llm peak`) loads the model as
           a worker does and featurizes one batch of that many tokens (LoRA + head); its resident memory after
           the load, and its peak during the batch (VmHWM, reset after the load through /proc/self/clear_refs:
           ru_maxrss would do, but Linux carries it over exec, so a child starts at its parent's peak), next to
           influence.memory's estimate for that batch; for --load-dtypes, the load alone.
  e2e      the embedded service (bench.harness.start_service: SQLite, filesystem broker, a build worker and a
           query worker) with INFLUENCE_MAX_TOKENS_PER_BATCH=--e2e-tokens: register the model folder and
           adapter, upload --e2e-rows rows (JSONL with a noisy column), build an index over the LoRA units and
           the head (max length 256), --queries queries of one example after a warm-up (p50, p95), an audit
           and a layer report against --reference examples; each must succeed, and each is timed; then the
           API process's resident and peak memory, and whether torch or faiss was ever mapped into it.
Every result records the machine's float32 and bfloat16 matrix-product rates (matmul_rates): a CPU without
native bfloat16 (AVX-512 BF16, AMX) multiplies in bfloat16 about 100 times slower, so by default bfloat16 is
measured only where it costs no product: the load (--load-dtypes); --dtypes bfloat16 runs the rest too.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.harness import (
    FIRST_WORD_ID,
    REPO,
    free_port,
    save_random_causal_lm,
    start_service,
    stop_service,
    synthetic_text,
)

SHAPES_DIR = Path(os.environ.get("INFLUENCE_LLM_SHAPES_DIR", REPO / "var" / "llm-shapes"))
ROW_TOKENS = 256
HEAD_CHUNK_TOKENS = 1024  # the service's default (app/config.py)
LORA_HEAD = ["role:lora", "head"]
SHAPES = common.LLM_SHAPES


# ----------------------------------------------------------------------------------------- shapes and rows


def shape_folders(shape: str) -> tuple[Path, Path]:
    """(model folder, adapter folder) of a shape, built the first time (a `complete` marker says it was)."""
    root = SHAPES_DIR / shape
    model, adapter = root / "model", root / "adapter"
    spec = SHAPES[shape]
    if (root / "complete.json").is_file() and json.loads((root / "complete.json").read_text()) == spec:
        return model, adapter
    import transformers

    common.log(f"building {shape} in {root} (random weights, once)")
    shutil.rmtree(root, ignore_errors=True)
    config = getattr(transformers, spec["config"])(**{k: v for k, v in spec.items() if k != "config"})
    save_random_causal_lm(config, model, adapter, lora_rank=8, lora_targets=("q_proj", "v_proj"))
    (root / "complete.json").write_text(json.dumps(spec))
    return model, adapter


def completion_rows(tokenizer, n: int, seed: int, noisy_share: float = 0.0):
    """n rows of exactly ROW_TOKENS tokens: (prompt, completion, noisy). A clean completion is the prompt's
    first words reversed; a noisy one (a seeded `noisy_share` of the rows) is random words."""
    import numpy as np

    from influence.data import Example, encode_examples

    vocab = len(tokenizer)
    probe = encode_examples(
        tokenizer,
        [Example(synthetic_text([FIRST_WORD_ID]), synthetic_text([FIRST_WORD_ID]))],
        "causal-lm",
        ROW_TOKENS,
    )
    extra = len(probe[0].input_ids) - 2  # what the tokenizer adds around the words (<s>, </s>)
    prompt_words = (ROW_TOKENS - extra) // 2
    completion_words = ROW_TOKENS - extra - prompt_words
    rng = np.random.default_rng(seed)
    noisy = np.zeros(n, dtype=bool)
    noisy[rng.permutation(n)[: round(noisy_share * n)]] = True
    rows = []
    for i in range(n):
        prompt = rng.integers(FIRST_WORD_ID, vocab, prompt_words)
        if noisy[i]:
            completion = rng.integers(FIRST_WORD_ID, vocab, completion_words)
        else:
            completion = prompt[:completion_words][::-1]
        rows.append((synthetic_text(prompt), synthetic_text(completion), bool(noisy[i])))
    lengths = {
        len(e.input_ids)
        for e in encode_examples(
            tokenizer, [Example(p, c) for p, c, _ in rows[:4]], "causal-lm", 4 * ROW_TOKENS
        )
    }
    if lengths != {ROW_TOKENS}:
        raise SystemExit(f"rows tokenize to {sorted(lengths)} tokens, not {ROW_TOKENS}")
    return rows


def lora_head_layers(model):
    from influence import discover_layers, select_layers

    return select_layers(discover_layers(model), LORA_HEAD)


# -------------------------------------------------------------------------------------------------- library


def run_floor(model, batches) -> None:
    """Forward and the model's own loss backward, no hooks; the LoRA parameters require grad meanwhile."""
    trainable = [p for name, p in model.named_parameters() if "lora_" in name]
    for param in trainable:
        param.requires_grad_(True)
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                labels=batch.labels,
                use_cache=False,
            )
            out.loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        for param in trainable:
            param.requires_grad_(False)


def store_bytes(featurizer, features, rows: int, folder: Path) -> dict[str, float]:
    """Bytes per row of each unit in a float16 store holding `features` (one chunk, finalized): its features,
    norms and, for token rows, token ids, offsets and token order."""
    from influence import FeatureStore, store_manifest
    from influence.store import layer_file_stem

    shutil.rmtree(folder, ignore_errors=True)
    manifest = store_manifest(
        featurizer,
        model_id="bench",
        revision=None,
        weights_hash="w",
        tokenizer_name="t",
        dataset_hash="d",
        num_rows=rows,
        task="causal-lm",
        max_length=ROW_TOKENS,
        dtype="float16",
        chunk_size=rows,
    )
    store = FeatureStore.create(folder, manifest)
    import numpy as np

    store.write_chunk(0, np.arange(rows), features)
    store.finalize()
    segment = folder / "segments" / "seg-000000"
    out = {}
    for name in featurizer.dims:
        stem = layer_file_stem(name)
        # The arrays' bytes (a .npy header of 128 bytes per file is left out: it does not grow with the rows).
        out[name] = sum(np.load(path, mmap_mode="r").nbytes for path in segment.glob(f"{stem}.*.npy")) / rows
        out[name] += np.load(segment / f"{stem}.npy", mmap_mode="r").nbytes / rows
    shutil.rmtree(folder, ignore_errors=True)
    return out


def bytes_summary(per_unit: dict[str, float]) -> dict[str, Any]:
    groups: dict[str, list[float]] = {}
    for name, size in per_unit.items():
        kind = "lora" if ".lora_" in name else name if name in ("embed", "head") else "other"
        groups.setdefault(kind, []).append(size)
    return {
        kind: {"units": len(v), "bytes_per_row_per_unit": sum(v) / len(v), "bytes_per_row": sum(v)}
        for kind, v in groups.items()
    } | {"all_units_bytes_per_row": sum(per_unit.values())}


def library(shape: str, dtype: str, args) -> dict[str, Any]:
    import torch

    from influence import Featurizer, ProjectionSpec, discover_layers, featurize_examples, load_model
    from influence.data import Example, encode_examples, iter_batches, pad_token_id

    model_folder, adapter = shape_folders(shape)
    started = time.perf_counter()
    loaded = load_model(model_folder, task="causal-lm", adapter=adapter, dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - started
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = completion_rows(tokenizer, args.rows, seed=1)
    examples = [Example(p, c) for p, c, _ in rows]
    encoded = encode_examples(tokenizer, examples, "causal-lm", ROW_TOKENS)
    batches = list(
        iter_batches(encoded, pad_token_id(tokenizer), "causal-lm", 32, max_tokens=args.ratio_tokens)
    )
    tokens = sum(len(e.input_ids) for e in encoded)
    completion_tokens = sum(sum(t != -100 for t in e.token_labels) for e in encoded)
    every = discover_layers(model)
    unit_sets = {"lora-head": lora_head_layers(model), "all": every}
    featurizers = {name: Featurizer(model, units, ProjectionSpec()) for name, units in unit_sets.items()}
    options = {
        "batch_size": 32,
        "max_length": ROW_TOKENS,
        "max_tokens": args.ratio_tokens,
        "head_chunk_tokens": HEAD_CHUNK_TOKENS,
    }

    methods = {"floor": lambda: run_floor(model, batches)}
    for name, featurizer in featurizers.items():
        methods[name] = lambda f=featurizer: featurize_examples(
            f, tokenizer, examples, "causal-lm", **options
        )
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    ratios: dict[str, list[float]] = {name: [] for name in featurizers}
    last = {}
    order = random.Random(0)
    for round_ in range(args.rounds):
        names = list(methods)
        order.shuffle(names)
        for name in names:
            elapsed, out = common.timed(methods[name])
            seconds[name].append(elapsed)
            last[name] = out
        for name in featurizers:
            ratios[name].append(seconds["floor"][-1] / seconds[name][-1])
        common.log(
            f"{shape} {dtype} round {round_ + 1}: "
            + ", ".join(f"{name} {args.rows / seconds[name][-1]:.3f} rows/s" for name in methods)
        )
    per_unit = store_bytes(featurizers["all"], last["all"].features, args.rows, common.WORK / "llm-store")
    lora_head_names = {layer.name for layer in unit_sets["lora-head"]}
    rates = {}
    for name in methods:
        rate = common.summary([args.rows / s for s in seconds[name]])
        rates[name] = {
            "rows_per_s": rate,
            "tokens_per_s": rate["median"] * tokens / args.rows,
            "completion_tokens_per_s": rate["median"] * completion_tokens / args.rows,
        }
    return {
        "shape": shape,
        "dtype": dtype,
        "rows": args.rows,
        "tokens": tokens,
        "completion_tokens": completion_tokens,
        "batches": [len(b) for b in batches],
        "max_tokens_per_batch": args.ratio_tokens,
        "head_chunk_tokens": HEAD_CHUNK_TOKENS,
        "load_s": load_s,
        "units": {name: len(units) for name, units in unit_sets.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "rates": rates,
        "ratio_to_floor": {name: common.summary(values) for name, values in ratios.items()},
        "seconds": seconds,
        "store_bytes_per_row": {
            "lora-head": bytes_summary({k: v for k, v in per_unit.items() if k in lora_head_names}),
            "all": bytes_summary(per_unit),
        },
        "load_avg_end": common.load_average(),
    }


# ------------------------------------------------------------------------------------------------------ rss


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(key)


def peak_child(argv: list[str]) -> None:
    """One batch of `--tokens` tokens (LoRA + head) in this fresh process; prints its RSS figures as JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.llm peak")
    parser.add_argument("--shape", required=True, choices=tuple(SHAPES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    parser.add_argument("--load-only", action="store_true", help="measure the load, featurize nothing")
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    import torch

    from influence import Featurizer, ProjectionSpec, load_model
    from influence.data import Example, encode_examples, iter_batches, pad_token_id

    model_folder, adapter = shape_folders(args.shape)
    base_kib = _status_kib("VmRSS")
    loaded = load_model(model_folder, task="causal-lm", adapter=adapter, dtype=getattr(torch, args.dtype))
    with torch.no_grad():  # weights mapped from their files become resident, as in a worker's first batch
        for tensor in loaded.model.parameters():
            tensor.sum()
    loaded_kib = _status_kib("VmRSS")
    units = lora_head_layers(loaded.model)
    result: dict[str, Any] = {
        "shape": args.shape,
        "dtype": args.dtype,
        "rss_start_mib": base_kib / 1024,
        "weights_mib": (loaded_kib - base_kib) / 1024,
        "peak_after_load_mib": _status_kib("VmHWM") / 1024,
        # Not this process's own peak: Linux carries ru_maxrss over exec, so it starts at the parent's peak.
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "estimate": None,
    }
    try:
        from influence.memory import estimate_model_memory
    except ImportError:  # the estimate is optional: without it the measurements stand alone
        pass
    else:
        result["estimate"] = estimate_model_memory(
            model_folder,
            dtype=args.dtype,
            max_tokens=args.tokens,
            head_chunk_tokens=HEAD_CHUNK_TOKENS,
            checkpointing=False,
            selected_units=units,
            projection=ProjectionSpec(),
            task="causal-lm",
            max_rows=32,
            row_tokens=ROW_TOKENS,
            adapters=[adapter],
        ).to_dict()
    if not args.load_only:
        rows = completion_rows(loaded.tokenizer, max(1, args.tokens // ROW_TOKENS), seed=2)
        examples = [Example(p, c) for p, c, _ in rows]
        encoded = encode_examples(loaded.tokenizer, examples, "causal-lm", ROW_TOKENS)
        pad = pad_token_id(loaded.tokenizer)
        (batch,) = iter_batches(encoded, pad, "causal-lm", 32, max_tokens=args.tokens)
        featurizer = Featurizer(loaded.model, units, ProjectionSpec())
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS: the batch's own peak
        seconds, _ = common.timed(lambda: featurizer.featurize(batch, head_chunk_tokens=HEAD_CHUNK_TOKENS))
        batch_peak = _status_kib("VmHWM") / 1024
        result |= {"tokens": int(batch.input_ids.numel()), "rows": len(batch), "batch_s": seconds}
        result |= {
            "batch_peak_mib": batch_peak,
            "peak_mib": max(batch_peak, result["peak_after_load_mib"]),
            "batch_over_loaded_mib": batch_peak - loaded_kib / 1024,
            "peak_over_start_mib": batch_peak - result["rss_start_mib"],
        }
        if result["estimate"] is not None:
            estimate = result["estimate"]
            result["estimate_mib"] = estimate["total_bytes"] / 2**20
            result["estimate_over_measured"] = result["estimate_mib"] / result["peak_over_start_mib"]
            batch_estimate = estimate["total_bytes"] - estimate["weights_bytes"]
            result["estimate_batch_over_measured"] = batch_estimate / 2**20 / result["batch_over_loaded_mib"]
    if result["estimate"] is not None:
        result["estimate_weights_mib"] = result["estimate"]["weights_bytes"] / 2**20
    print(json.dumps(result))


def rss(shape: str, dtype: str, budgets: list[int], args, load_only: bool = False) -> list[dict[str, Any]]:
    """peak_child in a fresh process per budget (one, measuring the load alone, with `load_only`)."""
    out = []
    for budget in budgets[:1] if load_only else budgets:
        command = [sys.executable, "-m", "bench.llm", "peak", "--shape", shape, "--dtype", dtype]
        command += ["--tokens", str(budget), "--threads", str(args.threads)]
        command += ["--load-only"] if load_only else []
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        common.log(f"{shape} {dtype} {'load' if load_only else budget}: {result}")
        out.append(result)
    return out


def matmul_rates(threads: int) -> dict[str, float]:
    """GFLOP/s of one block-shaped matrix product (128 x 896 by 896 x 4,864) per dtype, best of 3: a CPU
    without native bfloat16 (AVX-512 BF16, AMX) runs bfloat16 products far slower than float32."""
    import torch

    torch.set_num_threads(threads)
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(128, 896, dtype=dtype), torch.randn(896, 4864, dtype=dtype)
        best = min(common.timed(lambda a=a, b=b: a @ b)[0] for _ in range(3))
        rates[str(dtype).removeprefix("torch.")] = 2 * 128 * 896 * 4864 / best / 1e9
    rates["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return rates


# ------------------------------------------------------------------------------------------------------ e2e


def _check(response, *expected: int) -> dict[str, Any]:
    if response.status_code not in expected:
        raise SystemExit(
            f"{response.request.method} {response.request.url} -> {response.status_code}: "
            f"{response.text[:2000]}"
        )
    return response.json()


def _wait_job(client, path: str, timeout: float) -> tuple[dict[str, Any], float]:
    """Poll GET `path` (an index, audit or report) until its job ends; (the resource, seconds waited)."""
    started = time.perf_counter()

    def finished():
        body = _check(client.get(path), 200)
        job = body.get("job") or {}
        if job.get("status") in ("failed", "cancelled"):
            raise SystemExit(f"{path}: job {job['status']}: {job.get('error')}")
        return body if job.get("status") == "succeeded" else None

    return common.wait_for(finished, timeout, path), time.perf_counter() - started


def api_process(pid: int) -> dict[str, Any]:
    """The API process after everything ran through it: its resident and peak memory, and whether torch or faiss
    were ever mapped into it (the workers compute; the API validates and forwards)."""
    status = (Path("/proc") / str(pid) / "status").read_text()
    kib = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if line.startswith("Vm")}
    maps = (Path("/proc") / str(pid) / "maps").read_text()
    return {
        "rss_mib": kib["VmRSS"] / 1024,
        "peak_rss_mib": kib["VmHWM"] / 1024,
        "torch_loaded": "libtorch" in maps,
        "faiss_loaded": "_swigfaiss" in maps,
    }


def e2e(shape: str, args) -> dict[str, Any]:
    import httpx

    from influence.loading import load_tokenizer

    model_folder, adapter = shape_folders(shape)
    tokenizer = load_tokenizer(model_folder)
    train = completion_rows(tokenizer, args.e2e_rows, seed=3, noisy_share=0.2)
    held_out = completion_rows(tokenizer, args.queries + args.reference, seed=4)
    records = "".join(json.dumps({"prompt": p, "completion": c, "noisy": n}) + "\n" for p, c, n in train)
    env = {
        "INFLUENCE_DEVICE": "cpu",
        "INFLUENCE_MAX_TOKENS_PER_BATCH": str(args.e2e_tokens),
        "INFLUENCE_HEAD_CHUNK_TOKENS": str(HEAD_CHUNK_TOKENS),
        "INFLUENCE_COMPUTE_DTYPE": args.e2e_dtype,
        "INFLUENCE_MAX_LENGTH": str(ROW_TOKENS),
        # The build's fidelity sample (the service's defaults: 64 + 16 rows) costs what index rows cost; the
        # service sizes it to its 4 GiB measurement limit (one training row per pass, fewer query rows).
        "INFLUENCE_FIDELITY_TRAIN_ROWS": str(args.fidelity_rows),
        "INFLUENCE_FIDELITY_QUERY_ROWS": str(args.fidelity_query_rows),
        "INFLUENCE_QUERY_TIMEOUT_S": "1800",
        "INFLUENCE_DATABASE_URL": None,
        "INFLUENCE_BROKER_URL": None,
        "INFLUENCE_ARTIFACTS_DIR": None,
    }
    result: dict[str, Any] = {
        "shape": shape,
        "rows": len(train),
        "noisy_rows": sum(n for *_, n in train),
        "env": {k: v for k, v in env.items() if v is not None},
    }
    folder = Path(tempfile.mkdtemp(prefix="llm-e2e-", dir=common.WORK))
    port = free_port()
    service = start_service(
        port,
        data_dir=folder / "var",
        allowed_roots=[model_folder.parent],
        log_path=folder / "service.log",
        env=env,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=1800.0) as client:

            def call(path: str, expected: int, **request: Any) -> tuple[float, dict[str, Any]]:
                return common.timed(lambda: _check(client.post(path, **request), expected))

            def ready() -> bool:
                try:
                    return client.get("/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            common.wait_for(ready, 300, "the service")
            key = (folder / "var" / "local-api-key").read_text().strip()
            client.headers["Authorization"] = f"Bearer {key}"
            body = {"name": shape, "source": str(model_folder), "adapter": str(adapter), "task": "causal-lm"}
            result["register_model_s"], model = call("/v1/models", 201, json=body)
            result["model"] = {k: model[k] for k in ("num_layers", "num_blocks", "memory_estimate")}
            fields = {"task": "causal-lm", "text_column": "prompt", "label_column": "completion"}
            upload = {
                "files": {"file": ("rows.jsonl", records.encode())},
                "data": fields | {"noisy_column": "noisy"},
            }
            result["register_dataset_s"], dataset = call("/v1/datasets", 201, **upload)
            common.log(f"e2e {shape}: registered; building an index over {len(train)} rows")
            body = {"model_id": model["id"], "dataset_id": dataset["id"], "layers": LORA_HEAD}
            body |= {"max_length": ROW_TOKENS, "chunk_size": max(1, len(train) // 2)}
            _, created = call("/v1/indexes", 202, json=body)
            index, seconds = _wait_job(client, f"/v1/indexes/{created['id']}", 4 * 3600)
            result["build"] = {
                "wall_s": seconds,
                "rows_per_s": len(train) / seconds,
                "units": len(index["layers"]),
                "projection": {k: v for k, v in index["projection"].items() if k != "units"},
                "size_bytes": index["size_bytes"],
                "feature_bytes_per_row": index["feature_bytes_estimate"] / len(train),
                "fidelity": {k: v for k, v in (index.get("fidelity") or {}).items() if k != "units"},
            }
            common.log(f"e2e {shape}: built in {seconds:.0f}s; querying")
            examples = [{"text": p, "label": c} for p, c, _ in held_out]
            query = {"estimator": "grad-dot", "aggregation": "rank", "top_k": 10, "direction": "both"}
            path = f"/v1/indexes/{index['id']}/query"
            # The warm-up loads the model on the query worker; then one example per query, timed by the client.
            warm, _ = call(
                path, 200, json=query | {"examples": [{"text": train[0][0], "label": train[0][1]}]}
            )
            latencies, served = [], []
            for example in examples[: args.queries]:
                seconds, answer = call(path, 200, json=query | {"examples": [example]})
                assert len(answer["results"][0]["helpful"]) == min(10, len(train))
                latencies.append(seconds)
                served.append(answer.get("seconds"))
            result["query"] = {
                "warm_up_s": warm,
                "p50_s": common.percentile(latencies, 50),
                "p95_s": common.percentile(latencies, 95),
                "latencies_s": latencies,
                "answer_seconds": served,
            }
            reference = {"examples": examples[args.queries :]}
            common.log(f"e2e {shape}: audit and layer report")
            _, audit = call(f"/v1/indexes/{index['id']}/audits", 202, json={"reference": reference})
            audit, seconds = _wait_job(client, f"/v1/audits/{audit['id']}", 3600)
            result["audit"] = {"wall_s": seconds, "summary": audit["summary"]}
            body = {"reference": reference, "cancellation_rows": args.cancellation_rows}
            _, report = call(f"/v1/indexes/{index['id']}/reports", 202, json=body)
            report, seconds = _wait_job(client, f"/v1/reports/{report['id']}", 3600)
            result["report"] = {"wall_s": seconds, "summary": report["summary"]}
            result["api_process"] = api_process(service.pid)
    finally:
        stop_service(service)
        if args.keep_e2e:
            common.log(f"e2e data and log kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["peak"]:
        peak_child(argv[1:])
        return
    parser = common.argument_parser("llm", __doc__)
    parser.add_argument("--parts", default="library,rss,e2e", help="library, rss, e2e (comma-separated)")
    parser.add_argument("--shapes", default="qwen2-0.5b", help=f"of {', '.join(SHAPES)} (comma-separated)")
    parser.add_argument("--dtypes", default="float32", help="library and rss: compute dtypes")
    parser.add_argument(
        "--load-dtypes", default="bfloat16", help="rss: dtypes whose load alone is measured (no batch)"
    )
    parser.add_argument("--rows", type=int, default=4, help="library: rows each method featurizes a round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ratio-tokens", type=int, default=1024, help="library: max_tokens_per_batch")
    parser.add_argument("--budgets", default="1024,2048,4096", help="rss: max_tokens_per_batch values")
    parser.add_argument("--e2e-shape", default="qwen2-0.5b", choices=tuple(SHAPES))
    parser.add_argument("--e2e-rows", type=int, default=32)
    parser.add_argument("--e2e-tokens", type=int, default=2048, help="e2e: INFLUENCE_MAX_TOKENS_PER_BATCH")
    parser.add_argument("--e2e-dtype", default="float32", help="e2e: INFLUENCE_COMPUTE_DTYPE")
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument(
        "--reference", type=int, default=4, help="e2e: reference examples of audit and report"
    )
    parser.add_argument("--fidelity-rows", type=int, default=64, help="e2e: INFLUENCE_FIDELITY_TRAIN_ROWS")
    parser.add_argument(
        "--fidelity-query-rows", type=int, default=16, help="e2e: INFLUENCE_FIDELITY_QUERY_ROWS"
    )
    parser.add_argument(
        "--cancellation-rows", type=int, default=4, help="e2e: the report's cancellation_rows"
    )
    parser.add_argument("--keep-e2e", action="store_true", help="keep the e2e service's data folder and log")
    args = parser.parse_args(argv)
    parts, shapes = set(args.parts.split(",")), args.shapes.split(",")
    dtypes, load_dtypes = args.dtypes.split(","), [d for d in args.load_dtypes.split(",") if d]
    if args.quick:
        shapes, dtypes, args.rounds, parts = shapes[:1], dtypes[:1], 1, parts - {"rss"}
        args.e2e_rows, args.queries = min(args.e2e_rows, 16), min(args.queries, 3)
    budgets = common.sizes(args.budgets)
    common.set_threads(args.threads)
    common.WORK.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict[str, Any] = {"machine": common.machine(), "matmul_gflops": matmul_rates(args.threads)}
    result |= {"row_tokens": ROW_TOKENS, "library": [], "rss": []}
    for shape in {*shapes, *([args.e2e_shape] if "e2e" in parts else [])}:
        shape_folders(shape)
    for shape in shapes:
        for dtype in dtypes:
            if "library" in parts:
                result["library"].append(library(shape, dtype, args))
            if "rss" in parts:
                result["rss"].extend(rss(shape, dtype, budgets, args))
        for dtype in load_dtypes if "rss" in parts else ():
            result["rss"].extend(rss(shape, dtype, budgets, args, load_only=True))
    if "e2e" in parts:
        result["e2e"] = e2e(args.e2e_shape, args)
    result["wall_s"] = time.perf_counter() - started
    common.emit("llm", result, args.quick, headline(result))


def headline(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"wall_s": result["wall_s"], "load_1min": common.load_average()[0]}
    for entry in result["library"]:
        out[f"{entry['shape']}/{entry['dtype']}"] = {
            "floor_rows_per_s": entry["rates"]["floor"]["rows_per_s"]["median"],
            **{f"ratio_{name}": value["median"] for name, value in entry["ratio_to_floor"].items()},
        }
    for entry in result["rss"]:
        key = f"{entry['shape']}/{entry['dtype']}/{entry.get('tokens', 'load')}"
        if "tokens" in entry:
            out[key] = {
                "weights_and_batch_mib": entry["peak_over_start_mib"],
                "estimate_mib": entry.get("estimate_mib"),
            }
        else:
            out[key] = {
                "weights_mib": entry["weights_mib"],
                "estimate_mib": entry.get("estimate_weights_mib"),
            }
    if "e2e" in result:
        e2e_result = result["e2e"]
        out["e2e"] = {
            "rows": e2e_result["rows"],
            "build_s": e2e_result["build"]["wall_s"],
            "query_p50_s": e2e_result["query"]["p50_s"],
            "audit_s": e2e_result["audit"]["wall_s"],
            "report_s": e2e_result["report"]["wall_s"],
            "api_rss_mib": e2e_result["api_process"]["rss_mib"],
            "api_torch_loaded": e2e_result["api_process"]["torch_loaded"],
        }
    return out


if __name__ == "__main__":
    main()
