"""Lightning (``lightning.pytorch``): ``Trainer(..., callbacks=[MpdiagCallback()])``.

See ``MpdiagCallback``; ``mpdiag.integrations.pytorch_lightning`` has the same callback for the older
``pytorch_lightning`` package name.
"""

from __future__ import annotations

from mpdiag.integrations._lightning import DOC, LightningHooks
from mpdiag.integrations._session import missing

try:
    from lightning.pytorch import Callback
except ImportError as error:  # pragma: no cover - exercised in a process without it
    raise missing("lightning", __name__, "pip install 'mpdiag[lightning]'", error) from error

__all__ = ["MpdiagCallback"]


class MpdiagCallback(LightningHooks, Callback):
    __doc__ = DOC
