"""diagnose(model): record a model's training, then report on it.

``mpdiag.record.recording.Recording`` does the recording (hooks, steps, the Run); a Diagnosis is one
that can also write the report, so that recording never depends on rendering.

Examples:
    >>> import torch, mpdiag
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with mpdiag.diagnose(model, optimizer=opt) as diag:
    ...     for _ in range(3):
    ...         opt.zero_grad()
    ...         model(torch.randn(4, 8)).pow(2).mean().backward()
    ...         opt.step()  # closes the step
    >>> diag.run.steps
    [0, 1, 2]
    >>> diag.run.stats("2.weight", "param_grad", step=2).numel
    8
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from mpdiag.core.stats import DEFAULT_FORMATS, FormatSpecs
from mpdiag.io.runfile import RunFileSink
from mpdiag.record.recording import OnNonFinite, Recording
from mpdiag.record.sinks import Sink
from mpdiag.render import Report, report

__all__ = ["diagnose", "Diagnosis"]


class Diagnosis(Recording):
    """Hooks on one model, the current step, the statistics recorded so far, and the report of them.
    See ``diagnose``."""

    def __init__(
        self,
        model: nn.Module,
        *,
        run_file: str | os.PathLike[str] | None = None,
        sinks: Sequence[Sink] = (),
        **options: Any,
    ) -> None:
        run_files = (RunFileSink(run_file),) if run_file is not None else ()
        super().__init__(model, sinks=(*run_files, *sinks), **options)

    def report(self, out_dir: str | os.PathLike[str], **options: Any) -> Report | None:
        """Write the HTML report of everything recorded so far into ``out_dir``; see ``mpdiag.report``.
        Under torch.distributed only rank 0 writes it (the statistics are the whole job's); other ranks
        write nothing and get None."""
        if self.rank != 0:
            return None
        return report(self.run, out_dir, **options)


def diagnose(
    model: nn.Module,
    *,
    formats: FormatSpecs = DEFAULT_FORMATS,
    every: int = 1,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    on_nonfinite: OnNonFinite = "record",
    run_file: str | os.PathLike[str] | None = None,
    group: Any = None,
    sinks: Sequence[Sink] = (),
    optimizer_state: bool = True,
    updates: bool = True,
) -> Diagnosis:
    """Record, per module and parameter, how values sit against each format's range.

    Args:
        model: the module to observe (all its submodules, by ``named_modules()`` name; the root is "").
        formats: formats to count casts for: a name, alias, dtype or Format, or a sequence of them.
        every: record one step in ``every``; unrecorded steps cost next to nothing.
        include: glob(s) of module names to observe; default all.
        exclude: glob(s) of module names not to observe.
        optimizer: when given, a step closes by itself when ``optimizer.step()`` returns (the parameters
            are observed as it begins: what the forward used); a step that a GradScaler skips closes when
            the next forward starts with gradients cleared. Its state is recorded too (see
            ``optimizer_state``).
        scaler: the GradScaler (``torch.amp`` or ``torch.cuda.amp``) scaling this training, if any: the
            loss scale of each recorded step is kept in ``run.loss_scales``, so that analyses can tell
            true gradients from the scaled ones that were recorded.
        on_nonfinite: what to do when a recorded step saw NaN or inf, once it closes: "record" (keep the
            events in ``run.nonfinite_events()``), "warn" (also an MpdiagWarning naming the origin) or
            "raise" (also a NonFiniteError carrying the origin and the sites' recent history).
        run_file: a new file to write every recorded step to as it closes (SQLite, crash-safe);
            ``mpdiag.load(path)`` reads it back, also while training goes on. Under torch.distributed
            only rank 0 writes it.
        group: the torch.distributed process group whose ranks' statistics are combined when a step
            closes (default: the default group, when one is initialised). The model may be wrapped in
            DistributedDataParallel or sharded with FSDP2's ``fully_shard``; names are the user's own.
            Every rank must close the same steps (``optimizer=`` does), as with any collective.
        sinks: more destinations for every recorded step as it closes, besides the Run in memory and
            ``run_file`` (``mpdiag.record.sinks.Sink``: opened at attach, closed at detach; rank 0 only).
        optimizer_state: with ``optimizer=``, record every floating tensor of its state after each
            recorded step, per parameter, as sites of kind ``optimizer_state`` named
            ``<parameter>.<key>`` (``blocks.0.mlp.0.weight.exp_avg_sq``). Costs as much counting as the
            parameters once per state tensor (Adam: twice); False leaves it out.
        updates: with ``optimizer=``, record what each recorded step changed in each parameter (the new
            value minus the old, exactly) as sites of kind ``update``, named as the parameter. Costs a
            copy of the observed parameters from the start of the optimizer's step to its end, on
            recorded steps only; ``include=`` limits it to some modules, False leaves it out.

    Returns:
        A ``Diagnosis``, usable as a context manager.

    Examples:
        >>> import torch, mpdiag
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> with mpdiag.diagnose(model, formats=("fp16", "bf16")) as diag:
        ...     model(torch.full((2, 4), 1e6)).sum().backward()
        >>> stats = diag.run.stats("0", "activation")
        >>> stats.overflow("fp16"), stats.overflow("bf16")
        (8, 0)
    """
    return Diagnosis(
        model,
        formats=formats,
        every=every,
        include=include,
        exclude=exclude,
        optimizer=optimizer,
        scaler=scaler,
        on_nonfinite=on_nonfinite,
        run_file=run_file,
        sinks=sinks,
        group=group,
        optimizer_state=optimizer_state,
        updates=updates,
    )
