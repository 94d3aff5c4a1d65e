"""`influence indexes` (also `influence index`): create (waits for the build), list, show (with the projection's
fidelity), delete, delete-rows, compact, settings (cli/settings.py)."""

from __future__ import annotations

import argparse
from typing import Any

from influence_client.cli.arguments import add_command, add_group, add_no_wait, layers, options_of
from influence_client.cli.context import EXIT_OK, Context, Record, fields_named, finish
from influence_client.cli.jobs import render_job
from influence_client.cli.output import short, size
from influence_client.cli.resources import Filter, Resource, add_delete, add_list, add_show
from influence_client.cli.settings import add_settings_command
from influence_client.schemas import IndexOptions

INDEX_STATUSES = ("pending", "building", "ready", "failed", "cancelled")
# Units the fidelity table of `indexes show` lists, lowest first.
FIDELITY_ROWS = 10


def _render(ctx: Context, index: Record) -> None:
    job = index.get("job") or {}
    ctx.console.fields(
        [
            *fields_named(index, "id", "status", "model_id", "dataset_id"),
            ("layers", f"{len(index['layers'])}: " + short(", ".join(index["layers"]), 80)),
            ("projection", _projection_text(index["projection"])),
            *fields_named(index, "dtype", "faiss_kind"),
            ("rows", index["num_rows"]),
            ("deleted_rows", index["deleted_rows"]),
            ("size", size(index["size_bytes"])),
            (
                "job",
                f"{job.get('id')} {job.get('status')} {job.get('done')}/{job.get('total')}" if job else None,
            ),
            ("created_at", index["created_at"]),
        ]
    )
    _show_fidelity(ctx, index)


def _show_fidelity(ctx: Context, index: Record) -> None:
    """The projection's fidelity per unit, lowest first (at most FIDELITY_ROWS lines and a count)."""
    fidelity = index.get("fidelity")
    if not fidelity:
        if index.get("status") == "ready":
            ctx.console.line("fidelity: not measured (the index was built before fidelity was measured)")
        return
    if fidelity.get("skipped"):
        ctx.console.line(f"fidelity: not measured ({short(fidelity['skipped'], 200)})")
        return
    units = fidelity.get("units") or {}
    threshold = fidelity.get("threshold") or 0.9
    below = fidelity.get("below_threshold") or []
    sample = fidelity.get("sample") or {}
    ctx.console.line(
        f"fidelity: {len(below)} of {len(units)} units below {threshold:g} (Spearman of projected vs exact "
        f"scores; {sample.get('train_rows')} x {sample.get('query_rows')} rows, seed {sample.get('seed')})"
    )
    ordered = sorted(
        units.items(), key=lambda item: (item[1].get("spearman") is not None, item[1].get("spearman") or 0.0)
    )
    rows = [
        [
            name,
            f"{(unit.get('projection') or {}).get('kind')} {(unit.get('projection') or {}).get('dim')}",
            unit.get("spearman"),
            unit.get("top10_overlap"),
            unit.get("rel_error"),
            "LOW" if unit.get("spearman") is None or unit["spearman"] < threshold else "",
        ]
        for name, unit in ordered[:FIDELITY_ROWS]
    ]
    ctx.console.table(["UNIT", "PROJECTION", "SPEARMAN", "TOP10", "REL_ERROR", ""], rows)
    if len(ordered) > FIDELITY_ROWS:
        ctx.console.line(f"... and {len(ordered) - FIDELITY_ROWS} more units (--json shows them all)")
    if sample.get("note"):
        ctx.console.line(f"note: {sample['note']}")


def _projection_text(projection: Record) -> str:
    text = f"{projection['kind']} dim {projection['dim']} seed {projection['seed']}"
    if projection.get("exact_max_params") is not None:
        text += f", exact up to {projection['exact_max_params']} params"
    kinds: dict[str, int] = {}
    for unit in (projection.get("units") or {}).values():
        kinds[unit["kind"]] = kinds.get(unit["kind"], 0) + 1
    if kinds:
        text += " (units: " + ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) + ")"
    return text


def _row(index: Record) -> list[Any]:
    return [
        *(index[key] for key in ("id", "status", "model_id", "dataset_id")),
        len(index["layers"]),
        index["num_rows"],
        index["deleted_rows"],
        size(index["size_bytes"]),
        index["created_at"][:19],
    ]


INDEXES = Resource(
    noun="index",
    render=_render,
    headers=("ID", "STATUS", "MODEL", "DATASET", "LAYERS", "ROWS", "DELETED", "SIZE", "CREATED"),
    row=_row,
    filters=(
        Filter("--model", "model_id"),
        Filter("--dataset", "dataset_id"),
        Filter("--status", "status", INDEX_STATUSES),
    ),
)


def _unit_projection(value: str) -> tuple[str, dict[str, Any]]:
    """NAME=KIND[:DIM] -> (name, {kind[, dim]}): one unit's projection override."""
    name, eq, rest = value.rpartition("=")
    kind, colon, dim = rest.partition(":")
    if not eq or not name or not kind:
        raise argparse.ArgumentTypeError(f"expected NAME=KIND[:DIM], got {value!r}")
    unit: dict[str, Any] = {"kind": kind}
    if colon:
        try:
            unit["dim"] = int(dim)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer DIM in {value!r}") from None
    return name, unit


def add_commands(commands: Any) -> None:
    indexes = add_group(
        commands, "indexes", "build, inspect, compact and delete indexes; their settings", aliases=("index",)
    )
    sub = add_command(indexes, "create", create, "build an index (waits for the build)")
    sub.add_argument("--model", required=True, dest="model_id")
    sub.add_argument("--dataset", required=True, dest="dataset_id")
    sub.add_argument("--layers", type=layers, help="layer selector (default: every layer)")
    sub.add_argument(
        "--projection",
        choices=("auto", "factorized", "gaussian", "rademacher", "identity"),  # per unit also: tokens
        help="auto (default): small units (LoRA, head) exact, the others factorized",
    )
    sub.add_argument("--dim", type=int, help="projection dimension per projected unit (256)")
    sub.add_argument(
        "--projection-unit",
        type=_unit_projection,
        action="append",
        metavar="NAME=KIND[:DIM]",
        help="override one unit's projection (repeatable), e.g. head=gaussian:64, block.0.attn.q=identity or "
        "embed=tokens:192 (the embedding's per-token sketch)",
    )
    sub.add_argument("--seed", type=int)
    sub.add_argument("--dtype", choices=("float16", "float32"))
    sub.add_argument("--faiss-kind", choices=("flat", "ivf", "hnsw"))
    sub.add_argument("--chunk-size", type=int)
    sub.add_argument("--max-length", type=int)
    add_no_wait(sub)
    add_list(indexes, INDEXES)
    add_show(indexes, INDEXES)
    add_delete(indexes, INDEXES, "delete an index and its artifacts")
    sub = add_command(indexes, "delete-rows", delete_rows, "delete training rows from an index")
    sub.add_argument("index_id")
    sub.add_argument("rows", type=int, nargs="+", metavar="ROW")
    sub = add_command(indexes, "compact", compact, "remove deleted rows for good (waits)")
    sub.add_argument("index_id")
    add_no_wait(sub)
    add_settings_command(indexes)


def create(ctx: Context) -> int:
    args = ctx.args
    projection: dict[str, Any] = {
        key: value
        for key, value in (("kind", args.projection), ("dim", args.dim), ("seed", args.seed))
        if value is not None
    }
    if args.projection_unit:
        projection["units"] = dict(args.projection_unit)
    options = options_of(args, IndexOptions)
    # --projection names the kind; the request's projection is the object built from it and its neighbours.
    options["projection"] = projection or None
    index = ctx.client.create_index(args.model_id, args.dataset_id, **options)
    job = index["job"]
    if not args.no_wait and job is not None:
        ctx.wait(job["id"], f"index {index['id']}")
        index = ctx.client.get_index(index["id"])
    ctx.console.result(index, lambda: _render(ctx, index))
    return EXIT_OK if args.no_wait else finish(index["job"], "index build")


def delete_rows(ctx: Context) -> int:
    answer = ctx.client.delete_rows(ctx.args.index_id, ctx.args.rows)
    ctx.console.result(
        answer,
        lambda: ctx.console.line(
            f"deleted {answer['deleted']} rows ({answer['already_deleted']} were already); "
            f"{answer['num_rows']} rows answer queries, {answer['deleted_rows']} await a compaction"
        ),
    )
    return EXIT_OK


def compact(ctx: Context) -> int:
    job = ctx.client.compact(ctx.args.index_id)
    if not ctx.args.no_wait:
        job = ctx.wait(job["id"], f"compact {ctx.args.index_id}")
    ctx.console.result(job, lambda: render_job(ctx, job))
    return EXIT_OK if ctx.args.no_wait else finish(job, "compaction")
