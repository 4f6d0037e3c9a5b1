"""cohort and cohort_item: research cohorts and the state of each of their studies

Revision ID: 0006_cohorts
Revises: 0005_results
Create Date: 2026-11-28 05:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import archive.index

revision: str = "0006_cohorts"
down_revision: str | None = "0005_results"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    utc = archive.index.UTCDateTime(timezone=True)
    op.create_table(
        "cohort",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column(
            "weights_sha256",
            sa.String(length=64),
            nullable=False,
            comment="SHA-256 of the model weights when the cohort was created",
        ),
        sa.Column(
            "selection", sa.Text(), nullable=False, comment="JSON: how the studies were selected"
        ),
        sa.Column(
            "write_sr",
            sa.Boolean(),
            nullable=False,
            comment="store a research SR into each analysed study",
        ),
        sa.Column("status", sa.String(length=16), nullable=False, comment="CohortStatusValues"),
        sa.Column("created_at", utc, nullable=False),
        sa.Column(
            "run_id",
            sa.String(length=64),
            nullable=True,
            comment="the run that owns the cohort now (flow run id)",
        ),
        sa.Column("heartbeat_at", utc, nullable=True, comment="last sign of life of that run"),
        sa.Column("started_at", utc, nullable=True),
        sa.Column("finished_at", utc, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "cohort_item",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cohort_id", sa.Integer(), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column(
            "study_instance_uid",
            sa.String(length=64),
            nullable=False,
            comment="(0020,000D) StudyInstanceUID UI",
        ),
        sa.Column(
            "position", sa.Integer(), nullable=False, comment="order of the study in the cohort"
        ),
        sa.Column("status", sa.String(length=16), nullable=False, comment="CohortItemStatusValues"),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.String(length=1024), nullable=True),
        sa.Column(
            "cached",
            sa.Boolean(),
            nullable=False,
            comment="every result was reused from an earlier run",
        ),
        sa.Column("series_analysed", sa.Integer(), nullable=False),
        sa.Column("load_seconds", sa.Float(), nullable=True),
        sa.Column("inference_seconds", sa.Float(), nullable=True),
        sa.Column("total_seconds", sa.Float(), nullable=True),
        sa.Column("sr_sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("started_at", utc, nullable=True),
        sa.Column("finished_at", utc, nullable=True),
        sa.ForeignKeyConstraint(["cohort_id"], ["cohort.id"]),
        sa.ForeignKeyConstraint(["study_pk"], ["study.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("cohort_id", "study_pk", name="uq_cohort_item_cohort_study"),
    )
    with op.batch_alter_table("cohort_item", schema=None) as batch_op:
        batch_op.create_index(
            "ix_cohort_item_status", ["cohort_id", "status", "position"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("cohort_item", schema=None) as batch_op:
        batch_op.drop_index("ix_cohort_item_status")
    op.drop_table("cohort_item")
    op.drop_table("cohort")
