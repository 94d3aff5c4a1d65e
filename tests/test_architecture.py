"""The layout's rules, read from the source: imports go one way and form no cycle, imports inside functions say
why, and modules stay readable in size.

    influence         imports neither app, worker nor influence_client (a library usable on its own)
    app               never imports worker (the worker is Celery's entry point over app.jobs)
    influence_client  imports none of the server's packages (it ships without torch)
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("influence", "app", "worker", "influence_client")
# The folder each package lies in: the client is a distribution of its own (clients/python).
SOURCE_ROOTS = {package: ROOT for package in PACKAGES} | {"influence_client": ROOT / "clients" / "python"}
FORBIDDEN = {
    "influence": ("app", "worker", "influence_client"),
    "app": ("worker",),
    "worker": ("influence_client",),
    "influence_client": ("app", "worker", "influence"),
}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((SOURCE_ROOTS[package] / package).rglob("*.py")):
            parts = path.relative_to(SOURCE_ROOTS[package]).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> Iterator[tuple[ast.stmt, str, bool]]:
    """(node, imported module, inside a function) for every import of `path`, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    source_root = next(root for package, root in SOURCE_ROOTS.items() if path.is_relative_to(root / package))
    parts = path.relative_to(source_root).with_suffix("").parts
    package = parts[:-1]

    def visit(node: ast.AST, in_function: bool) -> Iterator[tuple[ast.stmt, str, bool]]:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield child, alias.name, in_function
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package[: len(package) - child.level + 1] + ((base,) if base else ()))
                yield child, base, in_function
                for alias in child.names:  # `from app.jobs import state` imports app.jobs.state
                    if f"{base}.{alias.name}" in MODULES:
                        yield child, f"{base}.{alias.name}", in_function
            yield from visit(child, inside)

    yield from visit(tree, False)


def _internal(name: str) -> str | None:
    """The module of ours that an import names (the longest known prefix), None for third-party ones."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for _, imported, _ in _imports(path):
            target = _internal(imported)
            if target is not None and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    """Counting imports inside functions too: a cycle hidden by a deferred import is still a cycle.
    A package imports its own modules from __init__, so a module importing its package's __init__ is not
    counted as an edge back."""
    graph = _graph()
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    assert _cycles(graph) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_one_way(package):
    wrong = sorted(
        f"{name} imports {imported}"
        for name, path in MODULES.items()
        if name.split(".")[0] == package
        for _, imported, _ in _imports(path)
        if imported.split(".")[0] in FORBIDDEN[package]
    )
    assert wrong == []


def _says_why(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, or on the line above the block of imports it stands in."""
    if "#" in lines[lineno - 1]:
        return True
    above = lineno - 2
    while above >= 0 and (lines[above].strip().startswith(("import ", "from ")) or not lines[above].strip()):
        above -= 1
    return above >= 0 and lines[above].strip().startswith("#")


def test_imports_inside_functions_say_why():
    """An import inside a function (a heavy optional module, a registry's plug-in) carries a comment on its line
    or above its block of imports; everything else is imported at the top."""
    silent = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        for node, imported, in_function in _imports(path):
            if in_function and not _says_why(lines, node.lineno):
                silent.append(f"{path.relative_to(ROOT)}:{node.lineno} {imported}")
    assert sorted(set(silent)) == []


def test_modules_stay_readable_in_size():
    """Over MAX_LINES lines a module says at its top why it is one module (a line starting `Size:`)."""
    long = []
    for path in MODULES.values():
        text = path.read_text()
        if text.count("\n") > MAX_LINES and "\nSize:" not in text.split('"""', 2)[1 if text.startswith('"""') else 0]:
            long.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert sorted(long) == []
