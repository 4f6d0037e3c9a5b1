"""The results table of a cohort, as CSV or Parquet, optionally de-identified.

Accepts a saved cohort and produces its results table: one row per study,
series and finding of the cohort's model (probability, present, volume,
location, key image, timings, whether the result was reused), and one row per
study that failed or was skipped (with the reason), so the table always
accounts for every study. Writes it as CSV (:func:`write_csv`) or Parquet
(:func:`write_parquet`, pyarrow).

De-identification (:class:`Pseudonymizer`) follows the PS3.15 Annex E basic
profile as implemented by ``dicognito``: Patient ID, Accession Number and
every UID are replaced by pseudonyms, dates are shifted; Patient's Name is
never exported. The pseudonyms come from a key: the same key gives the same
pseudonyms (so exports of several cohorts link up, and the de-identified
images written by :func:`export_images` carry the same UIDs as the table);
without the key they cannot be reversed. Never logs patient data.

References
----------
PS3.15 Annex E Attribute Confidentiality Profiles,
https://dicom.nema.org/medical/dicom/current/output/chtml/part15/chapter_E.html
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from sqlalchemy import select

from archive.cohorts import CohortItem, CohortItemStatusValues, get_cohort
from archive.db import Database
from archive.index import Instance, ModelResultRecord, Patient, Series, Study
from archive.store import FileStore

logger = logging.getLogger(__name__)

COLUMNS: tuple[tuple[str, str], ...] = (
    ("cohort", "string"),
    ("StudyInstanceUID", "string"),
    ("PatientID", "string"),
    ("AccessionNumber", "string"),
    ("StudyDate", "string"),
    ("SeriesInstanceUID", "string"),
    ("model_name", "string"),
    ("model_version", "string"),
    ("weights_sha256", "string"),
    ("finding", "string"),
    ("probability", "float64"),
    ("present", "bool"),
    ("volume_ml", "float64"),
    ("location_x", "float64"),
    ("location_y", "float64"),
    ("location_z", "float64"),
    ("key_sop_instance_uid", "string"),
    ("status", "string"),
    ("error", "string"),
    ("cached", "bool"),
    ("inference_seconds", "float64"),
    ("study_seconds", "float64"),
)
"""The results table's columns and their Arrow types (CSV has the same header)."""
COLUMN_NAMES = tuple(name for name, _ in COLUMNS)


def results_rows(db: Database, cohort_name: str) -> list[dict[str, Any]]:
    """The results table of the cohort, in cohort order.

    A done study has one row per analysed series and finding; a failed,
    skipped or not yet analysed study has one row without a finding, with its
    status and reason. When a series was analysed several times (its images
    changed), the newest result counts.

    Raises
    ------
    LookupError
        No cohort has that name.
    """
    cohort = get_cohort(db, cohort_name)
    with db.reader() as session:
        items = session.execute(
            select(
                CohortItem,
                Study.accession_number,
                Study.study_date,
                Patient.patient_id,
            )
            .join(Study, Study.id == CohortItem.study_pk)
            .join(Patient, Patient.id == Study.patient_pk)
            .where(CohortItem.cohort_id == cohort.id)
            .order_by(CohortItem.position)
        ).all()
        records = session.scalars(
            select(ModelResultRecord)
            .join(CohortItem, CohortItem.study_pk == ModelResultRecord.study_pk)
            .where(
                CohortItem.cohort_id == cohort.id,
                ModelResultRecord.model_name == cohort.model_name,
                ModelResultRecord.model_version == cohort.model_version,
                ModelResultRecord.weights_sha256 == cohort.weights_sha256,
            )
            .order_by(ModelResultRecord.created_at, ModelResultRecord.id)
        ).all()
    newest: dict[int, dict[str, ModelResultRecord]] = {}
    for record in records:
        newest.setdefault(record.study_pk, {})[record.series_instance_uid] = record

    rows: list[dict[str, Any]] = []
    for item, accession_number, study_date, patient_id in items:
        base = {
            "cohort": cohort.name,
            "StudyInstanceUID": item.study_instance_uid,
            "PatientID": patient_id,
            "AccessionNumber": accession_number,
            "StudyDate": study_date,
            "model_name": cohort.model_name,
            "model_version": cohort.model_version,
            "weights_sha256": cohort.weights_sha256,
            "status": item.status,
            "error": item.error,
            "cached": bool(item.cached),
            "study_seconds": item.total_seconds,
        }
        series_results = newest.get(item.study_pk, {})
        if item.status != CohortItemStatusValues.DONE.value or not series_results:
            rows.append({**_empty_row(), **base})
            continue
        for series_instance_uid, record in series_results.items():
            for finding in json.loads(record.findings):
                location = finding.get("location") or [None, None, None]
                rows.append(
                    {
                        **_empty_row(),
                        **base,
                        "SeriesInstanceUID": series_instance_uid,
                        "finding": finding["key"],
                        "probability": float(finding["probability"]),
                        "present": bool(finding["present"]),
                        "volume_ml": finding.get("volume_ml"),
                        "location_x": location[0],
                        "location_y": location[1],
                        "location_z": location[2],
                        "key_sop_instance_uid": finding.get("key_sop_instance_uid"),
                        "inference_seconds": record.inference_seconds,
                    }
                )
    return rows


def _empty_row() -> dict[str, Any]:
    return dict.fromkeys(COLUMN_NAMES)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write the results table as CSV (UTF-8, header row, empty cells for missing values)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMN_NAMES), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


def write_parquet(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write the results table as Parquet with a fixed schema (types as in :data:`COLUMNS`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"string": pa.string(), "float64": pa.float64(), "bool": pa.bool_()}
    schema = pa.schema([(name, types[kind]) for name, kind in COLUMNS])
    table = pa.Table.from_pylist([{k: row.get(k) for k in COLUMN_NAMES} for row in rows], schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def write_results(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write CSV or Parquet, by the file's suffix (``.csv``, ``.parquet``/``.pq``).

    Raises
    ------
    ValueError
        Another suffix.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return write_csv(rows, path)
    if suffix in (".parquet", ".pq"):
        return write_parquet(rows, path)
    raise ValueError(f"output must end in .csv or .parquet, got {Path(path).name!r}")


class Pseudonymizer:
    """Keyed, reproducible pseudonyms for the table and the images (dicognito, PS3.15 E).

    Parameters
    ----------
    key : str
        The secret the pseudonyms derive from (at least 8 characters). Keep it
        to link later exports; without it the pseudonyms cannot be reversed.
    """

    def __init__(self, key: str) -> None:
        if not key or len(key) < 8:
            raise ValueError("the pseudonym key must have at least 8 characters")
        from dicognito.anonymizer import Anonymizer

        self._anonymizer = Anonymizer(seed=key)

    def dataset(self, ds: Dataset) -> Dataset:
        """De-identify `ds` in place (and return it)."""
        if not hasattr(ds, "file_meta"):
            ds.file_meta = FileMetaDataset()
        self._anonymizer.anonymize(ds)
        return ds

    def row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A results row with its identifiers replaced by the same pseudonyms the images get."""
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.PatientID = row.get("PatientID") or ""
        ds.AccessionNumber = row.get("AccessionNumber") or ""
        ds.StudyInstanceUID = row["StudyInstanceUID"]
        if row.get("StudyDate"):
            ds.StudyDate = row["StudyDate"]
        if row.get("SeriesInstanceUID"):
            ds.SeriesInstanceUID = row["SeriesInstanceUID"]
        if row.get("key_sop_instance_uid"):
            ds.SOPInstanceUID = row["key_sop_instance_uid"]
        self.dataset(ds)
        out = dict(row)
        out["PatientID"] = str(ds.PatientID)
        out["AccessionNumber"] = str(ds.AccessionNumber)
        out["StudyInstanceUID"] = str(ds.StudyInstanceUID)
        out["StudyDate"] = str(ds.get("StudyDate", "")) or None
        if row.get("SeriesInstanceUID"):
            out["SeriesInstanceUID"] = str(ds.SeriesInstanceUID)
        if row.get("key_sop_instance_uid"):
            out["key_sop_instance_uid"] = str(ds.SOPInstanceUID)
        if out.get("error"):
            # Reasons name series by UID; replace those with their pseudonyms too.
            for original in (row["StudyInstanceUID"], row.get("SeriesInstanceUID")):
                if original and original in out["error"]:
                    out["error"] = out["error"].replace(original, "<uid>")
        return out

    def rows(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self.row(r) for r in rows]


def export_images(
    db: Database,
    file_store: FileStore,
    cohort_name: str,
    output_dir: Path,
    pseudonymizer: Pseudonymizer,
) -> int:
    """Write de-identified copies of the cohort's images to ``output_dir/<study>/<series>/``.

    Only image series are written (our own SRs are left out). File and
    folder names are the pseudonymous UIDs. Returns the number of files.
    """
    cohort = get_cohort(db, cohort_name)
    with db.reader() as session:
        paths = session.execute(
            select(Instance.path)
            .join(Series, Series.id == Instance.series_pk)
            .join(CohortItem, CohortItem.study_pk == Series.study_pk)
            .where(CohortItem.cohort_id == cohort.id, Series.modality != "SR")
            .order_by(CohortItem.position, Series.id, Instance.instance_number, Instance.id)
        ).scalars()
        paths = list(paths)
    count = 0
    output_dir = Path(output_dir)
    for relative in paths:
        ds = pydicom.dcmread(file_store.absolute(relative))
        pseudonymizer.dataset(ds)
        target = (
            output_dir / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
        ) / f"{ds.SOPInstanceUID}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
        count += 1
    logger.info("cohort %s: %d de-identified instance(s) exported", cohort_name, count)
    return count
