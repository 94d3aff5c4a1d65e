"""Tenants and API keys; every model, dataset, index and job belongs to a tenant.

Rows that exist before this revision (a single-user installation) are given to a tenant named `local`, the one
the embedded runner makes a key for.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OWNED = ("models", "datasets", "indexes", "jobs")
LOCAL_TENANT_ID = "local"


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("prefix", sa.String(length=32), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_api_keys_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("prefix", name=op.f("uq_api_keys_prefix")),
    )
    op.create_index(op.f("ix_api_keys_tenant_id"), "api_keys", ["tenant_id"])

    for table in OWNED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("tenant_id", sa.String(length=32), nullable=True))
    bind = op.get_bind()
    existing = sum(bind.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar() or 0 for table in OWNED)
    if existing:
        tenants = sa.table(
            "tenants", sa.column("id", sa.String), sa.column("name", sa.String), sa.column("created_at", sa.DateTime)
        )
        op.bulk_insert(tenants, [{"id": LOCAL_TENANT_ID, "name": "local", "created_at": datetime.now(UTC)}])
        for table in OWNED:
            bind.execute(sa.text(f"UPDATE {table} SET tenant_id = :tenant"), {"tenant": LOCAL_TENANT_ID})
    for table in OWNED:
        with op.batch_alter_table(table) as batch:
            batch.alter_column("tenant_id", existing_type=sa.String(length=32), nullable=False)
            batch.create_foreign_key(
                op.f(f"fk_{table}_tenant_id_tenants"), "tenants", ["tenant_id"], ["id"], ondelete="RESTRICT"
            )
            batch.create_index(op.f(f"ix_{table}_tenant_id"), ["tenant_id"])


def downgrade() -> None:
    for table in reversed(OWNED):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(op.f(f"ix_{table}_tenant_id"))
            batch.drop_constraint(op.f(f"fk_{table}_tenant_id_tenants"), type_="foreignkey")
            batch.drop_column("tenant_id")
    op.drop_index(op.f("ix_api_keys_tenant_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
