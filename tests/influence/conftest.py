"""Fixtures shared by the library's test modules."""

from __future__ import annotations

import time

import pytest

from influence.data import stratified_subsample
from influence.finetune import TrainSettings, finetune_lora, inject_label_noise
from influence.loading import packaged_minilm_path

MINILM_SETTINGS = TrainSettings(epochs=2, lr=5e-3, batch_size=16, max_length=32, seed=0)


@pytest.fixture(scope="session")
def minilm_run(tmp_path_factory, sst2_train, sst2_validation):
    """One real fine-tune of the packaged MiniLM (LoRA r = 4 on query and value) on 256 SST-2 rows: test_finetune.py
    checks the training, test_real_model.py scores its adapter (one fine-tune for both: it is the slow part)."""
    train = stratified_subsample(sst2_train, 256, seed=0)
    # Trained on clean labels (a clear loss drop in 2 short epochs); the mask only exercises noisy_mask.npy.
    _, mask = inject_label_noise([e.label for e in train], 0.2, seed=0)
    eval_set = sst2_validation[:48]
    out = tmp_path_factory.mktemp("minilm-run")
    steps: list[dict] = []
    started = time.perf_counter()
    result = finetune_lora(
        packaged_minilm_path(), train, out, eval_set=eval_set, train_settings=MINILM_SETTINGS,
        noisy_mask=mask, progress=steps.append,
    )
    seconds = time.perf_counter() - started
    return {"result": result, "train": train, "eval": eval_set, "steps": steps, "mask": mask,
            "seconds": seconds}
