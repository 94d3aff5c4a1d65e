"""The paper's protocol as ONE service job, with the retraining check, on real SST-2 and the packaged MiniLM.

What `POST /v1/experiments` does, end to end over HTTP against the embedded service (SQLite, a real Celery
worker, CPU), driven through the typed client (influence_client):

1. register the packaged MiniLM (a fresh classification head) and three datasets: 4,500 stratified SST-2
   training rows (the same subsample as scripts/reproduce_paper.py), and the validation split, whose first 500
   stratified rows are the reference set and the other 372 the held-out set;
2. one experiment: 20% of the training labels flipped (seed), LoRA r = 4 on query and value, AdamW 2e-3, batch
   32, 3 epochs, max length 64, the epoch with the lowest reference loss kept; the checkpoint registered as a
   model, the noisy rows as a dataset, an index over the paper's units (WE, the LoRA tensors, the head), a layer
   report (grad-dot, cosine, DataInf x mean, rank, vote, rank-c, vote-c);
3. the retraining check: the 30% lowest rows by rank aggregation over the given layers are removed and the model
   retrained with the same settings; held-out accuracy next to removing 30% at random and the oracle (flipped
   rows first).

    python scripts/experiment_retraining.py [--seed 0] [--layers middle] [--aggregation rank]

Writes docs/reproduction/experiment-<seed>-<layers>-<aggregation>.json (the experiment's answer and timings).
State lives under var/experiment/ (delete it to start over; the service caches fine-tunes by their settings).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: the repository's packages (influence, influence_client, bench)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the service inherits it: see app/embedded.py

from bench.harness import (  # noqa: E402
    SST2,
    free_port,
    sst2_reproduction_split,
    start_service,
    stop_service,
    tsv_text,
)

DATA_DIR = (ROOT / "var" / "experiment").resolve()
OUT_DIR = ROOT / "docs" / "reproduction"
N_TRAIN, N_REFERENCE = 4500, 500


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def load_data():
    """(train rows, validation rows, reference positions, held-out positions): the reproduction's split."""
    train, validation, reference, _ = sst2_reproduction_split(N_TRAIN, N_REFERENCE)
    chosen = {id(e) for e in reference}
    reference_rows = [i for i, e in enumerate(validation) if id(e) in chosen]
    heldout_rows = [i for i, e in enumerate(validation) if id(e) not in chosen]
    as_rows = lambda examples: [(e.text, int(e.label)) for e in examples]  # noqa: E731
    return as_rows(train), as_rows(validation), reference_rows, heldout_rows


def tsv_bytes(rows: list[tuple[str, int]]) -> bytes:
    return tsv_text(("sentence", "label"), rows).encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/experiment_retraining.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", default=None, help="retraining ranking layers (default: the index's)")
    parser.add_argument("--aggregation", default="rank")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)

    from influence import packaged_minilm_path
    from influence_client import InfluenceAPIError, InfluenceClient

    started = time.perf_counter()
    port = free_port()
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    process = start_service(
        port,
        data_dir=DATA_DIR,
        allowed_roots=[SST2, packaged_minilm_path().parent, DATA_DIR],
        log_path=DATA_DIR / "service.log",
        env={"INFLUENCE_MAX_ACTIVE_JOBS_PER_TENANT": "8"},
    )
    try:
        key_file = DATA_DIR / "local-api-key"
        for _ in range(240):
            if key_file.exists():
                break
            time.sleep(0.5)
        client = InfluenceClient(f"http://127.0.0.1:{port}", api_key=key_file.read_text().strip(), timeout=120)
        for _ in range(240):
            try:
                client.ready()
                break
            except (InfluenceAPIError, OSError, Exception):  # not up yet
                time.sleep(0.5)
        say("service ready")

        train, validation, reference_rows, heldout_rows = load_data()
        model = client.register_model(str(packaged_minilm_path()), name="minilm", task="classification", num_labels=2)
        trainset = client.upload_dataset(tsv_bytes(train), name="sst2-train-4500", format="tsv",
                                         text_column="sentence", label_column="label")  # fmt: skip
        valset = client.upload_dataset(tsv_bytes(validation), name="sst2-validation", format="tsv",
                                       text_column="sentence", label_column="label")  # fmt: skip
        body = {
            "name": f"sst2-minilm-seed{args.seed}",
            "base_model_id": model["id"],
            "dataset_id": trainset["id"],
            "reference": {"dataset_id": valset["id"], "rows": reference_rows},
            "heldout": {"dataset_id": valset["id"], "rows": heldout_rows},
            "noise_rate": 0.2,
            "seed": args.seed,
            "lora": {"r": 4, "alpha": 4, "dropout": 0.05},
            "epochs": args.epochs,
            "learning_rate": 2e-3,
            "batch_size": 32,
            "max_length": 64,
            "report": {"estimators": ["grad-dot", "datainf"], "cancellation_rows": 1000},
            "retraining": {
                "enabled": True,
                "remove_fraction": 0.3,
                "layers": args.layers,
                "aggregation": args.aggregation,
            },
        }
        experiment = client.create_experiment(**body)
        say(f"experiment {experiment['id']} queued")
        last = None

        def progress(job) -> None:
            nonlocal last
            line = f"{job['status']} {job['done']}/{job['total']}"
            if line != last:
                say(line)
                last = line

        job = client.wait_for_job(experiment["id"], poll=5.0, on_progress=progress)
        final = client.get_experiment(experiment["id"])
        if job["status"] != "succeeded":
            say(f"experiment ended {job['status']}: {job.get('error')}")
            return 1
        report = client.get_report(final["report_id"])
        out = {
            "command": "python scripts/experiment_retraining.py " + " ".join(argv or sys.argv[1:]),
            "seconds": round(time.perf_counter() - started, 1),
            "experiment": final,
            "report_recommendation": (report.get("report") or {}).get("recommendation"),
            "report_reference_accuracy": (report.get("report") or {}).get("reference_accuracy"),
        }
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        name = f"experiment-seed{args.seed}-{args.layers or 'index'}-{args.aggregation}.json"
        (OUT_DIR / name).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        say(f"retraining: {json.dumps(final.get('retraining'), indent=2)}")
        say(f"written {OUT_DIR / name} in {out['seconds']:.0f}s")
        return 0
    finally:
        stop_service(process)


if __name__ == "__main__":
    raise SystemExit(main())
