"""The loss scale a GradScaler applied in the step being recorded, without a host read in the hooks."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["LossScaleSnapshot"]


class LossScaleSnapshot:
    """The loss scale a GradScaler used in the current step, captured without a host read.

    The scale is copied on its device when the step's first gradient arrives (the GradScaler has scaled
    the loss by then, and has not yet updated the scale for the next step); the host reads the copy
    when the step closes. ``GradScaler._scale`` is private, so a scaler without it is read with
    ``get_scale()`` at the close instead (right for every step but one the scaler skipped).
    """

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler
        self._copy: torch.Tensor | None = None
        self._version: int | None = None

    def take(self) -> None:
        scale = getattr(self.scaler, "_scale", None)
        if self._copy is None and isinstance(scale, torch.Tensor):
            self._copy = scale.detach().clone()
            self._version = scale._version

    def updated_since_taken(self) -> bool:
        """Whether ``scaler.update()`` ran since ``take()``: it rewrites the scale in place, which bumps
        the tensor's version counter (read on the host: no device sync). A step the scaler skipped has
        no ``optimizer.step()`` to close it, but it always has this update."""
        scale = getattr(self.scaler, "_scale", None)
        return self._version is not None and isinstance(scale, torch.Tensor) and scale._version != self._version

    def read(self) -> float | None:
        if not self.scaler.is_enabled():
            return None
        return float(self._copy) if self._copy is not None else float(self.scaler.get_scale())

    def clear(self) -> None:
        self._copy = None
        self._version = None
