"""The workflow commands, written once for audits, reports, checks and experiments: each workflow is a job
whose id is the resource's id, so `create` (wait and print unless --no-wait), `show`, `list`, `delete`, `wait`,
`cancel` and `download` work the same for all of them, driven by a small class per workflow (a `Workflow`
whose methods say how one is created and printed).

`influence audit INDEX ...` is `influence audit create INDEX ...`: see with_default_actions."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from influence_client.cli import resources
from influence_client.cli.arguments import (
    add_command,
    add_group,
    add_no_wait,
    int_list,
    json_object,
    read_examples,
)
from influence_client.cli.context import EXIT_OK, CommandError, Context, Record, finish, job_of
from influence_client.cli.jobs import JOB_STATUSES, cancel_job
from influence_client.cli.resources import Filter, Resource
from influence_client.client import InfluenceClient

# What a workflow's `list` prints, unless its resource says otherwise.
HEADERS = ("ID", "STATUS", "INDEX", "PROGRESS", "CREATED")
INDEX_FILTER = Filter("--index", "index_id")
STATUS_FILTER = Filter("--status", "status", JOB_STATUSES)


class Workflow:
    """One workflow: its resource and helps, and how one is created and printed; the generic commands below
    do the rest. A subclass per workflow sets `resource` and `helps` and defines `add_create_options` and
    `create`; the other methods have defaults."""

    resource: Resource  # show, list, delete, and how one is printed (--no-wait and the default `result`)
    # The command's help (""), its `create`'s, and any action's whose help is not the generic one.
    helps: ClassVar[Mapping[str, str]]
    downloads = False  # it has `download ID FILE` (see `download`)

    @property
    def command(self) -> str:
        """The command, e.g. `audit`: the resource's noun, also the word its messages use."""
        return self.resource.noun

    @property
    def actions(self) -> tuple[str, ...]:
        return ("create", "show", "list", "delete", "wait", "cancel") + (
            ("download",) if self.downloads else ()
        )

    def add_create_options(self, parser: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def create(self, ctx: Context) -> Record:
        """Checks the arguments, creates one, answers what the service did."""
        raise NotImplementedError

    def add_show_options(self, parser: argparse.ArgumentParser) -> None:
        """Options of `create`, `show` and `wait` on how a finished one is printed (and saved): none here."""

    def validate_show_options(self, args: argparse.Namespace) -> None:
        """Refuses show options that do not go together, before anything is created or printed."""

    def result(self, ctx: Context, resource_id: str) -> int:
        """How a finished one is printed by `create`, `show` and `wait` (its show options applied), with its exit
        status: here the resource, and the exit status its job's."""
        resource = self.resource.get(ctx.client, resource_id)
        ctx.console.result(resource, lambda: self.resource.render(ctx, resource))
        return finish(job_of(resource), self.command)

    def show(self, ctx: Context, resource_id: str) -> int:
        """What `show` prints, with its exit status: the `result`."""
        return self.result(ctx, resource_id)

    def download(self, client: InfluenceClient, resource_id: str, path: str) -> str:
        """`download ID FILE` (where `downloads`): saves what the workflow made to FILE, says what it saved."""
        raise NotImplementedError


def add_commands(commands: Any, workflow: Workflow) -> None:
    resource, helps = workflow.resource, workflow.helps
    group = add_group(commands, workflow.command, helps[""])
    sub = _add_action(group, workflow, "create", create)
    workflow.add_create_options(sub)
    workflow.add_show_options(sub)
    add_no_wait(sub)
    workflow.add_show_options(_add_action(group, workflow, "show", show, resource.id_name))
    resources.add_list(group, resource)
    resources.add_delete(group, resource, helps.get("delete"))
    workflow.add_show_options(_add_action(group, workflow, "wait", wait, resource.id_name))
    _add_action(group, workflow, "cancel", cancel, resource.id_name)
    if workflow.downloads:
        _add_action(group, workflow, "download", download, resource.id_name, "file")


def _add_action(
    group: Any,
    workflow: Workflow,
    action: str,
    handler: Callable[[Workflow, Context], int],
    *positionals: str,
) -> argparse.ArgumentParser:
    title = workflow.resource.title
    generic = {
        "show": f"show {title}",
        "wait": f"wait for {title} to finish, then print it as `show` does",
        "cancel": f"cancel {title} (its job)",
    }
    help_text = workflow.helps.get(action) or generic[action]
    sub = add_command(group, action, functools.partial(handler, workflow), help_text)
    for positional in positionals:
        sub.add_argument(positional)
    return sub


def create(workflow: Workflow, ctx: Context) -> int:
    workflow.validate_show_options(ctx.args)
    created = workflow.create(ctx)
    if ctx.args.no_wait:
        ctx.console.result(created, lambda: workflow.resource.render(ctx, created))
        return EXIT_OK
    ctx.wait(str(job_of(created)["id"]), f"{workflow.command} {created['id']}")
    return workflow.result(ctx, created["id"])


def show(workflow: Workflow, ctx: Context) -> int:
    workflow.validate_show_options(ctx.args)
    return workflow.show(ctx, workflow.resource.id_of(ctx.args))


def wait(workflow: Workflow, ctx: Context) -> int:
    workflow.validate_show_options(ctx.args)
    resource_id = workflow.resource.id_of(ctx.args)
    ctx.wait(resource_id, f"{workflow.command} {resource_id}")
    return workflow.result(ctx, resource_id)


def cancel(workflow: Workflow, ctx: Context) -> int:
    return cancel_job(ctx, workflow.resource.id_of(ctx.args))


def download(workflow: Workflow, ctx: Context) -> int:
    resource_id, path = workflow.resource.id_of(ctx.args), ctx.args.file
    saved = workflow.download(ctx.client, resource_id, path)
    ctx.console.result(
        {"id": resource_id, "saved": saved, "path": path},
        lambda: ctx.console.line(f"saved {saved} to {path}"),
    )
    return EXIT_OK


# ------------------------------------------------------------------------------------ what they share


def head_fields(noun: str, resource: Record) -> list[tuple[str, Any]]:
    """The head of a workflow resource for people: its id, state, index and (when it failed) the error."""
    pairs: list[tuple[str, Any]] = [(noun, resource["id"]), ("status", resource.get("status"))]
    if resource.get("index_id"):
        pairs.append(("index_id", resource["index_id"]))
    job = resource.get("job") or {}
    if job.get("status") in ("queued", "running") and job.get("total"):
        pairs.append(("progress", f"{job['done']}/{job['total']}"))
    if job.get("error"):
        pairs.append(("error", job["error"]))
    return pairs


def job_resource(noun: str, name: str = "", filters: Sequence[Filter] = ()) -> Resource:
    """A workflow resource printed as its head fields and listed as HEADERS rows (audits, reports, checks)."""
    return Resource(
        noun=noun,
        render=lambda ctx, resource: ctx.console.fields(head_fields(noun, resource)),
        headers=HEADERS,
        row=_row,
        filters=filters,
        name=name,
    )


def _row(item: Record) -> list[Any]:
    """A workflow resource as a row of HEADERS."""
    job = item.get("job") or {}
    progress = f"{job['done']}/{job['total']}" if job.get("total") else "-"
    created = item.get("created_at") or job.get("created_at") or ""
    return [item["id"], item.get("status"), item.get("index_id"), progress, created[:19]]


def add_reference_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reference set (one of)")
    group.add_argument("--reference-dataset", metavar="ID", help="rows of this dataset")
    group.add_argument("--reference-rows", type=int_list, metavar="0,5,...", help="with --reference-dataset")
    group.add_argument(
        "--reference-limit", type=int, metavar="N", help="with --reference-dataset: first N rows"
    )
    group.add_argument("--reference-examples", metavar="FILE", help="JSON list or JSONL of {text, label}")
    group.add_argument("--reference", type=json_object, metavar="JSON", help="the reference object itself")


def reference(args: argparse.Namespace) -> dict[str, Any]:
    """The reference set from the --reference-* options (exactly one source)."""
    sources = [
        name
        for name, value in (
            ("--reference-dataset", args.reference_dataset),
            ("--reference-examples", args.reference_examples),
            ("--reference", args.reference),
        )
        if value is not None
    ]
    if len(sources) != 1:
        raise CommandError("give exactly one of --reference-dataset, --reference-examples, --reference")
    if args.reference_dataset is None and (
        args.reference_rows is not None or args.reference_limit is not None
    ):
        raise CommandError("--reference-rows and --reference-limit go with --reference-dataset")
    if args.reference is not None:
        return dict(args.reference)
    if args.reference_examples is not None:
        return {"examples": read_examples(args.reference_examples)}
    chosen: dict[str, Any] = {"dataset_id": args.reference_dataset}
    if args.reference_rows is not None:
        chosen["rows"] = args.reference_rows
    if args.reference_limit is not None:
        chosen["limit"] = args.reference_limit
    return chosen
