"""Instances indexed by when they finished and deliveries by when they were delivered, so the
stage latencies of /metrics (the last 24 h) read only that window, not every row ever written.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # (state, time): SQLite without statistics otherwise searches the state index alone, i.e.
    # every classified image ever (measured: benchmarks/metrics_scrape.py).
    op.create_index("ix_instances_state_finished_at", "instances", ["state", "finished_at"])
    op.create_index("ix_deliveries_state_delivered_at", "deliveries", ["state", "delivered_at"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_state_delivered_at", table_name="deliveries")
    op.drop_index("ix_instances_state_finished_at", table_name="instances")
