"""What every command works with: the client, the console, its arguments; its exit statuses and the endings
commands share (a job's outcome, a deletion, a page of a list)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from influence_client.cli.output import Console, ProgressBar
from influence_client.client import InfluenceClient
from influence_client.schemas import Job

EXIT_OK, EXIT_CHECK_FAILED, EXIT_ERROR, EXIT_INCOMPATIBLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# An answer of the service as a command reads it (the client's TypedDicts are such mappings).
Record = Mapping[str, Any]


class CommandError(Exception):
    """Ends a command with a message on stderr and an exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


class Context:
    """What a command works with: the client, the console and the parsed arguments."""

    def __init__(self, client: InfluenceClient, console: Console, args: argparse.Namespace):
        self.client = client
        self.console = console
        self.args = args

    def wait(self, job_id: str, label: str) -> Job:
        """Wait for a job with a progress bar; a job that did not succeed is returned too (callers decide)."""
        bar = ProgressBar(self.console.stderr, label)
        try:
            return self.client.wait_for_job(
                job_id,
                poll=getattr(self.args, "poll", 0.5),
                timeout=getattr(self.args, "wait_timeout", None),
                on_progress=bar.update,
            )
        except KeyboardInterrupt:
            raise CommandError(
                f"interrupted; job {job_id} goes on: `influence jobs wait {job_id}`", EXIT_INTERRUPTED
            ) from None
        finally:
            bar.close()


Handler = Callable[[Context], int]


def finish(job: Record | None, what: str) -> int:
    """EXIT_OK, unless the job failed or was cancelled (then a CommandError says so, with the job's error)."""
    if job is None or job.get("status") not in ("failed", "cancelled"):
        return EXIT_OK
    detail = f": {job['error']}" if job.get("error") else ""
    raise CommandError(f"{what} {job['id']} {job['status']}{detail}")


def job_of(resource: Record) -> Record:
    """A workflow resource's job (or what the resource itself says of its state)."""
    return resource.get("job") or {"id": resource["id"], "status": resource.get("status")}


def fields_named(record: Record, *keys: str) -> list[tuple[str, Any]]:
    """Fields of a record for Console.fields, each printed under its own key."""
    return [(key, record[key]) for key in keys]


def deleted(ctx: Context, resource_id: str) -> int:
    ctx.console.result({"deleted": resource_id}, lambda: ctx.console.line(f"deleted {resource_id}"))
    return EXIT_OK


def page_table(ctx: Context, page: Record, headers: Sequence[str], rows: list[list[Any]]) -> None:
    """A page of a list as a table, and where it sits in the whole list when that is longer."""
    ctx.console.table(headers, rows)
    shown = len(page["items"])
    if page["total"] > shown:
        first = page["offset"] + 1 if shown else page["offset"]
        ctx.console.line(
            f"({first}-{page['offset'] + shown} of {page['total']}; --offset / --limit for more)"
        )
