"""Synthetic index rows in bulk: many studies without files, for query tests and benchmarks.

:func:`fill` inserts patients, studies, series and instances straight into the
index tables (bulk SQL, no DICOM files, no ingest), so that query latency can
be measured on 100k studies and C-CANCEL tested on thousands of matches.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import create_engine, insert, text

from archive.index import Instance, Patient, Series, Study

ROOT = "1.2.826.0.1.3680043.8.498.77"
SERIES_PER_STUDY = 2
INSTANCES_PER_SERIES = 5


def study_values(n: int) -> dict[str, str]:
    """The attributes of synthetic study `n` (shared by the index fill and Orthanc)."""
    day = 1 + n % 3650
    year, rest = 2015 + day // 365, day % 365
    return {
        "PatientID": f"PID{n // 2:07d}",
        "PatientName": f"SURNAME{n // 2:07d}^GIVEN",
        "AccessionNumber": f"ACC{n:08d}",
        "StudyInstanceUID": f"{ROOT}.{n}",
        "StudyDate": f"{year:04d}{1 + rest // 31:02d}{1 + rest % 28:02d}",
    }


def fill(url: str, studies: int) -> None:
    """Bulk-insert `studies` studies (two per patient) with their series and instances."""
    engine = create_engine(url)
    now = datetime.now(UTC)
    chunk = 5000
    with engine.begin() as conn:
        for start in range(0, studies, chunk):
            stop = min(start + chunk, studies)
            patients, study_rows, series_rows, instance_rows = [], [], [], []
            for n in range(start, stop):
                v = study_values(n)
                if n % 2 == 0:
                    patients.append(
                        {
                            "id": n // 2 + 1,
                            "patient_id": v["PatientID"],
                            "issuer_of_patient_id": "",
                            "patient_name": v["PatientName"],
                            "patient_birth_date": "19700101",
                            "patient_sex": "O",
                        }
                    )
                study_rows.append(
                    {
                        "id": n + 1,
                        "study_instance_uid": v["StudyInstanceUID"],
                        "patient_pk": n // 2 + 1,
                        "study_date": v["StudyDate"],
                        "study_time": "120000",
                        "accession_number": v["AccessionNumber"],
                        "study_id": "1",
                        "study_description": "CT ABDOMEN",
                        "referring_physician_name": "",
                        "modalities_in_study": "CT",
                        "number_of_study_related_series": SERIES_PER_STUDY,
                        "number_of_study_related_instances": SERIES_PER_STUDY
                        * INSTANCES_PER_SERIES,
                        "first_received_at": now,
                        "last_received_at": now,
                    }
                )
                for s in range(SERIES_PER_STUDY):
                    series_pk = n * SERIES_PER_STUDY + s + 1
                    series_rows.append(
                        {
                            "id": series_pk,
                            "series_instance_uid": f"{v['StudyInstanceUID']}.{s + 1}",
                            "study_pk": n + 1,
                            "modality": "CT",
                            "series_number": s + 1,
                            "series_description": "",
                            "body_part_examined": "ABDOMEN",
                            "number_of_series_related_instances": INSTANCES_PER_SERIES,
                            "last_received_at": now,
                        }
                    )
                    for i in range(INSTANCES_PER_SERIES):
                        instance_rows.append(
                            {
                                "sop_instance_uid": f"{v['StudyInstanceUID']}.{s + 1}.{i + 1}",
                                "series_pk": series_pk,
                                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                                "instance_number": i + 1,
                                "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                                "path": "none",
                                "size": 0,
                                "sha256": "0" * 64,
                                "received_at": now,
                                "calling_ae_title": "BENCH",
                                "source_address": "",
                            }
                        )
            if patients:
                conn.execute(insert(Patient), patients)
            conn.execute(insert(Study), study_rows)
            conn.execute(insert(Series), series_rows)
            conn.execute(insert(Instance), instance_rows)
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT setval('patient_id_seq', (SELECT max(id) FROM patient))"))
            conn.execute(text("SELECT setval('study_id_seq', (SELECT max(id) FROM study))"))
            conn.execute(text("SELECT setval('series_id_seq', (SELECT max(id) FROM series))"))
    with engine.connect() as conn:
        conn.execute(text("ANALYZE"))
        conn.commit()
    engine.dispose()
