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
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for variable, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
}.items():
    os.environ.setdefault(variable, value)
sys.path.insert(0, str(ROOT))

SST2 = ROOT / "data" / "sst2"  # ships with the repository (data/sst2/README.md)
DATA_DIR = (ROOT / "var" / "experiment").resolve()
OUT_DIR = ROOT / "docs" / "reproduction"
N_TRAIN, N_REFERENCE = 4500, 500


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def load_data():
    """(train rows, validation rows, reference positions, held-out positions): the reproduction's split."""
    from influence import read_labelled_tsv, stratified_subsample

    train = stratified_subsample(read_labelled_tsv(SST2 / "train.tsv"), N_TRAIN, seed=0)
    validation = read_labelled_tsv(SST2 / "validation.tsv")
    chosen = {id(e) for e in stratified_subsample(validation, N_REFERENCE, seed=0)}
    reference = [i for i, e in enumerate(validation) if id(e) in chosen]
    heldout = [i for i, e in enumerate(validation) if id(e) not in chosen]
    as_rows = lambda examples: [(e.text, int(e.label)) for e in examples]  # noqa: E731
    return as_rows(train), as_rows(validation), reference, heldout


def tsv_bytes(rows: list[tuple[str, int]]) -> bytes:
    out = io.StringIO()
    out.write("sentence\tlabel\n")
    for text, label in rows:
        out.write(f"{text}\t{label}\n")
    return out.getvalue().encode("utf-8")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(port: int, allowed: list[Path]) -> subprocess.Popen:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "INFLUENCE_DATA_DIR": str(DATA_DIR),
        "INFLUENCE_ALLOWED_ROOTS": json.dumps([str(p) for p in allowed]),
        "INFLUENCE_MAX_ACTIVE_JOBS_PER_TENANT": "8",
    }
    log = open(DATA_DIR / "service.log", "ab")  # noqa: SIM115 - the child writes to it until it stops
    process = subprocess.Popen(
        [sys.executable, "-m", "app.embedded", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    log.close()
    return process


def stop_service(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


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
    process = start_service(port, [SST2, packaged_minilm_path().parent, DATA_DIR])
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
