"""Lightning under its older package name, ``pytorch_lightning``: ``pytorch_lightning.Trainer(...,
callbacks=[MpdiagCallback()])``. The same callback as ``mpdiag.integrations.lightning``'s."""

from __future__ import annotations

from mpdiag.integrations._lightning import DOC, LightningHooks

try:
    from pytorch_lightning import Callback
except ImportError as error:  # pragma: no cover - exercised in a process without pytorch_lightning
    raise ImportError(
        f"mpdiag.integrations.pytorch_lightning needs the pytorch_lightning package ({error}); install it with "
        f"pip install pytorch_lightning, or use mpdiag.integrations.lightning with the lightning package"
    ) from error

__all__ = ["MpdiagCallback"]


class MpdiagCallback(LightningHooks, Callback):
    __doc__ = DOC
