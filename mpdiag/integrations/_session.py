"""What the trainer callbacks share: their options, one recording per training, and its end.

A trainer calls its callbacks at moments that differ from library to library; each callback turns them
into the same four calls: ``attach`` when training begins (the trainer has prepared the model and the
optimizer), ``begin`` when a step begins (numbered as the trainer numbers it), ``finish`` when training
ends, and ``finish(error)`` when it raised.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpdiag.core.errors import AttachError, MpdiagError
from mpdiag.core.run import Run
from mpdiag.core.stats import format_names
from mpdiag.integrations.tensorboard import TensorBoard
from mpdiag.io.runfile import RunFileError, RunFileSink
from mpdiag.record.recording import Recording, check_options
from mpdiag.record.sinks import Sink
from mpdiag.render import Report, report

__all__ = ["TrainingSession", "OPTIONS"]

log = logging.getLogger(__name__)

#: What a trainer callback takes: diagnose's own options, and where to write the report and TensorBoard logs.
OPTIONS = ("formats", "every", "include", "exclude", "on_nonfinite", "run_file", "report_dir", "tensorboard")


class TrainingSession:
    """One callback's recordings: a Recording from ``attach`` to ``finish``, then its Run and report."""

    def __init__(self, owner: str, options: dict[str, Any]) -> None:
        self._owner = owner
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise MpdiagError(f"{owner} got unknown option(s) {', '.join(unknown)}; it takes {', '.join(OPTIONS)}")
        options = dict(options)
        self.report_dir: str | os.PathLike[str] | None = options.pop("report_dir", None)
        self.tensorboard: str | os.PathLike[str] | None = options.pop("tensorboard", None)
        self.run_file: str | os.PathLike[str] | None = options.pop("run_file", None)
        # a bad option fails here, when the callback is made, not after the trainer has set everything up
        if "formats" in options:
            format_names(options["formats"])
        check_options(**{k: v for k, v in options.items() if k in ("every", "on_nonfinite", "include", "exclude")})
        if self.run_file is not None and Path(self.run_file).exists():
            raise RunFileError(f"run file {self.run_file} already exists; choose a new path or delete it first")
        self._options = options
        self.diagnosis: Recording | None = None
        self._run: Run | None = None
        self.report: Report | None = None

    @property
    def run(self) -> Run | None:
        """Everything recorded: a snapshot while training runs, the whole run once it ended."""
        return self.diagnosis.run if self.diagnosis is not None else self._run

    def attach(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scaler: torch.amp.GradScaler | None,
        first_step: int,
    ) -> None:
        if self.diagnosis is not None:  # an earlier training raised where no callback saw it end
            self.finish(MpdiagError("training began again before the last one ended"))
        sinks: list[Sink] = []
        if self.run_file is not None:
            sinks.append(RunFileSink(self.run_file))
        if self.tensorboard is not None:
            sinks.append(TensorBoard(self.tensorboard))
        try:
            self.diagnosis = Recording(model, optimizer=optimizer, scaler=scaler, sinks=sinks, **self._options)
        except AttachError as error:
            raise AttachError(
                f"{self._owner} could not attach: {error} (two mpdiag callbacks on one trainer, or a "
                f"diagnose() still attached to its model, would do this)"
            ) from error
        self.diagnosis.begin_step(first_step)

    def begin(self, index: int) -> None:
        if self.diagnosis is not None:
            self.diagnosis.begin_step(index)

    def finish(self, error: BaseException | None = None) -> None:
        """Detach (recording the step in progress), keep the Run, and write the report when asked; when
        training raised, the report is still written (it shows what led there), and a failure to write
        it is logged, never raised over the training's own exception."""
        diagnosis, self.diagnosis = self.diagnosis, None
        if diagnosis is None:
            return
        try:
            diagnosis.__exit__(type(error) if error is not None else None, error, None)
        finally:
            self._run = diagnosis.run
            self._write_report(diagnosis, error)

    def _write_report(self, diagnosis: Recording, error: BaseException | None) -> None:
        if self.report_dir is None or diagnosis.rank != 0:  # the statistics are the whole job's: one report
            return
        if error is None:
            self.report = report(diagnosis.run, self.report_dir)
            return
        try:
            self.report = report(diagnosis.run, self.report_dir)
        except Exception:
            log.exception("mpdiag: the report of a training that raised could not be written")
