"""Stage `noise`: read the training rows and flip exactly round(rate n) labels with the seed
(influence.inject_label_noise). The noisy rows (noisy.jsonl) become the new dataset; noise.json records the
flipped rows and both labellings, which the fine-tunes read back (noisy_training)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from app.services.datasets import iter_rows
from app.workflows.experiment.stages.context import StageContext, training_dataset
from influence import Example, inject_label_noise

NOISY_ROWS_FILE = "noisy.jsonl"
NOISE_FILE = "noise.json"


def run(ctx: StageContext) -> dict[str, Any]:
    params = ctx.params
    with ctx.run.session() as session:
        dataset = training_dataset(session, params)
    rows = list(iter_rows(ctx.settings, dataset))
    labels = [int(row["label"]) for row in rows]
    noisy, mask = inject_label_noise(
        labels, float(params["noise_rate"]), int(params["seed"]), int(params["num_classes"])
    )
    names = dataset.label_names
    with ctx.run.write_file(NOISY_ROWS_FILE) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for row, label, flipped in zip(rows, noisy.tolist(), mask.tolist(), strict=True):
            record = {
                "text": row["text"],
                "text_pair": row.get("text_pair"),
                # Names stay names, so the new dataset numbers its classes as the training dataset does.
                "label": names[label] if names else label,
                "noisy": bool(flipped),
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    ctx.state.artifacts[NOISY_ROWS_FILE] = ctx.run.artifacts[NOISY_ROWS_FILE]
    ctx.write_json(
        NOISE_FILE,
        {
            "rate": params["noise_rate"],
            "seed": params["seed"],
            "num_classes": params["num_classes"],
            "flipped_rows": np.flatnonzero(mask).tolist(),
            "clean_labels": labels,
            "noisy_labels": noisy.tolist(),
        },
    )
    return {
        "rate": params["noise_rate"],
        "seed": params["seed"],
        "rows": len(rows),
        "flipped": int(mask.sum()),
        "num_classes": params["num_classes"],
    }


def noisy_training(ctx: StageContext) -> tuple[list[Example], np.ndarray]:
    """The noisy training examples (class indices) and the flipped mask, from this stage's artifacts."""
    noise = json.loads((ctx.run.directory / NOISE_FILE).read_text(encoding="utf-8"))
    examples = []
    with open(ctx.run.directory / NOISY_ROWS_FILE, encoding="utf-8") as handle:
        for line, label in zip(handle, noise["noisy_labels"], strict=True):
            row = json.loads(line)
            examples.append(Example(text=row["text"], label=int(label), text_pair=row.get("text_pair")))
    mask = np.zeros(len(examples), dtype=bool)
    mask[noise["flipped_rows"]] = True
    return examples, mask
