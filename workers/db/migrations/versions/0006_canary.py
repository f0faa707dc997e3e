"""canary deployments and their analyses

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "canary_deployments",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("key", sa.String(length=512), nullable=False),
        sa.Column("environment", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=True),
        sa.Column("new_value", sa.Text(), nullable=False),
        sa.Column("previous_value", sa.Text(), nullable=True),
        sa.Column("replaces_version", sa.String(length=64), nullable=True),
        sa.Column("canary_selector", sa.Text(), nullable=False),
        sa.Column("baseline_selector", sa.Text(), nullable=False),
        sa.Column("metrics", JSON_DOC, nullable=False),
        sa.Column("judge", JSON_DOC, nullable=False),
        sa.Column("interval_seconds", sa.Integer(), nullable=False),
        sa.Column("window_seconds", sa.Integer(), nullable=False),
        sa.Column("step_seconds", sa.Integer(), nullable=False),
        sa.Column("passes_required", sa.Integer(), nullable=False),
        sa.Column("failure_limit", sa.Integer(), nullable=False),
        sa.Column("inconclusive_limit", sa.Integer(), nullable=False),
        sa.Column("min_samples", sa.Integer(), nullable=False),
        sa.Column("prometheus_deadline_seconds", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("passes", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("inconclusives", sa.Integer(), nullable=False),
        sa.Column("prometheus_down_since", WHEN, nullable=True),
        sa.Column("last_analysis_at", WHEN, nullable=True),
        sa.Column("decided_at", WHEN, nullable=True),
        sa.Column("decision_reason", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_canary_deployments")),
        sa.UniqueConstraint("name", name=op.f("uq_canary_deployments_name")),
    )
    op.create_index("ix_canary_deployments_state", "canary_deployments", ["state"])
    op.create_table(
        "canary_analyses",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("deployment_id", sa.BigInteger(), nullable=False),
        sa.Column("at", WHEN, nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("results", JSON_DOC, nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_canary_analyses")),
    )
    op.create_index("ix_canary_analyses_deployment", "canary_analyses", ["deployment_id", "at"])


def downgrade() -> None:
    op.drop_index("ix_canary_analyses_deployment", table_name="canary_analyses")
    op.drop_table("canary_analyses")
    op.drop_index("ix_canary_deployments_state", table_name="canary_deployments")
    op.drop_table("canary_deployments")
