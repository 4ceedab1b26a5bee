"""Initial schema: studies, series, instances, results, deliveries, model versions, audit trail.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("accession_number", sa.String(64)),
        sa.Column("first_received_at", sa.DateTime, nullable=False),
        sa.Column("last_received_at", sa.DateTime, nullable=False, index=True),
    )
    op.create_table(
        "series",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False, index=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("modality", sa.String(16)),
    )
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False, index=True),
        sa.Column("series_id", sa.Integer, sa.ForeignKey("series.id"), nullable=False, index=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
        # received | queued | processing | classified | ignored | failed (frozen here, not imported)
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("reason", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("received_at", sa.DateTime, nullable=False),
        sa.Column("queued_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
    )
    op.create_table(
        "results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("instance_id", sa.Integer, sa.ForeignKey("instances.id"), nullable=False, index=True),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("probability", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("decode_ms", sa.Float, nullable=False),
        sa.Column("inference_ms", sa.Float, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("instance_id", "model_name", "model_version"),
    )
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False, index=True),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("destination", sa.String(128), nullable=False),
        sa.Column("sr_sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sr_path", sa.Text),
        sa.Column("instances_reported", sa.Integer, nullable=False),
        # pending | retrying | delivered | dead
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("delivered_at", sa.DateTime),
        sa.UniqueConstraint("study_id", "model_name", "model_version", "destination"),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("card", sa.JSON, nullable=False),
        sa.Column("first_served_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("name", "version"),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.DateTime, nullable=False, index=True),
        sa.Column("entity", sa.String(16), nullable=False),
        sa.Column("entity_id", sa.Integer, nullable=False, index=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text),
    )


def downgrade() -> None:
    for table in (
        "audit_events", "model_versions", "deliveries", "results", "instances", "series", "studies"
    ):
        op.drop_table(table)
