"""Per-unit projections on indexes: the request's per-unit overrides, the `auto` size threshold, and a place for
the build's fidelity measurements.

Rows from before keep null in all three: no overrides, not an `auto` projection, fidelity not measured.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("indexes") as batch:
        batch.add_column(sa.Column("projection_units", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("exact_max_params", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("fidelity", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("indexes") as batch:
        batch.drop_column("fidelity")
        batch.drop_column("exact_max_params")
        batch.drop_column("projection_units")
