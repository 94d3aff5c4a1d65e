"""The main job, end to end, over HTTP (what `make demo` runs).

1. Fine-tune the packaged MiniLM with LoRA on 2,000 SST-2 training rows, 20% of their labels flipped (AdamW
   lr 2e-3, batch 32, cosine schedule with 10% warm-up, 2 epochs, max length 64); cached under var/demo/.
2. Start the embedded service (SQLite, local artifacts, a real Celery worker on the filesystem broker, CPU).
3. Register the model (with its LoRA adapter) and the noisy training set over HTTP, authenticated with the
   local API key the embedded runner keeps in <data_dir>/local-api-key.
4. Build an index over all 63 layer units (progress bar), then ask which training rows most helped and most
   harmed three validation sentences, using the middle layers and rank aggregation, and print them with their
   per-layer scores and ranks.

    python scripts/demo.py [--port 8000] [--keep-serving]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: the repository's packages (influence, bench)

from bench.harness import SST2, free_port, start_service, stop_service, tsv_text  # noqa: E402

DATA_DIR = Path(os.environ.get("INFLUENCE_DATA_DIR", ROOT / "var")).resolve()
DEMO_DIR = DATA_DIR / "demo"
TRAIN_ROWS = 2000
NOISE_RATE = 0.2
SEED = 0
EPOCHS = 2
MAX_LENGTH = 64
EVAL_ROWS = 400
CHUNK_SIZE = 200  # 10 chunks: the unit of progress and of parallelism
QUERY_SENTENCES = 3
TOP_K = 3
STARTED = time.perf_counter()


def say(text: str = "") -> None:
    print(text, flush=True)


def elapsed() -> str:
    return f"{time.perf_counter() - STARTED:5.0f}s"


def bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


class Progress:
    """One line redrawn in place on a terminal; a line per change otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.last = ""

    def show(self, text: str) -> None:
        if text == self.last:
            return
        self.last = text
        if self.tty:
            sys.stdout.write("\r" + text.ljust(100))
            sys.stdout.flush()
        else:
            say(text)

    def done(self) -> None:
        if self.tty:
            sys.stdout.write("\n")
            sys.stdout.flush()


# --------------------------------------------------------------------------------------------- fine-tune


def quiet_libraries() -> None:
    """Keep transformers' loading bars and deprecation notices out of the demo's output."""
    import warnings

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def finetune():
    from influence import TrainSettings, finetune_lora, inject_label_noise, packaged_minilm_path
    from influence.data import Example, read_labelled_tsv, stratified_subsample

    train = stratified_subsample(read_labelled_tsv(SST2 / "train.tsv"), TRAIN_ROWS, seed=SEED)
    noisy_labels, noisy_mask = inject_label_noise([e.label for e in train], NOISE_RATE, seed=SEED)
    noisy_train = [Example(e.text, int(label)) for e, label in zip(train, noisy_labels, strict=True)]
    validation = read_labelled_tsv(SST2 / "validation.tsv")
    queries, held_out = validation[:QUERY_SENTENCES], validation[QUERY_SENTENCES : QUERY_SENTENCES + EVAL_ROWS]
    progress = Progress()

    def on_step(state: dict) -> None:
        progress.show(
            f"  fine-tuning {bar(state['step'], state['total_steps'])} step {state['step']}/{state['total_steps']}"
            f"  epoch {state['epoch']}  loss {state['loss']:.3f}  {elapsed()}"
        )

    result = finetune_lora(
        packaged_minilm_path(),
        noisy_train,
        DEMO_DIR / "finetune",
        eval_set=held_out,
        train_settings=TrainSettings(epochs=EPOCHS, lr=2e-3, batch_size=32, max_length=MAX_LENGTH, seed=SEED),
        noisy_mask=noisy_mask,
        progress=on_step,
    )
    if not result.reused:
        progress.done()
    accuracy = ", ".join(f"epoch {r.epoch}: {r.eval_accuracy:.1%}" for r in result.epochs)
    say(
        f"  {'reused the cached run' if result.reused else 'trained'} in {DEMO_DIR / 'finetune'}; held-out accuracy "
        f"{accuracy}; best epoch {result.best_epoch}"
    )
    return result, noisy_train, noisy_mask, queries


def write_training_file(rows, mask) -> Path:
    """The noisy training set as TSV, with the ground-truth `noisy` flag the service can report per row."""
    path = DEMO_DIR / f"sst2-train-{len(rows)}-noise{int(NOISE_RATE * 100)}.tsv"
    flagged = [(e.text, e.label, "true" if flipped else "false") for e, flipped in zip(rows, mask, strict=True)]
    text = tsv_text(("sentence", "label", "noisy"), flagged)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------- service


def wait_ready(client, process: subprocess.Popen, timeout: float = 180.0) -> dict:
    """/readyz's full answer. The embedded runner makes an API key of the `local` tenant as it starts; it is sent
    from then on (every call needs it, and /readyz shows its checks' details only to a key)."""
    import httpx

    deadline = time.monotonic() + timeout
    last = "no answer"
    key_file = DATA_DIR / "local-api-key"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the service exited ({process.returncode}); see {DEMO_DIR / 'service.log'}")
        if "Authorization" not in client.headers and key_file.exists():
            client.headers["Authorization"] = f"Bearer {key_file.read_text(encoding='utf-8').strip()}"
        try:
            response = client.get("/readyz")
            if response.status_code == 200 and "checks" in response.json():
                return response.json()
            last = response.json().get("detail", response.text)
        except httpx.TransportError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise SystemExit(f"the service was not ready after {timeout:.0f}s ({last}); see {DEMO_DIR / 'service.log'}")


def check(response, *expected: int) -> dict:
    if response.status_code not in expected:
        raise SystemExit(f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text}")
    return response.json()


def register_model(client, adapter: Path) -> dict:
    from influence import packaged_minilm_path
    from influence.loading import weights_hash

    source = packaged_minilm_path()
    expected = weights_hash(source, adapter)
    for model in check(client.get("/v1/models", params={"limit": 500}), 200)["items"]:
        if model["name"] == "minilm-sst2-lora" and model["weights_hash"] == expected:
            return model
    body = {"name": "minilm-sst2-lora", "source": str(source), "adapter": str(adapter), "task": "classification",
            "num_labels": 2}
    return check(client.post("/v1/models", json=body), 201)


def register_dataset(client, path: Path) -> dict:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for dataset in check(client.get("/v1/datasets", params={"limit": 500}), 200)["items"]:
        if dataset["name"] == path.stem and dataset["content_hash"] == digest:
            return dataset
    data = {"name": path.stem, "text_column": "sentence", "label_column": "label", "noisy_column": "noisy"}
    return check(client.post("/v1/datasets", data=data, files={"file": (path.name, path.read_bytes())}), 201)


def build_index(client, model: dict, dataset: dict) -> dict:
    body = {
        "model_id": model["id"],
        "dataset_id": dataset["id"],
        "projection": {"kind": "factorized", "dim": 256, "seed": 0},
        "dtype": "float16",
        "faiss_kind": "flat",
        "chunk_size": CHUNK_SIZE,
        "max_length": MAX_LENGTH,
    }
    index = check(client.post("/v1/indexes", json=body), 202)
    say(f"  index {index['id']}: {len(index['layers'])} layer units, {index['num_rows']} rows, "
        f"~{index['feature_bytes_estimate'] / 2**20:.0f} MiB of features; job {index['job']['id']}")
    progress = Progress()
    started = time.perf_counter()
    while True:
        job = check(client.get(f"/v1/jobs/{index['job']['id']}"), 200)
        rows = min(job["done"] * CHUNK_SIZE, index["num_rows"])
        rate = rows / (time.perf_counter() - started) if rows else 0.0
        progress.show(
            f"  building {bar(job['done'], job['total'])} {job['done']}/{job['total']} chunks  {rows} rows"
            f"  {rate:5.1f} rows/s  {job['status']}  {elapsed()}"
        )
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    progress.done()
    if job["status"] != "succeeded":
        raise SystemExit(f"the build {job['status']}: {job['error']}")
    index = check(client.get(f"/v1/indexes/{index['id']}"), 200)
    say(f"  ready in {job['duration_s']:.1f}s ({index['num_rows'] / job['duration_s']:.1f} rows/s, all layers); "
        f"{index['size_bytes'] / 2**20:.0f} MiB on disk with DataInf statistics and FAISS indexes")
    return index


# ------------------------------------------------------------------------------------------------ answer


def short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def print_answer(answer: dict) -> None:
    names = ["negative", "positive"]
    layers = answer["layers"]
    say(f"  layers: {len(layers)} middle-layer units ({layers[0]} ... {layers[-1]}); estimator "
        f"{answer['estimator']}; aggregation {answer['aggregation']} over layers; exact over all "
        f"{answer['num_rows']} rows; answered in {answer['seconds']:.2f}s")
    say("  " + answer["conventions"])
    flipped_harmful = flipped_helpful = shown = 0
    for result in answer["results"]:
        say()
        say(f"Example {result['example'] + 1}: \"{short(result['text'], 90)}\"")
        say(f"  label {result['label']} ({names[result['label']]}), the model predicts {result['prediction']} "
            f"({names[result['prediction']]}), loss {result['loss']:.3f}")
        hits = [("helped", h) for h in result["helpful"]] + [("harmed", h) for h in result["harmful"]]
        tags = []
        for i, (kind, hit) in enumerate(hits):
            tag = f"{'H' if kind == 'helped' else 'X'}{i % TOP_K + 1}"
            tags.append(tag)
            if i % TOP_K == 0:
                say(f"  Training rows that most {kind} it (aggregated score = mean rank over the layers):")
            flag = "FLIPPED" if hit["noisy"] else "       "
            say(f"   {tag} row {hit['row']:4d}  label {hit['label']} {flag}  score {hit['score']:7.1f}  "
                f"\"{short(hit['text'], 64)}\"")
            shown += 1
            if kind == "harmed" and hit["noisy"]:
                flipped_harmful += 1
            if kind == "helped" and hit["noisy"]:
                flipped_helpful += 1
        say("  Per-layer score (rank among all rows, 0 = most harmful):")
        say("   " + "layer".ljust(24) + "".join(t.rjust(17) for t in tags))
        for u, layer in enumerate(layers):
            cells = []
            for _, hit in hits:
                entry = hit["layers"][u]
                cells.append(f"{entry['score']:+.1e} ({entry['rank']:4.0f})".rjust(17))
            say("   " + layer.ljust(24) + "".join(cells))
    total = len(answer["results"]) * TOP_K
    say()
    say(f"Rows with a flipped label: {flipped_harmful}/{total} of the most harmful, {flipped_helpful}/{total} of "
        f"the most helpful (20% of all training rows are flipped).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--keep-serving", action="store_true", help="leave the service running at the end")
    args = parser.parse_args()
    import httpx

    from influence import packaged_minilm_path

    quiet_libraries()
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    port = free_port(args.port)
    say(f"[{elapsed()}] Starting the embedded service on 127.0.0.1:{port} (SQLite, artifacts and a filesystem "
        f"broker under {DATA_DIR}; log: {DEMO_DIR / 'service.log'})")
    service = start_service(
        port,
        data_dir=DATA_DIR,
        allowed_roots=[packaged_minilm_path().parent, DEMO_DIR],
        log_path=DEMO_DIR / "service.log",
        env={"INFLUENCE_DEVICE": os.environ.get("INFLUENCE_DEVICE", "auto")},
    )
    try:
        say(f"[{elapsed()}] Fine-tuning MiniLM + LoRA on {TRAIN_ROWS} SST-2 rows, {NOISE_RATE:.0%} of labels flipped")
        result, train, mask, queries = finetune()
        dataset_file = write_training_file(train, mask)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            ready = wait_ready(client, service)
            say(f"[{elapsed()}] Service ready: " + "; ".join(
                f"{name} ({check['detail']})" for name, check in ready["checks"].items()))
            say(f"[{elapsed()}] Authenticating with the local API key in {DATA_DIR / 'local-api-key'}")
            model = register_model(client, result.best_adapter.resolve())
            dataset = register_dataset(client, dataset_file)
            say(f"[{elapsed()}] Registered model {model['id']} ({model['num_layers']} layer units) and dataset "
                f"{dataset['id']} ({dataset['row_count']} rows)")
            say(f"[{elapsed()}] Building the index over every layer")
            index = build_index(client, model, dataset)
            say(f"[{elapsed()}] Asking which training rows most helped and most harmed {len(queries)} validation "
                f"sentences (middle layers, rank aggregation)")
            body = {
                "examples": [{"text": e.text, "label": e.label} for e in queries],
                "layers": "middle",
                "estimator": "grad-dot",
                "aggregation": "rank",
                "top_k": TOP_K,
                "direction": "both",
            }
            answer = check(client.post(f"/v1/indexes/{index['id']}/query", json=body), 200)
            print_answer(answer)
            say()
            say(f"[{elapsed()}] Done. The API was at http://127.0.0.1:{port}/docs")
            if args.keep_serving:
                say("Serving until Ctrl-C.")
                with contextlib.suppress(KeyboardInterrupt):
                    service.wait()
    finally:
        stop_service(service)


if __name__ == "__main__":
    main()
