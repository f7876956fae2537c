"""Reading TensorBoard event files back with TensorBoard's own reader, for the tests of the logs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_logs(log_dir: Path) -> dict[str, dict]:
    """Everything in ``log_dir``'s event files, by TensorBoard's own reader: scalars, histograms and texts
    as {tag: {step: value}}."""
    reader = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    )
    reader.Reload()
    tags = reader.Tags()
    return {
        "scalars": {t: _by_step(t, reader.Scalars(t), lambda e: e.value) for t in tags["scalars"]},
        "histograms": {t: _by_step(t, reader.Histograms(t), lambda e: e.histogram_value) for t in tags["histograms"]},
        "texts": {
            t: _by_step(t, reader.Tensors(t), lambda e: e.tensor_proto.string_val[0].decode()) for t in tags["tensors"]
        },
    }


def _by_step(tag: str, events: list, value: Callable[[Any], Any]) -> dict[int, Any]:
    """{step: value}; a step TensorBoard shows twice (two writers of one step) fails the test."""
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"{tag}: TensorBoard shows steps {steps}"
    return {e.step: value(e) for e in events}
