"""Analysis: pure functions from a Run to plain results (loss-scale advice, the GradScaler replay,
verdicts, the riskiest sites), and ``analyse``, which gathers them for the renderers. Imports
``mpdiag.core`` only."""

from mpdiag.analysis.overall import Analysis, analyse

__all__ = ["Analysis", "analyse"]
