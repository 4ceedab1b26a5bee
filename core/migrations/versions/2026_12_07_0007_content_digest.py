"""Instances keep a content digest beside the file's, so a re-send in another transfer syntax is
recognised as the same image (issue 23 row 2: the file's sha256 refused it as a conflict).

Rows stored before have none: a re-send of one is compared on the file's sha256, as before.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("content_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("content_sha256")
