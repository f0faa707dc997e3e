"""audit sink state carries a fencing token and the id of the key that signs it

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01

A shipper that lost its lease (paused by GC, SIGSTOP, a VM stall) must not write beside its
successor. Each shipper increments ``fence`` when it takes a sink, and every later write of
the sink's state (and every segment write, made in the same transaction) checks that the
token is still its own, holding the row locked meanwhile. ``key_id`` names the key the
sink's checkpoints are signed with, so that a shipper with another key refuses to start.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit_sink_state") as batch_op:
        batch_op.add_column(sa.Column("fence", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("key_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_sink_state") as batch_op:
        batch_op.drop_column("key_id")
        batch_op.drop_column("fence")
