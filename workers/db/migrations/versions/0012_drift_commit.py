"""drift findings record the desired commit they were compared with

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01

With desired configuration from Git (``FLEET_DRIFT_GIT_URL``), every finding records the
commit of the desired files its run compared with; ``fleet drift report`` shows it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("drift_findings") as batch_op:
        batch_op.add_column(sa.Column("desired_commit", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("drift_findings") as batch_op:
        batch_op.drop_column("desired_commit")
