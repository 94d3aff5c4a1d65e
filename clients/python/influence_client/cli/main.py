"""The `influence` parser and the run of one command: the client it talks through, its output, and how each
kind of failure ends it (a message on stderr, an exit status)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import httpx

from influence_client.cli import audits, checks, datasets, experiments, indexes, jobs, models, query, reports
from influence_client.cli.arguments import VALUE_OPTIONS, add_common_options
from influence_client.cli.context import EXIT_ERROR, EXIT_INCOMPATIBLE, CommandError, Context, Handler
from influence_client.cli.output import Console
from influence_client.cli.workflows import add_commands as add_workflow_commands
from influence_client.client import DEFAULT_URL, InfluenceAPIError, InfluenceClient
from influence_client.version import IncompatibleServiceError

WORKFLOWS = (audits.AUDIT, reports.REPORT, checks.CHECK, experiments.EXPERIMENT)
# Workflow commands take an action (`audit show ID`); without one the action is `create` (`audit INDEX ...`).
WORKFLOW_ACTIONS = {workflow.command: workflow.actions for workflow in WORKFLOWS}
# Validation failures listed under an invalid-request error, at most.
SHOWN_ERRORS = 10


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influence",
        description="Layer-wise training-data influence: the influence service from the command line.",
        epilog="Exit status: 0 ok, 1 a failing check, 2 errors, 3 a service of another major version. "
        "Run `influence COMMAND --help` for details.",
    )
    add_common_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    models.add_commands(commands)
    datasets.add_commands(commands)
    indexes.add_commands(commands)
    query.add_commands(commands)
    for workflow in WORKFLOWS:
        add_workflow_commands(commands, workflow)
    jobs.add_commands(commands)
    return parser


def with_default_actions(argv: Sequence[str]) -> list[str]:
    """`influence audit INDEX ...` means `influence audit create INDEX ...` (likewise report, check,
    experiment): the command's first positional word is taken as an action only if it is one."""
    args = list(argv)
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            return args
        if token.startswith("-"):
            i += 2 if token in VALUE_OPTIONS else 1
            continue
        if token not in WORKFLOW_ACTIONS:
            return args
        j = i + 1
        while j < len(args):
            word = args[j]
            if word in ("-h", "--help"):
                return args
            if not word.startswith("-"):
                break
            j += 2 if word in VALUE_OPTIONS else 1
        if j < len(args) and args[j] not in WORKFLOW_ACTIONS[token]:
            args.insert(i + 1, "create")
        return args
    return args


def _api_key(args: argparse.Namespace) -> str | None:
    key = getattr(args, "api_key", None) or os.environ.get("INFLUENCE_API_KEY")
    if key:
        return key
    path = getattr(args, "api_key_file", None) or os.environ.get("INFLUENCE_API_KEY_FILE")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CommandError(f"cannot read the API key file {path}: {exc.strerror}") from None
    return None


def _report_api_error(console: Console, error: InfluenceAPIError) -> None:
    """The problem on stderr: status, title and detail; for an invalid request, each invalid field on a line of
    its own (`body.estimator: unknown estimator 'x'; registered: ...`) instead of the detail, which joins
    the same failures into one line."""
    failures = error.errors
    if not failures:
        console.note(f"influence: error {error.status} {error.title}: {error.detail or ''}".rstrip(": "))
        return
    console.note(f"influence: error {error.status} {error.title}:")
    for failure in failures[:SHOWN_ERRORS]:
        where = ".".join(str(part) for part in failure.get("loc", []))
        # A validator's own message, without the prefix pydantic puts before it.
        message = str(failure.get("msg", "")).removeprefix("Value error, ")
        console.note(f"  {where}: {message}")
    if len(failures) > SHOWN_ERRORS:
        console.note(f"  ... and {len(failures) - SHOWN_ERRORS} more")


def main(
    argv: Sequence[str] | None = None,
    *,
    transport: httpx.BaseTransport | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one command; returns the exit status. `transport` (an in-process app, in tests) replaces the
    network; `stdout` / `stderr` default to the process's."""
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    parser = build_parser()
    try:
        # argparse prints help and usage errors to the process's streams: point them at ours.
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args = parser.parse_args(with_default_actions(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse has printed why
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    console = Console(getattr(args, "json", False), stdout, stderr)
    try:
        client = InfluenceClient(
            getattr(args, "url", None),
            _api_key(args),
            timeout=getattr(args, "timeout", 60.0),
            transport=transport,
        )
        with client:
            warning = client.check_service_version()
            if warning:
                console.note(f"influence: warning: {warning}")
            handler: Handler = args.handler
            return handler(Context(client, console, args))
    except IncompatibleServiceError as exc:
        console.note(f"influence: {exc}")
        return EXIT_INCOMPATIBLE
    except CommandError as exc:
        console.note(f"influence: {exc}")
        return exc.code
    except InfluenceAPIError as exc:
        _report_api_error(console, exc)
        return EXIT_ERROR
    except TimeoutError as exc:
        console.note(f"influence: {exc}")
        return EXIT_ERROR
    except httpx.TransportError as exc:
        url = getattr(args, "url", None) or os.environ.get("INFLUENCE_URL") or DEFAULT_URL
        console.note(f"influence: cannot reach the service at {url}: {exc}")
        return EXIT_ERROR
    except OSError as exc:  # a file to upload or to write
        console.note(f"influence: {exc}")
        return EXIT_ERROR
