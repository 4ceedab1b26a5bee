"""Labels from the site (issue 20 item 3): the RIS report, a CSV import or a dashboard click says
what a study showed, so the scorecard can measure each version on the site's own reads.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("accession_number", sa.String(length=64), nullable=True),
        sa.Column("label", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("who", sa.String(length=128), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_labels_study_instance_uid", "labels", ["study_instance_uid"])
    op.create_index("ix_labels_accession_number", "labels", ["accession_number"])
    op.create_index("ix_labels_received_at", "labels", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_labels_received_at", table_name="labels")
    op.drop_index("ix_labels_accession_number", table_name="labels")
    op.drop_index("ix_labels_study_instance_uid", table_name="labels")
    op.drop_table("labels")
