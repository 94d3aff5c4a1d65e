"""Item 1: featurization throughput (rows/s) as a ratio to the forward + backward floor, side by side with peers.

    python -m bench.featurize                 # 512 SST-2 rows, 5 rounds, every method, bergson if its venv exists
    python -m bench.featurize --quick         # 128 rows, 5 rounds, no batch-of-one + embedding loop: one JSON line
    python -m bench.featurize --small-batches # item 6, fourth round: small batches (a query's examples) on one
                                              # intra-op thread (influence.threads) vs on all, by batch shape

Methods, all on the same pre-tokenized rows (max length 128, tokenization excluded from every timing), the
packaged MiniLM + LoRA r = 4 (query, value) + classifier head, eval mode (dropout off), float32, CPU:

  floor         plain forward + loss.backward() in batches of 32 sorted by length, parameter gradients of the
                trainable parameters only (LoRA A/B and the head), as LoRA training computes them
  ours-lora     influence.Featurizer, 24 LoRA units + the classifier head, factorized projection, dim 256
  ours-all      influence.Featurizer, all 63 units (word embedding, every Linear, LoRA, pooler, head), dim 256
  ours-auto-*   the same two unit sets under the default projection `auto` (issue 12): LoRA and head exact
                (identity), the word embedding as exact token rows, the other units factorized 256
  vmap          torch.func vmap(grad) of each row's loss over the LoRA and head parameters, batches of 32 sorted
                by length, a prebuilt 4-D additive attention mask (the 2-D mask path breaks vmap); raw gradients
  loop          the paper's batch of one: zero_grad, forward, backward, copy the LoRA and head gradients
  loop+emb      the same, also copying the word-embedding gradient (30522 x 384 per row)
  bergson       bergson 2.5.1's GradientCollector (hooks), 16 x 16 projection per module, LoRA modules only, no
                head and no embedding, run in its own virtual environment (/tmp/bergson-venv) by
                bench/_bergson_runner.py, which times its own floor side by side in that process

Each round runs every method once, in a shuffled order; a method's rate is rows / seconds, its ratio is its rate
over the floor's rate of the same round, and the figures are the medians over rounds.

Checks (where comparable): ours against the batch-of-one loop's exact gradients put through the same
projection matrices (LoRA, head and embedding units); vmap against the loop's gradients.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import time
from pathlib import Path

from bench import common
from bench.harness import REPO

BERGSON_PYTHON = Path("/tmp/bergson-venv/bin/python")
BATCH_SIZE = 32
MAX_LENGTH = 128


def prepare(num_rows: int):
    import torch

    from influence import discover_layers, select_layers
    from influence.data import encode_examples, iter_batches, pad_token_id

    loaded = common.load_lora_model()
    model, tokenizer = loaded.model, loaded.tokenizer
    examples = common.sst2_examples("train", limit=num_rows)
    encoded = encode_examples(tokenizer, examples, "classification", MAX_LENGTH)
    pad = pad_token_id(tokenizer)
    batches = list(iter_batches(encoded, pad, "classification", BATCH_SIZE, sort_by_length=True))
    unsorted = list(iter_batches(encoded, pad, "classification", BATCH_SIZE, sort_by_length=False))
    layers = discover_layers(model)
    lora_head = select_layers(layers, common.LORA_HEAD_SELECTOR)
    tokens = [len(e.input_ids) for e in encoded]

    def grid(bs):
        return sum(b.input_ids.numel() for b in bs)

    info = {
        "rows": len(encoded),
        "mean_tokens": sum(tokens) / len(tokens),
        "max_tokens": max(tokens),
        "batch_size": BATCH_SIZE,
        "max_length": MAX_LENGTH,
        "padding_waste_sorted": 1 - sum(tokens) / grid(batches),
        "padding_waste_unsorted": 1 - sum(tokens) / grid(unsorted),
        "units_lora_head": len(lora_head),
        "units_all": len(layers),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
    }
    return model, encoded, batches, layers, lora_head, info


# ---------------------------------------------------------------------------------------------- methods


def run_floor(model, batches) -> None:
    for batch in batches:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
        out.loss.backward()


def make_ours(model, layers, kind: str = "factorized"):
    from influence import Featurizer, ProjectionSpec
    from influence.tokens import TokenRows

    featurizer = Featurizer(model, layers, ProjectionSpec(kind, 256, seed=0))

    def run(batches):
        out = []
        for batch in batches:
            result = featurizer.featurize(batch)
            out.append(
                {
                    name: value if isinstance(value, TokenRows) else value.numpy()
                    for name, value in result.features.items()
                }
            )
        return out

    return featurizer, run


def make_vmap(model, params: dict):
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    names = list(params)

    def loss_fn(p, ids, mask, label):
        out = functional_call(
            model, p, args=(), kwargs={"input_ids": ids[None], "attention_mask": mask[None]}
        )
        return F.cross_entropy(out.logits, label[None])

    per_sample = vmap(grad(loss_fn), in_dims=(None, 0, 0, 0))
    detached = {name: params[name].detach() for name in names}

    def run(batches):
        out = []
        for batch in batches:
            mask = batch.attention_mask[:, None, None, :].to(torch.float32)
            additive = (1.0 - mask) * torch.finfo(torch.float32).min
            grads = per_sample(detached, batch.input_ids, additive, batch.labels)
            out.append({name: grads[name].reshape(len(batch), -1) for name in names})
        return out

    return run


def make_loop(model, params: dict, rows, with_embedding: bool):
    import torch

    embedding = model.get_input_embeddings().weight

    def run(chosen=None):
        out = []
        chosen = rows if chosen is None else chosen
        embedding.requires_grad_(with_embedding)
        try:
            for row in chosen:
                model.zero_grad(set_to_none=True)
                ids = torch.tensor([row.input_ids])
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                loss = torch.nn.functional.cross_entropy(logits, torch.tensor([row.label]))
                loss.backward()
                copied = {name: p.grad.detach().clone().reshape(-1) for name, p in params.items()}
                if with_embedding:
                    copied["embed"] = embedding.grad.detach().clone()
                out.append(copied)
        finally:
            embedding.requires_grad_(False)
            embedding.grad = None
        return out

    return run


# ----------------------------------------------------------------------------------------------- checks


def _rel(a, b) -> float:
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def check_outputs(model, encoded, batches, featurizer_all, lora_head, params, loop_emb, vmap_run) -> dict:
    """Ours vs the loop's exact gradients projected with the same matrices; vmap vs the loop."""
    import torch

    from influence.layers import get_module

    sample_batches = batches[:2]
    rows = [int(i) for b in sample_batches for i in b.row_ids]
    loop_out = loop_emb_for_rows(loop_emb, encoded, rows)
    ours = {}
    for batch in sample_batches:
        result = featurizer_all.featurize(batch)
        for j, row in enumerate(batch.row_ids.tolist()):
            ours[row] = {name: value[j] for name, value in result.features.items()}
    # map parameter names to units
    unit_params = {}
    for layer in featurizer_all.layers:
        module = get_module(model, layer)
        for pname, p in params.items():
            if any(p is q for q in module.parameters(recurse=False)):
                unit_params.setdefault(layer.name, {})[pname.rsplit(".", 1)[-1]] = pname
    errors = {}
    for name, names in unit_params.items():
        if name not in {layer.name for layer in lora_head}:
            continue
        projector = featurizer_all.projectors[name]
        p_out, p_in = projector.matrices(torch.float64, "cpu")
        worst = 0.0
        for row in rows:
            g = loop_out[row][names["weight"]].double().reshape(projector.layer.out_features, -1)
            if "bias" in names:
                g = torch.cat([g, loop_out[row][names["bias"]].double()[:, None]], dim=1)
            if p_out is not None:
                g = p_out @ g
            if p_in is not None:
                g = g @ p_in.T
            worst = max(worst, _rel(ours[row][name], g.reshape(-1)))
        errors[name] = worst
    # the word embedding
    projector = featurizer_all.projectors["embed"]
    p_out, p_in = projector.matrices(torch.float64, "cpu")
    emb_worst = 0.0
    for row in rows:
        g = loop_out[row]["embed"].double()  # (vocab, 384)
        expected = p_out @ g.T @ p_in.T
        emb_worst = max(emb_worst, _rel(ours[row]["embed"], expected.reshape(-1)))
    # vmap vs loop
    vmap_out = vmap_run(sample_batches)
    vmap_worst = 0.0
    for batch, grads in zip(sample_batches, vmap_out, strict=True):
        for j, row in enumerate(batch.row_ids.tolist()):
            for pname in params:
                vmap_worst = max(vmap_worst, _rel(grads[pname][j], loop_out[row][pname]))
    return {
        "rows_checked": len(rows),
        "ours_vs_loop_projected_max_rel_err_lora_head": max(errors.values()),
        "ours_vs_loop_projected_max_rel_err_embedding": emb_worst,
        "vmap_vs_loop_max_rel_err": vmap_worst,
        "units_checked": len(errors) + 1,
    }


def loop_emb_for_rows(loop_emb, encoded, rows):
    out = loop_emb([encoded[i] for i in rows])
    return dict(zip(rows, out, strict=True))


# ---------------------------------------------------------------------------------------------- bergson


def run_bergson(encoded, rounds: int, layers_note: str) -> dict:
    """bench/_bergson_runner.py in bergson's own virtual environment, on the same token ids."""
    from influence import packaged_minilm_path

    if not BERGSON_PYTHON.exists():
        return {"status": "not run", "why": f"{BERGSON_PYTHON} does not exist (see docs/benchmarks.md)"}
    payload = common.WORK / "bergson-rows.json"
    payload.write_text(
        json.dumps(
            {
                "rows": [[e.input_ids, e.label] for e in encoded],
                "adapter": str(common.lora_adapter()),
                "base": str(packaged_minilm_path()),
            }
        )
    )
    command = [
        str(BERGSON_PYTHON),
        str(Path(__file__).with_name("_bergson_runner.py")),
        str(payload),
        "--rounds",
        str(rounds),
        "--batch-size",
        str(BATCH_SIZE),
    ]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=REPO)
    if proc.returncode != 0:
        return {"status": "failed", "why": proc.stderr.strip().splitlines()[-5:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["status"] = "ok"
    result["wall_s"] = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------------------------------- main


# (rows, words of "good"): a batch of `rows` identical sentences, padded length words + 2 ([CLS], [SEP]).
SMALL_BATCH_SHAPES = [(1, 10), (1, 40), (1, 120), (2, 10), (4, 10), (8, 10), (16, 10), (32, 10), (4, 40)]


def small_batches(repeats: int) -> dict:
    """Featurizer.featurize of the 12 LoRA B units (the query benchmark's layers) on batches of (rows, words):
    on influence.threads' one-thread worker vs inline on all intra-op threads, alternating, medians in ms; and
    the way the process' own measurement (on its first small batch) chose."""
    import statistics

    import torch

    from bench.query import LAYERS
    from influence import Featurizer, ProjectionSpec, discover_layers
    from influence.data import Example, encode_examples, iter_batches, pad_token_id
    from influence.threads import ONE_THREAD, is_small_batch

    loaded = common.load_lora_model()
    by_name = {layer.name: layer for layer in discover_layers(loaded.model)}
    featurizer = Featurizer(loaded.model, [by_name[n] for n in LAYERS], ProjectionSpec("factorized", 256, seed=0))
    pad = pad_token_id(loaded.tokenizer)
    cpu = torch.device("cpu")
    ways = {
        "one-thread": lambda batch: ONE_THREAD.on_worker(featurizer._featurize, batch, cpu),
        "all-threads": lambda batch: featurizer._featurize(batch, cpu),
    }
    rows_out = []
    for rows, words in SMALL_BATCH_SHAPES:
        examples = [Example(" ".join(["good"] * words), label=1) for _ in range(rows)]
        encoded = encode_examples(loaded.tokenizer, examples, "classification", MAX_LENGTH)
        batch = next(iter(iter_batches(encoded, pad, "classification", 64, sort_by_length=True)))
        if ONE_THREAD.one_thread_pays is None:
            featurizer.featurize(batch)  # the process decides on its first small batch, as a server does
        times: dict[str, list[float]] = {way: [] for way in ways}
        for i in range(repeats + 1):
            for way in ("one-thread", "all-threads") if i % 2 else ("all-threads", "one-thread"):
                seconds, _ = common.timed(lambda way=way, batch=batch: ways[way](batch))
                if i:  # the first pass of each shape is a warm-up
                    times[way].append(seconds)
        median = {way: 1000 * statistics.median(v) for way, v in times.items()}
        shape = tuple(batch.input_ids.shape)
        rows_out.append(
            {
                "rows": shape[0],
                "length": shape[1],
                "tokens": shape[0] * shape[1],
                "ms_one_thread": median["one-thread"],
                "ms_all_threads": median["all-threads"],
                "all_over_one": median["all-threads"] / median["one-thread"],
                "small_batch": is_small_batch(*shape),
            }
        )
        common.log(f"{shape}: one thread {median['one-thread']:.1f} ms, all {median['all-threads']:.1f} ms")
    return {
        "shapes": rows_out,
        "repeats": repeats,
        "process_chose_one_thread": ONE_THREAD.one_thread_pays,
        "process_calibration_s": ONE_THREAD.calibration,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.featurize", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 rows, one JSON line")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loop-rows", type=int, default=None, help="rows for the batch-of-one loops")
    parser.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    parser.add_argument("--no-bergson", action="store_true")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--small-batches", action="store_true", help="one intra-op thread vs all, small batches")
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    import torch

    if args.small_batches:
        measured = small_batches(repeats=15 if args.quick else 41)
        result = {"machine": common.machine(), "threads": torch.get_num_threads(), **measured}
        headline = {f"{r['rows']}x{r['length']}_all_over_one": r["all_over_one"] for r in measured["shapes"]}
        headline["process_chose_one_thread"] = measured["process_chose_one_thread"]
        headline["load_1min"] = common.load_average()[0]
        common.emit("featurize-small-batches", result, args.quick, headline)
        return

    num_rows = args.rows or (128 if args.quick else 512)
    loop_rows = args.loop_rows or (64 if args.quick else 256)
    started_load = common.load_average()
    model, encoded, batches, layers, lora_head, info = prepare(num_rows)
    common.training_trainables(model)  # requires_grad on LoRA A/B and the head, as in LoRA training
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    _featurizer_lora, ours_lora = make_ours(model, lora_head)
    featurizer_all, ours_all = make_ours(model, layers)
    _, auto_lora = make_ours(model, lora_head, "auto")  # issue 12's default: LoRA and head exact (identity)
    _, auto_all = make_ours(model, layers, "auto")  # + the embedding as exact token rows, the rest factorized
    vmap_run = make_vmap(model, params)
    loop_emb = make_loop(model, params, encoded, with_embedding=True)
    # loops run over a spread of rows: every k-th row of the input order, so lengths are representative
    step = max(1, len(encoded) // loop_rows)
    loop_sample = encoded[::step][:loop_rows]
    loop_run = make_loop(model, params, loop_sample, with_embedding=False)
    loop_emb_run = make_loop(model, params, loop_sample, with_embedding=True)

    methods = {
        "floor": (lambda: run_floor(model, batches), len(encoded)),
        "ours-lora": (lambda: ours_lora(batches), len(encoded)),
        "ours-all": (lambda: ours_all(batches), len(encoded)),
        "ours-auto-lora": (lambda: auto_lora(batches), len(encoded)),
        "ours-auto-all": (lambda: auto_all(batches), len(encoded)),
        "vmap": (lambda: vmap_run(batches), len(encoded)),
        "loop": (lambda: loop_run(), len(loop_sample)),
    }
    if not args.quick:
        methods["loop+emb"] = (lambda: loop_emb_run(), len(loop_sample))

    common.log(f"{len(encoded)} rows, {len(batches)} batches; warm-up")
    for fn, _ in methods.values():
        fn()
    rates: dict[str, list[float]] = {name: [] for name in methods}
    ratios: dict[str, list[float]] = {name: [] for name in methods if name != "floor"}
    rng = random.Random(0)
    loads = []
    for r in range(args.rounds):
        order = list(methods)
        rng.shuffle(order)
        this = {}
        for name in order:
            fn, count = methods[name]
            seconds, _ = common.timed(fn)
            this[name] = count / seconds
        for name, rate in this.items():
            rates[name].append(rate)
            if name != "floor":
                ratios[name].append(rate / this["floor"])
        loads.append(common.load_average()[0])
        common.log(f"round {r + 1}: " + ", ".join(f"{k} {v:.0f}/s" for k, v in this.items()))

    check = (
        {}
        if args.no_check
        else check_outputs(model, encoded, batches, featurizer_all, lora_head, params, loop_emb, vmap_run)
    )
    bergson = (
        {"status": "skipped"} if args.no_bergson or args.quick else run_bergson(encoded, args.rounds, "lora")
    )
    result = {
        "setup": info,
        "loop_rows": len(loop_sample),
        "machine": common.machine(),
        "load_at_start": started_load,
        "load_1min_per_round": loads,
        "rows_per_s": {name: common.summary(v) for name, v in rates.items()},
        "ratio_to_floor": {name: common.summary(v) for name, v in ratios.items()},
        "check": check,
        "bergson": bergson,
        "targets": {
            "ours-lora >= 0.85": None,
            "ours-all >= 0.75": None,
        },
    }
    lora_ratio = result["ratio_to_floor"]["ours-lora"]["median"]
    all_ratio = result["ratio_to_floor"]["ours-all"]["median"]
    result["targets"] = {"ours-lora >= 0.85": lora_ratio >= 0.85, "ours-all >= 0.75": all_ratio >= 0.75}
    headline = {
        "rows": len(encoded),
        "rounds": args.rounds,
        "load_1min": common.load_average()[0],
        "floor_rows_per_s": result["rows_per_s"]["floor"]["median"],
        "ratio_ours_lora_head": lora_ratio,
        "ratio_ours_all_layers": all_ratio,
        "ratio_vmap": result["ratio_to_floor"]["vmap"]["median"],
        "ratio_loop": result["ratio_to_floor"]["loop"]["median"],
        "max_rel_err_vs_loop": max(
            (v for k, v in check.items() if k.endswith("rel_err") or "rel_err" in k), default=None
        ),
    }
    if "loop+emb" in ratios:
        headline["ratio_loop_emb"] = result["ratio_to_floor"]["loop+emb"]["median"]
    if bergson.get("status") == "ok":
        headline["ratio_bergson"] = bergson["ratio_to_floor"]["median"]
    del torch
    common.emit("featurize", result, args.quick, headline)


if __name__ == "__main__":
    main()
