"""A recording: the recorder attached to one model, steps closed, the Run handed out.

A Recording owns every hook handle and removes them all on exit, also when the training step raised.
Closing a step is the only place the host reads device values: once per recorded step. Users get one
from ``mpdiag.diagnose`` (a ``Diagnosis``: this, and the report).

Its example is ``mpdiag.diagnose``'s: a Diagnosis is a Recording that can also write the report.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, get_args

import torch
from torch import nn

from mpdiag.core.errors import AttachError, MpdiagError, MpdiagWarning
from mpdiag.core.events import NonFiniteError, NonFiniteEvent
from mpdiag.core.run import Kind, Run, Site
from mpdiag.core.stats import DEFAULT_FORMATS, FormatSpecs, TensorStats, format_names
from mpdiag.core.updates import UpdateStats
from mpdiag.record import _dynamo, distributed
from mpdiag.record._dynamo import inlined_only, untraced
from mpdiag.record._loss_scale import LossScaleSnapshot
from mpdiag.record._optimizer import closure_of, is_grad_scaler, unwrap_optimizer
from mpdiag.record.anomaly import AnomalyWatch
from mpdiag.record.environment import describe
from mpdiag.record.hooks import Recorder, in_backward
from mpdiag.record.sinks import Sink

__all__ = ["Recording", "paused", "OnNonFinite", "check_options"]

#: What a recording does when a step it closes saw NaN or inf (see ``mpdiag.diagnose``).
OnNonFinite = Literal["record", "warn", "raise"]

log = logging.getLogger(__name__)

# Modules currently observed (-> their name in the diagnosed model), so a second diagnosis is refused.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, tuple[Recording, str]] = weakref.WeakKeyDictionary()


def diagnosed(model: nn.Module) -> bool:
    """Whether a recording is attached to ``model`` or to any of its modules."""
    return any(m in _ATTACHED for m in model.modules())


@contextlib.contextmanager
def paused(model: nn.Module) -> Iterator[None]:
    """Inside, every recording attached to ``model`` (or to any of its modules) is paused (see
    ``Recording.paused``): for mpdiag's own re-runs of a batch, which must not count as training."""
    recordings = {entry[0] for m in model.modules() if (entry := _ATTACHED.get(m)) is not None}
    with contextlib.ExitStack() as stack:
        for recording in recordings:
            stack.enter_context(recording.paused())
        yield


def _globs(value: str | Iterable[str] | None, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    patterns = tuple(value) if isinstance(value, Iterable) and not isinstance(value, str) else (value,)
    if not all(isinstance(p, str) for p in patterns):
        raise MpdiagError(f"{what} expects glob strings such as 'blocks.*.mlp', got {value!r}")
    return patterns


def _select_modules(
    model: nn.Module, include: str | Iterable[str] | None, exclude: str | Iterable[str] | None
) -> dict[str, nn.Module]:
    """The modules to observe, by the user's names: wrapper levels (FSDP, checkpointing) are dropped from
    names, and where two modules then share a name the innermost, the real one, is kept."""
    include_globs, exclude_globs = _globs(include, "include"), _globs(exclude, "exclude")
    named = {distributed.clean_name(n): m for n, m in model.named_modules()}
    modules = {n: m for n, m in named.items() if _selected(n, include_globs, exclude_globs)}
    if not modules:
        raise MpdiagError(
            f"include={include!r} / exclude={exclude!r} select none of the model's modules; "
            f"module names look like {list(named)[:4]}"
        )
    return modules


def _selected(name: str, include: tuple[str, ...] | None, exclude: tuple[str, ...] | None) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude))


class Recording:
    """Hooks on one model, the current step, and the statistics recorded so far. See ``mpdiag.diagnose``."""

    def __init__(
        self,
        model: nn.Module,
        *,
        formats: FormatSpecs = DEFAULT_FORMATS,
        every: int = 1,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: torch.amp.GradScaler | None = None,
        on_nonfinite: OnNonFinite = "record",
        sinks: Sequence[Sink] = (),
        group: Any = None,
        optimizer_state: bool = True,
        updates: bool = True,
    ) -> None:
        _check_arguments(model, scaler)
        for flag, value in (("optimizer_state", optimizer_state), ("updates", updates)):
            if not isinstance(value, bool):
                raise MpdiagError(f"{flag} must be True or False, got {value!r}")
        self._records_optimizer_state = optimizer_state
        self._records_updates = updates
        check_options(every, on_nonfinite, include, exclude)
        _dynamo.prepare(Recorder, Recording)
        optimizer, wrapper_scaler = unwrap_optimizer(optimizer) if optimizer is not None else (None, None)
        scaler = scaler if scaler is not None else wrapper_scaler  # accelerate's optimizer steps through one
        self._group = distributed.active_group(group)
        self._rank = distributed.rank_of(self._group)
        wrapper, (model, replicated) = model, distributed.unwrap(model)
        self.on_nonfinite = on_nonfinite
        self.formats = format_names(formats)
        self.every = every
        modules = _select_modules(model, include, exclude)
        self._observes_submodules = any(modules)  # a module besides the root (whose name is "")
        self._environment = describe(model, self.formats, scaler)
        if self._group is not None:
            self._environment["distributed"] = distributed.describe_group(self._group)
        self._device_type = self._environment["device"].split(":")[0]
        self._anomalies_written = 0
        params = _owned_parameters(modules)
        self._tied = _tied_parameters(model)  # each recorded once: the run answers to every name
        self._recorder = Recorder(
            self.formats, params, group=self._group, replicated=distributed.replicated_sites(params, replicated)
        )
        self._grads_at_close = self._group is not None and distributed.grads_settle_late(params, replicated)
        self._records: dict[int, dict[Site, TensorStats]] = {}
        self._loss_scales: dict[int, float] = {}
        self._events: dict[int, tuple[NonFiniteEvent, ...]] = {}
        self._updates: dict[int, dict[str, UpdateStats]] = {}
        self._scale_seen = LossScaleSnapshot(scaler) if scaler is not None else None
        if self._scale_seen is not None:
            self._recorder.on_first_backward = self._scale_seen.take
        self._step = 0
        self._closed = False
        self._paused = False
        self._optimizer = optimizer
        self._in_optimizer_step = False  # between optimizer.step()'s pre- and post-hook
        self._closure_running = False  # ... and step() was given a closure: forwards there are the step's own
        self._weights_version: int | None = None  # of one trainable weight, when the step's first forward ran
        self._warned: set[str] = set()  # the once-only warnings given
        self._forwards = 0  # training forwards of the whole model in the current step
        self._handles: list[Any] = []
        self._anomaly = AnomalyWatch(lambda: self._step)
        self._recorder.anomaly = self._anomaly
        self._recorder.device_type = self._device_type
        self._sinks: list[Sink] = []  # those opened: rank 0's (the statistics are the whole job's)
        self._claim(wrapper)  # first: a refused second diagnosis must not create a run file
        self._model_ref = weakref.ref(wrapper)
        try:  # an attach succeeds whole or leaves the model (and the disk) as it was
            for sink in sinks if self._rank == 0 else ():
                sink.open(self.formats, self._meta())
                self._sinks.append(sink)
            self._install(wrapper, modules, optimizer)
            self._anomaly.install()
        except BaseException:
            for sink in self._sinks:  # what this attach created, with nothing recorded in it
                sink.discard()
            self._sinks.clear()
            self._detach()
            raise

    def _detach(self) -> None:
        """Remove every hook and the anomaly watch and free the model: after a close or a failed attach."""
        self._closed = True
        self._anomaly.uninstall()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        model = self._model_ref()
        if model is not None:
            self._release(model)

    # -- public API -------------------------------------------------------------------------------
    @property
    def step_index(self) -> int:
        """Index of the step being recorded now (steps count from 0, recorded or not)."""
        return self._step

    @property
    def rank(self) -> int:
        """This process's rank in the process group whose statistics are combined (0 without one)."""
        return self._rank

    @property
    def recording(self) -> bool:
        """Whether the current step is one that is recorded (see ``every``)."""
        return self._recorder.recording

    @property
    def run(self) -> Run:
        """A snapshot of everything recorded so far, as plain data."""
        return Run(
            formats=self.formats,
            records={s: dict(r) for s, r in self._records.items()},
            meta=self._meta(),
            loss_scales=dict(self._loss_scales),
            events=dict(self._events),
            anomalies=tuple(self._anomaly.records),
            updates={s: dict(u) for s, u in self._updates.items()},
        )

    def _meta(self) -> dict[str, Any]:
        return {"every": self.every, "environment": dict(self._environment), "tied_parameters": self._tied}

    def step(self) -> None:
        """Close the current step: read its statistics from the device (the one host sync) and move on."""
        self._check_open()
        self._close_step()

    def _check_open(self) -> None:
        if self._closed:
            raise MpdiagError("this Diagnosis is closed; attach a new one with mpdiag.diagnose(model)")

    def begin_step(self, index: int, *, record: bool | None = None) -> None:
        """Number the step now beginning ``index``, as the training loop numbers it (a trainer's
        ``global_step``), so that mpdiag's step N is the trainer's step N, also after resuming from a
        checkpoint. It is recorded when ``index % every == 0``, or when ``record`` says so (a trainer
        whose logging cadence is another rule).

        Called again with the same number within the step, once the step has seen anything, it does
        nothing. A step still open under an earlier number (one a GradScaler skipped, whose optimizer
        step never ran) is closed first. Numbers only go up: the run keeps one record per step."""
        self._check_open()
        if isinstance(index, bool) or not isinstance(index, int):
            raise MpdiagError(f"begin_step expects the step's number as an int, got {index!r}")
        if index < self._step:
            raise MpdiagError(
                f"begin_step({index}) would go back: the recording is at step {self._step}; steps are "
                f"numbered in increasing order (the run keeps one record per step)"
            )
        rec = self._recorder
        rec.trained = True  # a training loop numbers its steps: forwards with autograd off are evaluation
        begun = rec.active or rec.saw_backward
        if index == self._step and begun:
            return
        try:
            if begun:
                self._close_step()
        finally:  # also when that close raised (on_nonfinite="raise"): the numbering stays the loop's
            self._step = index
            rec.recording = index % self.every == 0 if record is None else record

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside, nothing is recorded and no step closes; afterwards the recording goes on as it was
        (the step in progress, what training has been seen). For re-running a batch on the live model."""
        was_paused = self._paused
        self._paused = True
        try:
            with self._recorder.paused():
                yield
        finally:
            self._paused = was_paused

    def close(self) -> None:
        """Record a step in progress, then remove every hook. Safe to call more than once."""
        self._close(report=True)

    def _close(self, report: bool, body_failed: bool = False) -> None:
        if self._closed:
            return
        try:
            # Under torch.distributed, closing a step is a collective: a rank whose training raised must
            # not start one that the other ranks may never join. Its partial step is dropped.
            if self._recorder.active and not (body_failed and self._group is not None):
                self._close_step(report=report)
        finally:
            try:
                self._write_anomalies()
                self._close_sinks()
            finally:  # a sink that fails (a full disk) must not leave the hooks on the model
                self._detach()

    def _close_sinks(self) -> None:
        """Close every sink, also after one failed to close; then raise the first failure."""
        failures = []
        for sink in self._sinks:
            try:
                sink.close()
            except Exception as error:
                failures.append(error)
        if failures:
            raise failures[0]

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._anomaly.saw_exception(exc)  # read, never swallowed: the exception goes on to the caller
        # The step in progress is still recorded; its NaN is not raised over the body's own exception.
        self._close(report=exc is None, body_failed=exc is not None)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self._step}"
        return (
            f"<{type(self).__name__} {state}, {len(self._records)} recorded steps, formats {', '.join(self.formats)}>"
        )

    # -- internals --------------------------------------------------------------------------------
    def _claim(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if module in _ATTACHED:
                where = f"module {name!r} of this model" if name else "this model"
                as_name = _ATTACHED[module][1]
                raise AttachError(
                    f"{where} is already being diagnosed (as module {as_name!r} of the model a "
                    f"Diagnosis is attached to); close that Diagnosis (diag.close() or leave its "
                    f"with-block) before attaching another"
                )
        for name, module in model.named_modules():
            _ATTACHED[module] = (self, name)

    def _release(self, model: nn.Module) -> None:
        for module in model.modules():
            if _ATTACHED.get(module, (None,))[0] is self:
                del _ATTACHED[module]

    def _install(
        self, model: nn.Module, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None
    ) -> None:
        rec = self._recorder
        for name, module in modules.items():
            self._handles.append(module.register_forward_hook(_bind(rec.on_forward, name)))
        for name, param in rec.params.items():
            if param.requires_grad and not self._grads_at_close:
                self._handles.append(param.register_post_accumulate_grad_hook(_bind(rec.on_param_grad, name)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        self._handles.append(model.register_forward_pre_hook(self._before_model_forward))
        self._handles.append(model.register_forward_hook(self._after_model_forward, always_call=True))

    # Step boundaries. The parameters are observed in optimizer.step()'s pre-hook, while they are still
    # those the forward used, and the step closes in its post-hook, once the optimizer's state holds this
    # step's update. Without a closure, forward and backward ran before step(); with one (Lightning,
    # LBFGS) they run inside it, between the two hooks.
    @untraced
    def _before_optimizer_step(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._paused:
            return
        self._in_optimizer_step = True  # a step whose step() raised never reached its post-hook: reset here
        self._closure_running = closure_of(args, kwargs) is not None
        self._recorder.observe_params()
        if self._records_updates:
            self._recorder.copy_weights(optimizer)
        if self._stops_before_the_update():
            self._in_optimizer_step = self._closure_running = False
            self._close_step()  # records the step, then raises NonFiniteError: step() never runs

    def _stops_before_the_update(self) -> bool:
        """on_nonfinite="raise" and NaN/inf seen already: raise before the optimizer writes them into the
        weights (one read of the step's NaN/inf counts more per recorded step, in that mode only). A
        closure's forward and backward have not run yet: they are checked when the step closes."""
        rec = self._recorder
        if self.on_nonfinite != "raise" or not rec.recording or self._closure_running:
            return False
        return rec.events.any_nonfinite()

    @untraced
    def _after_optimizer_step(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._in_optimizer_step:
            self._in_optimizer_step = self._closure_running = False
            if self._records_optimizer_state:
                self._recorder.observe_optimizer_state(optimizer)
            self._recorder.observe_updates(optimizer)
            self._close_step()

    @untraced
    def _before_model_forward(self, model: nn.Module, args: Any) -> None:
        # Once training has been seen, a forward of the whole model with autograd off is evaluation or
        # generate(): neither recorded nor part of a step. (Before any backward, it is what is being
        # diagnosed: inference. Only the whole model's: reentrant checkpointing runs modules inside a
        # training forward without grad, and those are recorded.)
        self._recorder.evaluating = self._recorder.trained and not torch.is_grad_enabled()
        if self._recorder.evaluating or self._paused or in_backward():
            return
        self._recorder.in_model_forward = True
        if not (self._in_optimizer_step and self._closure_running):  # not a closure's forward
            self._at_step_boundary(model)
        self._forwards += 1

    def _at_step_boundary(self, model: nn.Module) -> None:
        """Before a training forward: close a step a GradScaler skipped, or warn that steps never close."""
        rec = self._recorder
        if not rec.saw_backward:
            self._weights_version = _version_of_a_weight(rec.params)
            return
        if self._optimizer is not None:
            if self._step_was_skipped(model):
                self._close_step()
            return
        if "unclosed" not in self._warned and self._step_looks_over(model):
            self._warned.add("unclosed")
            warnings.warn(
                "mpdiag: a new training step began (weights updated or gradients cleared since the last "
                "backward) but no step was closed, so every step is being merged into one and param_grad "
                "keeps only the latest gradients; pass optimizer= to diagnose() or call diag.step() after "
                "each optimizer step",
                MpdiagWarning,
                stacklevel=4,
            )

    @inlined_only
    def _after_model_forward(self, model: nn.Module, args: Any, output: Any) -> None:
        self._recorder.evaluating = self._recorder.in_model_forward = False

    def _step_was_skipped(self, model: nn.Module) -> bool:
        # A GradScaler that finds inf/NaN skips optimizer.step(), so its hooks never fire; backward ran and
        # the scaler's update() since (or the gradients were cleared): that step is over. Gradients still
        # present without an update mean gradient accumulation, which continues the step.
        if self._scale_seen is not None and self._scale_seen.updated_since_taken():
            return True
        return _gradients_cleared(model)

    def _step_looks_over(self, model: nn.Module) -> bool:
        version = _version_of_a_weight(self._recorder.params)
        weights_changed = version is not None and version != self._weights_version
        return weights_changed or _gradients_cleared(model)

    def _close_step(self, report: bool = True) -> None:
        rec = self._recorder
        step = self._step
        events: list[NonFiniteEvent] = []
        if rec.recording:
            saw_backward = rec.saw_backward
            self._records[step], events, updates = rec.collect(step)
            if updates:
                self._updates[step] = updates
            self._check_recorded(step, self._records[step], events, saw_backward)
            if events:
                self._events[step] = tuple(events)
            if self._scale_seen is not None:
                scale = self._scale_seen.read()
                if scale is not None:
                    self._loss_scales[step] = scale
            if rec.autocast_dtype is not None:
                self._environment["autocast_dtype"] = rec.autocast_dtype
            for sink in self._sinks:
                write_updates = getattr(sink, "write_updates", None)  # optional: sinks written before it
                if updates and write_updates is not None:
                    write_updates(step, updates)
                sink.write_step(
                    step,
                    self._records[step],
                    tuple(events),
                    self._loss_scales.get(step),
                    {"environment": self._environment},
                )
            self._write_anomalies()
        if self._scale_seen is not None:
            self._scale_seen.clear()
        rec.reset()
        self._forwards = 0
        self._in_optimizer_step = self._closure_running = False  # a step() that raised: its step is over
        self._step += 1
        rec.recording = self._step % self.every == 0
        if events and report:
            self._report_nonfinite(step, events)

    def _check_recorded(
        self, step: int, stats: dict[Site, TensorStats], events: list[NonFiniteEvent], saw_backward: bool
    ) -> None:
        """Warn, once each, about a recorded step that says the recording is not seeing training whole."""
        # Only the root's hook, of many modules observed: the model's own forward ran eagerly (a compiled
        # module called from it, say) and everything inside ran a compiled graph without the hooks.
        observed = {s.name for s in stats if s.kind is Kind.ACTIVATION}
        hooks_missed = not observed or (observed == {""} and self._observes_submodules)
        if "hooks" not in self._warned and saw_backward and hooks_missed:
            self._warned.add("hooks")
            warnings.warn(
                f"mpdiag: step {step} ran backward but no forward hook of the model's modules ran: a model "
                f"compiled with torch.compile and called before diagnose() was attached keeps running its compiled "
                f"graph without the hooks (dynamo does not guard on hooks added later), and so does a "
                f"graph this process compiled earlier for the same model class; attach before the first "
                f"compiled call (torch._dynamo.reset() drops graphs compiled earlier)",
                MpdiagWarning,
                stacklevel=4,
            )
        if "scaler" not in self._warned and self._skips_may_be_merged(events):
            self._warned.add("scaler")
            warnings.warn(
                f"mpdiag: step {step} held NaN/inf gradients over {self._forwards} forward passes without "
                f"an optimizer step; if a GradScaler skipped steps, pass it as diagnose(..., scaler=) so that "
                f"each skipped step closes on its own and gradients are judged unscaled",
                MpdiagWarning,
                stacklevel=4,
            )

    def _skips_may_be_merged(self, events: list[NonFiniteEvent]) -> bool:
        """Several forwards in one step and NaN/inf gradients, with no GradScaler to tell skips by: steps a
        scaler skipped merge when their gradients are zeroed in place (they look like accumulation)."""
        gradients_nonfinite = any(e.kind.is_gradient for e in events)
        return self._scale_seen is None and self._optimizer is not None and self._forwards > 1 and gradients_nonfinite

    def _write_anomalies(self) -> None:
        for record in self._anomaly.records[self._anomalies_written :]:
            for sink in self._sinks:
                sink.write_anomaly(record)
        self._anomalies_written = len(self._anomaly.records)

    def _report_nonfinite(self, step: int, events: list[NonFiniteEvent]) -> None:
        """After the step is recorded and the next one set up, so that raising loses nothing."""
        if self.on_nonfinite == "warn":
            warnings.warn(
                f"mpdiag: non-finite values at {events[0]} ({len(events)} site(s) in this step)",
                MpdiagWarning,
                stacklevel=4,
            )
        elif self.on_nonfinite == "raise":
            involved = {(e.name, e.kind) for e in events}
            recent = [s for s in sorted(self._records) if s <= step][-_HISTORY:]
            history = {
                (n, k): [(s, self._records[s][Site(n, k)]) for s in recent if Site(n, k) in self._records[s]]
                for n, k in involved
            }
            raise NonFiniteError(events[0], events, history)


_ON_NONFINITE: tuple[OnNonFinite, ...] = get_args(OnNonFinite)
_HISTORY = 8  # recorded steps of history a NonFiniteError carries for each site involved


def _bind(method: Any, name: str) -> Any:
    def hook(*args: Any) -> None:
        method(name, *args)

    return _dynamo.skip_own_frames(hook)


def _gradients_cleared(model: nn.Module) -> bool:
    """No parameter holds a gradient: zero_grad() (set to None) ran since the last backward."""
    return all(p.grad is None for p in model.parameters())


def _version_of_a_weight(params: dict[str, nn.Parameter]) -> int | None:
    """The in-place version of the first trainable parameter: an optimizer step changes it (no sync)."""
    return next((p._version for p in params.values() if p.requires_grad), None)


def check_options(
    every: object = 1, on_nonfinite: object = "record", include: object = None, exclude: object = None
) -> None:
    """Refuse a bad value of the options that need no model (the trainer callbacks check them when they
    are made, not when training starts)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise MpdiagError(f"every must be a positive integer (record one step in every N), got {every!r}")
    if on_nonfinite not in _ON_NONFINITE:
        raise MpdiagError(f"on_nonfinite must be one of {', '.join(map(repr, _ON_NONFINITE))}, got {on_nonfinite!r}")
    _globs(include, "include")  # type: ignore[arg-type]
    _globs(exclude, "exclude")  # type: ignore[arg-type]


def _check_arguments(model: object, scaler: object) -> None:
    if not isinstance(model, nn.Module):
        raise AttachError(
            f"diagnose() expects a torch.nn.Module, got {type(model).__name__}; "
            f"pass the model itself (not its parameters or its output)"
        )
    if scaler is not None and not is_grad_scaler(scaler):
        raise AttachError(f"scaler must be a torch GradScaler (torch.amp.GradScaler), got {type(scaler).__name__}")


def _owned_parameters(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """Parameters held directly by the selected modules, by fully-qualified name, each once: a tied
    parameter under the first of its names (the run's meta lists them all, ``_tied_parameters``)."""
    params: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for module_name, module in modules.items():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                params[f"{module_name}.{pname}" if module_name else pname] = param
    return params


def _tied_parameters(model: nn.Module) -> list[list[str]]:
    """The names of each parameter that ``model`` holds under more than one (tied weights, a module shared
    by two parents), in the model's order, as ``_owned_parameters`` names them."""
    names: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = distributed.clean_name(module_name)
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            group = names.setdefault(id(param), [])
            if (name := f"{prefix}.{pname}" if prefix else pname) not in group:
                group.append(name)
    return [group for group in names.values() if len(group) > 1]
