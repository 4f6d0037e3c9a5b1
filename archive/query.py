"""Query: a C-FIND identifier or QIDO-RS parameters as SQL on the index, matches as data sets.

Accepts a query level, the information model and a set of (keyword, value)
matching and return keys; produces a SQLAlchemy statement over the index and,
per match, a :class:`pydicom.dataset.Dataset` holding the requested keys. It
implements the attribute matching of PS3.4 C.2.2.2: single value, universal,
wild card (``*``/``?``, SQL LIKE metacharacters escaped), range (DA, TM, DT),
list of UID and multiple-value matching, with case-insensitive matching for PN.
Values are always bound parameters, never SQL text. It is shared by the C-FIND
SCP (:mod:`archive.handlers`) and QIDO-RS (:mod:`archive.dicomweb`), never
touches the network or the file store, and never logs values (they may carry
patient data).

References
----------
PS3.4 C.2.2.2, https://dicom.nema.org/medical/dicom/current/output/chtml/part04/sect_C.2.2.2.html
PS3.4 C.6, https://dicom.nema.org/medical/dicom/current/output/chtml/part04/sect_C.6.html
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from sqlalchemy import ColumnElement, Select, and_, exists, func, literal, or_, select
from sqlalchemy.orm import Session

from archive import status
from archive.index import Instance, Patient, Series, Study
from pipeline.uids import InvalidUIDError, validate_uid

SPECIFIC_CHARACTER_SET = "ISO_IR 192"
"""Responses are encoded in UTF-8 (PS3.5 6.1.2.3); the index holds decoded text."""

MAX_LIST_VALUES = 1000
"""Most values a List of UID or multiple-value key may carry."""

ESCAPE = "\\"


class QueryLevelValues(StrEnum):
    """Query/Retrieve Level (0008,0052), PS3.4 C.4.1.1.3.1."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class InformationModelValues(StrEnum):
    """The Query/Retrieve information models the archive offers (PS3.4 C.6)."""

    PATIENT_ROOT = "PATIENT_ROOT"
    STUDY_ROOT = "STUDY_ROOT"


LEVEL_ORDER = {
    QueryLevelValues.PATIENT: 0,
    QueryLevelValues.STUDY: 1,
    QueryLevelValues.SERIES: 2,
    QueryLevelValues.IMAGE: 3,
}


class QueryError(ValueError):
    """A query the archive refuses, with the DIMSE status and a comment without patient data.

    ``status`` is 0xA900 (Identifier does not match SOP Class) or 0xC000
    (Unable to process); the HTTP service answers 400 with ``comment``.
    """

    def __init__(self, status_code: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status_code
        self.comment = comment[:64]


class MatchKindValues(StrEnum):
    """How a key's value is matched (by VR, PS3.4 C.2.2.2)."""

    UID = "UID"
    PN = "PN"
    DATE = "DATE"
    TIME = "TIME"
    TEXT = "TEXT"
    INTEGER = "INTEGER"
    MODALITIES = "MODALITIES"
    DERIVED = "DERIVED"
    """Computed by the archive; returned, never matched (C.6.1.1 'D' keys)."""


@dataclass(frozen=True)
class Key:
    """One attribute the archive can match and return.

    ``column`` reads the value; ``max_length`` bounds a matching value
    (its VR's maximum, PS3.5 6.2), so that a huge wildcard is refused up front.
    """

    keyword: str
    level: QueryLevelValues
    kind: MatchKindValues
    column: Any
    max_length: int = 64
    unique: bool = False


_P, _ST, _SE, _IM = (
    QueryLevelValues.PATIENT,
    QueryLevelValues.STUDY,
    QueryLevelValues.SERIES,
    QueryLevelValues.IMAGE,
)
_K = MatchKindValues

_patient_studies = (
    select(func.count(Study.id)).where(Study.patient_pk == Patient.id).scalar_subquery()
)
_patient_series = (
    select(func.coalesce(func.sum(Study.number_of_study_related_series), 0))
    .where(Study.patient_pk == Patient.id)
    .scalar_subquery()
)
_patient_instances = (
    select(func.coalesce(func.sum(Study.number_of_study_related_instances), 0))
    .where(Study.patient_pk == Patient.id)
    .scalar_subquery()
)

KEYS: dict[str, Key] = {
    key.keyword: key
    for key in (
        Key("PatientID", _P, _K.TEXT, Patient.patient_id, 64, unique=True),
        Key("IssuerOfPatientID", _P, _K.TEXT, Patient.issuer_of_patient_id, 64),
        Key("PatientName", _P, _K.PN, Patient.patient_name, 324),
        Key("PatientBirthDate", _P, _K.DATE, Patient.patient_birth_date, 18),
        Key("PatientSex", _P, _K.TEXT, Patient.patient_sex, 16),
        Key("NumberOfPatientRelatedStudies", _P, _K.DERIVED, _patient_studies),
        Key("NumberOfPatientRelatedSeries", _P, _K.DERIVED, _patient_series),
        Key("NumberOfPatientRelatedInstances", _P, _K.DERIVED, _patient_instances),
        Key("StudyInstanceUID", _ST, _K.UID, Study.study_instance_uid, unique=True),
        Key("StudyDate", _ST, _K.DATE, Study.study_date, 18),
        Key("StudyTime", _ST, _K.TIME, Study.study_time, 28),
        Key("AccessionNumber", _ST, _K.TEXT, Study.accession_number, 16),
        Key("StudyID", _ST, _K.TEXT, Study.study_id, 16),
        Key("StudyDescription", _ST, _K.TEXT, Study.study_description, 64),
        Key("ReferringPhysicianName", _ST, _K.PN, Study.referring_physician_name, 324),
        Key("ModalitiesInStudy", _ST, _K.MODALITIES, Study.modalities_in_study, 16),
        Key("NumberOfStudyRelatedSeries", _ST, _K.DERIVED, Study.number_of_study_related_series),
        Key(
            "NumberOfStudyRelatedInstances",
            _ST,
            _K.DERIVED,
            Study.number_of_study_related_instances,
        ),
        Key("SeriesInstanceUID", _SE, _K.UID, Series.series_instance_uid, unique=True),
        Key("Modality", _SE, _K.TEXT, Series.modality, 16),
        Key("SeriesNumber", _SE, _K.INTEGER, Series.series_number, 12),
        Key("SeriesDescription", _SE, _K.TEXT, Series.series_description, 64),
        Key("BodyPartExamined", _SE, _K.TEXT, Series.body_part_examined, 16),
        Key(
            "NumberOfSeriesRelatedInstances",
            _SE,
            _K.DERIVED,
            Series.number_of_series_related_instances,
        ),
        Key("SOPInstanceUID", _IM, _K.UID, Instance.sop_instance_uid, unique=True),
        Key("SOPClassUID", _IM, _K.UID, Instance.sop_class_uid),
        Key("InstanceNumber", _IM, _K.INTEGER, Instance.instance_number, 12),
    )
}
"""Every key the archive matches and returns, by keyword (PS3.4 C.6.1.1 and C.6.2.1)."""

UNIQUE_KEYS = {
    _P: "PatientID",
    _ST: "StudyInstanceUID",
    _SE: "SeriesInstanceUID",
    _IM: "SOPInstanceUID",
}

# Keys answered with a fixed value or left empty; they are not indexed.
CONSTANT_KEYS: dict[str, Callable[[], Any]] = {
    "InstanceAvailability": lambda: "ONLINE",
    "SpecificCharacterSet": lambda: SPECIFIC_CHARACTER_SET,
}
IGNORED_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"}


@dataclass
class Query:
    """A validated query: level, matching conditions and the keys to return.

    Build it with :func:`parse_identifier` (C-FIND) or :func:`build_query` (QIDO-RS).
    """

    level: QueryLevelValues
    model: InformationModelValues
    conditions: list[ColumnElement[bool]] = field(default_factory=list)
    return_keys: list[str] = field(default_factory=list)
    """Keywords of the keys each match carries, in request order."""
    empty_keys: list[str] = field(default_factory=list)
    """Requested keys the archive does not hold: returned zero-length."""


def level_of(value: object) -> QueryLevelValues:
    """Parse Query/Retrieve Level (0008,0052).

    Raises
    ------
    QueryError
        0xA900 if the level is missing or not PATIENT, STUDY, SERIES or IMAGE.
    """
    text = str(value or "").strip().upper()
    try:
        return QueryLevelValues(text)
    except ValueError:
        raise QueryError(
            status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "QueryRetrieveLevel missing or unknown"
        ) from None


def _check_level(
    key: Key, level: QueryLevelValues, model: InformationModelValues, matching: bool
) -> None:
    if LEVEL_ORDER[key.level] > LEVEL_ORDER[level]:
        raise QueryError(
            status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            f"{key.keyword} is below the {level} level",
        )
    if model is InformationModelValues.STUDY_ROOT and level is _P:
        raise QueryError(
            status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "PATIENT level not in Study Root"
        )


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(_text(v) for v in value)
    return str(value).strip(" \x00")


def _split(text: str, key: Key) -> list[str]:
    values = [v.strip() for v in text.split("\\")]
    if len(values) > MAX_LIST_VALUES:
        raise QueryError(status.UNABLE_TO_PROCESS, f"{key.keyword}: too many values")
    return values


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def like_pattern(value: str) -> str:
    """A DICOM wild card value as a LIKE pattern with escape character ``\\``.

    ``%``, ``_`` and ``\\`` in the value are escaped, so they match themselves
    (PS3.4 C.2.2.2.4: only ``*`` and ``?`` are wild cards).
    """
    value = re.sub(r"\*+", "*", value)  # '**' means '*'
    out = []
    for char in value:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in "%_\\":
            out.append(ESCAPE + char)
        else:
            out.append(char)
    return "".join(out)


def literal_prefix(value: str) -> str:
    """The part of a wild card value before its first ``*`` or ``?``."""
    match = re.search(r"[*?]", value)
    return value if match is None else value[: match.start()]


def _prefix_range(expr: Any, prefix: str) -> ColumnElement[bool] | None:
    """``expr`` in [prefix, prefix') so that a B-tree index serves a prefix wild card."""
    if not prefix:
        return None
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    return and_(expr >= prefix, expr < upper)


def _wildcard(expr: Any, value: str, *, fold: Callable[[str], str] = lambda s: s) -> Any:
    condition: Any = expr.like(fold(like_pattern(value)), escape=ESCAPE)
    prefix = _prefix_range(expr, fold(literal_prefix(value)))
    return condition if prefix is None else and_(prefix, condition)


class Matcher:
    """Builds matching conditions for one database dialect.

    PN matching is case-insensitive (PS3.4 C.2.2.2.1: 'insensitive to case' is
    allowed for PN); it compares ``upper(name)`` in a byte-order collation, the
    expression the ``0003_query`` indexes cover.
    """

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect

    def folded(self, column: Any) -> Any:
        expr = func.upper(column)
        return expr.collate("C") if self.dialect == "postgresql" else expr

    def text_expr(self, column: Any) -> Any:
        return column.collate("C") if self.dialect == "postgresql" else column

    def condition(self, key: Key, raw: str, *, fuzzy: bool = False) -> ColumnElement[bool] | None:
        """The SQL condition for `raw` on `key`, or None for universal matching.

        Raises
        ------
        QueryError
            For a value that is malformed for its VR or too long.
        """
        text = raw.strip()
        if len(text) > (key.max_length + 1) * MAX_LIST_VALUES or any(
            len(v.strip()) > key.max_length for v in text.split("\\")
        ):
            raise QueryError(status.UNABLE_TO_PROCESS, f"{key.keyword}: value too long")
        if text == "" or (text.strip("*") == "" and key.kind is not MatchKindValues.UID):
            return None  # PS3.4 C.2.2.2.3 universal matching ('*' alone is universal too)
        kind = key.kind
        if kind is _K.DERIVED:
            raise QueryError(
                status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                f"{key.keyword} is returned, not matched",
            )
        if kind is _K.UID:
            return self._uid(key, text)
        values = _split(text, key)
        for value in values:
            if len(value) > key.max_length:
                raise QueryError(status.UNABLE_TO_PROCESS, f"{key.keyword}: value too long")
        if kind is _K.DATE:
            parts = [self._range(key, v, _parse_date) for v in values]
        elif kind is _K.TIME:
            parts = [self._range(key, v, _parse_time) for v in values]
        elif kind is _K.INTEGER:
            parts = [self._integer(key, v) for v in values]
        elif kind is _K.MODALITIES:
            return self._modalities(values)
        elif kind is _K.PN:
            parts = [self._person_name(key, v, fuzzy) for v in values]
        else:
            parts = [self._string(key, v) for v in values]
        # PS3.4 C.2.2.2.8 multiple value matching: any value matches
        return parts[0] if len(parts) == 1 else or_(*parts)

    def _uid(self, key: Key, text: str) -> ColumnElement[bool]:
        if _has_wildcard(text):
            raise QueryError(
                status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                f"{key.keyword}: no wild cards in a UID",
            )
        uids = []
        for value in _split(text, key):
            try:
                uids.append(validate_uid(value, key.keyword))
            except InvalidUIDError:
                raise QueryError(
                    status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{key.keyword}: invalid UID"
                ) from None
        # PS3.4 C.2.2.2.2 list of UID matching
        return key.column == uids[0] if len(uids) == 1 else key.column.in_(uids)

    @staticmethod
    def _range(key: Key, value: str, parse: Callable[[str, Key], str]) -> ColumnElement[bool]:
        # PS3.4 C.2.2.2.5 range matching
        if _has_wildcard(value):
            raise QueryError(status.UNABLE_TO_PROCESS, f"{key.keyword}: no wild cards in a range")
        if "-" not in value:
            return key.column == parse(value, key)
        if value.count("-") != 1:
            raise QueryError(status.UNABLE_TO_PROCESS, f"{key.keyword}: malformed range")
        low, high = (v.strip() for v in value.split("-"))
        if not low and not high:
            raise QueryError(status.UNABLE_TO_PROCESS, f"{key.keyword}: empty range")
        conditions = [key.column != ""]
        if low:
            conditions.append(key.column >= parse(low, key))
        if high:
            bound = parse(high, key)
            # An upper TM bound such as '1200' includes 12:00:59.999999.
            conditions.append(key.column <= (bound + "~" if key.kind is _K.TIME else bound))
        if low and high and parse(low, key) > parse(high, key):
            raise QueryError(status.UNABLE_TO_PROCESS, f"{key.keyword}: range start after end")
        return and_(*conditions)

    @staticmethod
    def _integer(key: Key, value: str) -> ColumnElement[bool]:
        try:
            number = int(value)
        except ValueError:
            raise QueryError(status.UNABLE_TO_PROCESS, f"{key.keyword}: not an integer") from None
        if not -(2**31) <= number < 2**31:
            raise QueryError(status.UNABLE_TO_PROCESS, f"{key.keyword}: out of range")
        return key.column == number

    def _string(self, key: Key, value: str) -> ColumnElement[bool]:
        if _has_wildcard(value):
            # PS3.4 C.2.2.2.4 wild card matching
            return _wildcard(self.text_expr(key.column), value)
        # PS3.4 C.2.2.2.1 single value matching
        return key.column == value

    def _person_name(self, key: Key, value: str, fuzzy: bool) -> ColumnElement[bool]:
        expr = self.folded(key.column)
        if fuzzy:
            # PS3.18 8.3.4.1 fuzzy matching: any name component starting with the value
            # (case-insensitive); 'smi' finds 'Smith^John' and 'Doe^Smitty'.
            word = like_pattern(value.replace("*", "").replace("?", "")).upper()
            return or_(
                expr.like(word + "%", escape=ESCAPE),
                expr.like("%^" + word + "%", escape=ESCAPE),
                expr.like("% " + word + "%", escape=ESCAPE),
                expr.like("%=" + word + "%", escape=ESCAPE),
            )
        if _has_wildcard(value):
            return _wildcard(expr, value, fold=str.upper)
        return expr == value.upper()

    @staticmethod
    def _modalities(values: Sequence[str]) -> ColumnElement[bool]:
        # ModalitiesInStudy matches a study with a series of any listed modality.
        wanted = [v.upper() for v in values if v]
        if any(_has_wildcard(v) for v in wanted):
            raise QueryError(status.UNABLE_TO_PROCESS, "ModalitiesInStudy: no wild cards")
        return exists(
            select(literal(1)).where(Series.study_pk == Study.id, Series.modality.in_(wanted))
        )


def _parse_date(value: str, key: Key) -> str:
    digits = value.replace("-", "")
    if len(value) == 10 and value[4] == value[7] == "-":  # QIDO also accepts YYYY-MM-DD
        digits = value[:4] + value[5:7] + value[8:]
    if not re.fullmatch(r"\d{8}", digits):
        raise QueryError(status.UNABLE_TO_PROCESS, f"{key.keyword}: not a date YYYYMMDD")
    try:
        date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise QueryError(status.UNABLE_TO_PROCESS, f"{key.keyword}: no such date") from None
    return digits


def _parse_time(value: str, key: Key) -> str:
    text = value.replace(":", "")
    if not re.fullmatch(r"(\d{2})(\d{2}(\d{2}(\.\d{1,6})?)?)?", text):
        raise QueryError(status.UNABLE_TO_PROCESS, f"{key.keyword}: not a time HHMMSS.FFFFFF")
    if int(text[:2]) > 23 or (len(text) >= 4 and int(text[2:4]) > 59):
        raise QueryError(status.UNABLE_TO_PROCESS, f"{key.keyword}: no such time")
    return text


def _with_range_dates(value: str) -> str:
    # QIDO-RS sends ranges with ISO dates ('2020-01-01-2020-12-31'); DIMSE never does.
    match = re.fullmatch(r"(\d{4}-\d{2}-\d{2})?-(\d{4}-\d{2}-\d{2})?", value)
    if match and (match.group(1) or match.group(2)):
        return "-".join((g or "").replace("-", "") for g in match.groups())
    return value


def new_query(
    level: QueryLevelValues | str,
    model: InformationModelValues | str,
    matching: Sequence[tuple[str, str]],
    returning: Sequence[str],
    dialect: str,
    *,
    fuzzy: bool = False,
    strict: bool = True,
) -> Query:
    """Validate keys and values and build a :class:`Query`.

    Parameters
    ----------
    level, model
        The query level and information model.
    matching : sequence of (keyword, value)
        Keys with their values as text (backslash separates multiple values);
        an empty value is universal matching (the key is returned).
    returning : sequence of str
        Further keywords to return.
    dialect : str
        ``sqlite`` or ``postgresql``.
    fuzzy : bool
        QIDO-RS ``fuzzymatching=true`` for PN keys.
    strict : bool
        Refuse a non-empty value for a key the archive cannot match (C-FIND).

    Raises
    ------
    QueryError
        A key below the level, a malformed value, a key the archive cannot match.
    """
    level = QueryLevelValues(level)
    model = InformationModelValues(model)
    matcher = Matcher(dialect)
    query = Query(level, model)
    if model is InformationModelValues.STUDY_ROOT and level is _P:
        raise QueryError(
            status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "PATIENT level not in Study Root"
        )
    seen: set[str] = set()
    for keyword, raw in matching:
        if keyword in IGNORED_KEYS:
            continue
        key = KEYS.get(keyword)
        if key is None:
            if raw.strip() and strict:
                raise QueryError(
                    status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                    f"matching on {keyword[:40]} not supported",
                )
            if keyword not in seen and keyword not in query.empty_keys:
                query.empty_keys.append(keyword)
            continue
        _check_level(key, level, model, bool(raw.strip()))
        if key.kind is _K.DATE or key.kind is _K.TIME:
            raw = _with_range_dates(raw.strip())
        condition = matcher.condition(key, raw, fuzzy=fuzzy)
        if condition is not None:
            query.conditions.append(condition)
        if keyword not in seen:
            seen.add(keyword)
            query.return_keys.append(keyword)
    for keyword in returning:
        key = KEYS.get(keyword)
        if key is None:
            if keyword not in query.empty_keys and keyword not in CONSTANT_KEYS:
                query.empty_keys.append(keyword)
            elif keyword in CONSTANT_KEYS and keyword not in seen:
                seen.add(keyword)
                query.return_keys.append(keyword)
            continue
        if LEVEL_ORDER[key.level] > LEVEL_ORDER[level] or keyword in seen:
            continue
        seen.add(keyword)
        query.return_keys.append(keyword)
    # The unique keys of this level and the levels above always come back (C.4.1.2.1).
    for lvl, keyword in UNIQUE_KEYS.items():
        if LEVEL_ORDER[lvl] <= LEVEL_ORDER[level] and keyword not in seen:
            if model is InformationModelValues.STUDY_ROOT and lvl is _P:
                continue
            seen.add(keyword)
            query.return_keys.append(keyword)
    return query


def parse_identifier(
    identifier: Dataset, model: InformationModelValues | str, dialect: str
) -> Query:
    """A C-FIND/C-MOVE/C-GET request identifier as a :class:`Query`.

    Raises
    ------
    QueryError
        See :func:`new_query`; also for a sequence key with matching items.
    """
    level = level_of(identifier.get("QueryRetrieveLevel", ""))
    matching: list[tuple[str, str]] = []
    for elem in identifier:
        if elem.tag.group == 0x0002 or elem.tag.is_private:
            if elem.tag.is_private and elem.value not in (None, b"", ""):
                raise QueryError(
                    status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "private keys not supported"
                )
            continue
        keyword = elem.keyword or keyword_for_tag(elem.tag) or f"{int(elem.tag):08X}"
        if elem.VR == "SQ":
            # PS3.4 C.2.2.2.6 sequence matching: an empty item asks for the sequence
            # to be returned; the archive indexes no sequence, so it comes back empty.
            items = elem.value or []
            if any(e.value not in (None, "", b"") for item in items for e in item):
                raise QueryError(
                    status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                    f"sequence matching on {keyword[:40]} not supported",
                )
            matching.append((keyword, ""))
            continue
        value = elem.value
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        matching.append((keyword, _text(value)))
    return new_query(level, model, matching, (), dialect)


def statement(query: Query) -> Select[Any]:
    """The SELECT of `query`: one row per match, one column per returned key (by keyword).

    Only the returned attributes are read (no ORM entities): on a C-FIND with
    many matches, building entities costs more than the query.
    """
    level = LEVEL_ORDER[query.level]
    columns = [KEYS[k].column.label(k) for k in query.return_keys if k in KEYS] or [Patient.id]
    stmt = select(*columns)
    if level == 0:
        stmt = stmt.select_from(Patient)
    else:
        stmt = stmt.select_from(Study).join(Patient, Study.patient_pk == Patient.id)
        if level >= 2:
            stmt = stmt.join(Series, Series.study_pk == Study.id)
        if level >= 3:
            stmt = stmt.join(Instance, Instance.series_pk == Series.id)
    if query.conditions:
        stmt = stmt.where(*query.conditions)
    return stmt


def order_by_level(stmt: Select[Any], level: QueryLevelValues) -> Select[Any]:
    """Order matches stably (by the row id of the query level) for paging."""
    column = {_P: Patient.id, _ST: Study.id, _SE: Series.id, _IM: Instance.id}[level]
    return stmt.order_by(column)


def _value(key: Key, row: Any) -> Any:
    return row._mapping[key.keyword]


_SPECIFIC_CHARACTER_SET_TAG = 0x00080005
_QUERY_RETRIEVE_LEVEL_TAG = 0x00080052


def to_dataset(query: Query, row: Any) -> Dataset:
    """One match as an identifier holding exactly the requested keys (PS3.4 C.4.1.1.3.2)."""
    ds = Dataset()
    # Elements by tag and VR: Dataset.__setattr__ looks the keyword up each time,
    # which costs more than the query itself on a many-match C-FIND.
    ds.add_new(_SPECIFIC_CHARACTER_SET_TAG, "CS", SPECIFIC_CHARACTER_SET)
    ds.add_new(_QUERY_RETRIEVE_LEVEL_TAG, "CS", query.level.value)
    for keyword in query.return_keys:
        tag, vr = _tag_vr(keyword)
        if keyword in CONSTANT_KEYS:
            ds.add_new(tag, vr, CONSTANT_KEYS[keyword]())
            continue
        key = KEYS[keyword]
        value = _value(key, row)
        if key.kind is _K.MODALITIES:
            value = [v for v in (value or "").split("\\") if v]
        elif value is None:
            value = None
        elif key.kind in (_K.INTEGER, _K.DERIVED):
            value = str(int(value))
        ds.add_new(tag, vr, value if value not in ("", []) else None)
    for keyword in query.empty_keys:
        tag = tag_for_keyword(keyword)
        if tag is None:
            try:
                tag = int(keyword, 16)
            except ValueError:
                continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        ds.add_new(tag, vr, DicomSequence([]) if vr == "SQ" else None)
    return ds


@functools.cache
def _tag_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag, dictionary_VR(tag)


def run(session: Session, query: Query, *, batch: int = 200) -> Iterator[Dataset]:
    """Execute `query` and yield one identifier per match, fetching rows in batches."""
    stmt = statement(query).execution_options(yield_per=batch)
    for row in session.execute(stmt):
        yield to_dataset(query, row)


def retrieve_statement(query: Query) -> Select[Any]:
    """Path and SOP Instance UID of every instance at or below the matches of `query`."""
    stmt = (
        select(Instance.path, Instance.sop_instance_uid, Instance.transfer_syntax_uid)
        .select_from(Instance)
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .join(Patient, Study.patient_pk == Patient.id)
    )
    if query.conditions:
        stmt = stmt.where(*query.conditions)
    return stmt.order_by(Series.id, Instance.instance_number, Instance.id)
