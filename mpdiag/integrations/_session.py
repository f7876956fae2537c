"""What the trainer callbacks share: their options, one recording per training, and its end.

A trainer calls its callbacks at moments that differ from library to library; each callback turns them
into the same calls: ``attach`` when training begins (the trainer has prepared the model and the
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
from mpdiag.io.runfile import RunFileSink, refuse_existing
from mpdiag.record.recording import Recording, check_options
from mpdiag.record.sinks import Sink
from mpdiag.render import Report, report

__all__ = ["TrainingSession", "CallbackResults", "OPTIONS", "missing"]

log = logging.getLogger(__name__)

#: What a trainer callback takes: diagnose's own options, and where to write the report and TensorBoard logs.
OPTIONS = ("formats", "every", "include", "exclude", "on_nonfinite", "run_file", "report_dir", "tensorboard")


def missing(library: str, integration: str, install: str, error: ImportError) -> ImportError:
    """The error an integration raises when its library cannot be imported: what to install."""
    return ImportError(f"{integration} needs {library} ({error}); install it with {install}")


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
        run_file = options.pop("run_file", None)
        self.run_file: Path | None = Path(run_file) if run_file is not None else None
        # a bad option fails here, when the callback is made, not after the trainer has set everything up
        if "formats" in options:
            format_names(options["formats"])
        check_options(**{k: v for k, v in options.items() if k in ("every", "on_nonfinite", "include", "exclude")})
        if self.run_file is not None:
            refuse_existing(self.run_file)
        self._options = options
        self._wrote_run_file = False  # the file at run_file is this session's own, from an earlier training
        self.diagnosis: Recording | None = None
        self._run: Run | None = None
        self.report: Report | None = None

    @property
    def every(self) -> int:
        return int(self._options.get("every", 1))

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
        record_first: bool | None = None,
    ) -> None:
        """Attach for a training whose first step is ``first_step``. A later training with the same
        callback (``train()`` again, a retry with a smaller batch) starts the run file anew, and has
        TensorBoard hide what earlier logs hold from ``first_step`` on (its ``purge_step``)."""
        if self.diagnosis is not None:  # an earlier training raised where no callback saw it end
            self.finish(MpdiagError("training began again before the last one ended"))
        if self._wrote_run_file and self.run_file is not None:
            self.run_file.unlink(missing_ok=True)
        sinks: list[Sink] = []
        if self.run_file is not None:
            sinks.append(RunFileSink(self.run_file))
        if self.tensorboard is not None:
            sinks.append(TensorBoard(self.tensorboard, purge_step=first_step))
        try:
            self.diagnosis = Recording(model, optimizer=optimizer, scaler=scaler, sinks=sinks, **self._options)
        except AttachError as error:
            raise AttachError(
                f"{self._owner} could not attach: {error} (two mpdiag callbacks on one trainer, or a "
                f"diagnose() still attached to its model, would do this)"
            ) from error
        self._wrote_run_file = self.run_file is not None and self.diagnosis.rank == 0
        self.diagnosis.begin_step(first_step, record=record_first)

    def begin(self, index: int, record: bool | None = None) -> None:
        if self.diagnosis is not None:
            self.diagnosis.begin_step(index, record=record)

    def finish(self, error: BaseException | None = None) -> None:
        """Detach (recording the step in progress), keep the Run, and write the report when asked.

        When training raised (``error``), nothing here may take the place of its exception, which goes
        on to the user unchanged: a failure to detach or to write the report is logged. The report is
        still written: it shows what led there. When training ended, a NaN found in its last step
        (``on_nonfinite="raise"``) is raised, after the report is written."""
        diagnosis, self.diagnosis = self.diagnosis, None
        if diagnosis is None:
            return
        if error is None:
            try:
                diagnosis.close()
            except BaseException as raised:
                self._keep(diagnosis, raised)
                raise
        else:
            try:
                diagnosis.__exit__(type(error), error, None)
            except Exception:
                log.exception("mpdiag: detaching from a training that raised failed; its own exception goes on")
        self._keep(diagnosis, error)

    def _keep(self, diagnosis: Recording, error: BaseException | None) -> None:
        """Keep the detached recording's Run, and write its report when asked (rank 0: the statistics are
        the whole job's). After ``error``, a report that cannot be written is logged, not raised."""
        self._run = diagnosis.run
        if self.report_dir is None or diagnosis.rank != 0:
            return
        try:
            self.report = report(self._run, self.report_dir)
        except Exception:
            if error is None:
                raise
            log.exception("mpdiag: the report of a training that raised could not be written")


class CallbackResults:
    """What a trainer callback is made with (its options) and hands back: the Run, the recording while it
    runs, the report. The first base of each callback class, before its library's Callback."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self._session = TrainingSession(type(self).__name__, options)

    @property
    def run(self) -> Run | None:
        """What was recorded (None before training began); a snapshot while training runs."""
        return self._session.run

    @property
    def diagnosis(self) -> Recording | None:
        """The recording attached while training runs (None before and after)."""
        return self._session.diagnosis

    @property
    def report(self) -> Report | None:
        """The report written when training ended, when ``report_dir`` was given (None on other ranks)."""
        return self._session.report

    def close(self) -> None:
        """Detach now, recording the step in progress (after a training that raised where no callback
        event saw it; training's own end does this by itself)."""
        self._session.finish()
