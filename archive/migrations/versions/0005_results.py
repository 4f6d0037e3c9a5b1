"""model_result: per-series model results (triage cache and research results table)

Revision ID: 0005_results
Revises: 0002
Create Date: 2026-11-28 05:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import archive.index

revision: str = "0005_results"
down_revision: str | None = "0004_worklist"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_result",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column(
            "series_instance_uid",
            sa.String(length=64),
            nullable=False,
            comment="(0020,000E) SeriesInstanceUID UI of the analysed series",
        ),
        sa.Column(
            "series_fingerprint",
            sa.String(length=64),
            nullable=False,
            comment="SHA-256 over the series' SOP Instance UIDs and file checksums",
        ),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=False),
        sa.Column(
            "mode",
            sa.String(length=16),
            nullable=False,
            comment="active or shadow (ModelModeValues)",
        ),
        sa.Column(
            "findings",
            sa.Text(),
            nullable=False,
            comment="JSON list: key, probability, volume_ml, location, key_sop_instance_uid",
        ),
        sa.Column("inference_seconds", sa.Float(), nullable=False),
        sa.Column("created_at", archive.index.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_pk"], ["study.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "series_instance_uid",
            "series_fingerprint",
            "model_name",
            "model_version",
            "weights_sha256",
            name="uq_model_result_series_model",
        ),
    )
    with op.batch_alter_table("model_result", schema=None) as batch_op:
        batch_op.create_index("ix_model_result_study_pk", ["study_pk"], unique=False)
        batch_op.create_index(
            "ix_model_result_model", ["model_name", "model_version"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("model_result", schema=None) as batch_op:
        batch_op.drop_index("ix_model_result_model")
        batch_op.drop_index("ix_model_result_study_pk")
    op.drop_table("model_result")
