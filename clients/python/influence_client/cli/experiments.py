"""`influence experiment`: the paper's protocol as one job (noise, fine-tune, register, index, report and the
optional retraining check)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any, ClassVar

from influence_client.cli import resources, workflows
from influence_client.cli.arguments import json_object, layers, options_of
from influence_client.cli.context import Context, Record
from influence_client.cli.output import fmt
from influence_client.cli.resources import Resource
from influence_client.cli.workflows import Workflow
from influence_client.schemas import ExperimentOptions

RETRAINING_RUNS = ("influence", "random", "oracle")


def _render(ctx: Context, experiment: Record) -> None:
    job = experiment.get("job") or {}
    progress = f"{job['done']}/{job['total']}" if job.get("total") else None
    pairs: list[tuple[str, Any]] = [
        ("experiment", experiment["id"]),
        ("name", experiment.get("name")),
        ("status", experiment.get("status")),
        ("stage", experiment.get("stage")),
        ("stages done", ", ".join(experiment.get("stages_done") or []) or None),
        ("progress", progress),
    ]
    if job.get("error"):
        pairs.append(("error", job["error"]))
    pairs.extend((key, experiment.get(key)) for key in ("model_id", "dataset_id", "index_id", "report_id"))
    noise = experiment.get("noise")
    if noise:
        pairs.append(
            ("noise", f"{noise['flipped']} of {noise['rows']} labels flipped (seed {noise['seed']})")
        )
    finetune = experiment.get("finetune")
    if finetune:
        best: dict[str, Any] = next(
            (e for e in finetune["epochs"] if e["epoch"] == finetune["best_epoch"]), {}
        )
        pairs.append(
            (
                "fine-tune",
                f"best epoch {finetune['best_epoch']} of {len(finetune['epochs'])}: reference loss "
                f"{fmt(best.get('eval_loss'))}, accuracy {fmt(best.get('eval_accuracy'))}",
            )
        )
    retraining = experiment.get("retraining")
    if retraining:
        for run in RETRAINING_RUNS:
            outcome = retraining[run]
            pairs.append(
                (
                    f"retrain ({run})",
                    f"removed {outcome['removed']} ({outcome['noisy_removed']} noisy): best held-out accuracy "
                    f"{fmt(outcome['best_accuracy'])}",
                )
            )
    ctx.console.fields(pairs)


def _row(experiment: Record) -> list[Any]:
    return [
        experiment["id"],
        experiment.get("status"),
        experiment.get("stage"),
        experiment.get("index_id"),
        experiment.get("report_id"),
        (experiment.get("created_at") or "")[:19],
    ]


class Experiment(Workflow):
    """Experiments: printed the same whatever their state."""

    resource = Resource(
        noun="experiment",
        render=_render,
        headers=("ID", "STATUS", "STAGE", "INDEX", "REPORT", "CREATED"),
        row=_row,
    )
    helps: ClassVar[Mapping[str, str]] = {
        "": "the paper's protocol as one job: noise, fine-tune, index, report",
        "create": "start an experiment and wait for it",
    }

    def add_create_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--base-model", required=True, dest="base_model_id")
        parser.add_argument("--dataset", required=True, dest="dataset_id")
        parser.add_argument("--name")
        workflows.add_reference_options(parser)
        parser.add_argument(
            "--heldout",
            type=json_object,
            metavar="JSON",
            help="held-out reference set (needed for retraining)",
        )
        parser.add_argument("--noise-rate", type=float)
        parser.add_argument("--seed", type=int)
        parser.add_argument("--lora", type=json_object, metavar="JSON", help='e.g. {"r": 8, "alpha": 16}')
        parser.add_argument("--epochs", type=int)
        parser.add_argument("--learning-rate", type=float)
        parser.add_argument("--batch-size", type=int)
        parser.add_argument("--max-length", type=int)
        parser.add_argument("--warmup-ratio", type=float)
        parser.add_argument(
            "--layers", type=layers, help="layers the index holds (default: WE, role:lora, head)"
        )
        parser.add_argument(
            "--projection", type=json_object, metavar="JSON", help='e.g. {"kind": "factorized"}'
        )
        parser.add_argument("--dtype", choices=("float16", "float32"))
        parser.add_argument("--chunk-size", type=int)
        parser.add_argument("--report", type=json_object, metavar="JSON", help="layer report options")
        parser.add_argument("--retraining", type=json_object, metavar="JSON", help='e.g. {"enabled": true}')

    def create(self, ctx: Context) -> Record:
        args = ctx.args
        return ctx.client.create_experiment(
            args.base_model_id,
            args.dataset_id,
            workflows.reference(args),
            **options_of(args, ExperimentOptions),
        )

    def show(self, ctx: Context, resource_id: str) -> int:
        # Exits 0 even for a failed experiment: `show` reads its state, `create` and `wait` report its outcome.
        return resources.show(self.resource, ctx)


EXPERIMENT = Experiment()
