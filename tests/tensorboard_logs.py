"""Reading TensorBoard event files back with TensorBoard's own reader, for the tests of the logs."""

from __future__ import annotations

from pathlib import Path

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
        "scalars": {t: {e.step: e.value for e in reader.Scalars(t)} for t in tags["scalars"]},
        "histograms": {t: {e.step: e.histogram_value for e in reader.Histograms(t)} for t in tags["histograms"]},
        "texts": {
            t: {e.step: e.tensor_proto.string_val[0].decode() for e in reader.Tensors(t)} for t in tags["tensors"]
        },
    }
