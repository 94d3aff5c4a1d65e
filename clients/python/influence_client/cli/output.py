"""What a command prints: one JSON document (--json) or aligned tables and `key  value` lines for people, notes
and progress bars on stderr."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from influence_client.schemas import Job

TEXT_WIDTH = 60


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain aligned columns; numeric columns right-aligned, None as '-'."""
    cells = [[cell(value) for value in row] for row in rows]
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


def cell(value: Any) -> str:
    """One value as a table cell or a field: None as '-', booleans as yes/no, floats to 4 digits."""
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


def short(value: Any, width: int = TEXT_WIDTH) -> str:
    """Text on one line, cut to `width` characters."""
    text = "" if value is None else " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    amount = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} GiB"


def fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


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
            self.line(f"{key.ljust(width)}  {cell(value)}")

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
