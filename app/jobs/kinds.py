"""The registry of job kinds: what each kind's steps are, where they run, and who runs a workflow.

A job is started by dispatching its kind's first step; a step may dispatch more (a build plans chunks, the last
chunk dispatches finalize). Single-step workflow kinds (audit, layer report, batch check, experiment) run the
step `run`, which calls the runner that `runner_module` registers with `app.jobs.run.job_runner`. Adding a job
kind is one `register_kind` line here (plus its runner module, or its steps in app/jobs/steps.py).

This module imports nothing heavy: the API uses it to enqueue, the worker to recover.
"""

from __future__ import annotations

from dataclasses import dataclass

# Queue roles of a step: `cpu` is the cpu queue; `featurize` goes where featurization goes (the gpu queue when
# a worker with CUDA serves it, else cpu), since those steps run the model.
CPU = "cpu"
FEATURIZE = "featurize"


@dataclass(frozen=True)
class Step:
    name: str
    queue: str


STEPS: dict[str, Step] = {
    step.name: step
    for step in (
        Step("plan", CPU),
        Step("chunk", FEATURIZE),
        Step("finalize", CPU),
        Step("compact", CPU),
        # Workflow jobs featurize (and an experiment fine-tunes).
        Step("run", FEATURIZE),
    )
}


@dataclass(frozen=True)
class JobKind:
    name: str
    first_step: str
    #: A failed job fails its target index too (a build's index is unusable; a compaction leaves it as it was).
    fails_target: bool = False
    #: Workflow kinds: the module whose import registers the runner (imported by the worker on first use).
    runner_module: str | None = None


KINDS: dict[str, JobKind] = {}


def register_kind(kind: JobKind) -> str:
    """Declare a job kind; returns its name (the value stored in Job.kind)."""
    if kind.name in KINDS:
        raise ValueError(f"job kind {kind.name!r} is already registered")
    if kind.first_step not in STEPS:
        raise ValueError(f"job kind {kind.name!r} starts with unknown step {kind.first_step!r}")
    KINDS[kind.name] = kind
    return kind.name


def kind_of(name: str) -> JobKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"no worker runs jobs of kind {name!r}") from None


INDEX_BUILD = register_kind(JobKind("index_build", "plan", fails_target=True))
INDEX_COMPACT = register_kind(JobKind("index_compact", "compact"))
AUDIT = register_kind(JobKind("audit", "run", runner_module="app.workflows.audit.runner"))
LAYER_REPORT = register_kind(JobKind("layer_report", "run", runner_module="app.workflows.report.runner"))
BATCH_CHECK = register_kind(JobKind("batch_check", "run", runner_module="app.workflows.check.runner"))
EXPERIMENT = register_kind(JobKind("experiment", "run", runner_module="app.workflows.experiment.runner"))
