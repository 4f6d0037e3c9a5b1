"""Named DIMSE status codes returned by the archive's service handlers.

Handlers never return bare hex; each constant cites the section that defines it.
Codes written ``Cxxx``/``A7xx``/``A9xx`` in the standard leave the low bits to
the implementation: we use them to say precisely what went wrong, and always
send an Error Comment (0000,0902) beside them.
"""

from __future__ import annotations

# PS3.7 C.1.1 / PS3.4 B.2.3 (Storage Service Class, C-STORE statuses)
SUCCESS = 0x0000

# PS3.4 B.2.3: "Warning: Elements Discarded". Used when a second copy of a stored
# SOP Instance arrives with other bytes and the first copy is kept.
WARNING_ELEMENTS_DISCARDED = 0xB006

# PS3.4 B.2.3: "Refused: Out of Resources" (A7xx). Disk or index unavailable.
OUT_OF_RESOURCES = 0xA700

# PS3.4 B.2.3: "Error: Data Set does not match SOP Class" (A9xx).
# A Type 1 attribute the archive needs is missing.
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900

# PS3.4 B.2.3: "Error: Cannot understand" (Cxxx).
CANNOT_UNDERSTAND = 0xC000
"""The data set could not be decoded (truncated, malformed)."""
CANNOT_UNDERSTAND_INVALID_UID = 0xC001
"""A UID is not valid per PS3.5 9.1 (characters other than digits and dots, > 64 chars)."""
CANNOT_UNDERSTAND_UID_MISMATCH = 0xC002
"""SOP Class/Instance UID of the data set disagree with the command set
(Affected SOP Class UID (0000,0002) / Affected SOP Instance UID (0000,1000))."""

# PS3.7 C.4.1.1.4 / PS3.4 C.4.1.1.4 (Query/Retrieve)
PENDING = 0xFF00
PENDING_WARNING = 0xFF01
CANCEL = 0xFE00
SUB_OPERATIONS_COMPLETE_WITH_FAILURES = 0xB000
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000
