"""guarded feature-flag rollouts and each look the judge took at them

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "flag_rollouts",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("flag_key", sa.String(length=256), nullable=False),
        sa.Column("environment", sa.String(length=64), nullable=False),
        sa.Column("steps", JSON_DOC, nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("step_started_at", WHEN, nullable=False),
        sa.Column("min_step_seconds", sa.Integer(), nullable=False),
        sa.Column("min_impressions", sa.Integer(), nullable=False),
        sa.Column("treatment_before", sa.BigInteger(), nullable=False),
        sa.Column("control_before", sa.BigInteger(), nullable=False),
        sa.Column("treatment_variant", sa.String(length=128), nullable=False),
        sa.Column("control_variant", sa.String(length=128), nullable=False),
        sa.Column("treatment_selector", sa.Text(), nullable=False),
        sa.Column("control_selector", sa.Text(), nullable=False),
        sa.Column("metrics", JSON_DOC, nullable=False),
        sa.Column("judge", JSON_DOC, nullable=False),
        sa.Column("window_seconds", sa.Integer(), nullable=False),
        sa.Column("query_step_seconds", sa.Integer(), nullable=False),
        sa.Column("min_samples", sa.Integer(), nullable=False),
        sa.Column("inconclusive_limit", sa.Integer(), nullable=False),
        sa.Column("prometheus_deadline_seconds", sa.Integer(), nullable=False),
        sa.Column("on_failure", sa.String(length=16), nullable=False),
        sa.Column("original_percentage", sa.Float(), nullable=False),
        sa.Column("written_percentage", sa.Float(), nullable=False),
        sa.Column("written_at", WHEN, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("inconclusives", sa.Integer(), nullable=False),
        sa.Column("prometheus_down_since", WHEN, nullable=True),
        sa.Column("last_analysis_at", WHEN, nullable=True),
        sa.Column("decided_at", WHEN, nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("conflict", JSON_DOC, nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_flag_rollouts")),
        sa.UniqueConstraint("name", name=op.f("uq_flag_rollouts_name")),
    )
    op.create_index("ix_flag_rollouts_state", "flag_rollouts", ["state"])
    op.create_table(
        "flag_rollout_steps",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.BigInteger(), nullable=False),
        sa.Column("at", WHEN, nullable=False),
        sa.Column("percentage", sa.Float(), nullable=False),
        sa.Column("treatment_impressions", sa.BigInteger(), nullable=False),
        sa.Column("control_impressions", sa.BigInteger(), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("results", JSON_DOC, nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_flag_rollout_steps")),
    )
    op.create_index("ix_flag_rollout_steps_rollout", "flag_rollout_steps", ["rollout_id", "at"])


def downgrade() -> None:
    op.drop_index("ix_flag_rollout_steps_rollout", table_name="flag_rollout_steps")
    op.drop_table("flag_rollout_steps")
    op.drop_index("ix_flag_rollouts_state", table_name="flag_rollouts")
    op.drop_table("flag_rollouts")
