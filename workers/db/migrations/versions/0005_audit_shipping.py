"""audit shipping: cursors per source and sink, sink chain state

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "audit_cursors",
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("sink", sa.String(length=64), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("source", "sink", name=op.f("pk_audit_cursors")),
    )
    op.create_table(
        "audit_sink_state",
        sa.Column("sink", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(length=64), nullable=False),
        sa.Column("segment", sa.String(length=256), nullable=True),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("last_checkpoint_at", WHEN, nullable=True),
        sa.Column("stopped_reason", sa.Text(), nullable=True),
        sa.Column("updated_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("sink", name=op.f("pk_audit_sink_state")),
    )


def downgrade() -> None:
    op.drop_table("audit_sink_state")
    op.drop_table("audit_cursors")
