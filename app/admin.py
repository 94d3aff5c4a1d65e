"""Administration of tenants and API keys, on the database the INFLUENCE_* settings name (or --url).

    python -m app.admin create-tenant NAME             a tenant (prints its id)
    python -m app.admin create-key TENANT [--name L]   a key for a tenant (name or id); the key is printed once
    python -m app.admin list-tenants                   tenants with their keys (prefixes only)
    python -m app.admin revoke-key PREFIX              the key stops working at once

Only the sha256 of a key is stored: a lost key cannot be shown again, make a new one (and revoke the old).
"""

from __future__ import annotations

import argparse
import sys

from sqlalchemy import select

from app.config import Settings
from app.db import make_engine, make_session_factory, session_scope
from app.errors import ServiceError
from app.models import ApiKey, Tenant
from app.services import tenancy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.admin", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="database URL (default: from INFLUENCE_* settings)")
    commands = parser.add_subparsers(dest="command", required=True)
    tenant = commands.add_parser("create-tenant", help="create a tenant")
    tenant.add_argument("name")
    key = commands.add_parser("create-key", help="create an API key for a tenant (printed once)")
    key.add_argument("tenant", help="the tenant's name or id")
    key.add_argument("--name", default="", help="a label for the key (who or what uses it)")
    commands.add_parser("list-tenants", help="list tenants and their keys (prefixes, never the keys)")
    revoke = commands.add_parser("revoke-key", help="revoke an API key")
    revoke.add_argument("prefix", help="the key's prefix (its first 13 characters) or the whole key")
    args = parser.parse_args(argv)

    engine = make_engine(args.url or Settings().resolved_database_url)
    factory = make_session_factory(engine)
    try:
        with session_scope(factory) as session:
            if args.command == "create-tenant":
                made = tenancy.create_tenant(session, args.name)
                print(f"tenant {made.name} created: id {made.id}")
            elif args.command == "create-key":
                owner = tenancy.find_tenant(session, args.tenant)
                issued = tenancy.create_key(session, owner, name=args.name)
                print(f"API key for tenant {owner.name} (prefix {issued.prefix}); it is shown only now:")
                print(issued.token)
            elif args.command == "list-tenants":
                for row in session.scalars(select(Tenant).order_by(Tenant.created_at)):
                    print(f"{row.name}\t{row.id}")
                    keys = session.scalars(
                        select(ApiKey).where(ApiKey.tenant_id == row.id).order_by(ApiKey.created_at)
                    )
                    for item in keys:
                        state = "revoked" if item.revoked_at is not None else "active"
                        print(f"  key {item.prefix}...\t{state}\t{item.name}")
            else:
                revoked = tenancy.revoke_key(session, args.prefix)
                print(f"API key {revoked.prefix}... revoked")
    except ServiceError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
