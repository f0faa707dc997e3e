"""canary deployments name their canary subset, what they wrote there, and a deadline

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01

``subset`` is ``{"service": NAME}`` or ``{"tenants": [IDS]}`` (the platform's narrower
scopes), ``overrides`` what ``canary start`` wrote at those scopes (scope, tenant, the
version written, and the value and version it replaced there), so that promotion and
rollback compare-and-set against them. ``max_duration_seconds`` bounds the whole
deployment; ``conflict`` says who changed what when a deployment stops in ``conflict``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("canary_deployments") as batch_op:
        batch_op.add_column(sa.Column("subset", JSON_DOC, nullable=True))
        batch_op.add_column(sa.Column("overrides", JSON_DOC, nullable=True))
        batch_op.add_column(
            sa.Column("max_duration_seconds", sa.Integer(), nullable=False, server_default="7200")
        )
        batch_op.add_column(sa.Column("conflict", JSON_DOC, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("canary_deployments") as batch_op:
        batch_op.drop_column("conflict")
        batch_op.drop_column("max_duration_seconds")
        batch_op.drop_column("overrides")
        batch_op.drop_column("subset")
