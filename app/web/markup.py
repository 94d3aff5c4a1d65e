"""Escaped text, number formats and tables for the server-rendered parts of the report page.

Every helper returns HTML that is safe to concatenate: text from users goes through `escape`, numbers through
the formats (an em dash stands for a missing or non-finite value), and `cell` / `row` / `table` take content
that is already escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

MISSING = "—"


def escape(value: Any) -> str:
    """HTML-escaped text of any value (quotes too: safe inside attributes)."""
    return html.escape(str(value), quote=True)


def is_finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if is_finite(value) else MISSING


def signed(value: Any, digits: int = 3) -> str:
    return f"{value:+.{digits}f}" if is_finite(value) else MISSING


def percent(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}%}" if is_finite(value) else MISSING


def compact(value: Any) -> str:
    """A compact number whatever its magnitude (scores can be 1e-6 or 1e4)."""
    return f"{value:.4g}" if is_finite(value) else MISSING


def cell(content: str, cls: str = "") -> str:
    """A <td> of already-escaped content."""
    return f'<td class="{cls}">{content}</td>' if cls else f"<td>{content}</td>"


def row(*cells: str, cls: str = "") -> str:
    """A <tr> of rendered cells."""
    attr = f' class="{cls}"' if cls else ""
    return f"<tr{attr}>{''.join(cells)}</tr>"


def table(headers: Sequence[tuple[str, str]], rows: Sequence[str], cls: str = "") -> str:
    """A table from (label, css class) headers and rendered <tr> rows, in a horizontal scroller."""
    head = "".join(f'<th scope="col" class="{c}">{escape(label)}</th>' for label, c in headers)
    attr = f' class="{cls}"' if cls else ""
    return (
        f'<div class="scroll"><table{attr}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def section(ident: str, heading: str, content: str) -> str:
    """A page section with its id and <h2> heading (both markup, not escaped: they are the page's own)."""
    return f'<section id="{ident}"><h2>{heading}</h2>{content}</section>'
