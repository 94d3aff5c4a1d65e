"""`influence datasets`: upload, register-path, list, show, rows, delete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from influence_client.cli.arguments import add_command, add_group, add_page_options, options_of
from influence_client.cli.context import EXIT_OK, CommandError, Context, Record, fields_named, page_table
from influence_client.cli.output import short, size
from influence_client.cli.resources import Resource, add_delete, add_list, add_show
from influence_client.schemas import DatasetOptions

FORMATS = ("jsonl", "csv", "tsv", "parquet")


def _render(ctx: Context, dataset: Record) -> None:
    columns = dataset["columns"]
    ctx.console.fields(
        [
            *fields_named(dataset, "id", "name", "format", "task", "source"),
            ("rows", dataset["row_count"]),
            ("size", size(dataset["size_bytes"])),
            ("columns", ", ".join(f"{k}={v}" for k, v in columns.items() if v is not None)),
            *fields_named(dataset, "labels", "label_names"),
            ("noisy flag", dataset["has_noisy_flag"]),
            *fields_named(dataset, "content_hash", "created_at"),
        ]
    )


def _row(dataset: Record) -> list[Any]:
    labels = dataset["label_names"] or [str(label) for label in dataset["labels"]]
    return [
        *(dataset[key] for key in ("id", "name", "format", "task", "row_count")),
        ",".join(labels),
        dataset["has_noisy_flag"],
        short(dataset["source"], 40),
    ]


DATASETS = Resource(
    noun="dataset",
    render=_render,
    headers=("ID", "NAME", "FORMAT", "TASK", "ROWS", "LABELS", "NOISY", "SOURCE"),
    row=_row,
)


def add_commands(commands: Any) -> None:
    datasets = add_group(commands, "datasets", "register, inspect and delete datasets")
    for name, handler, source, what in (
        ("upload", upload, "file", "upload a dataset file (JSONL, CSV, TSV, Parquet)"),
        ("register-path", register_path, "path", "register a file already on the server"),
    ):
        sub = add_command(datasets, name, handler, what)
        sub.add_argument(source)
        sub.add_argument("--name")
        sub.add_argument("--format", choices=FORMATS)
        sub.add_argument("--task", choices=("classification", "causal-lm"))
        sub.add_argument("--text-column")
        sub.add_argument("--text-pair-column")
        sub.add_argument("--label-column")
        sub.add_argument("--noisy-column")
    add_list(datasets, DATASETS)
    add_show(datasets, DATASETS)
    sub = add_command(datasets, "rows", rows, "page through a dataset's rows")
    sub.add_argument("dataset_id")
    add_page_options(sub, limit=20)
    add_delete(datasets, DATASETS)


def upload(ctx: Context) -> int:
    if not Path(ctx.args.file).is_file():
        raise CommandError(f"no such file: {ctx.args.file}")
    dataset = ctx.client.upload_dataset(ctx.args.file, **options_of(ctx.args, DatasetOptions))
    ctx.console.result(dataset, lambda: _render(ctx, dataset))
    return EXIT_OK


def register_path(ctx: Context) -> int:
    dataset = ctx.client.register_dataset_path(ctx.args.path, **options_of(ctx.args, DatasetOptions))
    ctx.console.result(dataset, lambda: _render(ctx, dataset))
    return EXIT_OK


def rows(ctx: Context) -> int:
    page = ctx.client.dataset_rows(ctx.args.dataset_id, offset=ctx.args.offset, limit=ctx.args.limit)
    table = [
        [
            r["row"],
            r["label_name"] if r["label_name"] is not None else r["label"],
            r["noisy"],
            short(r["text"]),
        ]
        for r in page["items"]
    ]
    ctx.console.result(page, lambda: page_table(ctx, page, ("ROW", "LABEL", "NOISY", "TEXT"), table))
    return EXIT_OK
