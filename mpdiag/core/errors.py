"""mpdiag's exceptions: one root, ``MpdiagError``, so callers can catch everything mpdiag raises."""

from __future__ import annotations

__all__ = ["MpdiagError", "MpdiagWarning", "UnknownFormatError", "UnknownSiteError", "AttachError"]


class MpdiagError(RuntimeError):
    """Root of every error mpdiag raises on purpose."""


class UnknownFormatError(MpdiagError, ValueError):
    """A numeric format name, alias or dtype that mpdiag does not know."""


class UnknownSiteError(MpdiagError, KeyError):
    """A (name, kind) site that a Run did not record."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AttachError(MpdiagError, TypeError):
    """diagnose() was given something it cannot observe."""


class MpdiagWarning(UserWarning):
    """A result mpdiag computed is approximate or may mislead, or training produced something to look at."""
