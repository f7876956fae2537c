"""Probes: re-running a batch on a live model (loss-scale replay, tracing the first NaN/inf).

A probe's own forward and backward are not training: it pauses any attached recording with
``mpdiag.record.recording.paused``."""
