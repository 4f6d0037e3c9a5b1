"""Domain logic of pacs-triage, with no framework in it.

``volume`` (series -> Volume), ``selection`` (which models apply), ``findings``
(what models report), ``priority`` (findings + order -> priority, worklist
aging), ``report`` (TID 1500 SR), ``keyimage`` (Secondary Capture),
``render`` (window/level, thumbnails), ``codes`` (private codes), ``uids``.
Nothing here touches the network or the disk.
"""
