"""query indexes: case-folded names, modality, trigram name search on PostgreSQL

Revision ID: 0003_query
Revises: 0002
Create Date: 2026-11-28 05:40:00

C-FIND and QIDO-RS match PatientName case-insensitively on ``upper(patient_name)``
(archive.query.Matcher); a prefix wild card becomes a range on that expression,
which a B-tree index in byte order serves (``COLLATE "C"`` on PostgreSQL, so the
result does not depend on the database's collation). On PostgreSQL a trigram
index (pg_trgm, when the server offers it) also serves wild cards that do not
start with a literal prefix ('*SMITH*'). PatientID, AccessionNumber, StudyDate
and the UIDs are already indexed by 0001.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_query"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _has_trigram(bind: sa.Connection) -> bool:
    available = bind.execute(
        sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'")
    ).first()
    if available is None:
        return False
    installed = bind.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'"))
    if installed.first() is not None:
        return True
    may_create = bind.execute(
        sa.text(
            "SELECT rolsuper OR has_database_privilege(current_database(), 'CREATE') "
            "FROM pg_roles WHERE rolname = current_user"
        )
    ).scalar()
    if may_create:
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        return True
    return False


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute(
            "CREATE INDEX ix_patient_patient_name_upper ON patient "
            '((upper(patient_name) COLLATE "C"))'
        )
        op.execute('CREATE INDEX ix_patient_patient_id_pattern ON patient (patient_id COLLATE "C")')
        if _has_trigram(bind):
            op.execute(
                "CREATE INDEX ix_patient_patient_name_trgm ON patient "
                'USING gin ((upper(patient_name) COLLATE "C") gin_trgm_ops)'
            )
    else:
        op.execute("CREATE INDEX ix_patient_patient_name_upper ON patient (upper(patient_name))")
    op.create_index("ix_series_modality", "series", ["modality"])


def downgrade() -> None:
    bind = op.get_bind()
    op.drop_index("ix_series_modality", table_name="series")
    op.execute("DROP INDEX IF EXISTS ix_patient_patient_name_trgm")
    op.execute("DROP INDEX IF EXISTS ix_patient_patient_id_pattern")
    op.execute("DROP INDEX IF EXISTS ix_patient_patient_name_upper")
    del bind
