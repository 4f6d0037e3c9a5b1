"""SQL index of the archive: Patient / Study / Series / Instance.

The index holds the attributes that C-FIND, QIDO-RS and the worklist need,
plus where each instance's file lies and its checksum. It is the SQLAlchemy 2
ORM model; the schema itself is created and changed only by the Alembic
migrations in ``archive/migrations``. Each column's comment gives its tag,
keyword, VR and the key type it has in the Patient Root / Study Root C-FIND
information models (PS3.4 C.6.1.1 / C.6.2.1: U unique, R required, O optional,
D derived by the archive).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where UTC is required")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of every table of the index."""


class Patient(Base):
    """Patient level of the Patient Root information model (PS3.4 C.6.1.1.2)."""

    __tablename__ = "patient"
    __table_args__ = (
        UniqueConstraint("patient_id", "issuer_of_patient_id", name="uq_patient_identity"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(
        String(64), default="", comment="(0010,0020) PatientID LO, U"
    )
    issuer_of_patient_id: Mapped[str] = mapped_column(
        String(64), default="", comment="(0010,0021) IssuerOfPatientID LO, O"
    )
    patient_name: Mapped[str] = mapped_column(
        String(324), default="", comment="(0010,0010) PatientName PN, R"
    )
    patient_birth_date: Mapped[str] = mapped_column(
        String(8), default="", comment="(0010,0030) PatientBirthDate DA, R"
    )
    patient_sex: Mapped[str] = mapped_column(
        String(16), default="", comment="(0010,0040) PatientSex CS, R"
    )

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    """Study level of the Study Root information model (PS3.4 C.6.2.1.2)."""

    __tablename__ = "study"
    __table_args__ = (
        Index("ix_study_accession_number", "accession_number"),
        Index("ix_study_study_date", "study_date"),
        Index("ix_study_patient_pk", "patient_pk"),
        Index("ix_study_last_received_at", "last_received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(
        String(64), unique=True, comment="(0020,000D) StudyInstanceUID UI, U"
    )
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"))
    study_date: Mapped[str] = mapped_column(
        String(8), default="", comment="(0008,0020) StudyDate DA, R"
    )
    study_time: Mapped[str] = mapped_column(
        String(16), default="", comment="(0008,0030) StudyTime TM, R"
    )
    accession_number: Mapped[str] = mapped_column(
        String(16), default="", comment="(0008,0050) AccessionNumber SH, R"
    )
    study_id: Mapped[str] = mapped_column(
        String(16), default="", comment="(0020,0010) StudyID SH, R"
    )
    study_description: Mapped[str] = mapped_column(
        String(64), default="", comment="(0008,1030) StudyDescription LO, O"
    )
    referring_physician_name: Mapped[str] = mapped_column(
        String(324), default="", comment="(0008,0090) ReferringPhysicianName PN, O"
    )
    modalities_in_study: Mapped[str] = mapped_column(
        String(256), default="", comment="(0008,0061) ModalitiesInStudy CS, D (backslash-joined)"
    )
    number_of_study_related_series: Mapped[int] = mapped_column(
        Integer, default=0, comment="(0020,1206) NumberOfStudyRelatedSeries IS, D"
    )
    number_of_study_related_instances: Mapped[int] = mapped_column(
        Integer, default=0, comment="(0020,1208) NumberOfStudyRelatedInstances IS, D"
    )
    first_received_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, comment="when the first instance of the study arrived"
    )
    last_received_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, comment="when the latest instance of the study arrived"
    )

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """Series level (PS3.4 C.6.2.1.3)."""

    __tablename__ = "series"
    __table_args__ = (
        Index("ix_series_study_pk", "study_pk"),
        Index("ix_series_modality", "modality"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(
        String(64), unique=True, comment="(0020,000E) SeriesInstanceUID UI, U"
    )
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"))
    modality: Mapped[str] = mapped_column(
        String(16), default="", comment="(0008,0060) Modality CS, R"
    )
    series_number: Mapped[int | None] = mapped_column(
        Integer, nullable=True, comment="(0020,0011) SeriesNumber IS, R"
    )
    series_description: Mapped[str] = mapped_column(
        String(64), default="", comment="(0008,103E) SeriesDescription LO, O"
    )
    body_part_examined: Mapped[str] = mapped_column(
        String(16), default="", comment="(0018,0015) BodyPartExamined CS, O"
    )
    number_of_series_related_instances: Mapped[int] = mapped_column(
        Integer, default=0, comment="(0020,1209) NumberOfSeriesRelatedInstances IS, D"
    )
    last_received_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, comment="when the latest instance of the series arrived"
    )

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """Composite object instance level (PS3.4 C.6.2.1.4) and where its file lies."""

    __tablename__ = "instance"
    __table_args__ = (Index("ix_instance_series_pk", "series_pk"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(
        String(64), unique=True, comment="(0008,0018) SOPInstanceUID UI, U"
    )
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"))
    sop_class_uid: Mapped[str] = mapped_column(String(64), comment="(0008,0016) SOPClassUID UI, R")
    instance_number: Mapped[int | None] = mapped_column(
        Integer, nullable=True, comment="(0020,0013) InstanceNumber IS, R"
    )
    transfer_syntax_uid: Mapped[str] = mapped_column(
        String(64), comment="(0002,0010) TransferSyntaxUID UI, as received and stored"
    )
    path: Mapped[str] = mapped_column(String(255), comment="file path relative to the store root")
    size: Mapped[int] = mapped_column(BigInteger, comment="file size in bytes")
    sha256: Mapped[str] = mapped_column(String(64), comment="SHA-256 of the stored file")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    calling_ae_title: Mapped[str] = mapped_column(
        String(16), default="", comment="AE title of the sender (STOW-RS: 'STOW-RS')"
    )
    source_address: Mapped[str] = mapped_column(
        String(64), default="", comment="network address of the sender"
    )

    series: Mapped[Series] = relationship(back_populates="instances")


class StoreConflict(Base):
    """A second copy of a stored SOP Instance arrived with different bytes.

    Kept for audit: which copy was kept, who sent the other and its checksum.
    """

    __tablename__ = "store_conflict"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    stored_sha256: Mapped[str] = mapped_column(String(64))
    received_sha256: Mapped[str] = mapped_column(String(64))
    received_size: Mapped[int] = mapped_column(BigInteger)
    action: Mapped[str] = mapped_column(String(16), comment="kept_first or overwritten")
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    source_address: Mapped[str] = mapped_column(String(64), default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class StudyTriage(Base):
    """The triage state of a study: one row per study that has become stable at least once.

    Whether a study is still receiving images is derived, not stored: a study
    without a row, or whose ``last_received_at`` is later than ``ready_at``, is
    waiting for images. ``generation`` counts how often the study became ready;
    a result only updates this row if it belongs to the current generation, so
    a re-analysis supersedes older results and never the reverse.
    """

    __tablename__ = "study_triage"
    __table_args__ = (Index("ix_study_triage_state", "state"),)

    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(
        String(32),
        comment="queued, analysing, triaged, no_applicable_model or failed (TriageStateValues)",
    )
    ready_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), comment="when the current generation became ready (stable)"
    )
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    failure_reason: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    priority_class: Mapped[str | None] = mapped_column(String(16), nullable=True)
    priority_score: Mapped[float | None] = mapped_column(nullable=True)
    priority_reason: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    study: Mapped[Study] = relationship()


class TriageJob(Base):
    """The outbox of "study ready" events: one row per (study, generation).

    Written in the same transaction that marks the study ready, so a crash can
    neither lose a trigger nor create a second one (the unique key). A
    dispatcher claims a job with a lease; a job whose lease ran out (its node
    died) is claimed again.
    """

    __tablename__ = "triage_job"
    __table_args__ = (
        UniqueConstraint("study_pk", "generation", name="uq_triage_job_study_generation"),
        Index("ix_triage_job_status", "status", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"))
    generation: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(
        String(16), comment="pending, running, done or failed (JobStatusValues)"
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    error: Mapped[str | None] = mapped_column(String(1024), nullable=True)

    study: Mapped[Study] = relationship()


class ModelResultRecord(Base):
    """What one model found in one series: the triage result cache and the research results table.

    One row per (series content, model name, version, weights): a re-run of the
    same model on the same images reads the row instead of running the model
    again. ``series_fingerprint`` changes when the series' instances change, so
    a re-analysis after late arrivals never reuses a stale result. Shadow
    models are recorded like active ones (``mode``) but never set a priority.
    """

    __tablename__ = "model_result"
    __table_args__ = (
        UniqueConstraint(
            "series_instance_uid",
            "series_fingerprint",
            "model_name",
            "model_version",
            "weights_sha256",
            name="uq_model_result_series_model",
        ),
        Index("ix_model_result_study_pk", "study_pk"),
        Index("ix_model_result_model", "model_name", "model_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"))
    series_instance_uid: Mapped[str] = mapped_column(
        String(64), comment="(0020,000E) SeriesInstanceUID UI of the analysed series"
    )
    series_fingerprint: Mapped[str] = mapped_column(
        String(64), comment="SHA-256 over the series' SOP Instance UIDs and file checksums"
    )
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(16), comment="active or shadow (ModelModeValues)")
    findings: Mapped[str] = mapped_column(
        Text, comment="JSON list: key, probability, volume_ml, location, key_sop_instance_uid"
    )
    inference_seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    study: Mapped[Study] = relationship()


class ReadingStatus(Base):
    """Where the radiologists stand with a study: unread, opened, reported or dismissed.

    One row per study that has been shown on the worklist (a study without a
    row is unread). It also holds what the worklist displays of the AI result
    (the findings summary read back from the study's newest SR, and the key
    image stored for it), so the list never parses an SR per request.
    """

    __tablename__ = "reading_status"
    __table_args__ = (Index("ix_reading_status_state", "reading_state"),)

    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), primary_key=True)
    reading_state: Mapped[str] = mapped_column(
        String(16), default="unread", comment="unread, opened, reported or dismissed"
    )
    opened_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    opened_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    reported_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    dismissed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    dismissed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    findings_summary: Mapped[str | None] = mapped_column(
        Text, nullable=True, comment="JSON list of findings of the newest SR (finding, model...)"
    )
    summary_generation: Mapped[int | None] = mapped_column(
        Integer, nullable=True, comment="triage generation the summary was read for"
    )
    key_image_sop_instance_uid: Mapped[str | None] = mapped_column(
        String(64), nullable=True, comment="(0008,0018) SOPInstanceUID UI of the stored key image"
    )
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    study: Mapped[Study] = relationship()


class AiFeedback(Base):
    """A radiologist's verdict on the AI result of a study, kept for quality monitoring."""

    __tablename__ = "ai_feedback"
    __table_args__ = (Index("ix_ai_feedback_study_pk", "study_pk"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"))
    generation: Mapped[int] = mapped_column(Integer, comment="triage generation judged")
    verdict: Mapped[str] = mapped_column(String(16), comment="agree or disagree")
    finding: Mapped[str | None] = mapped_column(
        String(128), nullable=True, comment="the finding judged (CodeMeaning), or all"
    )
    model_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    priority_class: Mapped[str | None] = mapped_column(
        String(16), nullable=True, comment="the AI's priority class at the time of the verdict"
    )
    comment: Mapped[str] = mapped_column(Text, default="")
    given_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DeliveryOutbox(Base):
    """Messages the node owes to the outside world: alerts and forwarded results.

    One row per (study, generation, channel), written when the triage result is
    known, so a restart neither loses nor doubles a message; the sender marks
    a row ``sent`` once the receiver acknowledged it, retrying with backoff
    until then (``attempts``, ``next_attempt_at``).
    """

    __tablename__ = "delivery_outbox"
    __table_args__ = (
        UniqueConstraint("study_pk", "generation", "channel", name="uq_delivery_outbox_channel"),
        Index("ix_delivery_outbox_due", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"))
    generation: Mapped[int] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(
        String(160), comment="<kind>:<target name>, e.g. webhook:ris, hl7:ris, dimse:pacs"
    )
    kind: Mapped[str] = mapped_column(String(16), comment="alert or forward")
    status: Mapped[str] = mapped_column(
        String(16), comment="pending, sending, sent or failed (DeliveryStatusValues)"
    )
    payload: Mapped[str] = mapped_column(Text, comment="JSON: what to send (UIDs, finding text)")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
