"""The radiologists' worklist: ordering, reading states, feedback, quality, the web page.

:mod:`archive.worklist.service` holds the logic over the index;
:mod:`archive.worklist.api` the HTTP routes (``/api/worklist``, ``/worklist``)
that :func:`archive.http.create_app` includes.
"""
