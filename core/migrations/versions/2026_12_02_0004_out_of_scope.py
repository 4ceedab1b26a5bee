"""Out of scope: which version refused an image and its pixel check score; the score on results.

The state itself is a new value of the existing `state` string column (`out_of_scope`).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("scope_model_name", sa.String(64), nullable=True))
        batch.add_column(sa.Column("scope_model_version", sa.String(64), nullable=True))
        batch.add_column(sa.Column("scope_score", sa.Float, nullable=True))
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("scope_score", sa.Float, nullable=True))
        batch.add_column(sa.Column("scope_threshold", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.drop_column("scope_threshold")
        batch.drop_column("scope_score")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("scope_score")
        batch.drop_column("scope_model_version")
        batch.drop_column("scope_model_name")
