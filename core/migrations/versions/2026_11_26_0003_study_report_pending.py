"""Studies flag when they have something new to report, so finalise reads only those.

Without it the scheduler re-read every quiet study ever received, once a second. Existing studies
start flagged: the next finalise looks at each once (its delivery counts prevent a second SR).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("report_pending", sa.Boolean, nullable=False, server_default=sa.true()))
        batch.add_column(sa.Column("changes", sa.Integer, nullable=False, server_default="0"))
        batch.create_index("ix_studies_report_pending", ["report_pending"])


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_report_pending")
        batch.drop_column("changes")
        batch.drop_column("report_pending")
