"""fleet-wide state for the exporter: fleet_health

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01

``fleet exporter`` reads the fleet's state from the database at every scrape, so that it
is exported once and is the same whichever process serves it. Most of it already has a
table (drift findings, secret statuses, audit cursors, canary deployments, task runs);
``fleet_health`` keeps the rest: whether the secret store answered the last check, whether
each audit sink took its last batch, when drift detection last covered an environment,
and each job's last success (one row per job, rather than a search of every run).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "fleet_health",
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("updated_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("kind", "name"),
    )


def downgrade() -> None:
    op.drop_table("fleet_health")
