"""Stage `report`: a `layer_report` job on the experiment's index, run inline: NDR / AUC-NDR per layer,
aggregation and estimator against the injected noise (the noisy dataset's `noisy` column)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Job
from app.workflows.experiment.stages.context import NoQueue, StageContext
from app.workflows.experiment.stages.subjobs import reference_set, run_subjob, subjob
from app.workflows.report.schemas import ReportCreate
from app.workflows.report.service import LAYER_REPORT, create_report


def run(ctx: StageContext) -> dict[str, Any]:
    index_id = ctx.state.outputs["index"]["index_id"]
    body = ReportCreate(
        reference=reference_set(ctx.params["reference"]), noisy="dataset", **ctx.params["report"]
    )

    def create(session: Session, settings: Settings) -> Job:
        return create_report(session, settings, NoQueue(), index_id, body, ctx.run.tenant_id)

    report_id = subjob(ctx, "report", LAYER_REPORT, index_id, create)
    job = run_subjob(ctx, report_id, "layer report")
    return {"report_id": report_id, "summary": (job.result or {}).get("summary")}
