"""Coded concepts that pydicom's ``codes`` lacks: the one place where they are defined.

Accepts nothing and does nothing: it holds constants. Everything that has a
standard code is taken from :data:`pydicom.sr.codedict.codes` (SNOMED CT,
DICOM, UCUM) where it is used; this module defines only

- the private coding scheme ``99PACSTRIAGE`` for the concepts no standard
  names ("AI finding probability", "Triage priority", its three values, and
  the outcome of an AI analysis), and
- two standard codes missing from pydicom's dictionary (UCUM ``ml`` and
  UMLS ``C0034375`` "Qualitative Evaluations", the TID 1500 container).

Private coding scheme
---------------------
Designator ``99PACSTRIAGE`` (PS3.16 Section 8: private designators begin with
"99"), name "pacs-triage private codes", version "1", responsible
organization "pacs-triage project". Every SR that uses it identifies it in the
Coding Scheme Identification Sequence (0008,0110) (see
:func:`coding_scheme_identification`). Code values and meanings never change
once released; a new meaning gets a new value.

=================  =====================================  ===========================
Code value         Code meaning                           Used as
=================  =====================================  ===========================
``AIPROB``         AI finding probability                 NUM concept, unit UCUM "1"
``TRIAGEPRIO``     Triage priority                        CODE concept
``STAT``           STAT triage priority                   value of Triage priority
``URGENT``         Urgent triage priority                 value of Triage priority
``ROUTINE``        Routine triage priority                value of Triage priority
``AIOUTCOME``      AI analysis outcome                    CODE concept
``AIDONE``         AI analysis completed                  value of AI analysis outcome
``AINOMODEL``      No applicable AI model                 value of AI analysis outcome
``AIFAILED``       AI analysis failed                     value of AI analysis outcome
``AIFAILREASON``   AI analysis failure reason             TEXT concept
=================  =====================================  ===========================

Why private: DICOM defines "Probability" nowhere in a context group for
algorithm outputs (pydicom's dictionary lists DCM 122157 "Probability"
without any CID, and its definition could not be checked offline), and no
standard code exists for a worklist triage priority.

References
----------
PS3.16 Section 8 Coding Schemes,
https://dicom.nema.org/medical/dicom/current/output/chtml/part16/chapter_8.html ;
PS3.3 C.12.1.1.4 Coding Scheme Identification Sequence,
https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_C.12.html ;
PS3.16 TID 1500, https://dicom.nema.org/medical/dicom/current/output/chtml/part16/chapter_A.html
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code

PRIVATE_SCHEME_DESIGNATOR = "99PACSTRIAGE"
PRIVATE_SCHEME_NAME = "pacs-triage private codes"
PRIVATE_SCHEME_VERSION = "1"
PRIVATE_SCHEME_RESPONSIBLE_ORGANIZATION = "pacs-triage project"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME_DESIGNATOR, meaning)


AI_FINDING_PROBABILITY = _private("AIPROB", "AI finding probability")
"""Probability (0 to 1) that a model's finding is present; a NUM with unit UCUM "1"."""

TRIAGE_PRIORITY = _private("TRIAGEPRIO", "Triage priority")
"""How soon a study should be read, as the triage policy decided (concept name)."""

STAT_PRIORITY = _private("STAT", "STAT triage priority")
URGENT_PRIORITY = _private("URGENT", "Urgent triage priority")
ROUTINE_PRIORITY = _private("ROUTINE", "Routine triage priority")

AI_ANALYSIS_OUTCOME = _private("AIOUTCOME", "AI analysis outcome")
"""Whether the AI could analyse the study (concept name)."""
AI_ANALYSIS_COMPLETED = _private("AIDONE", "AI analysis completed")
NO_APPLICABLE_MODEL = _private("AINOMODEL", "No applicable AI model")
AI_ANALYSIS_FAILED = _private("AIFAILED", "AI analysis failed")
AI_ANALYSIS_FAILURE_REASON = _private("AIFAILREASON", "AI analysis failure reason")
"""Why the analysis failed, as text (concept name of a TEXT item)."""

MILLILITER = Code("ml", "UCUM", "milliliter")
"""UCUM millilitre: standard, but absent from pydicom's dictionary."""

QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
"""TID 1500 row "Qualitative Evaluations" container (study-level CODE/TEXT items)."""


def priority_class_code(priority_class: str) -> Code:
    """Return the coded value for a priority class ("STAT", "URGENT" or "ROUTINE").

    Raises
    ------
    ValueError
        If `priority_class` is none of the three classes.
    """
    by_class = {"STAT": STAT_PRIORITY, "URGENT": URGENT_PRIORITY, "ROUTINE": ROUTINE_PRIORITY}
    try:
        return by_class[str(priority_class).upper()]
    except KeyError:
        raise ValueError(
            f"priority_class must be one of {sorted(by_class)}, got {priority_class!r}"
        ) from None


def coding_scheme_identification() -> CodingSchemeIdentificationItem:
    """Return the Coding Scheme Identification Sequence item for ``99PACSTRIAGE``.

    References
    ----------
    PS3.3 C.12.1.1.4, https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_C.12.html
    """
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME_DESIGNATOR,
        name=PRIVATE_SCHEME_NAME,
        version=PRIVATE_SCHEME_VERSION,
        responsible_organization=PRIVATE_SCHEME_RESPONSIBLE_ORGANIZATION,
    )
