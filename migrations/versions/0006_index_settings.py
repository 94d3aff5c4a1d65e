"""Indexes remember which settings a query, audit or check that names none uses: the mode ("latest-report",
"pinned-report" or "defaults") and, when pinned, the layer report's job id.

Rows from before follow their latest succeeded layer report ("latest-report"), nothing pinned.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("indexes") as batch:
        batch.add_column(
            sa.Column("settings_mode", sa.String(length=16), nullable=False, server_default="latest-report")
        )
        batch.add_column(sa.Column("settings_report_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("indexes") as batch:
        batch.drop_column("settings_report_id")
        batch.drop_column("settings_mode")
