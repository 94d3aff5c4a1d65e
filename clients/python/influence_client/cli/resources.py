"""The commands every kind of resource has, written once: `show ID`, `list` (filters and a page) and
`delete ID`, each driven by a small table (`Resource`) of what the resource is called and how it is printed;
the client's methods for it are found by its noun."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from influence_client.cli.arguments import add_command, add_page_options
from influence_client.cli.context import EXIT_OK, Context, Record, deleted, page_table
from influence_client.client import InfluenceClient


@dataclass(frozen=True)
class Filter:
    """An option of `list` that the client's list method takes as `keyword`."""

    option: str
    keyword: str
    choices: Sequence[str] | None = None


@dataclass(frozen=True)
class Resource:
    """How the generic commands read, list and delete one kind of resource, and print it. The client names its
    methods for a resource after its noun: get_<noun>, list_<nouns> and, when it can be deleted, delete_<noun>."""

    noun: str  # the id argument is `<noun>_id`
    render: Callable[[Context, Record], None]  # one resource, for people
    headers: Sequence[str]
    row: Callable[[Record], list[Any]]  # a list item as a table row
    filters: Sequence[Filter] = ()
    name: str = ""  # what the commands' help calls one when that is not the noun: "layer report"

    def __post_init__(self) -> None:
        for method in (f"get_{self.noun}", f"list_{plural(self.noun)}"):
            if not callable(getattr(InfluenceClient, method, None)):
                raise TypeError(f"the client has no {method}() for the resource {self.noun!r}")

    @property
    def title(self) -> str:
        """One of them in the commands' help: "a model", "an index"."""
        called = self.name or self.noun
        return f"{'an' if called[0] in 'aeiou' else 'a'} {called}"

    @property
    def plural(self) -> str:
        return plural(self.name or self.noun)

    @property
    def get(self) -> Callable[[InfluenceClient, str], Record]:
        return getattr(InfluenceClient, f"get_{self.noun}")

    @property
    def list(self) -> Callable[..., Any]:
        """A page: (client, offset=, limit=, **filters)."""
        return getattr(InfluenceClient, f"list_{plural(self.noun)}")

    @property
    def delete(self) -> Callable[[InfluenceClient, str], None] | None:
        return getattr(InfluenceClient, f"delete_{self.noun}", None)

    @property
    def id_name(self) -> str:
        return f"{self.noun}_id"

    def id_of(self, args: argparse.Namespace) -> str:
        return str(getattr(args, self.id_name))


def plural(words: str) -> str:
    """The plural of a resource's name: "models", "indexes", "layer reports"."""
    return words + ("es" if words.endswith(("s", "x")) else "s")


def add_show(parent: Any, resource: Resource, help_text: str | None = None) -> argparse.ArgumentParser:
    sub = add_command(
        parent, "show", functools.partial(show, resource), help_text or f"show {resource.title}"
    )
    sub.add_argument(resource.id_name)
    return sub


def add_list(parent: Any, resource: Resource) -> argparse.ArgumentParser:
    help_text = f"list {resource.plural}, newest first"
    sub = add_command(parent, "list", functools.partial(list_page, resource), help_text)
    for option in resource.filters:
        sub.add_argument(option.option, dest=option.keyword, choices=option.choices)
    add_page_options(sub)
    return sub


def add_delete(parent: Any, resource: Resource, help_text: str | None = None) -> argparse.ArgumentParser:
    if resource.delete is None:
        raise ValueError(f"{resource.plural} cannot be deleted")
    help_text = help_text or f"delete {resource.title}"
    sub = add_command(parent, "delete", functools.partial(delete, resource), help_text)
    sub.add_argument(resource.id_name)
    return sub


def show(resource: Resource, ctx: Context) -> int:
    item = resource.get(ctx.client, resource.id_of(ctx.args))
    ctx.console.result(item, lambda: resource.render(ctx, item))
    return EXIT_OK


def list_page(resource: Resource, ctx: Context) -> int:
    args = ctx.args
    filters = {option.keyword: getattr(args, option.keyword) for option in resource.filters}
    page = resource.list(ctx.client, offset=args.offset, limit=args.limit, **filters)
    rows = [resource.row(item) for item in page["items"]]
    ctx.console.result(page, lambda: page_table(ctx, page, resource.headers, rows))
    return EXIT_OK


def delete(resource: Resource, ctx: Context) -> int:
    assert resource.delete is not None  # add_delete made sure
    resource_id = resource.id_of(ctx.args)
    resource.delete(ctx.client, resource_id)
    return deleted(ctx, resource_id)
