"""The core: plain data and pure functions that every other layer builds on.

Formats and their cast thresholds (``formats``, ``casting``), the statistics of one site (``stats``),
a run of recorded steps (``run``), non-finite events and anomaly records (``events``), errors. Nothing
here imports any other part of mpdiag.
"""
