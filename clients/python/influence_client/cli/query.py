"""`influence query`: which training rows most helped / harmed some examples, and which settings (layers,
estimator, aggregation) said so and where they came from."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from influence_client.cli.arguments import add_command, add_scoring_options, label, options_of, read_examples
from influence_client.cli.context import EXIT_OK, CommandError, Context, Record
from influence_client.cli.output import render_table, short
from influence_client.cli.settings import print_settings
from influence_client.schemas import QueryOptions


def add_commands(commands: Any) -> None:
    sub = add_command(commands, "query", query, "which training rows most helped / harmed some examples")
    sub.add_argument("index_id")
    sub.add_argument("--text", action="append", default=[], help="an example's text (repeat)")
    sub.add_argument("--text-pair", action="append", default=[], help="its second text (repeat, in order)")
    sub.add_argument(
        "--label", action="append", default=[], type=label, help="its label (repeat, or one for all)"
    )
    sub.add_argument("--examples", metavar="FILE", help="JSON list or JSONL of {text, label, text_pair?}")
    add_scoring_options(sub)
    sub.add_argument("--top-k", type=int)
    sub.add_argument("--direction", choices=("helpful", "harmful", "both"))
    sub.add_argument("--approximate", action="store_true", default=None)
    sub.add_argument("--candidates-per-layer", type=int)


def _examples(args: argparse.Namespace) -> list[dict[str, Any]]:
    examples: list[dict[str, Any]] = read_examples(args.examples) if args.examples else []
    texts, labels, pairs = args.text, args.label, args.text_pair
    if texts:
        if len(labels) not in (1, len(texts)):
            raise CommandError(f"give one --label for all texts or one per --text ({len(texts)})")
        if pairs and len(pairs) != len(texts):
            raise CommandError("give one --text-pair per --text")
        for i, text in enumerate(texts):
            example: dict[str, Any] = {"text": text, "label": labels[0] if len(labels) == 1 else labels[i]}
            if pairs:
                example["text_pair"] = pairs[i]
            examples.append(example)
    elif labels or pairs:
        raise CommandError("--label and --text-pair go with --text")
    if not examples:
        raise CommandError("give the examples: --text TEXT --label LABEL (repeatable) or --examples FILE")
    return examples


def _hit_rows(hits: Sequence[Record]) -> list[list[Any]]:
    return [[h["row"], h["score"], h["label"], h["noisy"], short(h["text"])] for h in hits]


def query(ctx: Context) -> int:
    args = ctx.args
    answer = ctx.client.query(args.index_id, _examples(args), **options_of(args, QueryOptions))

    def render() -> None:
        console = ctx.console
        console.line(
            f"{answer['estimator']} / {answer['aggregation']} over {len(answer['layers'])} layers, "
            f"{answer['num_rows']} rows{' (approximate)' if answer['approximate'] else ''}, "
            f"{answer['seconds']:.2f}s; score > 0 helps"
        )
        print_settings(ctx, answer, answer["index_id"])
        for result in answer["results"]:
            console.line()
            prediction = f", predicted {result['prediction']}" if result["prediction"] is not None else ""
            console.line(
                f"example {result['example']}: {short(result['text'])!r} label {result['label']}{prediction}, "
                f"loss {result['loss']:.4g}"
            )
            for direction in ("harmful", "helpful"):
                hits = result[direction]
                if hits is not None:
                    console.line(f"  most {direction}:")
                    for line in render_table(
                        ("ROW", "SCORE", "LABEL", "NOISY", "TEXT"), _hit_rows(hits)
                    ).split("\n"):
                        console.line("    " + line)

    ctx.console.result(answer, render)
    return EXIT_OK
