"""embedded secret store, rotation status snapshot, the fleet's audit log

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "fleet_audit_log",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("timestamp", WHEN, nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("metadata", JSON_DOC, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fleet_audit_log")),
    )
    op.create_table(
        "fleet_secrets",
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("current_version", sa.Integer(), nullable=False),
        sa.Column("custom_metadata", JSON_DOC, nullable=False),
        sa.Column("created_time", WHEN, nullable=False),
        sa.Column("updated_time", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("path", name=op.f("pk_fleet_secrets")),
    )
    op.create_table(
        "fleet_secret_versions",
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("ciphertext", sa.Text(), nullable=False),
        sa.Column("created_time", WHEN, nullable=False),
        sa.Column("deletion_time", WHEN, nullable=True),
        sa.Column("destroyed", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("path", "version", name=op.f("pk_fleet_secret_versions")),
    )
    op.create_table(
        "secret_rotation_status",
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("version_created", WHEN, nullable=True),
        sa.Column("due_at", WHEN, nullable=True),
        sa.Column("notify_at", WHEN, nullable=True),
        sa.Column("rotator", sa.String(length=64), nullable=True),
        sa.Column("owner", sa.String(length=256), nullable=True),
        sa.Column("checked_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("path", name=op.f("pk_secret_rotation_status")),
    )


def downgrade() -> None:
    op.drop_table("secret_rotation_status")
    op.drop_table("fleet_secret_versions")
    op.drop_table("fleet_secrets")
    op.drop_table("fleet_audit_log")
