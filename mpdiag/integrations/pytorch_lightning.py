"""Lightning under its older package name, ``pytorch_lightning``: ``pytorch_lightning.Trainer(...,
callbacks=[MpdiagCallback()])``. The same callback as ``mpdiag.integrations.lightning``'s."""

from __future__ import annotations

from mpdiag.integrations._lightning import DOC, LightningHooks
from mpdiag.integrations._session import missing

try:
    from pytorch_lightning import Callback
except ImportError as error:  # pragma: no cover - exercised in a process without it
    raise missing(
        "pytorch_lightning", __name__, "pip install pytorch_lightning, or use mpdiag.integrations.lightning", error
    ) from error

__all__ = ["MpdiagCallback"]


class MpdiagCallback(LightningHooks, Callback):
    __doc__ = DOC
