"""`influence check`: a batch of new rows scored against an index before it joins the training set; the exit
status follows the verdict (1: fail). Scoring options not given are the index's settings (not sent: the service
decides, and says where they came from); the threshold is a percentile, or calibrated for a target precision or
recall against a noisy mask."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from influence_client.cli import workflows
from influence_client.cli.arguments import FROM_INDEX, add_scoring_options, noisy_rows, options_of
from influence_client.cli.context import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    CommandError,
    Context,
    Record,
    finish,
    job_of,
)
from influence_client.cli.datasets import FORMATS
from influence_client.cli.output import cell, fmt, short
from influence_client.cli.settings import print_settings
from influence_client.cli.workflows import Workflow
from influence_client.schemas import CheckOptions


class Check(Workflow):
    """Batch checks: the verdict printed, and the exit status it sets."""

    resource = workflows.job_resource("check", filters=(workflows.INDEX_FILTER,))
    helps: ClassVar[Mapping[str, str]] = {
        "": "batch check of new rows before they join the training set (exit 1: fail)",
        "create": "check a file of new rows, wait, print the verdict",
        "show": "show a check (exit 1 when its verdict is fail)",
    }

    def add_create_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("index_id")
        parser.add_argument("file")
        parser.add_argument("--format", choices=FORMATS)
        parser.add_argument("--text-column", required=True)
        parser.add_argument("--text-pair-column")
        parser.add_argument("--label-column", required=True)
        workflows.add_reference_options(parser)
        add_scoring_options(parser)
        parser.add_argument(
            "--correct-only",
            action="store_true",
            default=None,
            help="voters: correctly predicted rows" + FROM_INDEX,
        )
        threshold = parser.add_argument_group("threshold (one of; default: percentile 5)")
        threshold.add_argument("--threshold-percentile", type=float, help="flag rows below this percentile")
        threshold.add_argument(
            "--target-precision",
            type=float,
            help="calibrate the threshold on the index's rows for this precision, in (0, 1], against --noisy",
        )
        threshold.add_argument(
            "--target-recall",
            type=float,
            help="calibrate the threshold on the index's rows for this recall, in (0, 1], against --noisy",
        )
        threshold.add_argument(
            "--noisy",
            type=noisy_rows,
            help="with a target, the known-noisy rows: `dataset` (its noisy column, the default when it has "
            "one), or row ids: a file of them (one per line, or a JSON list), a JSON list, or comma-separated",
        )
        parser.add_argument("--max-flagged", type=int, help="fail when more rows are flagged (0)")
        parser.add_argument(
            "--append", action="store_true", default=None, help="a passing batch joins the index"
        )

    def add_show_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--all-rows", action="store_true", help="print every row, not only the flagged ones"
        )

    def create(self, ctx: Context) -> Record:
        args = ctx.args
        if not Path(args.file).is_file():
            raise CommandError(f"no such file: {args.file}")
        return ctx.client.create_check(
            args.index_id,
            args.file,
            reference=workflows.reference(args),
            text_column=args.text_column,
            label_column=args.label_column,
            **options_of(args, CheckOptions),
        )

    def result(self, ctx: Context, check_id: str) -> int:
        """Print a check; the exit status follows its verdict (1: fail). --json holds every scored row, the table
        the flagged ones (every one with --all-rows)."""
        flagged_only = not (ctx.console.as_json or ctx.args.all_rows)
        check = ctx.client.get_check(check_id, flagged_only=flagged_only or None)
        shown = check.get("rows") or []

        def render() -> None:
            ctx.console.fields(workflows.head_fields("check", check))
            print_settings(ctx, check, check.get("index_id"))
            verdict = check.get("verdict")
            summary = check.get("summary") or {}
            if verdict is None:
                return
            ctx.console.line()
            ctx.console.line(
                f"verdict: {verdict.upper()} ({summary.get('flagged')} of {summary.get('rows')} rows flagged "
                f"below percentile {cell(summary.get('threshold_percentile'))}, at most "
                f"{summary.get('max_flagged')} allowed)"
            )
            if summary.get("calibration"):
                ctx.console.line(calibration_line(summary["calibration"]))
            for reason in check.get("reasons") or []:
                ctx.console.line(f"  - {reason}")
            for warning in check.get("warnings") or []:
                ctx.console.line(f"warning: {warning}")
            append = check.get("append") or {}
            if append.get("requested"):
                reason = f" ({append['reason']})" if append.get("reason") else ""
                ctx.console.line(
                    f"append: {append.get('status')}, {check.get('appended', 0)} rows joined{reason}"
                )
            ctx.console.line()
            ctx.console.table(
                ("ROW", "SCORE", "PERCENTILE", "FLAGGED", "LABEL", "TEXT"),
                [
                    [r["row"], r["score"], r["percentile"], r["flagged"], r["label"], short(r["text"])]
                    for r in shown
                ],
            )

        ctx.console.result(check, render)
        finish(job_of(check), "check")
        return EXIT_CHECK_FAILED if check.get("verdict") == "fail" else EXIT_OK


def calibration_line(calibration: Record) -> str:
    """The derived threshold, and the precision and recall it is expected to have, with their intervals."""
    c = calibration
    precision, recall = c.get("precision_interval") or [None, None], c.get("recall_interval") or [None, None]
    return (
        f"calibrated: percentile {cell(c.get('threshold_percentile'))} (the {c.get('cutoff_rows')} lowest of "
        f"{c.get('rows')} existing rows) for {c.get('target')} >= {c.get('value')}, on {c.get('known_noisy')} "
        f"known noisy rows: expected precision {fmt(c.get('precision'), 2)} [{fmt(precision[0], 2)}, "
        f"{fmt(precision[1], 2)}], recall {fmt(c.get('recall'), 2)} [{fmt(recall[0], 2)}, {fmt(recall[1], 2)}] "
        f"({cell(100 * c['confidence']) if c.get('confidence') is not None else '-'}% intervals)"
    )


CHECK = Check()
