"""Experiments, the worker side: the paper's protocol (method.md §4, §6) as one `experiment` job, stage after
stage (a module each under stages/):

    noise       read the training rows, flip exactly round(rate n) labels with the seed
    finetune    LoRA fine-tune of the base model on the noisy rows, the epoch with the lowest loss on the
                reference set kept (the paper's checkpoint)
    register    the noisy rows as a NEW dataset of the tenant and the fine-tuned checkpoint as a NEW model
    index       an index of that dataset under that model, built inside this job
    report      a `layer_report` job on the index, run inline: NDR / AUC-NDR against the injected noise
    retraining  (optional) an `audit` ranks the training rows; the lowest ranked are removed and the model
                fine-tuned again, compared with removing as many rows at random and with the oracle

Every stage is idempotent. Finished stages and their outputs are recorded in state.json (app/workflows/
experiment/state.py), so a job restarted after a crash continues with the first unfinished stage; a resource a
stage creates is also found again by what identifies it, so a crash between creating it and recording it never
creates it twice. `stage` in state.json is the live stage (GET /v1/experiments/{id} reads it); job progress is
stage-weighted over PROGRESS_TOTAL units.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from app.jobs.run import JobRun, job_runner
from app.workflows.experiment.schemas import STAGES
from app.workflows.experiment.stages import finetune, index, noise, register, report, retraining
from app.workflows.experiment.stages.context import Progress, StageContext
from app.workflows.experiment.state import KIND, STATE_FILE, ExperimentState

log = logging.getLogger(__name__)

STAGE_RUNNERS: dict[str, Callable[[StageContext], dict[str, Any]]] = {
    "noise": noise.run,
    "finetune": finetune.run,
    "register": register.run,
    "index": index.run,
    "report": report.run,
    "retraining": retraining.run,
}


@job_runner(KIND)
def run_experiment(run: JobRun) -> dict[str, Any]:
    stages = [s for s in STAGES if s != "retraining" or run.params["retraining"]["enabled"]]
    state = ExperimentState.load(run.directory / STATE_FILE)
    ctx = StageContext(run, state, Progress(run, stages))
    for stage in stages:
        if stage in state.stages_done:
            continue
        state.stage = stage
        state.save()
        ctx.at(0.0)
        log.info("experiment %s: stage %s", run.job_id, stage)
        state.finish(stage, STAGE_RUNNERS[stage](ctx))
    state.stage = "done"
    state.save()
    return {
        "stage": "done",
        "stages_done": state.stages_done,
        "outputs": state.outputs,
        "artifacts": dict(state.artifacts),
    }
