"""`influence audit`: every training row of an index scored against a reference set, most detrimental first,
with the settings it used (the index's, for the scoring options not given) and, with --review-recall, the review
prefix: the first rows of the ranking a reviewer reads to find that share of the noisy rows."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from influence_client.cli import workflows
from influence_client.cli.arguments import FROM_INDEX, add_scoring_options, noisy_rows, options_of
from influence_client.cli.context import CommandError, Context, Record, finish, job_of
from influence_client.cli.output import fmt, short
from influence_client.cli.settings import print_settings
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


def review_line(review: Record) -> str:
    """The review prefix: how many rows to read, what share of the known-noisy rows they hold, and the
    precision to expect, with their intervals."""
    recall, precision = (
        review.get("recall_interval") or [None, None],
        review.get("precision_interval") or [None, None],
    )
    share = review.get("share")
    return (
        f"review: read the first {review.get('rows')} of {review.get('total_rows')} rows"
        + (f" ({100 * share:.1f}%)" if share is not None else "")
        + f" for recall >= {review.get('target_recall')}: they hold {review.get('found')} of "
        f"{review.get('known_noisy')} known noisy rows, recall {fmt(review.get('recall'), 2)} "
        f"[{fmt(recall[0], 2)}, {fmt(recall[1], 2)}], expected precision {fmt(review.get('precision'), 2)} "
        f"[{fmt(precision[0], 2)}, {fmt(precision[1], 2)}] (`audit show ID --review` lists them)"
    )


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
            "--correct-only",
            action="store_true",
            default=None,
            help="voters: correctly predicted rows" + FROM_INDEX,
        )
        review = parser.add_argument_group("review prefix")
        review.add_argument(
            "--review-recall",
            type=float,
            metavar="RECALL",
            help="also mark the shortest start of the ranking expected to hold this share, in (0, 1], of the "
            "noisy rows",
        )
        review.add_argument(
            "--noisy",
            type=noisy_rows,
            help="with --review-recall, the known-noisy rows: `dataset` (its noisy column, the default when it "
            "has one), or row ids: a file of them (one per line, or a JSON list), a JSON list, or comma-separated",
        )

    def create(self, ctx: Context) -> Record:
        args = ctx.args
        options = options_of(args, AuditOptions)
        if args.review_recall is not None:
            review: dict[str, Any] = {"target_recall": args.review_recall}
            if args.noisy is not None:
                review["noisy"] = args.noisy
            options["review"] = review
        elif args.noisy is not None:
            raise CommandError(
                "--noisy goes with --review-recall (the mask the review prefix is measured against)"
            )
        return ctx.client.create_audit(args.index_id, workflows.reference(args), **options)

    def add_show_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--top", type=int, default=10, help="rows to print (10)")
        parser.add_argument("--output", metavar="FILE", help="save every row: FILE.csv or FILE.jsonl")
        parser.add_argument("--scores", metavar="FILE", help="save the raw score tensor (safetensors)")
        # Not `review`: that is AuditOptions' review object, which options_of would take this flag for.
        parser.add_argument(
            "--review",
            dest="review_only",
            action="store_true",
            help="the rows printed and saved (--output) are the review prefix's only (an audit made with "
            "--review-recall)",
        )

    def validate_show_options(self, args: argparse.Namespace) -> None:
        if args.output and Path(args.output).suffix.lower() not in ROW_FORMATS:
            raise CommandError(f"--output must end in .csv or .jsonl: {args.output}")

    def result(self, ctx: Context, audit_id: str) -> int:
        """Print (and download) a finished audit."""
        args, client = ctx.args, ctx.client
        audit = client.get_audit(audit_id)
        rows: list[AuditRow] = []
        if job_of(audit).get("status") == "succeeded":
            if args.review_only and not (audit.get("summary") or {}).get("review"):
                raise CommandError(
                    f"audit {audit_id} has no review prefix: create one with --review-recall to have one"
                )
            if args.top > 0:
                rows = client.audit_rows(audit_id, limit=args.top, review=args.review_only)["items"]
            if args.output:
                client.download_audit(
                    audit_id, _rows_format(args.output), args.output, review=args.review_only
                )
                saved = "the review prefix's rows" if args.review_only else "every row"
                ctx.console.note(f"saved {saved} to {args.output}")
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
            print_settings(ctx, audit, audit.get("index_id"))
            if summary and summary.get("review"):
                ctx.console.line(review_line(summary["review"]))
            if audit.get("rows_deleted_since_audit"):
                ctx.console.line(
                    f"note: {audit['rows_deleted_since_audit']} audited rows were deleted from the index since"
                )
            if rows:
                ctx.console.line()
                ctx.console.line(
                    ("the review prefix" if args.review_only else "most detrimental rows")
                    + " (rank 0 = most detrimental):"
                )
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
