# Over 600 lines: the whole reproduction (stages, caches, the summary and its markdown) as one script a clone runs.
"""Reproduce the paper's layer / aggregation study (Vitel & Chhabra, ICLR 2026) on real SST-2 with the packaged MiniLM.

Protocol (method.md §6, scaled to this machine): per seed s,

1. 4,500 stratified SST-2 training rows (fixed subsample, seed 0) with 20% of labels flipped (noise seed s);
2. LoRA r = 4, alpha = 4, dropout 0.05 on query and value, the head trained fully; AdamW lr 2e-3, batch 32,
   cosine schedule with 10% warm-up, 3 epochs, max length 64, training seed s; the adapter of the epoch with the
   lowest loss on the reference set is the checkpoint influence is computed at (the paper's choice);
3. 500 stratified validation rows (fixed, seed 0) are the reference ("infl") set; the other 372 are held out;
4. the paper's units (word embedding, the 24 LoRA tensors, the classification head) featurized with the
   library's default projection `auto`: the word embedding exact as token rows, the LoRA tensors and the head
   exact (identity), as the paper's own code keeps them (`--projection factorized`: every unit factorized to
   the default dimension, as this reproduction did before); correctness of each reference prediction;
5. cancellation per unit over 1,000 training rows (exact, raw parameter space);
6. influence.report.layer_report with grad-dot and DataInf, aggregations mean / rank / vote / rank-c / vote-c.

Fine-tunes, features, cancellation and per-seed reports are cached under var/reproduction/ (a rerun only
re-summarises). Results: docs/reproduction/sst2-minilm.json (auto) or sst2-minilm-factorized.json, and
docs/reproduction.md (the auto run, compared with the factorized one when its JSON is there).

    python scripts/reproduce_paper.py --seeds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: the repository's packages (influence, bench)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.harness import SST2 as SST2  # noqa: E402  (the data this script reads: tests/test_self_contained.py)
from bench.harness import cpu_name, sst2_reproduction_split  # noqa: E402
from influence.report.results import jsonable  # noqa: E402

CACHE = ROOT / "var" / "reproduction"
DOCS_JSONS = {
    "auto": ROOT / "docs" / "reproduction" / "sst2-minilm.json",
    "factorized": ROOT / "docs" / "reproduction" / "sst2-minilm-factorized.json",
}
PROJECTION_TEXT = {
    "auto": "the default projection `auto`: the word embedding exact as token rows (per row, its distinct tokens "
    "with their gradient rows), the LoRA tensors and the head exact (identity): no unit is compressed",
    "factorized": "the factorized projection (256 dimensions per unit)",
}
DOCS_MD = ROOT / "docs" / "reproduction.md"

N_TRAIN = 4500
N_REFERENCE = 500
NOISE_RATE = 0.2
SUBSAMPLE_SEED = 0
MAX_LENGTH = 64
EPOCHS = 3
LR = 2e-3
BATCH = 32
CANCELLATION_ROWS = 1000
ESTIMATORS = ("grad-dot", "datainf")
AGGREGATIONS = ("mean", "rank", "vote", "rank-c", "vote-c")
TABLE_AGGREGATIONS = ("mean", "rank-c", "vote-c")
# The paper's units for a LoRA classifier: WE, every LoRA tensor, the (fully trained) classification head.
# BERT's pooler sits before the head but is frozen here (not in modules_to_save), so it is not a paper unit.
LAYER_SELECTOR = ["WE", "role:lora", "head"]
FORMAT = 1
STARTED = time.perf_counter()


def say(text: str = "") -> None:
    print(f"[{time.perf_counter() - STARTED:6.0f}s] {text}", flush=True)


def machine() -> str:
    cpu = cpu_name() or "cpu"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads, {device}; Python {platform.python_version()}, {platform.system()}"
    )


# ------------------------------------------------------------------------------------------------ data


def load_data():
    """(train (4,500 clean), reference (500), held-out (rest of validation)) as influence Examples."""
    train, _, reference, held_out = sst2_reproduction_split(N_TRAIN, N_REFERENCE, seed=SUBSAMPLE_SEED)
    return train, reference, held_out


def noisy_train(train, seed: int):
    from influence import inject_label_noise

    labels, mask = inject_label_noise([e.label for e in train], NOISE_RATE, seed=seed, num_classes=2)
    examples = [dataclasses.replace(e, label=int(y)) for e, y in zip(train, labels, strict=True)]
    return examples, mask


# ---------------------------------------------------------------------------------------------- stages


def finetune(seed: int, train, mask, reference):
    from influence import LoraSettings, TrainSettings, finetune_lora, packaged_minilm_path

    started = time.perf_counter()
    last = [started]

    def progress(info: dict) -> None:
        now = time.perf_counter()
        if info["step"] == info["total_steps"] or now - last[0] > 30:
            last[0] = now
            say(
                f"  seed {seed}: fine-tune epoch {info['epoch']}/{EPOCHS}, step {info['step']}/"
                f"{info['total_steps']}, loss {info['loss']:.3f}"
            )

    result = finetune_lora(
        packaged_minilm_path(),
        train,
        CACHE / f"seed-{seed}" / "finetune",
        eval_set=reference,
        lora=LoraSettings(r=4, alpha=4, dropout=0.05, target_modules=("query", "value")),
        train_settings=TrainSettings(
            epochs=EPOCHS, lr=LR, batch_size=BATCH, max_length=MAX_LENGTH, warmup_ratio=0.1, seed=seed
        ),
        noisy_mask=mask,
        progress=progress,
    )
    record = json.loads((result.out_dir / "training.json").read_text())
    for e in result.epochs:
        say(
            f"  seed {seed}: epoch {e.epoch}: train loss {e.train_loss:.3f}, reference loss {e.eval_loss:.3f}, "
            f"accuracy {e.eval_accuracy:.3f}"
        )
    say(
        f"  seed {seed}: fine-tune {'reused from cache' if result.reused else 'done'} "
        f"({record['total_seconds']:.0f}s when computed), best epoch {result.best_epoch}"
    )
    return result, record


def projection_spec(name: str):
    from influence import DEFAULT_DIM, ProjectionSpec

    return ProjectionSpec(name, DEFAULT_DIM, seed=0)


def features(seed: int, result, train, reference, held_out, projection_name: str):
    """Features of the paper's units, reference correctness, cancellation; cached in var/reproduction."""
    from influence import (
        Featurizer,
        discover_layers,
        encode_examples,
        featurize_examples,
        iter_batches,
        layer_cancellation,
        load_model,
        packaged_minilm_path,
        predict,
        select_layers,
    )
    from influence.data import pad_token_id
    from influence.featurize import feature_arrays, features_from_arrays

    folder = CACHE / f"seed-{seed}" / projection_name
    projection = projection_spec(projection_name)
    key = {
        "format": FORMAT,
        "finetune": result.settings_hash,
        "best_epoch": result.best_epoch,
        "projection": projection.to_dict(),
        "selector": LAYER_SELECTOR,
        "max_length": MAX_LENGTH,
        "cancellation_rows": CANCELLATION_ROWS,
        "n_train": len(train),
        "n_reference": len(reference),
    }
    loaded = load_model(packaged_minilm_path(), adapter=result.best_adapter)
    layers = select_layers(discover_layers(loaded.model), LAYER_SELECTOR)
    meta_path = folder / "features.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            say(f"  seed {seed}: features, predictions and cancellation reused from cache")
            names = [layer.name for layer in layers]
            with np.load(folder / "train_features.npz") as f:
                train_features = features_from_arrays(f, names)
            with np.load(folder / "reference_features.npz") as f:
                reference_features = features_from_arrays(f, names)
            return layers, train_features, reference_features, meta

    model, tokenizer = loaded.model, loaded.tokenizer
    featurizer = Featurizer(model, layers, projection)
    timings = {}
    started = time.perf_counter()
    last = [started]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] > 30:
            last[0] = now
            say(f"  seed {seed}: featurize {done}/{total} rows ({len(layers)} units)")

    train_set = featurize_examples(
        featurizer,
        tokenizer,
        train,
        "classification",
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        progress=progress,
    )
    reference_set = featurize_examples(
        featurizer,
        tokenizer,
        reference,
        "classification",
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        progress=progress,
    )
    timings["featurize_s"] = time.perf_counter() - started
    reference_labels = np.array([e.label for e in reference])
    correct = reference_set.predictions == reference_labels
    held_predictions, _ = predict(loaded, held_out, batch_size=64, max_length=MAX_LENGTH)
    held_accuracy = float((held_predictions == np.array([e.label for e in held_out])).mean())

    started = time.perf_counter()
    rows = np.random.default_rng(seed).permutation(len(train))[:CANCELLATION_ROWS]
    encoded = encode_examples(tokenizer, [train[i] for i in rows], "classification", MAX_LENGTH)
    batches = iter_batches(encoded, pad_token_id(tokenizer), "classification", BATCH)
    cancellation = layer_cancellation(model, layers, batches, max_samples=CANCELLATION_ROWS)
    timings["cancellation_s"] = time.perf_counter() - started
    say(
        f"  seed {seed}: featurized in {timings['featurize_s']:.0f}s, cancellation in {timings['cancellation_s']:.0f}s"
    )

    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "train_features.npz", **feature_arrays(train_set.features))
    np.savez(folder / "reference_features.npz", **feature_arrays(reference_set.features))
    meta = {
        "key": key,
        "layers": [layer.to_dict() for layer in layers],
        "reference_correct": correct.tolist(),
        "reference_accuracy": float(correct.mean()),
        "held_out_accuracy": held_accuracy,
        "n_held_out": len(held_out),
        "cancellation": {name: dataclasses.asdict(c) for name, c in cancellation.items()},
        "timings": timings,
    }
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, allow_nan=True))
    os.replace(tmp, meta_path)  # last: its presence means the features beside it are complete
    return layers, train_set.features, reference_set.features, meta


def report(seed: int, layers, train_features, reference_features, meta, mask):
    from influence import Cancellation
    from influence.report import layer_report

    folder = CACHE / f"seed-{seed}" / meta["key"]["projection"]["kind"]
    path = folder / "report.json"
    key = {"features": meta["key"], "estimators": ESTIMATORS, "aggregations": AGGREGATIONS, "format": FORMAT}
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            say(f"  seed {seed}: layer report reused from cache")
            return cached["report"], cached["seconds"]
    started = time.perf_counter()
    names = [layer.name for layer in layers]
    result = layer_report(
        train_features,
        reference_features,
        layers=layers,
        noisy=mask,
        reference_correct=np.array(meta["reference_correct"], dtype=bool),
        reference_accuracy=meta["reference_accuracy"],
        estimators=ESTIMATORS,
        aggregations=AGGREGATIONS,
        cancellation={name: Cancellation(**c) for name, c in meta["cancellation"].items()},
        num_classes=2,
        extra_groups={
            "v.lora_B": [n for n in names if n.endswith("attn.v.lora_B")],
            "lora": [n for n in names if ".lora_" in n],
        },
    ).to_dict()
    seconds = time.perf_counter() - started
    say(f"  seed {seed}: layer report in {seconds:.0f}s")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "seconds": seconds, "report": result}))
    os.replace(tmp, path)
    return result, seconds


# --------------------------------------------------------------------------------------------- summary


GROUP_ORDER = [
    "WE",
    "blocks.00-01",
    "blocks.02-03",
    "blocks.04",
    "blocks.05",
    "first",
    "middle",
    "last",
    "CL",
    "total",
    "v.lora_B",
    "lora",
]


def mean_std(values) -> tuple[float, float]:
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(array) == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def fmt(values, digits: int = 3) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def entry_table(reports: list[dict]) -> dict:
    """(estimator, aggregation, layer set name) -> list over seeds of (NDR@30, AUC-NDR)."""
    table: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for rep in reports:
        for e in rep["entries"]:
            key = (e["estimator"], e["aggregation"], e["layers"]["name"])
            table.setdefault(key, []).append((e["ndr"]["30"], e["auc_ndr"]))
    return table


def paired(table, a: tuple, b: tuple) -> dict:
    """AUC-NDR difference a - b per seed, its mean, standard error and verdict."""
    diffs = [x[1] - y[1] for x, y in zip(table[a], table[b], strict=True)]
    mean = float(np.mean(diffs))
    se = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.inf
    if mean > 2 * se and all(d > 0 for d in diffs):
        verdict = "agree"
    elif mean < -2 * se and all(d < 0 for d in diffs):
        verdict = "disagree"
    else:
        verdict = "inconclusive"
    return {"a": list(a), "b": list(b), "diffs": diffs, "mean": mean, "se": se, "verdict": verdict}


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y, strict=True) if a is not None and b is not None]
    if len(pairs) < 3:
        return math.nan
    return float(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)


def summarise(seeds, runs, command: str, wall: float, projection_name: str) -> tuple[dict, str]:
    reports = [run["report"] for run in runs]
    table = entry_table(reports)
    first = reports[0]
    n, n_noisy = first["n_train"], first["n_noisy"]
    random_auc = first["random_baseline"]["auc_ndr"]
    random_auc_std = first["random_baseline"]["auc_ndr_std"]
    random_ndr30 = first["random_baseline"]["ndr"]["30"]
    groups = [g for g in GROUP_ORDER if any(k[2] == g for k in table)]

    comparisons = {"middle_vs_first": [], "rank_vote_vs_mean": []}
    for est in ESTIMATORS:
        for agg in TABLE_AGGREGATIONS:
            for other in ("WE", "first", "last", "CL"):
                comparisons["middle_vs_first"].append(paired(table, (est, agg, "middle"), (est, agg, other)))
        for group in groups:
            for agg in ("rank-c", "vote-c"):
                comparisons["rank_vote_vs_mean"].append(
                    paired(table, (est, agg, group), (est, "mean", group))
                )

    # Claim 3 as far as it is testable without retraining: does low cancellation mark good layers?
    cancel_rho = []
    for rep in reports:
        layers_c = {c["layer"]: c for c in rep["cancellation"]["layers"]}
        for est in ESTIMATORS:
            for agg in TABLE_AGGREGATIONS:
                singles = [
                    e
                    for e in rep["entries"]
                    if e["estimator"] == est and e["aggregation"] == agg and e["layers"]["kind"] == "layer"
                ]
                cancel_rho.append(
                    {
                        "estimator": est,
                        "aggregation": agg,
                        "rho": spearman(
                            [layers_c[e["layers"]["name"]]["l1_over_l1"] for e in singles],
                            [e["auc_ndr"] for e in singles],
                        ),
                    }
                )

    lowest, auc_ranks = 0, []
    for rep in reports:
        layer_c = {c["layer"]: c["l1_over_l1"] for c in rep["cancellation"]["layers"]}
        finite = {k: v for k, v in layer_c.items() if v is not None}
        lowest += min(finite, key=finite.get) == "embed"
        singles = sorted(
            (
                e
                for e in rep["entries"]
                if (e["estimator"], e["aggregation"], e["layers"]["kind"]) == ("grad-dot", "rank-c", "layer")
            ),
            key=lambda e: -e["auc_ndr"],
        )
        auc_ranks.append(1 + [e["layers"]["name"] for e in singles].index("embed"))
    we_cancellation = {"lowest": lowest, "seeds": len(reports), "auc_rank": float(np.mean(auc_ranks))}

    summary = {
        "format": FORMAT,
        "command": command,
        "machine": machine(),
        "wall_seconds": wall,
        "seeds": seeds,
        "protocol": {
            "model": "packaged MiniLM (sentence-transformers/all-MiniLM-L6-v2, 6 blocks), LoRA r=4 alpha=4 "
            "dropout 0.05 on query and value, head trained fully",
            "train_rows": n,
            "noise_rate": NOISE_RATE,
            "reference_rows": N_REFERENCE,
            "max_length": MAX_LENGTH,
            "epochs": EPOCHS,
            "lr": LR,
            "batch_size": BATCH,
            "cancellation_rows": CANCELLATION_ROWS,
            "units": LAYER_SELECTOR,
            "estimators": ESTIMATORS,
            "aggregations": AGGREGATIONS,
        },
        "random_baseline": first["random_baseline"],
        "per_seed": [
            {
                "seed": seed,
                "best_epoch": run["best_epoch"],
                "epochs": run["epochs"],
                "reference_accuracy": run["report"]["reference_accuracy"],
                "held_out_accuracy": run["held_out_accuracy"],
                "seconds": run["seconds"],
                "recommendation": run["report"]["recommendation"],
                "warnings": run["report"]["warnings"],
                "cancellation": run["report"]["cancellation"],
                "entries": [
                    {
                        "estimator": e["estimator"],
                        "aggregation": e["aggregation"],
                        "kind": e["layers"]["kind"],
                        "layers": e["layers"]["name"],
                        "ndr30": e["ndr"]["30"],
                        "auc_ndr": e["auc_ndr"],
                    }
                    for e in run["report"]["entries"]
                ],
            }
            for seed, run in zip(seeds, runs, strict=True)
        ],
        "comparisons": comparisons,
        "cancellation_vs_auc_ndr": cancel_rho,
        "we_cancellation": we_cancellation,
    }

    md = []
    md.append("# Reproduction: layer choice and aggregation on real SST-2 (MiniLM + LoRA)\n")
    md.append(
        "The paper's protocol (Vitel & Chhabra, ICLR 2026, method section 6) scaled to this machine: "
        f"{n:,} stratified SST-2 training rows with {NOISE_RATE:.0%} of labels flipped ({n_noisy} noisy), the "
        "packaged MiniLM (6 blocks) with LoRA r = 4, alpha = 4 on query and value and the head trained fully, "
        f"AdamW lr {LR}, batch {BATCH}, cosine schedule with 10% warm-up, {EPOCHS} epochs, max length {MAX_LENGTH}, "
        f"the epoch with the lowest reference loss; {N_REFERENCE} stratified validation rows as the reference "
        "set. Units: the word embedding (WE), the 24 LoRA tensors and the classification head (CL), featurized "
        f"with {PROJECTION_TEXT[projection_name]}. Produced by `scripts/reproduce_paper.py`; "
        "every number below is what that script measured.\n"
    )
    md.append("```\n" + command + "\n```\n")
    md.append(f"- Machine: {machine()}")
    md.append(f"- Wall time of this invocation: {wall / 60:.1f} min (cached stages are reused, see below)")
    md.append("- Compute time per seed when not cached (fine-tune / featurize / cancellation / report):")
    for seed, run in zip(seeds, runs, strict=True):
        s = run["seconds"]
        md.append(
            f"  - seed {seed}: {s['finetune_s'] / 60:.1f} / {s['featurize_s'] / 60:.1f} / "
            f"{s['cancellation_s'] / 60:.1f} / {s['report_s'] / 60:.1f} min"
        )
    total = sum(sum(run["seconds"].values()) for run in runs)
    md.append(f"  - all seeds together, uncached: {total / 60:.0f} min on this machine")
    md.append("")
    md.append("## Model accuracy\n")
    md.append(
        "| seed | best epoch | reference accuracy (500) | held-out accuracy (372) | reference loss by epoch |"
    )
    md.append("|---|---|---|---|---|")
    for seed, run in zip(seeds, runs, strict=True):
        losses = ", ".join(f"{e['eval_loss']:.3f}" for e in run["epochs"])
        md.append(
            f"| {seed} | {run['best_epoch']} | {run['report']['reference_accuracy']:.3f} | "
            f"{run['held_out_accuracy']:.3f} | {losses} |"
        )
    md.append("")
    md.append("## Random-order baselines\n")
    md.append(
        f"A uniformly random order gives NDR@30 = {random_ndr30:.3f} and AUC-NDR = {random_auc:.4f} with a standard "
        f"deviation of {random_auc_std:.4f} (exact: AUC-NDR is an affine function of the Mann-Whitney statistic of "
        f"the noisy rows' positions; n = {n}, {n_noisy} noisy). A layer set is useful only well above these.\n"
    )
    md.append("## NDR@30 and AUC-NDR per group (mean ± std over seeds)\n")
    md.append(
        "Groups: WE; consecutive block ranges (4 near-equal parts of 6 blocks); first / middle / last third of "
        "the blocks (blocks 0-1, 2-3, 4-5; the LoRA tensors in them); CL (the head); total (all 26 units); "
        "v.lora_B (the value projection's LoRA B in every block); lora (all 24 LoRA tensors). A group's scores "
        'are its members\' per-unit scores aggregated; for a single unit "mean" is its raw score.\n'
    )
    for est in ESTIMATORS:
        md.append(f"### {est}\n")
        header = "| group | " + " | ".join(f"NDR@30 {a}" for a in TABLE_AGGREGATIONS) + " | "
        header += " | ".join(f"AUC-NDR {a}" for a in TABLE_AGGREGATIONS) + " |"
        md.append(header)
        md.append("|---" * (1 + 2 * len(TABLE_AGGREGATIONS)) + "|")
        for group in groups:
            cells = [fmt([v[0] for v in table[(est, a, group)]]) for a in TABLE_AGGREGATIONS]
            cells += [fmt([v[1] for v in table[(est, a, group)]]) for a in TABLE_AGGREGATIONS]
            md.append(f"| {group} | " + " | ".join(cells) + " |")
        md.append("")
    md.append("### Single v-projection LoRA B tensors (AUC-NDR, mean ± std over seeds)\n")
    md.append("| unit | " + " | ".join(f"{e} {a}" for e in ESTIMATORS for a in TABLE_AGGREGATIONS) + " |")
    md.append("|---" * (1 + len(ESTIMATORS) * len(TABLE_AGGREGATIONS)) + "|")
    v_units = sorted(
        {k[2] for k in table if k[2].endswith("attn.v.lora_B")}, key=lambda s: int(s.split(".")[1])
    )
    for unit in v_units:
        cells = [fmt([v[1] for v in table[(e, a, unit)]]) for e in ESTIMATORS for a in TABLE_AGGREGATIONS]
        md.append(f"| {unit} | " + " | ".join(cells) + " |")
    md.append("")
    md.append("### Best single units and layer sets by AUC-NDR (mean over seeds)\n")
    ranked = sorted(
        ((float(np.mean([v[1] for v in vals])), key) for key, vals in table.items()), reverse=True
    )
    md.append("| estimator | aggregation | layer set | AUC-NDR | NDR@30 |")
    md.append("|---|---|---|---|---|")
    # A one-unit group (WE, CL, a one-block range) repeats its unit's row: list the unit only.
    single_groups = {
        e["layers"]["name"]
        for rep in reports
        for e in rep["entries"]
        if e["layers"]["kind"] == "group" and len(e["layers"]["members"]) == 1
    }
    ranked = [(v, key) for v, key in ranked if key[2] not in single_groups]
    for _, key in ranked[:10]:
        md.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {fmt([v[1] for v in table[key]])} | "
            f"{fmt([v[0] for v in table[key]])} |"
        )
    md.append("")
    md.append("Recommendation of `layer_report` per seed (best by AUC-NDR, if it clears its margin):\n")
    for seed, run in zip(seeds, runs, strict=True):
        rec = run["report"]["recommendation"]
        if rec is None:
            md.append(f"- seed {seed}: none — " + " ".join(run["report"]["warnings"]))
        else:
            md.append(
                f"- seed {seed}: {rec['layers']['name']} ({rec['layers']['kind']}), {rec['aggregation']}, "
                f"{rec['estimator']}: AUC-NDR {rec['auc_ndr']:.3f} (margin {rec['required_gain']:.3f} over random)"
            )
    md.append("")
    md.append(
        "## Cancellation per group (L1/L1 and L1/L2; mean over the group's units, mean ± std over seeds)\n"
    )
    md.append(
        "Over 1,000 training rows (noisy labels, as trained), exact per-sample gradients in parameter space.\n"
    )
    md.append("| group | L1/L1 | L1/L2 |")
    md.append("|---|---|---|")
    for group in groups:
        l1 = [
            next((g["l1_over_l1"] for g in r["cancellation"]["groups"] if g["group"] == group), None)
            for r in reports
        ]
        l2 = [
            next((g["l1_over_l2"] for g in r["cancellation"]["groups"] if g["group"] == group), None)
            for r in reports
        ]
        md.append(f"| {group} | {fmt(l1, 2)} | {fmt(l2, 1)} |")
    md.append("")
    md.append("## What this says about the paper's claims\n")
    md.extend(claims_text(summary, table))
    md.append("")
    md.append(
        "Raw per-seed numbers (every unit and group, every estimator and aggregation, cancellation, warnings): "
        f"`{DOCS_JSONS[projection_name].relative_to(ROOT)}`. Full per-seed reports: "
        f"`var/reproduction/seed-*/{projection_name}/report.json`.\n"
    )
    other = DOCS_JSONS["factorized"]
    if projection_name == "auto" and other.is_file():
        md.extend(compare_text(summary, json.loads(other.read_text())))
    return summary, "\n".join(md)


def _mean_auc(summary: dict) -> dict:
    """(estimator, aggregation, layers) -> mean AUC-NDR over the summary's seeds."""
    values: dict = {}
    for run in summary["per_seed"]:
        for e in run["entries"]:
            values.setdefault((e["estimator"], e["aggregation"], e["layers"]), []).append(e["auc_ndr"])
    return {key: float(np.mean(v)) for key, v in values.items() if all(x is not None for x in v)}


def compare_text(now: dict, before: dict) -> list[str]:
    """How AUC-NDR moved from the factorized-256 run to this one, per group and aggregation (mean over seeds)."""
    new, old = _mean_auc(now), _mean_auc(before)
    md = ["", "## Against the earlier run with every unit factorized to 256 numbers\n"]
    md.append(
        "The same protocol, seeds and fine-tunes (`python scripts/reproduce_paper.py --seeds 3 --projection "
        "factorized`, its numbers in `docs/reproduction/sst2-minilm-factorized.json`), with every unit "
        "compressed by the factorized projection to 256 numbers. AUC-NDR, mean over seeds: factorized -> exact "
        "(change).\n"
    )
    for est in ESTIMATORS:
        md.append(f"### {est}\n")
        md.append("| group | " + " | ".join(TABLE_AGGREGATIONS) + " |")
        md.append("|---" * (1 + len(TABLE_AGGREGATIONS)) + "|")
        for group in GROUP_ORDER:
            cells = []
            for agg in TABLE_AGGREGATIONS:
                key = (est, agg, group)
                if key in new and key in old:
                    cells.append(f"{old[key]:.3f} -> {new[key]:.3f} ({new[key] - old[key]:+.3f})")
                else:
                    cells.append("-")
            if any(c != "-" for c in cells):
                md.append(f"| {group} | " + " | ".join(cells) + " |")
        md.append("")
    moved = {k: new[k] - old[k] for k in new if k in old and k[2] != "WE" and k[2] in GROUP_ORDER}
    largest = max(moved, key=lambda k: abs(moved[k]))
    we = {k: new[k] - old[k] for k in new if k in old and k[2] == "WE"}
    md.append(
        f"- Across the {len(moved)} (estimator, aggregation, group) cells other than WE (all five aggregations), "
        f"AUC-NDR moved by {np.mean(np.abs(list(moved.values()))):.3f} on average; the largest move is "
        f"{moved[largest]:+.3f} ({largest[0]}, {largest[1]}, {largest[2]}), where raw mean adds the units' "
        "scores as they are, so a unit whose score scale changed (the exact embedding) moves the sum."
    )
    md.append(
        "- WE: "
        + ", ".join(f"{est} {agg} {old[(est, agg, 'WE')]:.3f} -> {new[(est, agg, 'WE')]:.3f}" for est, agg, _ in we)
        + "."
    )
    earlier, after = before.get("we_cancellation", {}), now.get("we_cancellation", {})
    if earlier and after:
        md.append(
            f"- Cancellation: the word embedding still has the lowest cancellation of all units in "
            f"{after['lowest']} of {after['seeds']} seeds; its AUC-NDR rank among the 26 units (grad-dot, rank-c, "
            f"1 = best) is {after['auc_rank']:.1f} exact against {earlier['auc_rank']:.1f} factorized."
        )
    md.append("")
    return md


def claims_text(summary: dict, table) -> list[str]:
    """Plain statements from the measured comparisons; the decision rule is stated in the text."""
    out = [
        "Decision rule for a comparison of two cells (AUC-NDR, paired by seed): *agree* when the mean difference "
        "exceeds two standard errors and every seed has the same sign, *disagree* when the same holds in the "
        "opposite direction, otherwise *inconclusive*.\n"
    ]
    mid = summary["comparisons"]["middle_vs_first"]

    def line(c: dict) -> str:
        diffs = ", ".join(f"{d:+.3f}" for d in c["diffs"])
        if c["a"][2] == c["b"][2]:  # same layers, two aggregations
            what = f"{c['a'][0]}, {c['a'][2]}: {c['a'][1]} − {c['b'][1]}"
        else:
            what = f"{c['a'][0]}, {c['a'][1]}: {c['a'][2]} − {c['b'][2]}"
        return f"  - {what} = {c['mean']:+.3f} (per seed {diffs}) → {c['verdict']}"

    def count(cells, verdict):
        return sum(c["verdict"] == verdict for c in cells)

    def overall(cells) -> str:
        agree, disagree, n = count(cells, "agree"), count(cells, "disagree"), len(cells)
        if agree == n:
            return "agree"
        if disagree == n:
            return "disagree"
        if agree > n / 2 and disagree == 0:
            return "mostly agree"
        if disagree > n / 2 and agree == 0:
            return "mostly disagree"
        return "inconclusive (mixed)"

    def tally(cells) -> str:
        return (
            f"**{overall(cells)}**: {count(cells, 'agree')} of {len(cells)} estimator × aggregation cells "
            f"agree, {count(cells, 'disagree')} disagree"
        )

    def mean_diff(cells) -> str:
        return f"mean AUC-NDR difference {np.mean([c['mean'] for c in cells]):+.3f}"

    def first_half(verdict: str) -> str:
        if verdict in ("agree", "mostly agree"):
            return "holds"
        return "fails" if verdict in ("disagree", "mostly disagree") else "is inconclusive"

    def second_half(last: str, head: str) -> str:
        losing = {"disagree", "mostly disagree"}
        if last in losing or head in losing:
            return "are not competitive (the last layers or the head detect noise better)"
        if last in ("agree", "mostly agree") and head in ("agree", "mostly agree"):
            return "are better"
        return "are competitive (no consistent difference)"

    groups = {other: [c for c in mid if c["b"][2] == other] for other in ("WE", "first", "last", "CL")}
    out.append(
        "1. **Middle layers vs the first (the paper: middle attention layers beat the word embeddings and are "
        "competitive with or better than the last).** Middle (blocks 2-3) better than WE: "
        f"{tally(groups['WE'])} ({mean_diff(groups['WE'])}). Better than the first third (blocks 0-1): "
        f"{tally(groups['first'])} ({mean_diff(groups['first'])}). Better than the last third (blocks 4-5): "
        f"{tally(groups['last'])} ({mean_diff(groups['last'])}). Better than the head (CL): "
        f"{tally(groups['CL'])} ({mean_diff(groups['CL'])}). In short: against the word embeddings the claim "
        f"{first_half(overall(groups['WE']))}; against the last layers and the head the middle layers "
        f"{second_half(overall(groups['last']), overall(groups['CL']))}"
        " on this model. Caveat: MiniLM has 6 blocks (the paper's models 16-32), so its middle third is two "
        "blocks and its last third sits right under the head. Per cell:"
    )
    out.extend(line(c) for c in mid)
    rv = summary["comparisons"]["rank_vote_vs_mean"]
    total = [c for c in rv if c["a"][2] == "total"]
    multi = [c for c in rv if c["a"][2] in ("total", "lora", "v.lora_B", "first", "middle", "last")]
    out.append(
        "2. **Rank / Vote vs Mean (the paper: rank and vote, correct-only, beat mean).** On the total group, "
        f"where units of very different gradient size are mixed: {tally(total)}. Over every multi-unit group "
        f"(total, lora, v.lora_B, first, middle, last): {tally(multi)}. Over all groups, single-unit ones "
        f"included (there only the test-sample aggregation differs): {tally(rv)}. In short: the claim "
        f"{first_half(overall(multi))} for groups of several units; the gain is largest where the units' score "
        "magnitudes differ most, which is what raw mean is sensitive to. Total group per cell:"
    )
    out.extend(line(c) for c in total)
    rhos = summary["cancellation_vs_auc_ndr"]
    by_cell: dict[tuple, list[float]] = {}
    for r in rhos:
        by_cell.setdefault((r["estimator"], r["aggregation"]), []).append(r["rho"])
    means = {cell: float(np.nanmean(v)) for cell, v in by_cell.items()}
    cells = ", ".join(f"{e} {a}: {v:+.2f}" for (e, a), v in means.items())
    critical = 1.96 / math.sqrt(26 - 1)  # two-sided 5% for a Spearman correlation over 26 units
    if all(v >= critical for v in means.values()):
        premise = "**not supported, and reversed**: units with MORE cancellation detect noise better"
    elif all(v > 0 for v in means.values()):
        premise = (
            "**not supported**: the correlation has the opposite sign to the rule (more cancellation, slightly "
            f"better detection) but is weak (|rho| < {critical:.2f}, the 5% level for 26 units, in some cells)"
        )
    elif all(v <= -critical for v in means.values()):
        premise = "**supported**: units with less cancellation detect noise better"
    else:
        premise = "**inconclusive**: the correlation's sign differs between estimators and aggregations"
    we = summary["we_cancellation"]
    out.append(
        "3. **NDR vs cancellation (the paper: NDR predicts the accuracy after filtering and retraining better "
        "than cancellation, which is unreliable).** We did not retrain (a fine-tune per filtered set), so the "
        "predictive part is untested here. What we tested is the premise of choosing layers by cancellation "
        "(Yeh et al.: less cancellation = better units). Spearman correlation across the 26 single units between "
        f"cancellation (L1/L1) and AUC-NDR, mean over seeds: {cells}. The premise is {premise}. The word "
        f"embedding has the lowest cancellation of all units in {we['lowest']} of {we['seeds']} seeds, yet its "
        f"AUC-NDR (grad-dot, rank-c) ranks {we['auc_rank']:.1f} of 26 on average (1 = best): its low "
        "cancellation comes from row-sparse gradients, not from informativeness, as the paper argues."
    )
    return out


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. seeds-1); default 3")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--prepare-only", action="store_true", help="fine-tune and featurize, no report")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/ (partial runs)")
    parser.add_argument(
        "--projection",
        choices=sorted(DOCS_JSONS),
        default="auto",
        help="auto (default: every paper unit exact) or factorized (256 numbers per unit)",
    )
    args = parser.parse_args(argv)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    command = "python scripts/reproduce_paper.py --seeds " + str(args.seeds)
    if args.first_seed:
        command += f" --first-seed {args.first_seed}"
    if args.projection != "auto":
        command += f" --projection {args.projection}"
    torch.set_num_threads(torch.get_num_threads())
    say(f"reproduction: seeds {seeds}; cache {CACHE}")
    say(f"machine: {machine()}")
    train, reference, held_out = load_data()
    say(f"data: {len(train)} train, {len(reference)} reference, {len(held_out)} held-out rows")
    runs = []
    for seed in seeds:
        say(f"seed {seed}")
        noisy, mask = noisy_train(train, seed)
        result, record = finetune(seed, noisy, mask, reference)
        layers, train_features, reference_features, meta = features(
            seed, result, noisy, reference, held_out, args.projection
        )
        if args.prepare_only:
            continue
        rep, report_s = report(seed, layers, train_features, reference_features, meta, mask)
        runs.append(
            {
                "report": rep,
                "best_epoch": result.best_epoch,
                "epochs": [dataclasses.asdict(e) for e in result.epochs],
                "held_out_accuracy": meta["held_out_accuracy"],
                "seconds": {
                    "finetune_s": record["total_seconds"],
                    "featurize_s": meta["timings"]["featurize_s"],
                    "cancellation_s": meta["timings"]["cancellation_s"],
                    "report_s": report_s,
                },
            }
        )
        say(
            f"seed {seed}: reference accuracy {rep['reference_accuracy']:.3f}; recommendation "
            f"{(rep['recommendation'] or {}).get('layers', {}).get('name')}"
        )
    wall = time.perf_counter() - STARTED
    if runs and not args.no_docs:
        summary, md = summarise(seeds, runs, command, wall, args.projection)
        docs_json = DOCS_JSONS[args.projection]
        docs_json.parent.mkdir(parents=True, exist_ok=True)
        docs_json.write_text(json.dumps(jsonable(summary), indent=1, allow_nan=False) + "\n")
        if args.projection == "auto":  # docs/reproduction.md tells the default's story
            DOCS_MD.write_text(md + "\n")
        written = f" and {DOCS_MD.relative_to(ROOT)}" if args.projection == "auto" else ""
        say(f"wrote {docs_json.relative_to(ROOT)}{written}")
    say(f"done in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
