"""Analysis: pure functions from a Run to plain results (loss-scale advice, the GradScaler replay,
verdicts, the riskiest sites). Imports ``mpdiag.core`` only."""
