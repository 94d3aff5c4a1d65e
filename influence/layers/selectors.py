"""Layer selectors (their syntax: influence.layers), each held to limits before it runs, regexes and globs run
on RE2 in linear time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import re2

from influence.errors import UnknownLayerError
from influence.layers.units import POSITIONS, ROLES, Layer

# Selector limits: every selector is checked against them before any of it runs, so its cost is bounded by
# (terms x layers x name length) whatever the model and whatever the caller sends.
MAX_SELECTOR_CHARS = 512  # one selector string, one `regex` field
MAX_SELECTOR_TERMS = 256  # terms in all: `&` parts of every string, other list items, object fields
MAX_PATTERN_TERMS = 16  # of which regexes and globs, the terms that scan every layer name
MAX_SELECTOR_DEPTH = 8  # lists within lists
# RE2 compiles a pattern to an automaton within this budget (a pattern over it is refused, never slow).
RE2_MAX_MEM = 4 << 20
_NEVER = r"[^\x00-\x{10FFFF}]"  # an empty class: RE2 has no `(?!)`


def _is_pattern(term: str) -> bool:
    term = term.strip()
    if term in ("all", "*"):
        return False
    kind, sep, _ = term.partition(":")
    return kind == "re" if sep else any(ch in term for ch in "*?[")


def _check_limits(selector) -> None:
    """Refuse a selector over the limits before any of it is evaluated. Iterative, so any nesting is safe."""
    terms = patterns = 0
    stack = [(selector, 0)]
    while stack:
        item, depth = stack.pop()
        texts: list[tuple[str, bool]] = []  # (string, is a regex field)
        children: list = []
        if isinstance(item, str):
            texts.append((item, False))
        elif isinstance(item, Mapping):
            terms += len(item)
            for key, value in item.items() if len(item) <= MAX_SELECTOR_TERMS else ():
                if isinstance(value, str):
                    texts.append((value, key == "regex"))
                elif _is_list(value):
                    children.extend(value)
        elif _is_list(item):
            if depth >= MAX_SELECTOR_DEPTH:
                raise UnknownLayerError(
                    f"layer selector lists may be nested at most {MAX_SELECTOR_DEPTH} deep"
                )
            children.extend(item)
        if len(children) > MAX_SELECTOR_TERMS:
            raise UnknownLayerError(f"a layer selector may have at most {MAX_SELECTOR_TERMS} terms")
        for child in children:
            if isinstance(child, str):
                texts.append((child, False))
                continue
            terms += 1
            if not isinstance(item, Mapping):  # in an object's field it is refused as a wrong type
                stack.append((child, depth + 1))
        for text, is_regex in texts:
            if len(text) > MAX_SELECTOR_CHARS:
                raise UnknownLayerError(
                    f"a layer selector string may have at most {MAX_SELECTOR_CHARS} characters, "
                    f"got one of {len(text)}"
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise UnknownLayerError(
                    "a layer selector string is not valid Unicode (a lone surrogate)"
                ) from None
            parts = [text] if is_regex else text.split("&")
            terms += len(parts)
            patterns += sum(1 for part in parts if is_regex or _is_pattern(part))
        if terms > MAX_SELECTOR_TERMS:
            raise UnknownLayerError(f"a layer selector may have at most {MAX_SELECTOR_TERMS} terms")
        if patterns > MAX_PATTERN_TERMS:
            raise UnknownLayerError(
                f"a layer selector may have at most {MAX_PATTERN_TERMS} regex or glob terms, got {patterns}"
            )


def _is_list(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def _compile_re2(pattern: str, shown: str):
    options = re2.Options()
    options.log_errors = False  # a bad pattern is the caller's error, answered; nothing for stderr
    options.max_mem = RE2_MAX_MEM
    options.never_capture = True  # only "does it match" is asked: the DFA answers that alone
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = (
            exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        )
        raise UnknownLayerError(
            f"bad layer {shown}: {reason}; layer regexes are RE2 syntax (linear time), which has no lookarounds "
            "such as (?=...) or (?!...) and no backreferences such as \\1"
        ) from None


def _re2_literal(char: str) -> str:
    return char if char.isascii() and char.isalnum() else f"\\x{{{ord(char):x}}}"


def glob_to_re2(glob: str) -> str:
    """fnmatch's glob syntax (`*`, `?`, `[seq]`, `[!seq]`, case-sensitive, the whole name) as an RE2 pattern.

    Reads a glob exactly as fnmatch.translate does (brackets without a closing `]` are literal, a `]` first in
    a class is a member, reversed ranges are empty), but runs in linear time on RE2 without fnmatch's cache.
    """
    parts: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        char = glob[i]
        i += 1
        if char == "*":
            if not parts or parts[-1] != ".*":
                parts.append(".*")
        elif char == "?":
            parts.append(".")
        elif char == "[":
            j = i
            if j < n and glob[j] == "!":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                parts.append(_re2_literal("["))
            else:
                parts.append(_glob_class(glob[i:j]))
                i = j + 1
        else:
            parts.append(_re2_literal(char))
    return r"\A(?s:" + "".join(parts) + r")\z"


def _glob_class(content: str) -> str:
    """One `[...]` of a glob (without its brackets) as an RE2 class, read as fnmatch reads it."""
    negate = content.startswith("!")
    body = content[1:] if negate else content
    # fnmatch splits the class at the hyphens that make ranges, then drops the ranges whose ends are reversed.
    chunks: list[str] = []
    start, k = 0, 1
    while (k := body.find("-", k)) >= 0:
        chunks.append(body[start:k])
        start, k = k + 1, k + 3
    if body[start:]:
        chunks.append(body[start:])
    else:
        chunks[-1] += "-"
    for k in range(len(chunks) - 1, 0, -1):
        if chunks[k - 1][-1] > chunks[k][0]:
            chunks[k - 1] = chunks[k - 1][:-1] + chunks[k][1:]
            del chunks[k]
    # Python's class parser then reads "chunk-chunk-..." left to right: a member, a range operator, a member.
    tokens: list[tuple[str, bool]] = []  # (character, is a range operator)
    for index, chunk in enumerate(chunks):
        if index:
            tokens.append(("-", True))
        tokens.extend((char, False) for char in chunk)
    items: list[str] = []
    t = 0
    while t < len(tokens):
        low = tokens[t][0]
        if t + 2 < len(tokens) and tokens[t + 1][1]:
            high = tokens[t + 2][0]
            if high < low:
                raise UnknownLayerError(f"bad layer glob class [{content}]: range {low}-{high} is reversed")
            items.append(f"{_re2_literal(low)}-{_re2_literal(high)}")
            t += 3
        else:
            items.append(_re2_literal(low))
            t += 1
    if not items:
        return "." if negate else _NEVER
    return f"[{'^' if negate else ''}{''.join(items)}]"


class _Catalog:
    """The layers a selector runs over, indexed once per call: names and groups cost no scan, and a term that
    appears twice is evaluated once."""

    def __init__(self, layers: Sequence[Layer]):
        self.layers = list(layers)
        self.names = {layer.name for layer in self.layers}
        self.groups: dict[str, set[str]] = {}
        for layer in self.layers:
            for group in layer.groups:
                self.groups.setdefault(group, set()).add(layer.name)
        self.memo: dict[object, frozenset[str]] = {}

    def where(self, keep) -> frozenset[str]:
        return frozenset(layer.name for layer in self.layers if keep(layer))

    def matching(self, pattern) -> frozenset[str]:
        return frozenset(name for name in self.names if pattern.search(name))

    def blocks(self, low: int, high: int) -> frozenset[str]:
        key = ("blocks", low, high)
        if key not in self.memo:
            self.memo[key] = self.where(lambda layer: layer.block is not None and low <= layer.block <= high)
        return self.memo[key]


def _match_term(term: str, catalog: _Catalog) -> frozenset[str]:
    term = term.strip()
    if term not in catalog.memo:
        catalog.memo[term] = _evaluate_term(term, catalog)
    return catalog.memo[term]


def _evaluate_term(term: str, catalog: _Catalog) -> frozenset[str]:
    if term in ("all", "*"):
        return frozenset(catalog.names)
    kind, sep, value = term.partition(":")
    if sep:
        if kind == "re":
            return catalog.matching(_compile_re2(value, f"regex {value!r}"))
        if kind == "blocks":
            low, _, high = value.partition("-")
            try:
                lo, hi = int(low), int(high or low)
            except ValueError as exc:
                raise UnknownLayerError(f"bad block range {value!r}: expected like 2-4") from exc
            return catalog.blocks(lo, hi)
        if kind == "role":
            if value not in ROLES:
                raise UnknownLayerError(f"unknown role {value!r}; roles: {', '.join(ROLES)}")
            return catalog.where(lambda layer: layer.matches_role(value))
        if kind == "position":
            if value not in POSITIONS:
                raise UnknownLayerError(f"unknown position {value!r}; positions: {', '.join(POSITIONS)}")
            return catalog.where(lambda layer: layer.position == value)
        if kind == "group":
            return frozenset(catalog.groups.get(value, ()))
        raise UnknownLayerError(f"unknown selector kind {kind!r} in {term!r}")
    if any(ch in term for ch in "*?["):
        return catalog.matching(_compile_re2(glob_to_re2(term), f"glob {term!r}"))
    if term in catalog.names:
        return frozenset((term,))
    return frozenset(catalog.groups.get(term, ()))


def _match_string(selector: str, catalog: _Catalog) -> set[str]:
    chosen: set[str] | None = None
    for term in selector.split("&"):
        names = _match_term(term, catalog)
        chosen = set(names) if chosen is None else chosen & names
    return chosen or set()


def _match_dict(selector: Mapping, catalog: _Catalog) -> set[str]:
    allowed = {"names", "regex", "blocks", "roles", "position", "groups"}
    unknown = set(selector) - allowed
    if unknown:
        raise UnknownLayerError(
            f"unknown selector fields {sorted(map(str, unknown))}; allowed: {sorted(allowed)}"
        )

    def strings(field: str) -> list[str]:
        value = selector[field]
        if isinstance(value, str):
            return [value]
        if isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
            return list(value)
        raise UnknownLayerError(
            f"selector field {field!r} must be a string or a list of strings, got {value!r}"
        )

    def text(field: str) -> str:
        value = selector[field]
        if not isinstance(value, str):
            raise UnknownLayerError(f"selector field {field!r} must be a string, got {value!r}")
        return value

    criteria: list[set[str] | frozenset[str]] = []  # within a field: union; across fields: intersection
    if selector.get("names"):
        criteria.append(set().union(*(_match_string(name, catalog) for name in strings("names"))))
    if selector.get("regex"):
        pattern = text("regex")
        key = ("regex", pattern)
        if key not in catalog.memo:
            catalog.memo[key] = catalog.matching(_compile_re2(pattern, f"regex {pattern!r}"))
        criteria.append(catalog.memo[key])
    if selector.get("blocks") is not None:
        bounds = selector["blocks"]
        if (
            isinstance(bounds, str)
            or not isinstance(bounds, Sequence)
            or len(bounds) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
        ):
            raise UnknownLayerError(
                f"selector field 'blocks' must be [first, last] block numbers, got {bounds!r}"
            )
        criteria.append(catalog.blocks(bounds[0], bounds[1]))
    if selector.get("roles"):
        criteria.append(set().union(*(_match_term(f"role:{r}", catalog) for r in strings("roles"))))
    if selector.get("position"):
        criteria.append(_match_term(f"position:{text('position')}", catalog))
    if selector.get("groups"):
        criteria.append(set().union(*(_match_term(f"group:{g}", catalog) for g in strings("groups"))))
    chosen = set(catalog.names)
    for names in criteria:
        chosen &= names
    return chosen


def select_layers(layers: Sequence[Layer], selector: str | Sequence | Mapping | None) -> list[Layer]:
    """Layers matched by a selector (None = all), in the order of `layers`. Nothing matched -> UnknownLayerError.

    Limits (each refused with UnknownLayerError before anything is matched): MAX_SELECTOR_CHARS characters per
    string, MAX_SELECTOR_TERMS terms in all, MAX_PATTERN_TERMS of them regexes or globs, lists nested at most
    MAX_SELECTOR_DEPTH deep. Regexes are RE2 (linear time: no lookarounds, no backreferences).
    """
    if selector is None:
        return list(layers)
    _check_limits(selector)
    catalog = _Catalog(layers)
    chosen = _select(selector, catalog)
    return [layer for layer in catalog.layers if layer.name in chosen]


def _select(selector, catalog: _Catalog) -> set[str]:
    if isinstance(selector, str):
        chosen = _match_string(selector, catalog)
    elif isinstance(selector, Mapping):
        chosen = _match_dict(selector, catalog)
    elif _is_list(selector):
        chosen = set()
        for item in selector:
            chosen |= _select(item, catalog)
        return chosen
    else:
        raise UnknownLayerError(
            f"a layer selector is a string, a list or an object, got {type(selector).__name__}"
        )
    if not chosen:
        raise UnknownLayerError(_nothing_matched(selector, catalog.layers))
    return chosen


def _nothing_matched(selector, layers: Sequence[Layer]) -> str:
    sample = ", ".join(layer.name for layer in layers[:6])
    shown = repr(selector)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return f"layer selector {shown} matches no layer (available: {sample}, ... {len(layers)} in all)"

