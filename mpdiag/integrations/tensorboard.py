"""TensorBoard: every recorded step as scalars and histograms, live while training runs or after it.

``TensorBoard(log_dir)`` is a sink (``mpdiag.record.sinks.Sink``): give it to ``diagnose(...,
sinks=[...])`` and each step is written as it closes, from the statistics the step close has already
read to the host (no further device read). ``to_tensorboard(run, log_dir)`` writes a whole Run, a run
file's included, with the same tags and steps. The writer is the one torch ships
(``torch.utils.tensorboard``), which needs the ``tensorboard`` package (``pip install
'mpdiag[tensorboard]'``).

Tags group as TensorBoard's UI groups them, by their first component:

- ``{format}/{kind}/{site}/underflow``, ``.../subnormal``: the share of the site's non-zero finite
  values that a cast to the format flushes to zero, or leaves subnormal;
- ``{format}/{kind}/{site}/overflow``: the share of its finite values at or past the format's overflow
  threshold;
- ``range/{kind}/{site}/log2_amax`` and ``.../log2_amin_nonzero``: log2 of the largest and of the
  smallest non-zero finite magnitude (left out while the site held no such value);
- ``nonfinite/{kind}/{site}/nan`` and ``.../inf``: how many NaN and inf values it held;
- ``log2_magnitude/{kind}/{site}``: the histogram of log2|x| at power-of-two resolution (mpdiag's own
  bins, exact); TensorBoard needs a sum and a sum of squares too, which are those of the bins' centres;
- ``loss_scale``: the GradScaler's scale of the step, when one was followed;
- text ``nonfinite`` (the step's NaN/inf events, first seen first) and ``environment``.

``kind`` is activation, activation_grad, param or param_grad; ``site`` is the module or parameter name
(the root module's is ``_root``). Gradients are as recorded: under a GradScaler they are scaled, by
the ``loss_scale`` of the same step.

Example:
    >>> import torch, mpdiag
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> with mpdiag.diagnose(model, formats="fp16") as diag:
    ...     model(torch.randn(2, 4)).sum().backward()
    >>> sorted(t for t in scalar_values(diag.run, 0) if t.startswith("fp16/param_grad/0.bias/"))
    ['fp16/param_grad/0.bias/overflow', 'fp16/param_grad/0.bias/subnormal', 'fp16/param_grad/0.bias/underflow']
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mpdiag.core.events import AnomalyRecord, NonFiniteEvent
from mpdiag.core.run import Run, Site
from mpdiag.core.stats import HIST_EXPONENTS, TensorStats

__all__ = ["TensorBoard", "to_tensorboard", "scalar_values", "tag_of", "ROOT_TAG"]

#: The root module's name in tags (its own name is empty, which a tag component cannot be).
ROOT_TAG = "_root"


def tag_of(group: str, site: Site, metric: str | None = None) -> str:
    """The tag of one of a site's values: ``group/kind/site[/metric]``."""
    parts = [group, site.kind.value, site.name or ROOT_TAG]
    return "/".join(parts if metric is None else [*parts, metric])


def _site_scalars(site: Site, stats: TensorStats) -> dict[str, float]:
    values: dict[str, float] = {
        tag_of("nonfinite", site, "nan"): float(stats.nans),
        tag_of("nonfinite", site, "inf"): float(stats.posinf + stats.neginf),
    }
    if stats.finite_nonzero:
        values[tag_of("range", site, "log2_amax")] = math.log2(stats.amax)
        values[tag_of("range", site, "log2_amin_nonzero")] = math.log2(stats.amin_nonzero)
        for fmt in stats.formats:
            values[tag_of(fmt, site, "underflow")] = stats.underflow(fmt) / stats.finite_nonzero
            values[tag_of(fmt, site, "subnormal")] = stats.subnormal(fmt) / stats.finite_nonzero
    if stats.finite:
        for fmt in stats.formats:
            values[tag_of(fmt, site, "overflow")] = stats.overflow(fmt) / stats.finite
    return values


def scalar_values(run: Run, step: int) -> dict[str, float]:
    """Every scalar written for ``step`` of ``run``, by tag (what TensorBoard shows at that step)."""
    return _scalars(run.records[step], run.loss_scales.get(step))


def _scalars(stats: Mapping[Site, TensorStats], loss_scale: float | None) -> dict[str, float]:
    values: dict[str, float] = {}
    for site in sorted(stats):
        values.update(_site_scalars(site, stats[site]))
    if loss_scale is not None:
        values["loss_scale"] = float(loss_scale)
    return values


def _histogram(stats: TensorStats) -> dict[str, Any] | None:
    """``add_histogram_raw``'s arguments for the log2|x| histogram: one bucket per power of two, bucket i
    covering [e_i, e_i + 1) (TensorBoard gives each bucket its right edge; the first starts at min)."""
    nonzero = np.flatnonzero(stats.hist)
    if not len(nonzero):
        return None
    lo, hi = int(nonzero[0]), int(nonzero[-1])
    counts = stats.hist[lo : hi + 1].astype(np.float64)
    exponents = HIST_EXPONENTS[lo : hi + 1].astype(np.float64)
    centres = exponents + 0.5
    # fp64 values beyond fp32's range are counted in the end bins: keep min and max inside the buckets
    low, high = float(exponents[0]), float(exponents[-1] + 1)
    return {
        "min": min(max(math.log2(stats.amin_nonzero), low), high),
        "max": max(min(math.log2(stats.amax), high), low),
        "num": float(counts.sum()),
        "sum": float((counts * centres).sum()),
        "sum_squares": float((counts * centres**2).sum()),
        "bucket_limits": (exponents + 1).tolist(),
        "bucket_counts": counts.tolist(),
    }


def _nonfinite_text(events: tuple[NonFiniteEvent, ...]) -> str:
    return "\n".join(f"- {event}" for event in events)


class TensorBoard:
    """A sink that writes each recorded step to TensorBoard event files in ``log_dir`` as it closes.

    Args:
        log_dir: the directory TensorBoard reads (``tensorboard --logdir``); created if needed.
        flush_secs: at most this long between a step's close and its values on disk (TensorBoard reads
            what is on disk, so this is how live the view is); every step is on disk at ``close``.
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, flush_secs: float = 5.0) -> None:
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self._writer: Any = None
        self._created: list[Path] = []  # what open() made, for discard
        self._last_flush = 0.0

    def __repr__(self) -> str:
        return f"TensorBoard({str(self.log_dir)!r})"

    # -- the Sink protocol ---------------------------------------------------------------------------
    def open(self, formats: tuple[str, ...], meta: Mapping[str, Any]) -> None:
        writer_class = _summary_writer()
        made_dir = not self.log_dir.exists()
        before = set(self.log_dir.iterdir()) if not made_dir else set()
        self._writer = writer_class(str(self.log_dir))
        self._created = sorted(set(self.log_dir.iterdir()) - before) + ([self.log_dir] if made_dir else [])
        self._writer.add_text("environment", _environment_text(formats, meta), global_step=0)

    def write_step(
        self,
        step: int,
        stats: Mapping[Site, TensorStats],
        events: tuple[NonFiniteEvent, ...],
        loss_scale: float | None,
        meta: Mapping[str, Any],
    ) -> None:
        _write(self._writer, step, stats, events, loss_scale)
        if time.monotonic() - self._last_flush >= self.flush_secs:
            self._writer.flush()
            self._last_flush = time.monotonic()

    def write_anomaly(self, record: AnomalyRecord) -> None:
        where = f" in module {record.module!r}" if record.module is not None else ""
        self._writer.add_text("anomaly", f"{record.message}{where} (autograd node {record.node})", record.step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def discard(self) -> None:
        self.close()
        for path in self._created:  # its files first, then the directory if open() made it
            if path.is_dir():
                if not any(path.iterdir()):
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)
        self._created = []


def _write(
    writer: Any,
    step: int,
    stats: Mapping[Site, TensorStats],
    events: tuple[NonFiniteEvent, ...],
    loss_scale: float | None,
) -> None:
    """One step into ``writer``: its scalars as one event (one record, not one per value), then one
    histogram per site and the text of its non-finite events."""
    summary_module = _summary_module()
    values = [v for tag, x in _scalars(stats, loss_scale).items() for v in summary_module.scalar(tag, x).value]
    writer.file_writer.add_summary(summary_module.Summary(value=values), step)
    for site in sorted(stats):
        histogram = _histogram(stats[site])
        if histogram is not None:
            writer.add_histogram_raw(tag_of("log2_magnitude", site), global_step=step, **histogram)
    if events:
        writer.add_text("nonfinite", _nonfinite_text(events), global_step=step)


def to_tensorboard(run: Run, log_dir: str | os.PathLike[str]) -> Path:
    """Write every recorded step of ``run`` to TensorBoard event files in ``log_dir`` (the same tags and
    steps as the live ``TensorBoard`` sink writes); returns ``log_dir``."""
    sink = TensorBoard(log_dir)
    sink.open(run.formats, run.meta)
    try:
        for step in run.steps:
            _write(sink._writer, step, run.records[step], run.events.get(step, ()), run.loss_scales.get(step))
        for record in run.anomalies:
            sink.write_anomaly(record)
    finally:
        sink.close()
    return sink.log_dir


def _environment_text(formats: tuple[str, ...], meta: Mapping[str, Any]) -> str:
    facts = {"formats": list(formats), **meta}
    return "```\n" + json.dumps(facts, indent=2, default=str, sort_keys=True) + "\n```"


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch's writer needs the tensorboard package
        raise ImportError(
            f"writing TensorBoard logs needs the tensorboard package ({error}); "
            f"install it with pip install 'mpdiag[tensorboard]'"
        ) from error
    return SummaryWriter


def _summary_module() -> Any:
    _summary_writer()  # the same clear error when tensorboard is missing
    from torch.utils.tensorboard import summary

    return summary
