"""`influence jobs`: list, show, cancel, wait."""

from __future__ import annotations

from typing import Any

from influence_client.cli.arguments import add_command, add_group
from influence_client.cli.context import EXIT_OK, Context, Record, fields_named, finish
from influence_client.cli.resources import Filter, Resource, add_list, add_show

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def render_job(ctx: Context, job: Record) -> None:
    progress = f"{job['done']}/{job['total']}" + (
        f" ({job['progress']:.0%})" if job["progress"] is not None else ""
    )
    ctx.console.fields(
        [
            *fields_named(job, "id", "kind", "status", "target_id"),
            ("progress", progress),
            *fields_named(job, "cancel_requested", "attempts", "error", "created_at", "duration_s"),
        ]
    )


def _row(job: Record) -> list[Any]:
    done = f"{job['done']}/{job['total']}"
    return [job["id"], job["kind"], job["status"], done, job["target_id"], job["created_at"][:19]]


JOBS = Resource(
    noun="job",
    render=render_job,
    headers=("ID", "KIND", "STATUS", "DONE", "TARGET", "CREATED"),
    row=_row,
    filters=(
        Filter("--status", "status", JOB_STATUSES),
        Filter("--kind", "kind"),
        Filter("--target", "target_id"),
    ),
)


def add_commands(commands: Any) -> None:
    jobs = add_group(commands, "jobs", "follow, list and cancel jobs")
    add_list(jobs, JOBS)
    add_show(jobs, JOBS)
    add_command(jobs, "cancel", cancel, "cancel a job").add_argument("job_id")
    add_command(jobs, "wait", wait, "wait for a job to finish").add_argument("job_id")


def cancel_job(ctx: Context, job_id: str) -> int:
    """Cancel a job and print it as it is then (a running one stops at its next checkpoint)."""
    job = ctx.client.cancel_job(job_id)
    ctx.console.result(job, lambda: render_job(ctx, job))
    return EXIT_OK


def cancel(ctx: Context) -> int:
    return cancel_job(ctx, ctx.args.job_id)


def wait(ctx: Context) -> int:
    job = ctx.wait(ctx.args.job_id, f"job {ctx.args.job_id}")
    ctx.console.result(job, lambda: render_job(ctx, job))
    return finish(job, "job")
