"""Validation and deterministic derivation of DICOM Unique Identifiers.

Accepts any string and says whether it is a syntactically valid UID; derives
stable UIDs for the objects pacs-triage writes from their identity (so a
retried store does not create a second copy). Never touches the file system.
The archive validates every UID here before using it in a path or a query, so
a UID can never name a file outside its directory.
"""

from __future__ import annotations

import re

from pydicom.uid import generate_uid

# PS3.5 9.1: components of digits separated by ".", at most 64 characters.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_LENGTH = 64


class InvalidUIDError(ValueError):
    """A value is not a valid UID (PS3.5 Section 9.1)."""


def validate_uid(value: object, keyword: str = "UID") -> str:
    """Return `value` as a UID string, or raise if it is not a valid UID.

    Leading zeros inside components (a frequent deviation in modality data) are
    tolerated; characters other than digits and dots, empty components and
    values longer than 64 characters are not.

    Parameters
    ----------
    value : object
        The candidate UID (a ``str`` or pydicom ``UID``).
    keyword : str
        The attribute keyword, used in the error message.

    Returns
    -------
    str
        The UID, stripped of the trailing NUL padding that UI values may carry.

    Raises
    ------
    InvalidUIDError
        If `value` is missing, too long or contains characters other than digits and dots.

    References
    ----------
    PS3.5 Section 9.1, https://dicom.nema.org/medical/dicom/current/output/chtml/part05/chapter_9.html
    """
    if value is None:
        raise InvalidUIDError(f"{keyword} is missing")
    uid = str(value).rstrip("\x00").strip()
    if not uid:
        raise InvalidUIDError(f"{keyword} is empty")
    if len(uid) > UID_MAX_LENGTH:
        raise InvalidUIDError(f"{keyword} is longer than {UID_MAX_LENGTH} characters")
    if not _UID_RE.match(uid):
        raise InvalidUIDError(f"{keyword} contains characters other than digits and dots")
    return uid


def is_valid_uid(value: object) -> bool:
    """Return True if `value` is a valid UID (see :func:`validate_uid`)."""
    try:
        validate_uid(value)
    except InvalidUIDError:
        return False
    return True


def deterministic_uid(*parts: object) -> str:
    """Return a UID that depends only on `parts`: the same parts give the same UID.

    Used for every object pacs-triage writes (SR, key image), with parts such
    as (Study Instance UID, model name, model version, analysis generation),
    so that storing the same result twice names the same instance and the
    archive keeps one copy rather than two.

    Parameters
    ----------
    *parts : object
        The identity of the object; each part is turned into text. At least one.

    Returns
    -------
    str
        A UID under pydicom's root (1.2.826.0.1.3680043.8.498.), derived from a
        SHA-512 hash of the parts, at most 64 characters.

    Raises
    ------
    ValueError
        If no parts are given.

    References
    ----------
    PS3.5 Section 9 and Annex B (UIDs from a hash),
    https://dicom.nema.org/medical/dicom/current/output/chtml/part05/chapter_B.html
    """
    if not parts:
        raise ValueError("deterministic_uid needs at least one part")
    # The separator keeps ("1.2", "3") and ("1.23",) apart.
    entropy = ["pacs-triage", *(f"{len(str(p))}:{p}" for p in parts)]
    return str(generate_uid(entropy_srcs=entropy))
