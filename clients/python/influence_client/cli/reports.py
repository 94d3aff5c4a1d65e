"""`influence report`: which layers, estimator and aggregation find the noisy training rows."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import ClassVar

from influence_client.cli import workflows
from influence_client.cli.arguments import add_scoring_options, noisy_rows, options_of
from influence_client.cli.context import Context, Record, finish, job_of
from influence_client.cli.output import fmt
from influence_client.cli.workflows import Workflow
from influence_client.client import InfluenceClient
from influence_client.schemas import ReportOptions


def _render(ctx: Context, report: Record, top: int) -> None:
    console = ctx.console
    body = report.get("report")
    console.fields(workflows.head_fields("report", report))
    if not isinstance(body, dict):
        return
    console.line()
    console.line(
        f"{body.get('n_train')} training rows ({body.get('n_noisy')} noisy), {body.get('n_reference')} reference "
        f"rows, reference accuracy {fmt(body.get('reference_accuracy'))}"
    )
    recommendation = body.get("recommendation")
    if recommendation:
        layers = recommendation.get("layers") or {}
        console.line(
            f"recommendation: layers {layers.get('name')} ({layers.get('kind')}), aggregation "
            f"{recommendation.get('aggregation')}, estimator {recommendation.get('estimator')}: AUC-NDR "
            f"{fmt(recommendation.get('auc_ndr'))} (gain {fmt(recommendation.get('auc_ndr_gain'))}, required "
            f"{fmt(recommendation.get('required_gain'))})"
        )
    else:
        explanation = (body.get("criteria") or {}).get("explanation")
        console.line("recommendation: none" + (f" ({explanation})" if explanation else ""))
    for warning in body.get("warnings") or []:
        console.line(f"warning: {warning}")
    entries = sorted(
        body.get("entries") or [],
        key=lambda e: -(e.get("auc_ndr") if e.get("auc_ndr") is not None else float("-inf")),
    )[:top]
    if entries:
        percents = list(entries[0].get("ndr") or {})[:3]
        console.line()
        console.table(
            ("ESTIMATOR", "AGGREGATION", "LAYERS", "AUC-NDR", "GAIN", "Z", *(f"NDR@{p}" for p in percents)),
            [
                [
                    e.get("estimator"),
                    e.get("aggregation"),
                    (e.get("layers") or {}).get("name"),
                    fmt(e.get("auc_ndr")),
                    fmt(e.get("auc_ndr_gain")),
                    fmt(e.get("auc_ndr_z"), 2),
                    *(fmt((e.get("ndr") or {}).get(p)) for p in percents),
                ]
                for e in entries
            ],
        )


class Report(Workflow):
    """Layer reports: the recommendation and the best entries printed, the HTML page saved."""

    resource = workflows.job_resource(
        "report", name="layer report", filters=(workflows.INDEX_FILTER, workflows.STATUS_FILTER)
    )
    helps: ClassVar[Mapping[str, str]] = {
        "": "layer report: which layers, estimator and aggregation detect noisy rows",
        "create": "start a layer report, wait, print its recommendation",
        "download": "save the report's HTML page to FILE",
    }
    downloads = True

    def add_create_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("index_id")
        workflows.add_reference_options(parser)
        add_scoring_options(parser, plural=True)
        parser.add_argument("--vote-k", type=float)
        parser.add_argument(
            "--noisy",
            type=noisy_rows,
            help="`dataset` (its noisy column) or the noisy row ids: a file of them (one per line, or a JSON "
            "list), a JSON list, or comma-separated",
        )
        parser.add_argument(
            "--cancellation-rows", type=int, help="rows the cancellation is measured over (1000)"
        )
        parser.add_argument("--top-rows", type=int, help="most detrimental rows listed per estimator (20)")

    def add_show_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--top", type=int, default=10, help="table rows to print (10)")
        parser.add_argument("--html", metavar="FILE", help="save the report's HTML page")

    def create(self, ctx: Context) -> Record:
        args = ctx.args
        return ctx.client.create_report(
            args.index_id, workflows.reference(args), **options_of(args, ReportOptions)
        )

    def result(self, ctx: Context, report_id: str) -> int:
        report = ctx.client.get_report(report_id)
        if ctx.args.html and job_of(report).get("status") == "succeeded":
            ctx.client.report_html(report_id, ctx.args.html)
            ctx.console.note(f"saved the report page to {ctx.args.html}")
        ctx.console.result(report, lambda: _render(ctx, report, ctx.args.top))
        return finish(job_of(report), "report")

    def download(self, client: InfluenceClient, report_id: str, path: str) -> str:
        client.report_html(report_id, path)
        return "the report page"


REPORT = Report()
