"""`influence models`: register, list, show, layers, delete."""

from __future__ import annotations

from typing import Any

from influence_client.cli.arguments import add_command, add_group, options_of
from influence_client.cli.context import EXIT_OK, CommandError, Context, Record, fields_named
from influence_client.cli.output import short
from influence_client.cli.resources import Resource, add_delete, add_list, add_show
from influence_client.schemas import CheckpointIn, ModelOptions


def _render(ctx: Context, model: Record) -> None:
    ctx.console.fields(
        [
            *fields_named(model, "id", "name", "source", "revision", "task", "num_labels", "adapter"),
            ("checkpoints", len(model["checkpoints"])),
            ("layers", model["num_layers"]),
            ("blocks", model["num_blocks"]),
            *fields_named(model, "weights_hash", "created_at"),
        ]
    )


def _row(model: Record) -> list[Any]:
    return [
        *(model[key] for key in ("id", "name", "task", "num_labels", "num_layers")),
        short(model["source"], 40),
        model["created_at"][:19],
    ]


MODELS = Resource(
    noun="model",
    render=_render,
    headers=("ID", "NAME", "TASK", "LABELS", "LAYERS", "SOURCE", "CREATED"),
    row=_row,
)


def add_commands(commands: Any) -> None:
    models = add_group(commands, "models", "register, inspect and delete models")
    sub = add_command(models, "register", register, "register a model (a server folder or a cached hub id)")
    sub.add_argument("source", help="absolute folder on the server, or a hub id in its cache")
    sub.add_argument("--name", required=True)
    sub.add_argument("--task", choices=("classification", "causal-lm"))
    sub.add_argument("--num-labels", type=int)
    sub.add_argument("--revision")
    sub.add_argument("--adapter", help="PEFT adapter folder on the server")
    sub.add_argument(
        "--checkpoint",
        nargs=2,
        action="append",
        metavar=("ADAPTER", "LR"),
        help="TracIn-CP checkpoint (repeat)",
    )
    add_list(models, MODELS)
    add_show(models, MODELS)
    add_command(models, "layers", layers, "list a model's layer units").add_argument("model_id")
    add_delete(models, MODELS, "delete a model (not its folders)")


def register(ctx: Context) -> int:
    args = ctx.args
    checkpoints = None
    if args.checkpoint:
        try:
            checkpoints = [
                CheckpointIn(adapter=path, learning_rate=float(lr)) for path, lr in args.checkpoint
            ]
        except ValueError:
            raise CommandError("--checkpoint ADAPTER LR: LR must be a number") from None
    options = options_of(args, ModelOptions)
    options["checkpoints"] = checkpoints
    model = ctx.client.register_model(args.source, args.name, **options)
    ctx.console.result(model, lambda: _render(ctx, model))
    return EXIT_OK


def layers(ctx: Context) -> int:
    answer = ctx.client.model_layers(ctx.args.model_id)
    rows = [
        [la["name"], la["role"], la["block"], la["position"], f"{la['rows']}x{la['cols']}", la["num_params"]]
        for la in answer["layers"]
    ]

    def render() -> None:
        ctx.console.table(("NAME", "ROLE", "BLOCK", "POSITION", "SHAPE", "PARAMS"), rows)
        ctx.console.line()
        ctx.console.line("groups: " + ", ".join(sorted(answer["groups"])))

    ctx.console.result(answer, render)
    return EXIT_OK
