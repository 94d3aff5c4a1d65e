"""`influence`: the service's HTTP API from a shell, for people (aligned tables) and scripts (`--json`).

    influence models register /models/minilm --name minilm --num-labels 2
    influence datasets upload train.tsv --text-column sentence
    influence indexes create --model M --dataset D --layers middle        # waits, with a progress bar
    influence query INDEX --text "a gorgeous , witty movie" --label 1 --top-k 5
    influence audit INDEX --reference-dataset D --output audit.csv        # = `audit create`
    influence check INDEX new.csv --text-column sentence --label-column label --reference-dataset D

The service is `--url` (or INFLUENCE_URL, default http://127.0.0.1:8000); the key `--api-key`, `--api-key-file`
(the embedded service writes <data_dir>/local-api-key) or INFLUENCE_API_KEY / INFLUENCE_API_KEY_FILE.
Job-creating commands wait for their job (progress on stderr when it is a terminal) unless `--no-wait`.

Exit status: 0 success; 1 a check whose verdict is fail; 2 a usage error, an error answer of the service (its
problem detail goes to stderr), a failed or cancelled job, or a service that cannot be reached; 130 when
interrupted while waiting (the job goes on). `--json` prints exactly one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

import httpx

from influence_client.client import DEFAULT_URL, AuditRow, InfluenceAPIError, InfluenceClient, Job

EXIT_OK, EXIT_CHECK_FAILED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
# Workflow commands take an action (`audit show ID`); without one the action is `create` (`audit INDEX ...`).
WORKFLOW_ACTIONS = {
    "audit": ("create", "show", "list", "delete"),
    "report": ("create", "show", "list", "delete"),
    "check": ("create", "show", "list", "delete"),
    "experiment": ("create", "show", "list", "delete"),
}
# Options of every command that take a value (the workflow rewrite must step over their values).
VALUE_OPTIONS = ("--url", "--api-key", "--api-key-file", "--timeout", "--poll", "--wait-timeout")
TEXT_WIDTH = 60
# An answer of the service as a command reads it (the client's TypedDicts are such mappings).
Record = Mapping[str, Any]


class CommandError(Exception):
    """Ends a command with a message on stderr and an exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------ output


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain aligned columns; numeric columns right-aligned, None as '-'."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = [
        bool(cells) and all(_is_number(row[i]) or row[i] == "-" for row in cells) for i in range(len(headers))
    ]
    lines = []
    for row in [list(headers), *cells]:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value).replace("\t", " ").replace("\n", " ")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _short(value: Any, width: int = TEXT_WIDTH) -> str:
    text = "" if value is None else " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


class Console:
    """Where a command's answer goes: one JSON document (--json) or text for people; notes to stderr."""

    def __init__(self, as_json: bool, stdout: TextIO, stderr: TextIO):
        self.as_json = as_json
        self.stdout = stdout
        self.stderr = stderr
        self.emitted = False

    def result(self, document: Any, render: Callable[[], None]) -> None:
        """The command's answer: `document` as JSON, or `render()` for people."""
        if self.as_json:
            if self.emitted:  # one document per run: a second answer is a bug of the command
                raise RuntimeError("a command emitted two JSON documents")
            json.dump(document, self.stdout, indent=2, ensure_ascii=False)
            self.stdout.write("\n")
            self.emitted = True
        else:
            render()

    def line(self, text: str = "") -> None:
        print(text, file=self.stdout)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.line(render_table(headers, rows) if rows else "(none)")

    def fields(self, pairs: Sequence[tuple[str, Any]]) -> None:
        """`key  value` lines, the values aligned."""
        width = max((len(key) for key, _ in pairs), default=0)
        for key, value in pairs:
            self.line(f"{key.ljust(width)}  {_cell(value)}")

    def note(self, text: str) -> None:
        print(text, file=self.stderr)


class ProgressBar:
    """A one-line job progress bar on a terminal (stderr); silent when that is not a terminal (CI logs)."""

    def __init__(self, stream: TextIO, label: str, width: int = 30):
        self.stream = stream
        self.label = label
        self.width = width
        self.started = time.monotonic()
        self.enabled = stream.isatty()
        self.drawn = False

    def update(self, job: Job) -> None:
        if not self.enabled:
            return
        done, total = job["done"], job["total"]
        filled = int(self.width * min(1.0, done / total)) if total else 0
        bar = "#" * filled + "." * (self.width - filled)
        counts = f"{done}/{total}" if total else "?"
        elapsed = time.monotonic() - self.started
        self.stream.write(f"\r{self.label} [{bar}] {counts} {job['status']} {elapsed:.0f}s\033[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


# ------------------------------------------------------------------------------------------- arguments


def _layers(value: str) -> Any:
    """A layer selector: JSON when it looks like a list or an object, else the selector string itself."""
    if value.lstrip().startswith(("[", "{")):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    return value


def _json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return parsed


def _unit_projection(value: str) -> tuple[str, dict[str, Any]]:
    """NAME=KIND[:DIM] -> (name, {kind[, dim]}): one unit's projection override."""
    name, eq, rest = value.rpartition("=")
    kind, colon, dim = rest.partition(":")
    if not eq or not name or not kind:
        raise argparse.ArgumentTypeError(f"expected NAME=KIND[:DIM], got {value!r}")
    unit: dict[str, Any] = {"kind": kind}
    if colon:
        try:
            unit["dim"] = int(dim)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer DIM in {value!r}") from None
    return name, unit


def _int_list(value: str) -> list[int]:
    try:
        return [int(part) for part in value.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _label(value: str) -> int | str:
    # Class indices are integers; anything else is a label name (or a causal LM's completion).
    try:
        return int(value)
    except ValueError:
        return value


def _read_examples(path: str) -> list[dict[str, Any]]:
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


def _common_options(parser: argparse.ArgumentParser) -> None:
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


def _page_options(parser: argparse.ArgumentParser, limit: int = 50) -> None:
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--limit", type=int, default=limit)


def _no_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-wait", action="store_true", help="print the created job and return at once")


def _reference_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reference set (one of)")
    group.add_argument("--reference-dataset", metavar="ID", help="rows of this dataset")
    group.add_argument("--reference-rows", type=_int_list, metavar="0,5,...", help="with --reference-dataset")
    group.add_argument(
        "--reference-limit", type=int, metavar="N", help="with --reference-dataset: first N rows"
    )
    group.add_argument("--reference-examples", metavar="FILE", help="JSON list or JSONL of {text, label}")
    group.add_argument("--reference", type=_json_object, metavar="JSON", help="the reference object itself")


def _scoring_options(parser: argparse.ArgumentParser, plural: bool = False) -> None:
    parser.add_argument(
        "--layers", type=_layers, help="layer selector, e.g. middle, role:attention or a JSON list"
    )
    if plural:
        parser.add_argument("--estimators", help="comma-separated, e.g. grad-dot,cosine")
        parser.add_argument("--aggregations", help="comma-separated, e.g. mean,rank,vote")
    else:
        parser.add_argument("--estimator", choices=("grad-dot", "cosine", "datainf"))
        parser.add_argument("--aggregation", help="mean, rank, vote, zmean, median, rrf (and -c variants)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influence",
        description="Layer-wise training-data influence: the influence service from the command line.",
        epilog="Exit status: 0 ok, 1 a failing check, 2 errors. Run `influence COMMAND --help` for details.",
    )
    _common_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        parent: Any, name: str, handler: Callable[..., int], help_text: str
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
        _common_options(sub)
        sub.set_defaults(handler=handler)
        return sub

    def group(name: str, help_text: str) -> Any:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _common_options(sub)
        return sub.add_subparsers(dest="action", metavar="ACTION", required=True)

    models = group("models", "register, inspect and delete models")
    sub = command(
        models, "register", models_register, "register a model (a server folder or a cached hub id)"
    )
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
    _page_options(command(models, "list", models_list, "list models, newest first"))
    command(models, "show", models_show, "show a model").add_argument("model_id")
    command(models, "layers", models_layers, "list a model's layer units").add_argument("model_id")
    command(models, "delete", models_delete, "delete a model (not its folders)").add_argument("model_id")

    datasets = group("datasets", "register, inspect and delete datasets")
    for name, handler, what in (
        ("upload", datasets_upload, "upload a dataset file (JSONL, CSV, TSV, Parquet)"),
        ("register-path", datasets_register_path, "register a file already on the server"),
    ):
        sub = command(datasets, name, handler, what)
        sub.add_argument("file" if name == "upload" else "path")
        sub.add_argument("--name")
        sub.add_argument("--format", choices=("jsonl", "csv", "tsv", "parquet"))
        sub.add_argument("--task", choices=("classification", "causal-lm"))
        sub.add_argument("--text-column")
        sub.add_argument("--text-pair-column")
        sub.add_argument("--label-column")
        sub.add_argument("--noisy-column")
    _page_options(command(datasets, "list", datasets_list, "list datasets, newest first"))
    command(datasets, "show", datasets_show, "show a dataset").add_argument("dataset_id")
    sub = command(datasets, "rows", datasets_rows, "page through a dataset's rows")
    sub.add_argument("dataset_id")
    _page_options(sub, limit=20)
    command(datasets, "delete", datasets_delete, "delete a dataset").add_argument("dataset_id")

    indexes = group("indexes", "build, inspect, compact and delete indexes")
    sub = command(indexes, "create", indexes_create, "build an index (waits for the build)")
    sub.add_argument("--model", required=True, dest="model_id")
    sub.add_argument("--dataset", required=True, dest="dataset_id")
    sub.add_argument("--layers", type=_layers, help="layer selector (default: every layer)")
    sub.add_argument(
        "--projection",
        choices=("auto", "factorized", "gaussian", "rademacher", "identity"),  # per unit also: tokens
        help="auto (default): small units (LoRA, head) exact, the others factorized",
    )
    sub.add_argument("--dim", type=int, help="projection dimension per projected unit (256)")
    sub.add_argument(
        "--projection-unit",
        type=_unit_projection,
        action="append",
        metavar="NAME=KIND[:DIM]",
        help="override one unit's projection (repeatable), e.g. head=gaussian:64, block.0.attn.q=identity or "
        "embed=tokens:192 (the embedding's per-token sketch)",
    )
    sub.add_argument("--seed", type=int)
    sub.add_argument("--dtype", choices=("float16", "float32"))
    sub.add_argument("--faiss-kind", choices=("flat", "ivf", "hnsw"))
    sub.add_argument("--chunk-size", type=int)
    sub.add_argument("--max-length", type=int)
    _no_wait(sub)
    sub = command(indexes, "list", indexes_list, "list indexes, newest first")
    sub.add_argument("--model", dest="model_id")
    sub.add_argument("--dataset", dest="dataset_id")
    sub.add_argument("--status", choices=("pending", "building", "ready", "failed", "cancelled"))
    _page_options(sub)
    command(indexes, "show", indexes_show, "show an index").add_argument("index_id")
    command(indexes, "delete", indexes_delete, "delete an index and its artifacts").add_argument("index_id")
    sub = command(indexes, "delete-rows", indexes_delete_rows, "delete training rows from an index")
    sub.add_argument("index_id")
    sub.add_argument("rows", type=int, nargs="+", metavar="ROW")
    sub = command(indexes, "compact", indexes_compact, "remove deleted rows for good (waits)")
    sub.add_argument("index_id")
    _no_wait(sub)

    sub = command(commands, "query", query, "which training rows most helped / harmed some examples")
    sub.add_argument("index_id")
    sub.add_argument("--text", action="append", default=[], help="an example's text (repeat)")
    sub.add_argument("--text-pair", action="append", default=[], help="its second text (repeat, in order)")
    sub.add_argument(
        "--label", action="append", default=[], type=_label, help="its label (repeat, or one for all)"
    )
    sub.add_argument("--examples", metavar="FILE", help="JSON list or JSONL of {text, label, text_pair?}")
    _scoring_options(sub)
    sub.add_argument("--vote-k", type=float)
    sub.add_argument("--top-k", type=int)
    sub.add_argument("--direction", choices=("helpful", "harmful", "both"))
    sub.add_argument("--approximate", action="store_true", default=None)
    sub.add_argument("--candidates-per-layer", type=int)

    audit = group("audit", "audit every training row against a reference set")
    sub = command(audit, "create", audit_create, "start an audit, wait, print the most detrimental rows")
    sub.add_argument("index_id")
    _reference_options(sub)
    _scoring_options(sub)
    sub.add_argument(
        "--correct-only", action="store_true", default=None, help="voters: correctly predicted rows"
    )
    sub.add_argument("--vote-k", type=float)
    _audit_output_options(sub)
    _no_wait(sub)
    sub = command(audit, "show", audit_show, "show an audit and its most detrimental rows")
    sub.add_argument("audit_id")
    _audit_output_options(sub)
    _page_options(command(audit, "list", audit_list, "list audits, newest first"))
    command(audit, "delete", audit_delete, "delete an audit and its files").add_argument("audit_id")

    report = group("report", "layer report: which layers, estimator and aggregation detect noisy rows")
    sub = command(report, "create", report_create, "start a layer report, wait, print its recommendation")
    sub.add_argument("index_id")
    _reference_options(sub)
    _scoring_options(sub, plural=True)
    sub.add_argument("--vote-k", type=float)
    sub.add_argument("--noisy", help="`dataset` (its noisy column) or comma-separated noisy row ids")
    sub.add_argument("--cancellation-rows", type=int, help="rows the cancellation is measured over (1000)")
    sub.add_argument("--top-rows", type=int, help="most detrimental rows listed per estimator (20)")
    _report_output_options(sub)
    _no_wait(sub)
    sub = command(report, "show", report_show, "show a layer report")
    sub.add_argument("report_id")
    _report_output_options(sub)
    sub = command(report, "list", report_list, "list layer reports, newest first")
    sub.add_argument("--index", dest="index_id")
    sub.add_argument("--status", choices=("queued", "running", "succeeded", "failed", "cancelled"))
    _page_options(sub)
    command(report, "delete", report_delete, "delete a layer report").add_argument("report_id")

    check = group("check", "batch check of new rows before they join the training set (exit 1: fail)")
    sub = command(check, "create", check_create, "check a file of new rows, wait, print the verdict")
    sub.add_argument("index_id")
    sub.add_argument("file")
    sub.add_argument("--format", choices=("jsonl", "csv", "tsv", "parquet"))
    sub.add_argument("--text-column", required=True)
    sub.add_argument("--text-pair-column")
    sub.add_argument("--label-column", required=True)
    _reference_options(sub)
    _scoring_options(sub)
    sub.add_argument("--vote-k", type=float)
    sub.add_argument(
        "--correct-only", action="store_true", default=None, help="voters: correctly predicted rows"
    )
    sub.add_argument("--threshold-percentile", type=float, help="flag rows below this percentile (5)")
    sub.add_argument("--max-flagged", type=int, help="fail when more rows are flagged (0)")
    sub.add_argument("--append", action="store_true", default=None, help="a passing batch joins the index")
    sub.add_argument("--all-rows", action="store_true", help="print every row, not only the flagged ones")
    _no_wait(sub)
    sub = command(check, "show", check_show, "show a check (exit 1 when its verdict is fail)")
    sub.add_argument("check_id")
    sub.add_argument("--all-rows", action="store_true")
    sub = command(check, "list", check_list, "list checks, newest first")
    sub.add_argument("--index", dest="index_id")
    _page_options(sub)
    command(check, "delete", check_delete, "delete a check").add_argument("check_id")

    experiment = group("experiment", "the paper's protocol as one job: noise, fine-tune, index, report")
    sub = command(experiment, "create", experiment_create, "start an experiment and wait for it")
    sub.add_argument("--base-model", required=True, dest="base_model_id")
    sub.add_argument("--dataset", required=True, dest="dataset_id")
    sub.add_argument("--name")
    _reference_options(sub)
    sub.add_argument(
        "--heldout", type=_json_object, metavar="JSON", help="held-out reference set (needed for retraining)"
    )
    sub.add_argument("--noise-rate", type=float)
    sub.add_argument("--seed", type=int)
    sub.add_argument("--lora", type=_json_object, metavar="JSON", help='e.g. {"r": 8, "alpha": 16}')
    sub.add_argument("--epochs", type=int)
    sub.add_argument("--learning-rate", type=float)
    sub.add_argument("--batch-size", type=int)
    sub.add_argument("--max-length", type=int)
    sub.add_argument("--warmup-ratio", type=float)
    sub.add_argument("--layers", type=_layers, help="layers the index holds (default: WE, role:lora, head)")
    sub.add_argument("--projection", type=_json_object, metavar="JSON", help='e.g. {"kind": "factorized"}')
    sub.add_argument("--dtype", choices=("float16", "float32"))
    sub.add_argument("--chunk-size", type=int)
    sub.add_argument("--report", type=_json_object, metavar="JSON", help="layer report options")
    sub.add_argument("--retraining", type=_json_object, metavar="JSON", help='e.g. {"enabled": true}')
    _no_wait(sub)
    command(experiment, "show", experiment_show, "show an experiment").add_argument("experiment_id")
    _page_options(command(experiment, "list", experiment_list, "list experiments, newest first"))
    command(experiment, "delete", experiment_delete, "delete an experiment").add_argument("experiment_id")

    jobs = group("jobs", "follow, list and cancel jobs")
    sub = command(jobs, "list", jobs_list, "list jobs, newest first")
    sub.add_argument("--status", choices=("queued", "running", "succeeded", "failed", "cancelled"))
    sub.add_argument("--kind")
    sub.add_argument("--target", dest="target_id")
    _page_options(sub)
    command(jobs, "show", jobs_show, "show a job").add_argument("job_id")
    command(jobs, "cancel", jobs_cancel, "cancel a job").add_argument("job_id")
    command(jobs, "wait", jobs_wait, "wait for a job to finish").add_argument("job_id")
    return parser


def _audit_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top", type=int, default=10, help="rows to print (10)")
    parser.add_argument("--output", metavar="FILE", help="save every row: FILE.csv or FILE.jsonl")
    parser.add_argument("--scores", metavar="FILE", help="save the raw score tensor (safetensors)")


def _report_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top", type=int, default=10, help="table rows to print (10)")
    parser.add_argument("--html", metavar="FILE", help="save the report's HTML page")


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


# -------------------------------------------------------------------------------------------- context


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

    def reference(self) -> dict[str, Any]:
        """The reference set from the --reference-* options (exactly one source)."""
        args = self.args
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
            return {"examples": _read_examples(args.reference_examples)}
        reference: dict[str, Any] = {"dataset_id": args.reference_dataset}
        if args.reference_rows is not None:
            reference["rows"] = args.reference_rows
        if args.reference_limit is not None:
            reference["limit"] = args.reference_limit
        return reference


def _job_id(resource: dict[str, Any]) -> str:
    # A workflow's resource is its job: its id is the job's (the `job` member, when present, says so too).
    job = resource.get("job")
    return str(job["id"] if isinstance(job, dict) and job.get("id") else resource["id"])


def _finish(job: Job | dict[str, Any] | None, what: str) -> int:
    """EXIT_OK, unless the job failed or was cancelled (then a CommandError says so, with the job's error)."""
    if job is None or job.get("status") not in ("failed", "cancelled"):
        return EXIT_OK
    detail = f": {job['error']}" if job.get("error") else ""
    raise CommandError(f"{what} {job['id']} {job['status']}{detail}")


def _job_of(resource: dict[str, Any]) -> dict[str, Any]:
    """A workflow resource's job (or what the resource itself says of its state)."""
    return resource.get("job") or {"id": resource["id"], "status": resource.get("status")}


# --------------------------------------------------------------------------------------------- models


def _model_rows(models: Sequence[Record]) -> list[list[Any]]:
    return [
        [
            m["id"],
            m["name"],
            m["task"],
            m["num_labels"],
            m["num_layers"],
            _short(m["source"], 40),
            m["created_at"][:19],
        ]
        for m in models
    ]


_MODEL_HEADERS = ("ID", "NAME", "TASK", "LABELS", "LAYERS", "SOURCE", "CREATED")


def _show_model(ctx: Context, model: dict[str, Any]) -> None:
    ctx.console.fields(
        [
            ("id", model["id"]),
            ("name", model["name"]),
            ("source", model["source"]),
            ("revision", model["revision"]),
            ("task", model["task"]),
            ("num_labels", model["num_labels"]),
            ("adapter", model["adapter"]),
            ("checkpoints", len(model["checkpoints"])),
            ("layers", model["num_layers"]),
            ("blocks", model["num_blocks"]),
            ("weights_hash", model["weights_hash"]),
            ("created_at", model["created_at"]),
        ]
    )


def models_register(ctx: Context) -> int:
    args = ctx.args
    checkpoints = None
    if args.checkpoint:
        try:
            checkpoints = [{"adapter": path, "learning_rate": float(lr)} for path, lr in args.checkpoint]
        except ValueError:
            raise CommandError("--checkpoint ADAPTER LR: LR must be a number") from None
    model = ctx.client.register_model(
        args.source,
        name=args.name,
        task=args.task,
        num_labels=args.num_labels,
        revision=args.revision,
        adapter=args.adapter,
        checkpoints=checkpoints,  # type: ignore[arg-type]
    )
    ctx.console.result(model, lambda: _show_model(ctx, dict(model)))
    return EXIT_OK


def models_list(ctx: Context) -> int:
    page = ctx.client.list_models(offset=ctx.args.offset, limit=ctx.args.limit)
    ctx.console.result(page, lambda: _page_table(ctx, page, _MODEL_HEADERS, _model_rows(page["items"])))
    return EXIT_OK


def models_show(ctx: Context) -> int:
    model = ctx.client.get_model(ctx.args.model_id)
    ctx.console.result(model, lambda: _show_model(ctx, dict(model)))
    return EXIT_OK


def models_layers(ctx: Context) -> int:
    layers = ctx.client.model_layers(ctx.args.model_id)
    rows = [
        [la["name"], la["role"], la["block"], la["position"], f"{la['rows']}x{la['cols']}", la["num_params"]]
        for la in layers["layers"]
    ]

    def render() -> None:
        ctx.console.table(("NAME", "ROLE", "BLOCK", "POSITION", "SHAPE", "PARAMS"), rows)
        ctx.console.line()
        ctx.console.line("groups: " + ", ".join(sorted(layers["groups"])))

    ctx.console.result(layers, render)
    return EXIT_OK


def _page_table(ctx: Context, page: Any, headers: Sequence[str], rows: list[list[Any]]) -> None:
    ctx.console.table(headers, rows)
    shown = len(page["items"])
    if page["total"] > shown:
        first = page["offset"] + 1 if shown else page["offset"]
        ctx.console.line(
            f"({first}-{page['offset'] + shown} of {page['total']}; --offset / --limit for more)"
        )


# ------------------------------------------------------------------------------------------- datasets


_DATASET_HEADERS = ("ID", "NAME", "FORMAT", "TASK", "ROWS", "LABELS", "NOISY", "SOURCE")


def _dataset_rows(datasets: Sequence[Record]) -> list[list[Any]]:
    return [
        [
            d["id"],
            d["name"],
            d["format"],
            d["task"],
            d["row_count"],
            ",".join(d["label_names"] or [str(label) for label in d["labels"]]),
            d["has_noisy_flag"],
            _short(d["source"], 40),
        ]
        for d in datasets
    ]


def _show_dataset(ctx: Context, dataset: dict[str, Any]) -> None:
    columns = dataset["columns"]
    ctx.console.fields(
        [
            ("id", dataset["id"]),
            ("name", dataset["name"]),
            ("format", dataset["format"]),
            ("task", dataset["task"]),
            ("source", dataset["source"]),
            ("rows", dataset["row_count"]),
            ("size", _size(dataset["size_bytes"])),
            ("columns", ", ".join(f"{k}={v}" for k, v in columns.items() if v is not None)),
            ("labels", dataset["labels"]),
            ("label_names", dataset["label_names"]),
            ("noisy flag", dataset["has_noisy_flag"]),
            ("content_hash", dataset["content_hash"]),
            ("created_at", dataset["created_at"]),
        ]
    )


def _dataset_form(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": args.name,
        "format": args.format,
        "task": args.task,
        "text_column": args.text_column,
        "text_pair_column": args.text_pair_column,
        "label_column": args.label_column,
        "noisy_column": args.noisy_column,
    }


def datasets_upload(ctx: Context) -> int:
    if not Path(ctx.args.file).is_file():
        raise CommandError(f"no such file: {ctx.args.file}")
    dataset = ctx.client.upload_dataset(ctx.args.file, **_dataset_form(ctx.args))
    ctx.console.result(dataset, lambda: _show_dataset(ctx, dict(dataset)))
    return EXIT_OK


def datasets_register_path(ctx: Context) -> int:
    dataset = ctx.client.register_dataset_path(ctx.args.path, **_dataset_form(ctx.args))
    ctx.console.result(dataset, lambda: _show_dataset(ctx, dict(dataset)))
    return EXIT_OK


def datasets_list(ctx: Context) -> int:
    page = ctx.client.list_datasets(offset=ctx.args.offset, limit=ctx.args.limit)
    ctx.console.result(page, lambda: _page_table(ctx, page, _DATASET_HEADERS, _dataset_rows(page["items"])))
    return EXIT_OK


def datasets_show(ctx: Context) -> int:
    dataset = ctx.client.get_dataset(ctx.args.dataset_id)
    ctx.console.result(dataset, lambda: _show_dataset(ctx, dict(dataset)))
    return EXIT_OK


def datasets_rows(ctx: Context) -> int:
    page = ctx.client.dataset_rows(ctx.args.dataset_id, offset=ctx.args.offset, limit=ctx.args.limit)
    rows = [
        [
            r["row"],
            r["label_name"] if r["label_name"] is not None else r["label"],
            r["noisy"],
            _short(r["text"]),
        ]
        for r in page["items"]
    ]
    ctx.console.result(page, lambda: _page_table(ctx, page, ("ROW", "LABEL", "NOISY", "TEXT"), rows))
    return EXIT_OK


def models_delete(ctx: Context) -> int:
    ctx.client.delete_model(ctx.args.model_id)
    return _deleted(ctx, ctx.args.model_id)


def datasets_delete(ctx: Context) -> int:
    ctx.client.delete_dataset(ctx.args.dataset_id)
    return _deleted(ctx, ctx.args.dataset_id)


def _deleted(ctx: Context, resource_id: str) -> int:
    ctx.console.result({"deleted": resource_id}, lambda: ctx.console.line(f"deleted {resource_id}"))
    return EXIT_OK


# -------------------------------------------------------------------------------------------- indexes


_INDEX_HEADERS = ("ID", "STATUS", "MODEL", "DATASET", "LAYERS", "ROWS", "DELETED", "SIZE", "CREATED")


def _index_rows(indexes: Sequence[Record]) -> list[list[Any]]:
    return [
        [
            i["id"],
            i["status"],
            i["model_id"],
            i["dataset_id"],
            len(i["layers"]),
            i["num_rows"],
            i["deleted_rows"],
            _size(i["size_bytes"]),
            i["created_at"][:19],
        ]
        for i in indexes
    ]


def _show_index(ctx: Context, index: dict[str, Any]) -> None:
    job = index.get("job") or {}
    projection = index["projection"]
    ctx.console.fields(
        [
            ("id", index["id"]),
            ("status", index["status"]),
            ("model_id", index["model_id"]),
            ("dataset_id", index["dataset_id"]),
            ("layers", f"{len(index['layers'])}: " + _short(", ".join(index["layers"]), 80)),
            ("projection", _projection_text(projection)),
            ("dtype", index["dtype"]),
            ("faiss_kind", index["faiss_kind"]),
            ("rows", index["num_rows"]),
            ("deleted_rows", index["deleted_rows"]),
            ("size", _size(index["size_bytes"])),
            (
                "job",
                f"{job.get('id')} {job.get('status')} {job.get('done')}/{job.get('total')}" if job else None,
            ),
            ("created_at", index["created_at"]),
        ]
    )
    _show_fidelity(ctx, index)


# Units the fidelity table of `indexes show` lists, lowest first.
FIDELITY_ROWS = 10


def _show_fidelity(ctx: Context, index: dict[str, Any]) -> None:
    """The projection's fidelity per unit, lowest first (at most FIDELITY_ROWS lines and a count)."""
    fidelity = index.get("fidelity")
    if not fidelity:
        if index.get("status") == "ready":
            ctx.console.line("fidelity: not measured (the index was built before fidelity was measured)")
        return
    if fidelity.get("skipped"):
        ctx.console.line(f"fidelity: not measured ({_short(fidelity['skipped'], 200)})")
        return
    units = fidelity.get("units") or {}
    threshold = fidelity.get("threshold") or 0.9
    below = fidelity.get("below_threshold") or []
    sample = fidelity.get("sample") or {}
    ctx.console.line(
        f"fidelity: {len(below)} of {len(units)} units below {threshold:g} (Spearman of projected vs exact "
        f"scores; {sample.get('train_rows')} x {sample.get('query_rows')} rows, seed {sample.get('seed')})"
    )
    ordered = sorted(
        units.items(), key=lambda item: (item[1].get("spearman") is not None, item[1].get("spearman") or 0.0)
    )
    rows = [
        [
            name,
            f"{(unit.get('projection') or {}).get('kind')} {(unit.get('projection') or {}).get('dim')}",
            unit.get("spearman"),
            unit.get("top10_overlap"),
            unit.get("rel_error"),
            "LOW" if unit.get("spearman") is None or unit["spearman"] < threshold else "",
        ]
        for name, unit in ordered[:FIDELITY_ROWS]
    ]
    ctx.console.table(["UNIT", "PROJECTION", "SPEARMAN", "TOP10", "REL_ERROR", ""], rows)
    if len(ordered) > FIDELITY_ROWS:
        ctx.console.line(f"... and {len(ordered) - FIDELITY_ROWS} more units (--json shows them all)")
    if sample.get("note"):
        ctx.console.line(f"note: {sample['note']}")


def _projection_text(projection: dict[str, Any]) -> str:
    text = f"{projection['kind']} dim {projection['dim']} seed {projection['seed']}"
    if projection.get("exact_max_params") is not None:
        text += f", exact up to {projection['exact_max_params']} params"
    kinds: dict[str, int] = {}
    for unit in (projection.get("units") or {}).values():
        kinds[unit["kind"]] = kinds.get(unit["kind"], 0) + 1
    if kinds:
        text += " (units: " + ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) + ")"
    return text


def indexes_create(ctx: Context) -> int:
    args = ctx.args
    projection: dict[str, Any] = {
        key: value
        for key, value in (("kind", args.projection), ("dim", args.dim), ("seed", args.seed))
        if value is not None
    }
    if args.projection_unit:
        projection["units"] = dict(args.projection_unit)
    index = ctx.client.create_index(
        args.model_id,
        args.dataset_id,
        layers=args.layers,
        projection=projection or None,
        dtype=args.dtype,
        faiss_kind=args.faiss_kind,
        chunk_size=args.chunk_size,
        max_length=args.max_length,
    )
    job = index["job"]
    if not args.no_wait and job is not None:
        ctx.wait(job["id"], f"index {index['id']}")
        index = ctx.client.get_index(index["id"])
    ctx.console.result(index, lambda: _show_index(ctx, dict(index)))
    return EXIT_OK if args.no_wait else _finish(index["job"], "index build")


def indexes_list(ctx: Context) -> int:
    args = ctx.args
    page = ctx.client.list_indexes(
        model_id=args.model_id,
        dataset_id=args.dataset_id,
        status=args.status,
        offset=args.offset,
        limit=args.limit,
    )
    ctx.console.result(page, lambda: _page_table(ctx, page, _INDEX_HEADERS, _index_rows(page["items"])))
    return EXIT_OK


def indexes_show(ctx: Context) -> int:
    index = ctx.client.get_index(ctx.args.index_id)
    ctx.console.result(index, lambda: _show_index(ctx, dict(index)))
    return EXIT_OK


def indexes_delete(ctx: Context) -> int:
    ctx.client.delete_index(ctx.args.index_id)
    return _deleted(ctx, ctx.args.index_id)


def indexes_delete_rows(ctx: Context) -> int:
    answer = ctx.client.delete_rows(ctx.args.index_id, ctx.args.rows)
    ctx.console.result(
        answer,
        lambda: ctx.console.line(
            f"deleted {answer['deleted']} rows ({answer['already_deleted']} were already); "
            f"{answer['num_rows']} rows answer queries, {answer['deleted_rows']} await a compaction"
        ),
    )
    return EXIT_OK


def indexes_compact(ctx: Context) -> int:
    job = ctx.client.compact(ctx.args.index_id)
    if not ctx.args.no_wait:
        job = ctx.wait(job["id"], f"compact {ctx.args.index_id}")
    ctx.console.result(job, lambda: _show_job(ctx, dict(job)))
    return EXIT_OK if ctx.args.no_wait else _finish(job, "compaction")


# ---------------------------------------------------------------------------------------------- query


def _query_examples(args: argparse.Namespace) -> list[dict[str, Any]]:
    examples: list[dict[str, Any]] = _read_examples(args.examples) if args.examples else []
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
    return [[h["row"], h["score"], h["label"], h["noisy"], _short(h["text"])] for h in hits]


def query(ctx: Context) -> int:
    args = ctx.args
    answer = ctx.client.query(
        args.index_id,
        _query_examples(args),
        layers=args.layers,
        estimator=args.estimator,
        aggregation=args.aggregation,
        vote_k=args.vote_k,
        top_k=args.top_k,
        direction=args.direction,
        approximate=args.approximate,
        candidates_per_layer=args.candidates_per_layer,
    )

    def render() -> None:
        console = ctx.console
        console.line(
            f"{answer['estimator']} / {answer['aggregation']} over {len(answer['layers'])} layers, "
            f"{answer['num_rows']} rows{' (approximate)' if answer['approximate'] else ''}, "
            f"{answer['seconds']:.2f}s; score > 0 helps"
        )
        for result in answer["results"]:
            console.line()
            prediction = f", predicted {result['prediction']}" if result["prediction"] is not None else ""
            console.line(
                f"example {result['example']}: {_short(result['text'])!r} label {result['label']}{prediction}, "
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


# --------------------------------------------------------------------------------------------- audits


_WORKFLOW_HEADERS = ("ID", "STATUS", "INDEX", "PROGRESS", "CREATED")


def _workflow_rows(items: Sequence[Record]) -> list[list[Any]]:
    rows = []
    for item in items:
        job = item.get("job") or {}
        progress = f"{job['done']}/{job['total']}" if job.get("total") else "-"
        created = item.get("created_at") or job.get("created_at") or ""
        rows.append([item["id"], item.get("status"), item.get("index_id"), progress, created[:19]])
    return rows


def _workflow_fields(title: str, resource: dict[str, Any]) -> list[tuple[str, Any]]:
    """The head of a workflow resource for people: its id, state, index and (when it failed) the error."""
    pairs: list[tuple[str, Any]] = [(title, resource["id"]), ("status", resource.get("status"))]
    if resource.get("index_id"):
        pairs.append(("index_id", resource["index_id"]))
    job = resource.get("job") or {}
    if job.get("status") in ("queued", "running") and job.get("total"):
        pairs.append(("progress", f"{job['done']}/{job['total']}"))
    if job.get("error"):
        pairs.append(("error", job["error"]))
    return pairs


def _show_workflow(ctx: Context, title: str, resource: dict[str, Any]) -> None:
    ctx.console.fields(_workflow_fields(title, resource))


def _audit_result(ctx: Context, audit_id: str) -> int:
    """Print (and download) a finished audit; the one answer of `audit create` and `audit show`."""
    args, client = ctx.args, ctx.client
    audit = client.get_audit(audit_id)
    succeeded = _job_of(dict(audit)).get("status") == "succeeded"
    rows: list[AuditRow] = []
    if succeeded:
        if args.top > 0:
            rows = client.audit_rows(audit_id, limit=args.top)["items"]
        if args.output:
            # The suffix was checked before the audit was created: .csv or .jsonl.
            suffix: Literal["csv", "jsonl"] = "csv" if Path(args.output).suffix.lower() == ".csv" else "jsonl"
            client.download_audit(audit_id, suffix, args.output)
            ctx.console.note(f"saved every row to {args.output}")
        if args.scores:
            client.download_audit_scores(audit_id, args.scores)
            ctx.console.note(f"saved the score tensor to {args.scores}")

    def render() -> None:
        pairs = _workflow_fields("audit", dict(audit))
        summary = audit.get("summary")
        if summary:
            accuracy = summary["reference_accuracy"]
            pairs.extend(
                [
                    (
                        "rows",
                        f"{summary['num_rows']} ranked, {summary['estimator']} / {summary['aggregation']}",
                    ),
                    ("layers", f"{len(summary['layers'])}: " + _short(", ".join(summary["layers"]), 80)),
                    (
                        "reference",
                        f"{summary['num_reference']} rows"
                        + (f", model accuracy {accuracy:.3f}" if accuracy is not None else ""),
                    ),
                    *_noise_fields(summary.get("noise")),
                ]
            )
        ctx.console.fields(pairs)
        if audit.get("rows_deleted_since_audit"):
            ctx.console.line(
                f"note: {audit['rows_deleted_since_audit']} audited rows were deleted from the index since"
            )
        if rows:
            ctx.console.line()
            ctx.console.line("most detrimental rows (rank 0 = most detrimental):")
            ctx.console.table(
                ("RANK", "ROW", "SCORE", "LABEL", "NOISY", "TEXT"),
                [[r["rank"], r["row"], r["score"], r["label"], r["noisy"], _short(r["text"])] for r in rows],
            )

    ctx.console.result({"audit": audit, "rows": rows}, render)
    return _finish(_job_of(dict(audit)), "audit")


def _noise_fields(noise: Record | None) -> list[tuple[str, Any]]:
    """How well a ranking finds the dataset's noisy rows, against a random order."""
    if not noise:
        return []
    return [
        (
            "noise found",
            f"{noise['noisy_rows']} noisy rows: NDR@30 {_fmt(noise['ndr_at_30'])} (random "
            f"{_fmt(noise['random_ndr_at_30'])}), AUC-NDR {_fmt(noise['auc_ndr'])} (random "
            f"{_fmt(noise['random_auc_ndr'])})",
        )
    ]


def _check_output_suffix(path: str | None) -> None:
    if path and Path(path).suffix.lower() not in (".csv", ".jsonl"):
        raise CommandError(f"--output must end in .csv or .jsonl: {path}")


def audit_create(ctx: Context) -> int:
    args = ctx.args
    _check_output_suffix(args.output)
    audit = ctx.client.create_audit(
        args.index_id,
        ctx.reference(),
        layers=args.layers,
        estimator=args.estimator,
        aggregation=args.aggregation,
        correct_only=args.correct_only,
        vote_k=args.vote_k,
    )
    if args.no_wait:
        ctx.console.result(audit, lambda: _show_workflow(ctx, "audit", dict(audit)))
        return EXIT_OK
    ctx.wait(_job_id(dict(audit)), f"audit {audit['id']}")
    return _audit_result(ctx, audit["id"])


def audit_show(ctx: Context) -> int:
    _check_output_suffix(ctx.args.output)
    return _audit_result(ctx, ctx.args.audit_id)


def audit_list(ctx: Context) -> int:
    page = ctx.client.list_audits(offset=ctx.args.offset, limit=ctx.args.limit)
    ctx.console.result(page, lambda: _page_table(ctx, page, _WORKFLOW_HEADERS, _workflow_rows(page["items"])))
    return EXIT_OK


def audit_delete(ctx: Context) -> int:
    ctx.client.delete_audit(ctx.args.audit_id)
    return _deleted(ctx, ctx.args.audit_id)


# -------------------------------------------------------------------------------------------- reports


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _render_report(ctx: Context, report: dict[str, Any], top: int) -> None:
    console = ctx.console
    body = report.get("report")
    _show_workflow(ctx, "report", report)
    if not isinstance(body, dict):
        return
    console.line()
    console.line(
        f"{body.get('n_train')} training rows ({body.get('n_noisy')} noisy), {body.get('n_reference')} reference "
        f"rows, reference accuracy {_fmt(body.get('reference_accuracy'))}"
    )
    recommendation = body.get("recommendation")
    if recommendation:
        layers = recommendation.get("layers") or {}
        console.line(
            f"recommendation: layers {layers.get('name')} ({layers.get('kind')}), aggregation "
            f"{recommendation.get('aggregation')}, estimator {recommendation.get('estimator')}: AUC-NDR "
            f"{_fmt(recommendation.get('auc_ndr'))} (gain {_fmt(recommendation.get('auc_ndr_gain'))}, required "
            f"{_fmt(recommendation.get('required_gain'))})"
        )
    else:
        explanation = (body.get("criteria") or {}).get("explanation")
        console.line("recommendation: none" + (f" ({explanation})" if explanation else ""))
    for warning in body.get("warnings") or []:
        console.line(f"warning: {warning}")
    entries = sorted(
        body.get("entries") or [],
        key=lambda e: -(e.get("auc_ndr") if e.get("auc_ndr") is not None else float("-inf")),
    )[:top]
    if entries:
        percents = list(entries[0].get("ndr") or {})[:3]
        console.line()
        console.table(
            ("ESTIMATOR", "AGGREGATION", "LAYERS", "AUC-NDR", "GAIN", "Z", *(f"NDR@{p}" for p in percents)),
            [
                [
                    e.get("estimator"),
                    e.get("aggregation"),
                    (e.get("layers") or {}).get("name"),
                    _fmt(e.get("auc_ndr")),
                    _fmt(e.get("auc_ndr_gain")),
                    _fmt(e.get("auc_ndr_z"), 2),
                    *(_fmt((e.get("ndr") or {}).get(p)) for p in percents),
                ]
                for e in entries
            ],
        )


def _report_result(ctx: Context, report_id: str) -> int:
    report = ctx.client.get_report(report_id)
    succeeded = _job_of(dict(report)).get("status") == "succeeded"
    if ctx.args.html and succeeded:
        ctx.client.report_html(report_id, ctx.args.html)
        ctx.console.note(f"saved the report page to {ctx.args.html}")
    ctx.console.result(report, lambda: _render_report(ctx, dict(report), ctx.args.top))
    return _finish(_job_of(dict(report)), "report")


def report_create(ctx: Context) -> int:
    args = ctx.args
    noisy: Any = None
    if args.noisy is not None:
        noisy = "dataset" if args.noisy == "dataset" else {"rows": _int_list(args.noisy)}
    report = ctx.client.create_report(
        args.index_id,
        ctx.reference(),
        layers=args.layers,
        estimators=args.estimators.split(",") if args.estimators else None,
        aggregations=args.aggregations.split(",") if args.aggregations else None,
        vote_k=args.vote_k,
        noisy=noisy,
        cancellation_rows=args.cancellation_rows,
        top_rows=args.top_rows,
    )
    if args.no_wait:
        ctx.console.result(report, lambda: _show_workflow(ctx, "report", dict(report)))
        return EXIT_OK
    ctx.wait(_job_id(dict(report)), f"report {report['id']}")
    return _report_result(ctx, report["id"])


def report_show(ctx: Context) -> int:
    return _report_result(ctx, ctx.args.report_id)


def report_list(ctx: Context) -> int:
    args = ctx.args
    page = ctx.client.list_reports(
        index_id=args.index_id, status=args.status, offset=args.offset, limit=args.limit
    )
    ctx.console.result(page, lambda: _page_table(ctx, page, _WORKFLOW_HEADERS, _workflow_rows(page["items"])))
    return EXIT_OK


def report_delete(ctx: Context) -> int:
    ctx.client.delete_report(ctx.args.report_id)
    return _deleted(ctx, ctx.args.report_id)


# --------------------------------------------------------------------------------------------- checks


def _check_result(ctx: Context, check_id: str) -> int:
    """Print a check; the exit status follows its verdict (1: fail). --json holds every scored row, the table
    the flagged ones (every one with --all-rows)."""
    flagged_only = not (ctx.console.as_json or ctx.args.all_rows)
    check = ctx.client.get_check(check_id, flagged_only=flagged_only or None)
    job = _job_of(dict(check))
    shown = check.get("rows") or []

    def render() -> None:
        _show_workflow(ctx, "check", dict(check))
        verdict = check.get("verdict")
        summary = check.get("summary") or {}
        if verdict is not None:
            ctx.console.line()
            ctx.console.line(
                f"verdict: {verdict.upper()} ({summary.get('flagged')} of {summary.get('rows')} rows flagged "
                f"below percentile {summary.get('threshold_percentile')}, at most {summary.get('max_flagged')} "
                "allowed)"
            )
            for reason in check.get("reasons") or []:
                ctx.console.line(f"  - {reason}")
            for warning in check.get("warnings") or []:
                ctx.console.line(f"warning: {warning}")
            append = check.get("append") or {}
            if append.get("requested"):
                reason = f" ({append['reason']})" if append.get("reason") else ""
                ctx.console.line(
                    f"append: {append.get('status')}, {check.get('appended', 0)} rows joined{reason}"
                )
            ctx.console.line()
            ctx.console.table(
                ("ROW", "SCORE", "PERCENTILE", "FLAGGED", "LABEL", "TEXT"),
                [
                    [r["row"], r["score"], r["percentile"], r["flagged"], r["label"], _short(r["text"])]
                    for r in shown
                ],
            )

    ctx.console.result(check, render)
    _finish(job, "check")
    return EXIT_CHECK_FAILED if check.get("verdict") == "fail" else EXIT_OK


def check_create(ctx: Context) -> int:
    args = ctx.args
    if not Path(args.file).is_file():
        raise CommandError(f"no such file: {args.file}")
    check = ctx.client.create_check(
        args.index_id,
        args.file,
        reference=ctx.reference(),
        text_column=args.text_column,
        label_column=args.label_column,
        text_pair_column=args.text_pair_column,
        format=args.format,
        layers=args.layers,
        estimator=args.estimator,
        aggregation=args.aggregation,
        vote_k=args.vote_k,
        correct_only=args.correct_only,
        threshold_percentile=args.threshold_percentile,
        max_flagged=args.max_flagged,
        append=args.append,
    )
    if args.no_wait:
        ctx.console.result(check, lambda: _show_workflow(ctx, "check", dict(check)))
        return EXIT_OK
    ctx.wait(_job_id(dict(check)), f"check {check['id']}")
    return _check_result(ctx, check["id"])


def check_show(ctx: Context) -> int:
    return _check_result(ctx, ctx.args.check_id)


def check_list(ctx: Context) -> int:
    page = ctx.client.list_checks(index_id=ctx.args.index_id, offset=ctx.args.offset, limit=ctx.args.limit)
    ctx.console.result(page, lambda: _page_table(ctx, page, _WORKFLOW_HEADERS, _workflow_rows(page["items"])))
    return EXIT_OK


def check_delete(ctx: Context) -> int:
    ctx.client.delete_check(ctx.args.check_id)
    return _deleted(ctx, ctx.args.check_id)


# ---------------------------------------------------------------------------------------- experiments


def _render_experiment(ctx: Context, experiment: dict[str, Any]) -> None:
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
                f"{_fmt(best.get('eval_loss'))}, accuracy {_fmt(best.get('eval_accuracy'))}",
            )
        )
    retraining = experiment.get("retraining")
    if retraining:
        for run in ("influence", "random", "oracle"):
            outcome = retraining[run]
            pairs.append(
                (
                    f"retrain ({run})",
                    f"removed {outcome['removed']} ({outcome['noisy_removed']} noisy): best held-out accuracy "
                    f"{_fmt(outcome['best_accuracy'])}",
                )
            )
    ctx.console.fields(pairs)


def experiment_create(ctx: Context) -> int:
    args = ctx.args
    experiment = ctx.client.create_experiment(
        args.base_model_id,
        args.dataset_id,
        ctx.reference(),
        name=args.name,
        heldout=args.heldout,
        noise_rate=args.noise_rate,
        seed=args.seed,
        lora=args.lora,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        max_length=args.max_length,
        warmup_ratio=args.warmup_ratio,
        layers=args.layers,
        projection=args.projection,
        dtype=args.dtype,
        chunk_size=args.chunk_size,
        report=args.report,
        retraining=args.retraining,
    )
    if not args.no_wait:
        ctx.wait(_job_id(dict(experiment)), f"experiment {experiment['id']}")
        experiment = ctx.client.get_experiment(experiment["id"])
    ctx.console.result(experiment, lambda: _render_experiment(ctx, dict(experiment)))
    if args.no_wait:
        return EXIT_OK
    return _finish(_job_of(dict(experiment)), "experiment")


def experiment_show(ctx: Context) -> int:
    experiment = ctx.client.get_experiment(ctx.args.experiment_id)
    ctx.console.result(experiment, lambda: _render_experiment(ctx, dict(experiment)))
    return EXIT_OK


def experiment_list(ctx: Context) -> int:
    page = ctx.client.list_experiments(offset=ctx.args.offset, limit=ctx.args.limit)
    rows = [
        [
            e["id"],
            e.get("status"),
            e.get("stage"),
            e.get("index_id"),
            e.get("report_id"),
            (e.get("created_at") or "")[:19],
        ]
        for e in page["items"]
    ]
    ctx.console.result(
        page, lambda: _page_table(ctx, page, ("ID", "STATUS", "STAGE", "INDEX", "REPORT", "CREATED"), rows)
    )
    return EXIT_OK


def experiment_delete(ctx: Context) -> int:
    ctx.client.delete_experiment(ctx.args.experiment_id)
    return _deleted(ctx, ctx.args.experiment_id)


# ----------------------------------------------------------------------------------------------- jobs


def _show_job(ctx: Context, job: dict[str, Any]) -> None:
    progress = f"{job['done']}/{job['total']}" + (
        f" ({job['progress']:.0%})" if job["progress"] is not None else ""
    )
    ctx.console.fields(
        [
            ("id", job["id"]),
            ("kind", job["kind"]),
            ("status", job["status"]),
            ("target_id", job["target_id"]),
            ("progress", progress),
            ("cancel_requested", job["cancel_requested"]),
            ("attempts", job["attempts"]),
            ("error", job["error"]),
            ("created_at", job["created_at"]),
            ("duration_s", job["duration_s"]),
        ]
    )


def jobs_list(ctx: Context) -> int:
    args = ctx.args
    page = ctx.client.list_jobs(
        status=args.status, kind=args.kind, target_id=args.target_id, offset=args.offset, limit=args.limit
    )
    rows = [
        [j["id"], j["kind"], j["status"], f"{j['done']}/{j['total']}", j["target_id"], j["created_at"][:19]]
        for j in page["items"]
    ]
    ctx.console.result(
        page, lambda: _page_table(ctx, page, ("ID", "KIND", "STATUS", "DONE", "TARGET", "CREATED"), rows)
    )
    return EXIT_OK


def jobs_show(ctx: Context) -> int:
    job = ctx.client.get_job(ctx.args.job_id)
    ctx.console.result(job, lambda: _show_job(ctx, dict(job)))
    return EXIT_OK


def jobs_cancel(ctx: Context) -> int:
    job = ctx.client.cancel_job(ctx.args.job_id)
    ctx.console.result(job, lambda: _show_job(ctx, dict(job)))
    return EXIT_OK


def jobs_wait(ctx: Context) -> int:
    job = ctx.wait(ctx.args.job_id, f"job {ctx.args.job_id}")
    ctx.console.result(job, lambda: _show_job(ctx, dict(job)))
    return _finish(job, "job")


# ----------------------------------------------------------------------------------------------- main


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
            handler: Callable[[Context], int] = args.handler
            return handler(Context(client, console, args))
    except CommandError as exc:
        console.note(f"influence: {exc}")
        return exc.code
    except InfluenceAPIError as exc:
        console.note(f"influence: error {exc.status} {exc.title}: {exc.detail or ''}".rstrip(": "))
        for error in exc.errors[:10]:
            console.note(f"  {'.'.join(str(p) for p in error.get('loc', []))}: {error.get('msg')}")
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


if __name__ == "__main__":
    sys.exit(main())
