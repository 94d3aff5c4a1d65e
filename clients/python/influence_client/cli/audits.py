"""`influence audit`: every training row of an index scored against a reference set, most detrimental first."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from influence_client.cli import workflows
from influence_client.cli.arguments import add_scoring_options, options_of
from influence_client.cli.context import CommandError, Context, Record, finish, job_of
from influence_client.cli.output import fmt, short
from influence_client.cli.workflows import Workflow
from influence_client.client import InfluenceClient
from influence_client.schemas import AuditOptions, AuditRow

ROW_FORMATS = (".csv", ".jsonl")
SCORES_FORMAT = ".safetensors"


def _rows_format(path: str) -> Literal["csv", "jsonl"]:
    return "csv" if Path(path).suffix.lower() == ".csv" else "jsonl"


def _noise_fields(noise: Record | None) -> list[tuple[str, Any]]:
    """How well a ranking finds the dataset's noisy rows, against a random order."""
    if not noise:
        return []
    return [
        (
            "noise found",
            f"{noise['noisy_rows']} noisy rows: NDR@30 {fmt(noise['ndr_at_30'])} (random "
            f"{fmt(noise['random_ndr_at_30'])}), AUC-NDR {fmt(noise['auc_ndr'])} (random "
            f"{fmt(noise['random_auc_ndr'])})",
        )
    ]


class Audit(Workflow):
    """Audits: the most detrimental rows printed, every row or the score tensor saved."""

    resource = workflows.job_resource("audit")
    helps: ClassVar[Mapping[str, str]] = {
        "": "audit every training row against a reference set",
        "create": "start an audit, wait, print the most detrimental rows",
        "show": "show an audit and its most detrimental rows",
        "delete": "delete an audit and its files",
        "download": "save every row (FILE.csv or FILE.jsonl) or the raw score tensor (FILE.safetensors)",
    }
    downloads = True

    def add_create_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("index_id")
        workflows.add_reference_options(parser)
        add_scoring_options(parser)
        parser.add_argument(
            "--correct-only", action="store_true", default=None, help="voters: correctly predicted rows"
        )
        parser.add_argument("--vote-k", type=float)

    def create(self, ctx: Context) -> Record:
        args = ctx.args
        return ctx.client.create_audit(
            args.index_id, workflows.reference(args), **options_of(args, AuditOptions)
        )

    def add_show_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--top", type=int, default=10, help="rows to print (10)")
        parser.add_argument("--output", metavar="FILE", help="save every row: FILE.csv or FILE.jsonl")
        parser.add_argument("--scores", metavar="FILE", help="save the raw score tensor (safetensors)")

    def validate_show_options(self, args: argparse.Namespace) -> None:
        if args.output and Path(args.output).suffix.lower() not in ROW_FORMATS:
            raise CommandError(f"--output must end in .csv or .jsonl: {args.output}")

    def result(self, ctx: Context, audit_id: str) -> int:
        """Print (and download) a finished audit."""
        args, client = ctx.args, ctx.client
        audit = client.get_audit(audit_id)
        rows: list[AuditRow] = []
        if job_of(audit).get("status") == "succeeded":
            if args.top > 0:
                rows = client.audit_rows(audit_id, limit=args.top)["items"]
            if args.output:
                client.download_audit(audit_id, _rows_format(args.output), args.output)
                ctx.console.note(f"saved every row to {args.output}")
            if args.scores:
                client.download_audit_scores(audit_id, args.scores)
                ctx.console.note(f"saved the score tensor to {args.scores}")

        def render() -> None:
            pairs = workflows.head_fields("audit", audit)
            summary = audit.get("summary")
            if summary:
                accuracy = summary["reference_accuracy"]
                pairs.extend(
                    [
                        (
                            "rows",
                            f"{summary['num_rows']} ranked, {summary['estimator']} / {summary['aggregation']}",
                        ),
                        ("layers", f"{len(summary['layers'])}: " + short(", ".join(summary["layers"]), 80)),
                        (
                            "reference",
                            f"{summary['num_reference']} rows"
                            + (f", model accuracy {accuracy:.3f}" if accuracy is not None else ""),
                        ),
                        *_noise_fields(summary.get("noise")),
                    ]
                )
            ctx.console.fields(pairs)
            if audit.get("rows_deleted_since_audit"):
                ctx.console.line(
                    f"note: {audit['rows_deleted_since_audit']} audited rows were deleted from the index since"
                )
            if rows:
                ctx.console.line()
                ctx.console.line("most detrimental rows (rank 0 = most detrimental):")
                ctx.console.table(
                    ("RANK", "ROW", "SCORE", "LABEL", "NOISY", "TEXT"),
                    [
                        [r["rank"], r["row"], r["score"], r["label"], r["noisy"], short(r["text"])]
                        for r in rows
                    ],
                )

        ctx.console.result({"audit": audit, "rows": rows}, render)
        return finish(job_of(audit), "audit")

    def download(self, client: InfluenceClient, audit_id: str, path: str) -> str:
        suffix = Path(path).suffix.lower()
        if suffix == SCORES_FORMAT:
            client.download_audit_scores(audit_id, path)
            return "the score tensor"
        if suffix not in ROW_FORMATS:
            raise CommandError(
                f"FILE must end in .csv, .jsonl (every row) or .safetensors (the scores): {path}"
            )
        client.download_audit(audit_id, _rows_format(path), path)
        return "every row"


AUDIT = Audit()
