"""audit cursors remember an id gap they wait at

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit_cursors") as batch:
        batch.add_column(sa.Column("gap_seen_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("gap_upto", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("gap_horizon_xid", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_cursors") as batch:
        batch.drop_column("gap_horizon_xid")
        batch.drop_column("gap_upto")
        batch.drop_column("gap_seen_at")
