"""The command line's options: the service and output options every command takes, the option sets several
commands share, and the parsers of option values."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from influence_client.cli.context import CommandError, Handler
from influence_client.cli.output import short
from influence_client.client import DEFAULT_URL

# Options of every command that take a value (the default-action rewrite must step over their values).
VALUE_OPTIONS = ("--url", "--api-key", "--api-key-file", "--timeout", "--poll", "--wait-timeout")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: an option given before the command is not reset by the command's own parser.
    group = parser.add_argument_group("service and output")
    group.add_argument("--url", default=argparse.SUPPRESS, help=f"service URL (INFLUENCE_URL; {DEFAULT_URL})")
    group.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (INFLUENCE_API_KEY)")
    group.add_argument(
        "--api-key-file",
        default=argparse.SUPPRESS,
        help="file holding the API key, e.g. <data_dir>/local-api-key (INFLUENCE_API_KEY_FILE)",
    )
    group.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds per request (60)")
    group.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document"
    )
    group.add_argument(
        "--poll", type=float, default=argparse.SUPPRESS, help="seconds between job polls (0.5)"
    )
    group.add_argument(
        "--wait-timeout",
        type=float,
        default=argparse.SUPPRESS,
        help="give up waiting after this many seconds",
    )


def add_group(commands: Any, name: str, help_text: str, aliases: tuple[str, ...] = ()) -> Any:
    """A command with actions (`influence models ...`): the subparsers its actions are added to."""
    sub = commands.add_parser(name, help=help_text, description=help_text, aliases=list(aliases))
    add_common_options(sub)
    return sub.add_subparsers(dest="action", metavar="ACTION", required=True)


def add_command(parent: Any, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
    """A command (or an action of a group) that `handler` runs."""
    sub: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
    add_common_options(sub)
    sub.set_defaults(handler=handler)
    return sub


def add_page_options(parser: argparse.ArgumentParser, limit: int = 50) -> None:
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--limit", type=int, default=limit)


def add_no_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-wait", action="store_true", help="print the created job and return at once")


# What a scoring option left out means for a query, an audit or a check.
FROM_INDEX = "; not given: the index's settings (`influence indexes settings INDEX`)"


def add_scoring_options(parser: argparse.ArgumentParser, plural: bool = False) -> None:
    # Estimator and aggregation names are the service's to check: it knows its registries and answers 422
    # naming the field. An option left out (None) is not sent: the index's settings decide it then, and a
    # default sent from here would override them.
    after = "" if plural else FROM_INDEX
    parser.add_argument(
        "--layers", type=layers, help="layer selector, e.g. middle, role:attention or a JSON list" + after
    )
    if plural:
        parser.add_argument("--estimators", type=names, help="comma-separated, e.g. grad-dot,cosine")
        parser.add_argument("--aggregations", type=names, help="comma-separated, e.g. mean,rank,vote")
    else:
        parser.add_argument(
            "--estimator", help="grad-dot, cosine, datainf (and any other the service has)" + after
        )
        parser.add_argument(
            "--aggregation", help="mean, rank, vote, zmean, median, rrf (and -c variants)" + after
        )
        parser.add_argument("--vote-k", type=float, help="vote: share of the rows each voter scores" + after)


def options_of(args: argparse.Namespace, options: type) -> dict[str, Any]:
    """The parsed options that `options` (a TypedDict of a client method's options, influence_client.schemas)
    names: each option's dest is the API's field name, so they pass to the client as they are."""
    return {key: getattr(args, key) for key in options.__annotations__ if hasattr(args, key)}


def layers(value: str) -> Any:
    """A layer selector: JSON when it looks like a list or an object, else the selector string itself."""
    if value.lstrip().startswith(("[", "{")):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    return value


def json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return parsed


def names(value: str) -> list[str] | None:
    """Comma-separated names; none at all leaves the choice to the service."""
    return value.split(",") if value else None


def noisy_rows(value: str) -> str | dict[str, list[int]]:
    """A noisy mask: `dataset` (the index dataset's noisy column), or dataset row ids: a file of them (one per
    line, or a JSON list), a JSON list, or comma-separated."""
    if value == "dataset":
        return "dataset"
    text = value
    if Path(value).is_file():
        try:
            text = Path(value).read_text(encoding="utf-8")
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {value}: {exc.strerror}") from None
    refusal = argparse.ArgumentTypeError(
        f"expected `dataset` or row ids (a file of them, one per line or a JSON list; a JSON list; or "
        f"comma-separated), got {short(value, 40)!r}"
    )
    try:
        items = json.loads(text) if text.lstrip().startswith("[") else text.replace(",", " ").split()
    except json.JSONDecodeError:
        raise refusal from None
    if not isinstance(items, list) or not items:
        raise refusal
    rows = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise refusal
        try:
            rows.append(int(item))
        except ValueError:
            raise refusal from None
    return {"rows": rows}


def int_list(value: str) -> list[int]:
    try:
        return [int(part) for part in value.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def label(value: str) -> int | str:
    # Class indices are integers; anything else is a label name (or a causal LM's completion).
    try:
        return int(value)
    except ValueError:
        return value


def read_examples(path: str) -> list[dict[str, Any]]:
    """Examples from a JSON list or a JSONL file of {text, label, text_pair?} objects."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    try:
        stripped = text.lstrip()
        items = (
            json.loads(text)
            if stripped.startswith("[")
            else [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        )
    except json.JSONDecodeError as exc:
        raise CommandError(f"{path}: not JSON or JSONL: {exc}") from None
    if not items or not all(isinstance(item, dict) for item in items):
        raise CommandError(f"{path}: expected JSON objects with `text` and `label`")
    return items
