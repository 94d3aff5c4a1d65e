"""The one-off migrate step: `python -m app.migrate` upgrades the database of app.config to head.

The app never migrates on import or start; deployments run this once before the API and workers
(docker compose's `migrate` service, the embedded runner). `python -m app.migrate <revision>` targets another
revision (`base` with --downgrade).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alembic import command
from alembic.config import Config

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def alembic_config(url: str | None = None, *, configure_logging: bool = False) -> Config:
    """Alembic's config for this repository; `url` overrides the one app.config gives. Logging is set up
    from alembic.ini only when asked (the command line), never under a host process (tests, the API)."""
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = configure_logging
    config.set_main_option("script_location", str(ROOT / "migrations"))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str | None = None, revision: str = "head", *, configure_logging: bool = False) -> None:
    command.upgrade(alembic_config(url, configure_logging=configure_logging), revision)


def downgrade(url: str | None = None, revision: str = "base", *, configure_logging: bool = False) -> None:
    command.downgrade(alembic_config(url, configure_logging=configure_logging), revision)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.migrate", description=__doc__.splitlines()[0])
    parser.add_argument("revision", nargs="?", default=None, help="target revision (default: head / base)")
    parser.add_argument("--downgrade", action="store_true", help="downgrade instead of upgrading")
    parser.add_argument("--url", default=None, help="database URL (default: from INFLUENCE_* settings)")
    args = parser.parse_args(argv)
    url = args.url or Settings().resolved_database_url
    if args.downgrade:
        downgrade(url, args.revision or "base", configure_logging=True)
    else:
        upgrade(url, args.revision or "head", configure_logging=True)


if __name__ == "__main__":
    main()
