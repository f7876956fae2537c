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
- ``{format}/update/{param}/stalled``: the share of the parameter's changed elements that a weight
  stored in the format would have lost in the step (``mpdiag.core.updates.UpdateStats``);
- ``optimizer/update/{param}/changed``, ``.../lost`` and ``.../eps_dominated``: the share of its elements
  the step changed, the share of those with a non-zero gradient that its own dtype left unchanged, and
  the share where Adam's eps dominated the denominator (when each is known);
- ``log2_update_ratio/{param}``: the histogram of log2(|update| / |weight|), one bucket per power of two;
- text ``nonfinite`` (the step's NaN/inf events, first seen first) and ``environment``.

``kind`` is activation, activation_grad, param, param_grad, optimizer_state or update; ``site`` is the
module or parameter name (the root module's is ``_root``). Gradients are as recorded: under a GradScaler
they are scaled, by the ``loss_scale`` of the same step.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mpdiag.core.errors import MpdiagError
from mpdiag.core.events import AnomalyRecord, NonFiniteEvent
from mpdiag.core.run import Run, Site
from mpdiag.core.stats import HIST_EXPONENTS, TensorStats
from mpdiag.core.updates import RATIO_BINS, RATIO_LOW, UpdateStats

__all__ = ["TensorBoard", "to_tensorboard", "scalar_values", "tag_of", "ROOT_TAG"]

#: The root module's name in tags (its own name is empty, which a tag component cannot be).
ROOT_TAG = "_root"


def tag_of(group: str, site: Site, metric: str | None = None) -> str:
    """The tag of one of a site's values: ``group/kind/site[/metric]``."""
    parts = [group, site.kind.value, site.name or ROOT_TAG]
    return "/".join(parts if metric is None else [*parts, metric])


def _site_scalars(site: Site, stats: TensorStats) -> dict[str, float]:
    where = f"{site.kind.value}/{site.name or ROOT_TAG}"  # tag_of's, built once per site: this runs per step
    values: dict[str, float] = {
        f"nonfinite/{where}/nan": float(stats.nans),
        f"nonfinite/{where}/inf": float(stats.posinf + stats.neginf),
    }
    nonzero, finite = stats.finite_nonzero, stats.finite
    if nonzero:
        values[f"range/{where}/log2_amax"] = math.log2(stats.amax)
        values[f"range/{where}/log2_amin_nonzero"] = math.log2(stats.amin_nonzero)
        # casts: one row per tracked format, columns underflow, subnormal, overflow
        for fmt, (underflow, subnormal) in zip(stats.formats, (stats.casts[:, :2] / nonzero).tolist()):
            values[f"{fmt}/{where}/underflow"] = underflow
            values[f"{fmt}/{where}/subnormal"] = subnormal
    if finite:
        for fmt, overflow in zip(stats.formats, (stats.casts[:, 2] / finite).tolist()):
            values[f"{fmt}/{where}/overflow"] = overflow
    return values


def _update_scalars(update: UpdateStats) -> dict[str, float]:
    values = {f"{fmt}/update/{update.param}/stalled": update.stalled_share(fmt) for fmt in update.stalled}
    shares = {"changed": update.nonzero / update.numel if update.numel else 0.0, "lost": update.lost_share}
    shares["eps_dominated"] = update.eps_share
    values.update({f"optimizer/update/{update.param}/{k}": v for k, v in shares.items() if v is not None})
    return values


def scalar_values(run: Run, step: int) -> dict[str, float]:
    """Every scalar written for ``step`` of ``run``, by tag (what TensorBoard shows at that step)."""
    values: dict[str, float] = {}
    for site, stats in sorted(run.records[step].items()):
        values.update(_site_scalars(site, stats))
    for _, update in sorted(run.updates.get(step, {}).items()):
        values.update(_update_scalars(update))
    if step in run.loss_scales:
        values["loss_scale"] = float(run.loss_scales[step])
    return values


def _ratio_histogram(update: UpdateStats) -> dict[str, Any] | None:
    """The HistogramProto fields of the log2(|update| / |weight|) histogram (as ``_histogram``'s)."""
    exponents = np.arange(RATIO_LOW, RATIO_LOW + RATIO_BINS, dtype=np.float64)
    return _log2_buckets(np.asarray(update.ratio_counts, dtype=np.int64), exponents)


def _histogram(stats: TensorStats) -> dict[str, Any] | None:
    """The HistogramProto fields of the log2|x| histogram (``_log2_buckets``), with the site's extremes."""
    if not stats.finite_nonzero:
        return None
    return _log2_buckets(stats.hist, HIST_EXPONENTS, math.log2(stats.amin_nonzero), math.log2(stats.amax))


def _log2_buckets(
    counts: np.ndarray, exponents: np.ndarray, lowest: float | None = None, highest: float | None = None
) -> dict[str, Any] | None:
    """The HistogramProto fields of ``counts`` per power of two, bucket i covering [exponents[i],
    exponents[i] + 1) (TensorBoard gives each bucket its right edge; the first starts at min), from the
    first non-empty bucket to the last; None when all are empty. ``lowest`` and ``highest`` (log2 of the
    extremes) give min and max, kept inside those buckets (fp64 values beyond fp32's range are counted
    in the end bins); without them, the buckets' own edges."""
    nonzero = np.flatnonzero(counts)
    if not nonzero.size:
        return None
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    span, edges = counts[lo:hi], exponents[lo:hi]
    centres = edges + 0.5
    low, high = float(edges[0]), float(edges[-1] + 1)
    return {
        "min": low if lowest is None else min(max(lowest, low), high),
        "max": high if highest is None else max(min(highest, high), low),
        "num": float(span.sum()),  # every value counted (for a site: every finite non-zero one)
        "sum": float(span @ centres),
        "sum_squares": float(span @ (centres * centres)),
        "bucket_limit": (edges + 1).tolist(),
        "bucket": span.tolist(),
    }


def _nonfinite_text(events: tuple[NonFiniteEvent, ...]) -> str:
    return "\n".join(f"- {event}" for event in events)


class TensorBoard:
    """A sink that writes each recorded step to TensorBoard event files in ``log_dir`` as it closes.

    Args:
        log_dir: the directory TensorBoard reads (``tensorboard --logdir``); created if needed.
        flush_secs: at most this long between a step's close and its values on disk (TensorBoard reads
            what is on disk, so this is how live the view is); everything is on disk at ``close``.
        purge_step: for a training that restarts at this step into a directory that already holds its
            earlier logs (resumed from a checkpoint): TensorBoard hides their events from this step on,
            so that no step shows twice (``SummaryWriter``'s ``purge_step``).
    """

    def __init__(
        self, log_dir: str | os.PathLike[str], *, flush_secs: float = 5.0, purge_step: int | None = None
    ) -> None:
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self.purge_step = purge_step
        self._writer: Any = None
        self._protos: tuple[Any, Any] = (None, None)  # TensorBoard's Event and HistogramProto, once opened
        self._created: list[Path] = []  # what open() made, for discard
        self._updates: dict[str, UpdateStats] = {}  # the step's, written in its write_step's event

    def __repr__(self) -> str:
        return f"TensorBoard({str(self.log_dir)!r})"

    # -- the Sink protocol ---------------------------------------------------------------------------
    def open(self, formats: tuple[str, ...], meta: Mapping[str, Any]) -> None:
        writer_class = _summary_writer()
        from tensorboard.compat.proto import event_pb2, summary_pb2  # what torch's writer writes

        self._protos = (event_pb2.Event, summary_pb2.HistogramProto)
        made_dir = not self.log_dir.exists()
        before = set(self.log_dir.iterdir()) if not made_dir else set()
        self._writer = writer_class(str(self.log_dir), flush_secs=self.flush_secs, purge_step=self.purge_step)
        self._created = sorted(set(self.log_dir.iterdir()) - before) + ([self.log_dir] if made_dir else [])
        self._writer.add_text("environment", _environment_text(formats, meta), global_step=self.purge_step or 0)

    def write_step(
        self,
        step: int,
        stats: Mapping[Site, TensorStats],
        events: tuple[NonFiniteEvent, ...],
        loss_scale: float | None,
        meta: Mapping[str, Any],
    ) -> None:
        # One event holds every scalar and histogram of the step, built in place: the writer hands each
        # event to its own thread through a short queue (one event per value would wait on it), and
        # copying protos costs more than making them. The writer's thread flushes every flush_secs.
        event_class, histogram_class = self._protos
        event = event_class()
        add = event.summary.value.add
        for site in sorted(stats):
            for tag, value in _site_scalars(site, stats[site]).items():
                add(tag=tag, simple_value=value)
            histogram = _histogram(stats[site])
            if histogram is not None:
                add(tag=tag_of("log2_magnitude", site), histo=histogram_class(**histogram))
        updates, self._updates = self._updates, {}
        for name in sorted(updates):
            for tag, value in _update_scalars(updates[name]).items():
                add(tag=tag, simple_value=value)
            ratios = _ratio_histogram(updates[name])
            if ratios is not None:
                add(tag=f"log2_update_ratio/{name}", histo=histogram_class(**ratios))
        if loss_scale is not None:
            add(tag="loss_scale", simple_value=float(loss_scale))
        self._writer.file_writer.add_event(event, step=step)
        if events:
            self._writer.add_text("nonfinite", _nonfinite_text(events), global_step=step)

    def write_updates(self, step: int, updates: Mapping[str, UpdateStats]) -> None:
        self._updates = dict(updates)  # the step's write_step follows: one event holds the step

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


def to_tensorboard(run: Run, log_dir: str | os.PathLike[str]) -> Path:
    """Write every recorded step of ``run`` to TensorBoard event files in ``log_dir`` (the same tags and
    steps as the live ``TensorBoard`` sink writes); returns ``log_dir``. A directory that already holds
    event files is refused: TensorBoard would merge them with these."""
    held = sorted(Path(log_dir).glob("events.out.tfevents.*")) if Path(log_dir).is_dir() else []
    if held:
        raise MpdiagError(
            f"{log_dir} already holds TensorBoard event files ({held[0].name}, ...): TensorBoard would show "
            f"every step twice; write into a new directory, or delete those files first"
        )
    sink = TensorBoard(log_dir)
    sink.open(run.formats, run.meta)
    try:
        for step in run.steps:
            if step in run.updates:
                sink.write_updates(step, run.updates[step])
            sink.write_step(step, run.records[step], run.events.get(step, ()), run.loss_scales.get(step), run.meta)
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
    _use_compiled_checksum()
    return SummaryWriter


def _use_compiled_checksum() -> None:
    """Without TensorFlow, tensorboard's record writer checksums every event it writes with a CRC32C in
    pure Python, on its writer thread: about 60 ms of CPU for one step of 200 sites here, competing with
    training for the interpreter. When google-crc32c is installed (``mpdiag[tensorboard]`` installs it),
    the same masked checksum (TFRecord's: the CRC rotated by 15 bits plus a constant) is computed in C.
    Every byte written is the same (a test compares both on random data)."""
    try:
        import google_crc32c
    except ImportError:
        return
    if google_crc32c.implementation != "c":  # its pure-Python fallback is no faster
        return
    from tensorboard.summary.writer import record_writer

    if getattr(record_writer.masked_crc32c, "_compiled", False):
        return

    def masked_crc32c(data: bytes) -> int:
        crc = google_crc32c.value(bytes(data))
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    masked_crc32c._compiled = True  # type: ignore[attr-defined]
    record_writer.masked_crc32c = masked_crc32c
