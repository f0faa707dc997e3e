"""impression counts per minute and hour, distinct users, applied batches

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _counts(table: str) -> None:
    op.create_table(
        table,
        sa.Column("flag_key", sa.String(length=256), nullable=False),
        sa.Column("environment", sa.String(length=64), nullable=False),
        sa.Column("variant", sa.String(length=128), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=True),
        sa.Column("bucket_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
    )
    op.create_index(
        f"uq_{table}_key",
        table,
        ["flag_key", "environment", "variant", sa.text("coalesce(tenant_id, '')"), "bucket_start"],
        unique=True,
    )


def upgrade() -> None:
    _counts("flag_impression_counts")
    op.create_index("ix_flag_impression_counts_bucket", "flag_impression_counts", ["bucket_start"])
    _counts("flag_impression_counts_hourly")
    op.create_table(
        "flag_impression_users",
        sa.Column("flag_key", sa.String(length=256), nullable=False),
        sa.Column("environment", sa.String(length=64), nullable=False),
        sa.Column("variant", sa.String(length=128), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("users", sa.BigInteger(), nullable=False),
        sa.Column("sketch", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(
            "flag_key", "environment", "variant", "day", name=op.f("pk_flag_impression_users")
        ),
    )
    op.create_table(
        "impression_batches",
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("impressions", sa.Integer(), nullable=False),
        sa.Column("dead_letters", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("batch_id", name=op.f("pk_impression_batches")),
    )
    op.create_index("ix_impression_batches_applied", "impression_batches", ["applied_at"])


def downgrade() -> None:
    op.drop_index("ix_impression_batches_applied", table_name="impression_batches")
    op.drop_table("impression_batches")
    op.drop_table("flag_impression_users")
    op.drop_index(
        "uq_flag_impression_counts_hourly_key", table_name="flag_impression_counts_hourly"
    )
    op.drop_table("flag_impression_counts_hourly")
    op.drop_index("ix_flag_impression_counts_bucket", table_name="flag_impression_counts")
    op.drop_index("uq_flag_impression_counts_key", table_name="flag_impression_counts")
    op.drop_table("flag_impression_counts")
