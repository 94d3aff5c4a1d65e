"""Which settings a query, audit or check ran with and where they came from, as the command line says it
("settings: head / cosine / rank, from report 3f2a (pinned)"), and `influence indexes settings`: an index's
settings shown, or set (follow its latest layer report, pin one, or the defaults).

The service decides the settings: what the request named, else the index's layer report's recommendation, else
its defaults; its answers carry `settings_source` ("request", "report <id>" or "defaults") and `settings` (each
field with its own source). Whether a report is the pinned one or the latest is the index's mode, read when a
line for people needs it (GET /v1/indexes/{id}/settings); --json prints the service's documents as they are."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from influence_client.cli.arguments import add_command
from influence_client.cli.context import EXIT_OK, Context, Record
from influence_client.client import InfluenceAPIError, InfluenceClient
from influence_client.schemas import IndexSettings

REPORT_PREFIX = "report "
# Layer names a settings line lists before it only counts them.
NAMED_LAYERS = 3
FIELDS = ("layers", "estimator", "aggregation", "vote_k", "correct_only")
MODE_OPTIONS = {"pin": "pinned-report", "follow_latest": "latest-report", "defaults": "defaults"}


def layers_text(layers: Any) -> str:
    """A layer selector or the recommended units, short: None is every layer of the index."""
    if layers is None:
        return "every layer"
    if isinstance(layers, str):
        return layers
    if isinstance(layers, list) and all(isinstance(name, str) for name in layers):
        if len(layers) <= NAMED_LAYERS:
            return ", ".join(layers)
        return f"{len(layers)} layers"
    return json.dumps(layers)


def settings_text(settings: Record) -> str:
    """layers / estimator / aggregation, the aggregation as a report names it (`rank-c`: correct only)."""
    aggregation = str(settings.get("aggregation"))
    if settings.get("correct_only"):
        aggregation += "-c"
    if aggregation.startswith("vote") and settings.get("vote_k") is not None:
        aggregation += f" (vote_k {settings['vote_k']:g})"
    return f"{layers_text(settings.get('layers'))} / {settings.get('estimator')} / {aggregation}"


def _origin(source: str) -> str:
    if source.startswith(REPORT_PREFIX):
        return source
    return {"request": "the request", "defaults": "the defaults"}.get(source, source)


def _how_followed(report_id: str, view: IndexSettings | None) -> str:
    """Whether the report is the index's pinned one or its latest (when the index still says so)."""
    if view is None:
        return ""
    if view["mode"] == "pinned-report" and view["report_id"] == report_id:
        return " (pinned)"
    if view["mode"] == "latest-report" and (view.get("settings") or {}).get("report_id") == report_id:
        return " (the index's latest report)"
    return ""


def settings_line(source: str, settings: Record, view: IndexSettings | None = None) -> str:
    """ "head / cosine / rank, from report 3f2a (pinned)", and the fields that came from elsewhere."""
    text = f"{settings_text(settings)}, from {_origin(source)}"
    report_id = settings.get("report_id")
    if source.startswith(REPORT_PREFIX) and report_id:
        text += _how_followed(str(report_id), view)
    sources: Mapping[str, str] = settings.get("sources") or {}
    others: dict[str, list[str]] = {}
    for field in FIELDS:
        if field in sources and sources[field] != source:
            others.setdefault(sources[field], []).append(field)
    for origin, fields in others.items():
        text += f"; {', '.join(fields)} from {_origin(origin)}"
    return text


def index_view(client: InfluenceClient, index_id: str | None) -> IndexSettings | None:
    """The index's settings now, or None when they cannot be read (the index deleted since, a pinned report
    whose document is unreadable): the line then names the report without saying how it is followed."""
    if not index_id:
        return None
    try:
        return client.index_settings(index_id)
    except InfluenceAPIError:
        return None


def print_settings(ctx: Context, resource: Record, index_id: str | None) -> None:
    """The `settings:` line of an answer that carries settings_source and settings (and its note)."""
    source, settings = resource.get("settings_source"), resource.get("settings")
    if not source or not isinstance(settings, Mapping):
        return  # made before the service recorded settings
    view = index_view(ctx.client, index_id) if str(source).startswith(REPORT_PREFIX) else None
    ctx.console.line(f"settings: {settings_line(str(source), settings, view)}")
    if settings.get("note"):
        ctx.console.line(f"note: {settings['note']}")


# ---------------------------------------------------------------------------- influence indexes settings


def add_settings_command(group: Any) -> None:
    sub = add_command(
        group,
        "settings",
        index_settings,
        "show which settings the index's queries, audits and checks use, or set them",
    )
    sub.add_argument("index_id")
    modes = sub.add_mutually_exclusive_group()
    modes.add_argument(
        "--pin",
        metavar="REPORT",
        help="use this layer report's recommendation (its deletion is then refused)",
    )
    modes.add_argument(
        "--follow-latest",
        action="store_true",
        help="follow the index's newest succeeded layer report (new indexes)",
    )
    modes.add_argument(
        "--defaults", action="store_true", help="use the service's defaults, whatever reports say"
    )


def index_settings(ctx: Context) -> int:
    args = ctx.args
    chosen = [name for name in MODE_OPTIONS if getattr(args, name)]  # at most one: an exclusive group
    if chosen:
        view = ctx.client.set_index_settings(args.index_id, MODE_OPTIONS[chosen[0]], args.pin)
    else:
        view = ctx.client.index_settings(args.index_id)
    ctx.console.result(view, lambda: render_index_settings(ctx, view))
    return EXIT_OK


def render_index_settings(ctx: Context, view: IndexSettings) -> None:
    console = ctx.console
    mode = view["mode"] + (f" (report {view['report_id']})" if view["report_id"] else "")
    console.fields([("index", view["index_id"]), ("mode", mode)])
    settings = view["settings"]
    console.line(f"settings: {settings_line(view['settings_source'], settings, view)}")
    if settings.get("note"):
        console.line(f"note: {settings['note']}")
    sources = settings.get("sources") or {}
    console.line()
    console.table(
        ("FIELD", "VALUE", "SOURCE"),
        [
            [
                field,
                layers_text(settings.get(field)) if field == "layers" else settings.get(field),
                sources[field],
            ]
            for field in FIELDS
            if field in sources
        ],
    )
