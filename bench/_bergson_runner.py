"""Runs inside bergson's own virtual environment (/tmp/bergson-venv): times bergson 2.5.1's GradientCollector
side by side with the forward + backward floor, in this process, on the rows bench.featurize hands over.

    /tmp/bergson-venv/bin/python bench/_bergson_runner.py ROWS.json [--rounds 5] [--batch-size 32]

ROWS.json: {"rows": [[input_ids, label], ...], "adapter": folder, "base": MiniLM folder}. Prints one JSON line.

bergson setup, as in the issue: its collector's forward hooks and full backward hooks, per-module projection
16 x 16 (GradientProcessor(projection_dim=16), Rademacher, its default), target modules = the 24 LoRA A/B
Linear modules only (no head, no embedding: bergson supports neither the embedding nor, here, a PEFT
modules_to_save head as a target without more work). Batches of 32 sorted by length, eval mode, float32.
The loss is the per-row cross-entropy of the label (a classification head; bergson's own driver is written for
causal LMs, so the batch loop is ours and the hooks are bergson's).

Checks: bergson without projection (raw per-row LoRA gradients) against a batch-of-one loop's gradients, and
bergson's 16 x 16 features against its own projection matrices applied to those exact gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rows")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    import bergson
    from bergson.collector.gradient_collectors import GradientCollector
    from bergson.config import IndexConfig
    from bergson.gradients import GradientProcessor
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    with open(args.rows) as handle:
        payload = json.load(handle)
    rows = payload["rows"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(
            payload["base"], num_labels=2, dtype=torch.float32
        )
    model = PeftModel.from_pretrained(base, payload["adapter"], is_trainable=False).eval()
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or ("classifier" in name and "original_module" not in name))
    lora_modules = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and (".lora_A." in name + "." or ".lora_B." in name + ".")
    }

    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    batches = []
    for start in range(0, len(order), args.batch_size):
        idx = order[start : start + args.batch_size]
        width = max(len(rows[i][0]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, : len(rows[i][0])] = torch.tensor(rows[i][0])
            mask[j, : len(rows[i][0])] = 1
        labels = torch.tensor([rows[i][1] for i in idx])
        batches.append((idx, ids, mask, labels))

    data = Dataset.from_dict({"input_ids": [r[0] for r in rows]})
    tmp = tempfile.mkdtemp(prefix="bergson-bench-")

    def collector_for(projection_dim):
        cfg = IndexConfig(run_path=tmp, projection_dim=projection_dim or 0)
        processor = GradientProcessor(projection_dim=projection_dim)
        return GradientCollector(
            model=model, data=data, cfg=cfg, processor=processor, target_modules=lora_modules, skip_index=True
        )

    def floor():
        for _, ids, mask, labels in batches:
            model.zero_grad(set_to_none=True)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()

    def run_bergson(collector, keep=False):
        kept = {}
        for idx, ids, mask, labels in batches:
            with collector.with_batch(None):
                logits = model(input_ids=ids, attention_mask=mask).logits
                losses = F.cross_entropy(logits, labels, reduction="none")
                losses.sum().backward()
                model.zero_grad(set_to_none=True)
            if keep:
                for name, value in collector.mod_grads.items():
                    for j, i in enumerate(idx):
                        kept.setdefault(i, {})[name] = value[j].clone()
            collector.process_batch(idx, losses=losses)
        return kept

    projected = collector_for(16)
    methods = {"floor": floor, "bergson": lambda: run_bergson(projected)}
    for fn in methods.values():
        fn()
    rates = {name: [] for name in methods}
    ratios = []
    rng = random.Random(0)
    for _ in range(args.rounds):
        names = list(methods)
        rng.shuffle(names)
        this = {}
        for name in names:
            start = time.perf_counter()
            methods[name]()
            this[name] = len(rows) / (time.perf_counter() - start)
        for name, rate in this.items():
            rates[name].append(rate)
        ratios.append(this["bergson"] / this["floor"])

    # checks on the first batch: raw gradients vs a batch-of-one loop; projected vs its matrices
    first = batches[0][0]
    raw = run_bergson(collector_for(None), keep=True)
    feats = run_bergson(projected, keep=True)
    modules = dict(model.named_modules())
    raw_err = proj_err = 0.0
    for i in first[:8]:
        model.zero_grad(set_to_none=True)
        ids = torch.tensor([rows[i][0]])
        loss = F.cross_entropy(
            model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, torch.tensor([rows[i][1]])
        )
        loss.backward()
        for name in lora_modules:
            exact = modules[name].weight.grad.detach()
            got = raw[i][name].reshape(exact.shape)
            raw_err = max(raw_err, float((got - exact).norm() / exact.norm().clamp(min=1e-30)))
            o, k = exact.shape
            left = projected.projection(name, 16, o, "left", exact.device, exact.dtype)
            right = projected.projection(name, 16, k, "right", exact.device, exact.dtype)
            expected = left @ exact @ right.T
            got_p = feats[i][name].reshape(expected.shape)
            proj_err = max(proj_err, float((got_p - expected).norm() / expected.norm().clamp(min=1e-30)))
    model.zero_grad(set_to_none=True)
    print(
        json.dumps(
            {
                "bergson_version": getattr(bergson, "__version__", "2.5.1"),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "modules": len(lora_modules),
                "projection": "16 x 16 per module (Rademacher, bergson default)",
                "rows": len(rows),
                "rounds": args.rounds,
                "rows_per_s": {k: statistics.median(v) for k, v in rates.items()},
                "rows_per_s_all": rates,
                "ratio_to_floor": {
                    "median": statistics.median(ratios),
                    "min": min(ratios),
                    "max": max(ratios),
                },
                "check_raw_vs_loop_max_rel_err": raw_err,
                "check_projected_vs_own_matrices_max_rel_err": proj_err,
                "load_avg": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
