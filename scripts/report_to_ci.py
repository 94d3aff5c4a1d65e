"""From a layer report to a CI check, with real numbers (docs/report-to-ci.md shows a run).

1. Reuse the demo's fine-tuned MiniLM + LoRA (2,000 SST-2 training rows, 20% of their labels flipped; cached under
   var/demo/ by scripts/demo.py, trained here the same way when the cache is missing), start the embedded
   service, register the model, the noisy training set (with its `noisy` column) and the SST-2 validation split
   (the reference rows), and build the index over every layer unit (or reuse a ready one).
2. A layer report against the dataset's noisy column; the index's settings, which follow its latest report.
3. A batch of 40 NEW rows (SST-2 training rows that are not among the 2,000), 10 of their labels flipped, checked
   three ways:
     (a) today's fixed defaults named explicitly: every layer, grad-dot, rank, threshold percentile 5;
     (b) nothing named: the report's settings, threshold percentile 5;
     (c) nothing named, target_precision 0.8: the threshold calibrated on the index's noisy column.
   Per way: the settings and where they came from, the threshold, flipped and clean rows flagged, the verdict,
   and for (c) the stated precision and recall with their intervals next to what the batch measured; then (d),
   the calibrated check on 400 other new rows (20% flipped), whose measurement is precise enough to tell.
4. An audit with a review prefix (target_recall 0.8): its length and stated precision, checked against the rows
   of the prefix; and the same audit told only half of the noisy rows, measured against all of them (what an
   incomplete mask does to the stated numbers).

    python scripts/report_to_ci.py [--port 8000] [--out FILE] [--new-report] [--large-batch 400]

The figures go to --out (default var/demo/report-to-ci/report-to-ci.json), the batches beside it.

Everything goes through the HTTP API (httpx), as `influence` CLI commands would (the page lists them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a file: the repository's packages (influence, bench), and scripts/ for the demo's steps, reused as they
# are (the same cached fine-tune, model, dataset and index).
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the service inherits it: see app/embedded.py

import demo  # noqa: E402
from demo import DEMO_DIR, Progress, bar, check, elapsed, say  # noqa: E402

from bench.harness import SST2, cpu_name, free_port, start_service, stop_service, tsv_text  # noqa: E402

WORK_DIR = DEMO_DIR / "report-to-ci"
BATCH_ROWS = 40
BATCH_FLIPPED = 10
BATCH_SEED = 1
# A larger batch with the index's share of flipped labels (20%), checked the calibrated way: its intervals are
# narrow enough to tell whether the stated precision and recall carry over to new rows.
LARGE_ROWS = 400
LARGE_SEED = 2
# Validation rows the demo never touched (it used rows 0-2 as queries and 3-402 to pick the best epoch).
REFERENCE_ROWS = list(range(403, 603))
BASELINE_PERCENTILE = 5.0
TARGET_PRECISION = 0.8
REVIEW_RECALL = 0.8
# Percentiles at which the batch's flagged rows are also counted (from the same answers: no extra checks).
ALSO_AT = (5.0, 10.0, 20.0)


# ------------------------------------------------------------------------------------------------ inputs


def new_batch(exclude: set[str], size: int, flipped: int, seed: int):
    """`size` SST-2 training rows whose texts are not in `exclude` (the label proportions of the file), `flipped`
    of their labels flipped: (rows as (text, label), the flipped mask)."""
    # Here, as in the demo: influence loads torch, which the rest of the script does not need to start.
    from influence import inject_label_noise, read_labelled_tsv, stratified_subsample

    outside = [e for e in read_labelled_tsv(SST2 / "train.tsv") if e.text not in exclude]
    chosen = stratified_subsample(outside, size, seed=seed)
    labels, mask = inject_label_noise([e.label for e in chosen], flipped / size, seed=seed)
    return [(e.text, int(label)) for e, label in zip(chosen, labels, strict=True)], mask


def write_batch(name: str, rows) -> Path:
    path = WORK_DIR / name
    path.write_text(tsv_text(("sentence", "label"), rows))
    return path


def batch_info(path: Path, rows, flipped, seed: int) -> dict:
    return {
        "file": str(path.relative_to(ROOT)),
        "rows": len(rows),
        "flipped_rows": [i for i, f in enumerate(flipped) if f],
        "seed": seed,
    }


def register_reference(client) -> dict:
    """The SST-2 validation split as a dataset (the reference rows); reused when registered already."""
    path = SST2 / "validation.tsv"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for dataset in check(client.get("/v1/datasets", params={"limit": 500}), 200)["items"]:
        if dataset["name"] == "sst2-validation" and dataset["content_hash"] == digest:
            return dataset
    data = {"name": "sst2-validation", "text_column": "sentence", "label_column": "label"}
    return check(client.post("/v1/datasets", data=data, files={"file": (path.name, path.read_bytes())}), 201)


def ready_index(client, model: dict, dataset: dict) -> dict:
    """The newest ready index of the model and dataset over every layer unit, else a new one (the demo's)."""
    params = {"model_id": model["id"], "dataset_id": dataset["id"], "status": "ready", "limit": 50}
    for index in check(client.get("/v1/indexes", params=params), 200)["items"]:
        if len(index["layers"]) == model["num_layers"] and index["deleted_rows"] == 0:
            say(
                f"  reusing index {index['id']} ({len(index['layers'])} layer units, {index['num_rows']} rows)"
            )
            return index
    return demo.build_index(client, model, dataset)


# -------------------------------------------------------------------------------------------------- jobs


def wait_job(client, job: dict, label: str) -> dict:
    """Follow a job to its end with a progress line; exit with its error unless it succeeded."""
    progress = Progress()
    while True:
        job = check(client.get(f"/v1/jobs/{job['id']}"), 200)
        progress.show(
            f"  {label} {bar(job['done'], job['total'])} {job['done']}/{job['total']}  {job['status']}"
            f"  {elapsed()}"
        )
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1.0)
    progress.done()
    if job["status"] != "succeeded":
        raise SystemExit(f"{label} {job['status']}: {job['error']}")
    return job


def layer_report(client, index: dict, reference: dict, fresh: bool) -> dict:
    """The newest succeeded report of the index on this reference set, or a new one (noisy: the dataset's
    column; cancellation skipped: it is not what this walk-through reads)."""
    if not fresh:
        found = check(client.get("/v1/reports", params={"index_id": index["id"], "status": "succeeded"}), 200)
        for report in found["items"]:
            if report["params"].get("reference", {}).get("rows") == reference["rows"]:
                say(f"  reusing layer report {report['id']} (--new-report makes another)")
                return check(client.get(f"/v1/reports/{report['id']}"), 200)
    body = {"reference": reference, "noisy": "dataset", "cancellation_rows": 0}
    report = check(client.post(f"/v1/indexes/{index['id']}/reports", json=body), 202)
    job = wait_job(client, report["job"], "layer report")
    say(f"  report {report['id']} in {job['duration_s']:.0f}s")
    return check(client.get(f"/v1/reports/{report['id']}"), 200)


def run_check(client, index: dict, batch_file: Path, reference: dict, fields: dict, label: str) -> dict:
    """POST a check with these form fields, wait, and read it with every row."""
    data = {"reference": json.dumps(reference), "text_column": "sentence", "label_column": "label", **fields}
    files = {"file": (batch_file.name, batch_file.read_bytes())}
    created = check(client.post(f"/v1/indexes/{index['id']}/checks", data=data, files=files), 202)
    wait_job(client, created["job"], label)
    answer = check(client.get(f"/v1/checks/{created['id']}", params={"limit": 10_000}), 200)
    if len(answer["rows"]) != answer["summary"]["rows"]:
        raise SystemExit(
            f"check {created['id']}: read {len(answer['rows'])} of {answer['summary']['rows']} rows"
        )
    return answer


# --------------------------------------------------------------------------------------------- figures


def wilson(k: int, n: int) -> list[float]:
    """A batch measurement's own 95% interval, by the formula the service states its intervals with."""
    from influence.calibration import wilson_interval  # loads torch (influence): see new_batch

    return list(wilson_interval(k, n))


def settings_line(settings: dict) -> str:
    layers = settings["layers"]
    if isinstance(layers, list):
        shown = (
            ", ".join(layers) if len(layers) <= 4 else f"{', '.join(layers[:3])}, ... ({len(layers)} units)"
        )
    else:
        shown = "every unit" if layers in (None, "all") else str(layers)
    only = "-c" if settings.get("correct_only") else ""
    return f"layers {shown}; {settings['estimator']}; {settings['aggregation']}{only} (vote_k {settings['vote_k']:g})"


def report_entry(document: dict, summary: dict) -> dict | None:
    """The report's entry for the settings a check ran with (same estimator, aggregation and units), if any."""
    aggregation = summary["aggregation"] + ("-c" if summary["correct_only"] else "")
    units = sorted(summary["layers"])
    for entry in document["entries"]:
        if (entry["estimator"], entry["aggregation"]) == (summary["estimator"], aggregation) and sorted(
            entry["layers"]["members"]
        ) == units:
            return entry
    return None


def check_figures(answer: dict, flipped, document: dict) -> dict:
    """What a check flagged against the truth of the batch, next to the share of the index's noisy rows below
    the same percentiles (NDR@p of the report's entry for the same settings)."""
    rows = sorted(answer["rows"], key=lambda r: r["row"])
    flagged = [r["row"] for r in rows if r["flagged"]]
    bad = {i for i, f in enumerate(flipped) if f}
    summary = answer["summary"]
    hits = sum(1 for i in flagged if i in bad)
    figures = {
        "id": answer["id"],
        "settings_source": answer["settings_source"],
        "settings": answer["settings"],
        "threshold_percentile": summary["threshold_percentile"],
        "max_flagged": summary["max_flagged"],
        "verdict": answer["verdict"],
        "reasons": answer["reasons"],
        "warnings": answer["warnings"],
        "flagged_flipped": hits,
        "flagged_clean": len(flagged) - hits,
        "flipped": len(bad),
        "clean": len(rows) - len(bad),
        "percentiles": {
            "flipped": [rows[i]["percentile"] for i in sorted(bad)],
            "clean": [r["percentile"] for r in rows if r["row"] not in bad],
        },
        "at_percentile": {},
        "seconds": summary["seconds"],
    }
    entry = report_entry(document, summary)
    for p in ALSO_AT:
        below = [r["row"] for r in rows if r["percentile"] < p]
        found = sum(1 for i in below if i in bad)
        figures["at_percentile"][f"{p:g}"] = {
            "flipped": found,
            "clean": len(below) - found,
            "index_ndr": None if entry is None else entry["ndr"].get(f"{p:g}"),
        }
    calibration = summary.get("calibration")
    if calibration is not None:
        figures["calibration"] = calibration
        figures["batch_precision"] = hits / len(flagged) if flagged else None
        figures["batch_precision_interval"] = wilson(hits, len(flagged))
        figures["batch_recall"] = hits / len(bad)
        figures["batch_recall_interval"] = wilson(hits, len(bad))
    return figures


def print_check(name: str, figures: dict) -> None:
    say(f"  ({name}) settings from {figures['settings_source']}: {settings_line(figures['settings'])}")
    say(
        f"      threshold: percentile < {figures['threshold_percentile']:.2f}; flagged {figures['flagged_flipped']}"
        f"/{figures['flipped']} flipped, {figures['flagged_clean']}/{figures['clean']} clean; max_flagged "
        f"{figures['max_flagged']} -> verdict {figures['verdict'].upper()}"
    )
    also = "; ".join(
        f"< {p}: {v['flipped']}/{figures['flipped']} flipped"
        + ("" if v["index_ndr"] is None else f" (index {v['index_ndr']:.0%})")
        + f", {v['clean']}/{figures['clean']} clean"
        for p, v in figures["at_percentile"].items()
    )
    say(f"      at other percentiles: {also}")
    c = figures.get("calibration")
    if c is not None:
        measured = figures["batch_precision"]
        shown = "n/a (nothing flagged)" if measured is None else f"{measured:.2f}"
        lo, hi = figures["batch_precision_interval"]
        say(
            f"      calibrated on {c['rows']} index rows ({c['known_noisy']} known noisy): the "
            f"{c['cutoff_rows']} lowest; stated precision {c['precision']:.2f} [{c['precision_interval'][0]:.2f}, "
            f"{c['precision_interval'][1]:.2f}], recall {c['recall']:.2f} [{c['recall_interval'][0]:.2f}, "
            f"{c['recall_interval'][1]:.2f}]"
        )
        say(
            f"      measured on the batch: precision {shown} (Wilson [{lo:.2f}, {hi:.2f}]), recall "
            f"{figures['batch_recall']:.2f} [{figures['batch_recall_interval'][0]:.2f}, "
            f"{figures['batch_recall_interval'][1]:.2f}]"
        )
    for warning in figures["warnings"]:
        say(f"      warning: {warning}")


def run_audit(client, index: dict, reference: dict, noisy, truth: list[bool], label: str) -> dict:
    """An audit with a review prefix (nothing else named: the index's settings), its prefix read back and
    measured against `truth` (the full mask, by dataset row)."""
    review = (
        {"target_recall": REVIEW_RECALL}
        if noisy is None
        else {"target_recall": REVIEW_RECALL, "noisy": noisy}
    )
    created = check(
        client.post(f"/v1/indexes/{index['id']}/audits", json={"reference": reference, "review": review}), 202
    )
    wait_job(client, created["job"], label)
    audit = check(client.get(f"/v1/audits/{created['id']}"), 200)
    stated = audit["summary"]["review"]
    response = client.get(f"/v1/audits/{created['id']}/rows", params={"review": "true", "format": "jsonl"})
    if response.status_code != 200:
        raise SystemExit(f"reading the review prefix -> {response.status_code}: {response.text}")
    prefix = [json.loads(line) for line in response.text.splitlines() if line.strip()]
    found = sum(1 for row in prefix if truth[row["row"]])
    noisy_total = sum(truth)
    return {
        "id": audit["id"],
        "settings_source": audit["settings_source"],
        "settings": audit["settings"],
        "stated": stated,
        "prefix_rows": len(prefix),
        "measured_found": found,
        "measured_noisy": noisy_total,
        "measured_precision": found / len(prefix),
        "measured_precision_interval": wilson(found, len(prefix)),
        "measured_recall": found / noisy_total,
        "measured_recall_interval": wilson(found, noisy_total),
    }


def print_audit(figures: dict, mask_name: str) -> None:
    s = figures["stated"]
    say(
        f"  review prefix for recall {s['target_recall']:g} against {mask_name}: the first {s['rows']} of "
        f"{s['total_rows']} rows ({s['share']:.1%}); stated recall {s['recall']:.2f} [{s['recall_interval'][0]:.2f},"
        f" {s['recall_interval'][1]:.2f}], precision {s['precision']:.2f} [{s['precision_interval'][0]:.2f}, "
        f"{s['precision_interval'][1]:.2f}] ({s['found']}/{s['known_noisy']} known noisy)"
    )
    say(
        f"      measured against every flipped row: {figures['measured_found']}/{figures['prefix_rows']} flipped in"
        f" the prefix: precision {figures['measured_precision']:.2f}, recall {figures['measured_recall']:.2f} "
        f"({figures['measured_found']}/{figures['measured_noisy']})"
    )


# ---------------------------------------------------------------------------------------------- the run


def large_batch_size(text: str) -> int:
    """0 to 10,000 rows: the script reads a check's rows as one page, which holds at most 10,000."""
    size = int(text)
    if not 0 <= size <= 10_000:
        raise argparse.ArgumentTypeError(f"between 0 and 10000, got {size}")
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--out", type=Path, default=WORK_DIR / "report-to-ci.json", help="the figures (JSON)")
    parser.add_argument(
        "--new-report", action="store_true", help="make a new layer report even if one exists"
    )
    parser.add_argument(
        "--large-batch",
        type=large_batch_size,
        default=LARGE_ROWS,
        metavar="ROWS",
        help=f"also check this many other new rows the calibrated way ({LARGE_ROWS}; 0: skip)",
    )
    args = parser.parse_args()
    import httpx

    from influence import packaged_minilm_path

    demo.quiet_libraries()
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    port = free_port(args.port)
    say(f"[{elapsed()}] Starting the embedded service on 127.0.0.1:{port} (log: {DEMO_DIR / 'service.log'})")
    service = start_service(
        port,
        data_dir=demo.DATA_DIR,
        allowed_roots=[packaged_minilm_path().parent, DEMO_DIR],
        log_path=DEMO_DIR / "service.log",
        env={"INFLUENCE_DEVICE": os.environ.get("INFLUENCE_DEVICE", "auto")},
    )
    figures: dict = {
        "command": " ".join(["python", "scripts/report_to_ci.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
    }
    try:
        say(
            f"[{elapsed()}] The demo's fine-tune (MiniLM + LoRA on {demo.TRAIN_ROWS} SST-2 rows, "
            f"{demo.NOISE_RATE:.0%} flipped)"
        )
        result, train, mask, _ = demo.finetune()
        dataset_file = demo.write_training_file(train, mask)
        indexed = {e.text for e in train}
        rows, flipped = new_batch(indexed, BATCH_ROWS, BATCH_FLIPPED, BATCH_SEED)
        batch_file = write_batch("batch.tsv", rows)
        figures["batch"] = batch_info(batch_file, rows, flipped, BATCH_SEED)
        if args.large_batch:
            exclude = indexed | {text for text, _ in rows}
            large_flipped = round(args.large_batch * demo.NOISE_RATE)
            large_rows, large_mask = new_batch(exclude, args.large_batch, large_flipped, LARGE_SEED)
            large_file = write_batch(f"batch-{args.large_batch}.tsv", large_rows)
            figures["large_batch"] = batch_info(large_file, large_rows, large_mask, LARGE_SEED)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            demo.wait_ready(client, service)
            model = demo.register_model(client, result.best_adapter.resolve())
            dataset = demo.register_dataset(client, dataset_file)
            validation = register_reference(client)
            reference = {"dataset_id": validation["id"], "rows": REFERENCE_ROWS}
            say(
                f"[{elapsed()}] Model {model['id']}, training set {dataset['id']} ({dataset['row_count']} rows, "
                f"{int(mask.sum())} flipped), reference: validation rows {REFERENCE_ROWS[0]}-{REFERENCE_ROWS[-1]}"
            )
            index = ready_index(client, model, dataset)
            figures["index"] = {
                "id": index["id"],
                "rows": index["num_rows"],
                "layer_units": len(index["layers"]),
            }

            say(f"[{elapsed()}] Layer report (noisy: the dataset's column)")
            report = layer_report(client, index, reference, args.new_report)
            recommended = report["summary"]["recommendation"]
            figures["report"] = {"id": report["id"], "summary": report["summary"]}
            if recommended is None:
                say("  the report recommends nothing: the index keeps the defaults")
            else:
                say(
                    f"  recommends {recommended['estimator']}, {recommended['aggregation']} over "
                    f"{recommended['layers']} ({len(recommended['members'])} units): AUC-NDR "
                    f"{recommended['auc_ndr']:.3f} against "
                    f"{recommended['random_auc_ndr']:.3f} for a random order; reference accuracy "
                    f"{report['summary']['reference_accuracy']:.1%}"
                )
            view = check(client.get(f"/v1/indexes/{index['id']}/settings"), 200)
            if view["mode"] != "latest-report":
                view = check(
                    client.put(f"/v1/indexes/{index['id']}/settings", json={"mode": "latest-report"}), 200
                )
            say(
                f"  index settings: mode {view['mode']}, source {view['settings_source']}: "
                f"{settings_line(view['settings'])}"
            )
            figures["index_settings"] = view

            say(
                f"[{elapsed()}] Checking {len(rows)} new rows ({BATCH_FLIPPED} labels flipped: rows "
                f"{figures['batch']['flipped_rows']})"
            )
            ways = {
                "a": (
                    "fixed defaults",
                    {
                        "layers": "all",
                        "estimator": "grad-dot",
                        "aggregation": "rank",
                        "threshold_percentile": str(BASELINE_PERCENTILE),
                    },
                ),
                "b": ("report's settings", {"threshold_percentile": str(BASELINE_PERCENTILE)}),
                "c": ("calibrated", {"target_precision": str(TARGET_PRECISION), "max_flagged": "0"}),
            }
            figures["checks"] = {}
            for key, (label, fields) in ways.items():
                answer = run_check(client, index, batch_file, reference, fields, f"check ({key}) {label}")
                figures["checks"][key] = {
                    "label": label,
                    "fields": fields,
                    **check_figures(answer, flipped, report["report"]),
                }
                print_check(key, figures["checks"][key])
            if args.large_batch:
                say(
                    f"[{elapsed()}] The calibrated check (c) on {args.large_batch} other new rows, "
                    f"{large_flipped} flipped (the index's share)"
                )
                label, fields = ways["c"]
                answer = run_check(client, index, large_file, reference, fields, f"check (d) {label}")
                figures["checks"]["d"] = {
                    "label": f"{label}, {args.large_batch} rows",
                    "fields": fields,
                    **check_figures(answer, large_mask, report["report"]),
                }
                print_check("d", figures["checks"]["d"])

            say(f"[{elapsed()}] Audit with a review prefix (target recall {REVIEW_RECALL:g})")
            truth = [bool(f) for f in mask]
            figures["audit"] = run_audit(client, index, reference, None, truth, "audit")
            print_audit(figures["audit"], "the dataset's noisy column")
            known = [i for i, f in enumerate(truth) if f][::2]
            say(f"[{elapsed()}] The same audit told only {len(known)} of the {sum(truth)} flipped rows")
            figures["audit_half_mask"] = run_audit(
                client, index, reference, {"rows": known}, truth, "audit (half)"
            )
            print_audit(figures["audit_half_mask"], f"{len(known)} rows named noisy")
    finally:
        stop_service(service)
    figures["seconds"] = round(time.perf_counter() - demo.STARTED, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    say(f"[{elapsed()}] Done; figures in {args.out}")


if __name__ == "__main__":
    main()
