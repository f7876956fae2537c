"""Train the same model in several precisions side by side: convergence, speed and memory, measured.

``compare(model, loss_fn, batches, make_optimizer=...)`` trains one copy of ``model`` per precision,
each from the same weights, on the same batches in the same order, each step starting from the random
state that precision's previous step left (so every copy draws the same dropout masks, and the fp32
copy draws exactly what a plain loop would). By default the copies train in lock-step, one step of
each in turn (the order rotating), so that a shared machine's slow moments fall on all of them alike.

A second fp32 copy trains on the same batches in another order, with other random draws. Before each
of its steps its loss is also taken on fp32's batch of that step, with fp32's dropout masks: how far
that loss is from fp32's is the **noise band** each precision is judged against
(``mpdiag.analysis.convergence``): where two fp32 trajectories differing only in data order have got to.

Cost: one training per precision plus the yardstick's, with every copy and its optimizer state held at
once (``interleave=False``: one at a time). The user's model, its ``.grad``, the random state and every
global precision flag are as they were afterwards, also when training raised.

Examples:
    >>> import torch, mpdiag
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    >>> batches = [(torch.randn(16, 8), torch.randn(16, 1)) for _ in range(6)]
    >>> cmp = mpdiag.compare(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), batches,
    ...                      make_optimizer=lambda p: torch.optim.SGD(p, lr=0.1), precisions=("fp32", "bf16"))
    >>> sorted(cmp.results), len(cmp.results["bf16"].losses)
    (['bf16', 'fp32'], 6)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from mpdiag.analysis.convergence import IDENTICAL_YARDSTICK, convergence, noise_band, step_noise_band, window_for
from mpdiag.core.comparison import PRECISIONS, REFERENCE, Comparison, PrecisionResult
from mpdiag.core.errors import MpdiagError
from mpdiag.core.run import Run
from mpdiag.probe._matmul_precision import Fp32Mode, matmul_precision, tf32_changes_matmuls
from mpdiag.probe._memory import METHODS, StepMemory
from mpdiag.probe._rerun import preserved, rng_state, set_rng_state
from mpdiag.record import Recording, autocast_dtype, check_autocast, diagnosed

__all__ = ["compare"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]
MakeOptimizer = Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]
Progress = Callable[[str, int, int, float], None]

#: The diagnose() options a comparison passes on (the optimizer and scaler are each copy's own).
_DIAGNOSE_OPTIONS = ("formats", "every", "include", "exclude")

#: Recorded steps cost more than unrecorded ones: record every other step and time the rest.
_DEFAULT_EVERY = 2

#: Steps a comparison needs at least: a warm-up, a step whose memory is measured, a timed one.
_MIN_STEPS = 4


@dataclass(frozen=True)
class _Spec:
    """How one precision trains: autocast's dtype, loss scaling, the weights' own dtype, fp32 matmuls."""

    name: str
    autocast: torch.dtype | None = None
    scaled: bool = False
    weights: torch.dtype | None = None
    matmuls: Fp32Mode = "ieee"


_SPECS = {
    "fp32": _Spec("fp32"),
    "tf32": _Spec("tf32", matmuls="tf32"),
    "bf16": _Spec("bf16", autocast=torch.bfloat16),
    "fp16": _Spec("fp16", autocast=torch.float16, scaled=True),
    "bf16-pure": _Spec("bf16-pure", weights=torch.bfloat16),
}
assert tuple(_SPECS) == PRECISIONS


def compare(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    make_optimizer: MakeOptimizer,
    precisions: Sequence[str] = ("fp32", "tf32", "bf16", "fp16"),
    steps: int | None = None,
    grad_scaler: Mapping[str, Any] | None = None,
    diagnose: bool | Mapping[str, Any] = True,
    device: str | torch.device | None = None,
    noise_run: bool = True,
    warmup: int = 2,
    interleave: bool = True,
    progress: Progress | None = None,
) -> Comparison:
    """Train a copy of ``model`` per precision from the same weights on the same batches; compare them.

    Args:
        model: the model, with fp32 parameters, in the mode it trains in; it is copied, never trained.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss, forward included; it must not apply
            autocast itself (each precision sets its own).
        batches: the batches, in order; taken once and kept, so that every precision sees the same ones
            (a DataLoader that shuffles is read once). A list shorter than ``steps`` is gone through
            again; an iterator must hold ``steps`` batches.
        make_optimizer: ``make_optimizer(params)`` returns a new optimizer over ``params`` (one per copy).
        precisions: among "fp32" (fp32 matmuls and convolutions, no TF32 anywhere), "tf32" (TF32 matmuls
            and cuDNN convolutions where the device has them; on one without, the summary says it ran
            as fp32), "bf16" and "fp16" (autocast; fp16 with a ``torch.amp.GradScaler``) and "bf16-pure"
            (the weights, the optimizer's state and floating inputs in bf16, no fp32 master copy). fp32
            is always trained: everything is measured against it.
        steps: steps to train each precision (default: one pass over ``batches``); at least 4.
        grad_scaler: fp16's ``torch.amp.GradScaler`` arguments, e.g. ``{"init_scale": 2.0**16}``.
        diagnose: record each copy with ``mpdiag.diagnose`` (``results[p].run``), or a dict of its
            options (``formats``, ``every``, ``include``, ``exclude``); by default one step in 2 is
            recorded and the others are timed; False records nothing.
        device: the device to train on (default: the model's); copies and batches are moved there.
        noise_run: train the second fp32 copy that gives the noise band; False: fp32's own
            step-to-step change stands in (one training less, but a band that holds the batch-to-batch
            spread of the loss too: much wider).
        warmup: steps not timed at the start of each training.
        interleave: train the copies in lock-step (default); False: one after another, one copy in
            memory at a time.
        progress: called as ``progress(precision, steps_done, steps, loss)`` after every step.

    Returns:
        A ``Comparison``; ``str()`` of it is the summary, ``mpdiag.report(comparison, out_dir)`` its page.
    """
    _check_arguments(model, loss_fn, make_optimizer, warmup)
    specs = _specs(precisions)
    taken = _take(batches, steps)
    options = _diagnose_options(diagnose)
    device = _device(device, model)
    for spec in specs:
        if spec.autocast is not None:
            check_autocast(device.type, spec.autocast)
    if warmup >= len(taken) - 1:
        raise MpdiagError(
            f"warmup={warmup} leaves no step of {len(taken)} to time; pass a smaller warmup or more steps"
        )
    plan = _Plan.of(len(taken), options.get("every") if options is not None else None, warmup, device)
    noise_order = _another_order(len(taken))
    start = rng_state()
    noise_start = _other_random_state(start)
    jobs = [_Job(_SPECS[REFERENCE], REFERENCE, list(range(len(taken))), start)]
    if noise_run:
        jobs.append(_Job(_SPECS[REFERENCE], "fp32 (noise)", noise_order, noise_start, yardstick=True))
    jobs += [_Job(spec, spec.name, list(range(len(taken))), start) for spec in specs if spec.name != REFERENCE]
    setup = _Setup(model, loss_fn, make_optimizer, taken, device, options, plan, dict(grad_scaler or {}), progress)
    try:
        finished = _train(jobs, setup, interleave)
    finally:
        set_rng_state(start)
    return _comparison(finished, setup, noise_run)


@dataclass(frozen=True)
class _Job:
    """One training to run: its precision, a label, the order of the batches, the random state it starts from."""

    spec: _Spec
    label: str
    order: list[int]
    start: dict[str, Any]
    yardstick: bool = False


@dataclass(frozen=True)
class _Setup:
    model: nn.Module
    loss_fn: LossFn
    make_optimizer: MakeOptimizer
    batches: list[Any]
    device: torch.device
    diagnose: dict[str, Any] | None
    plan: _Plan
    grad_scaler: dict[str, Any]
    progress: Progress | None


@dataclass(frozen=True)
class _Plan:
    """Which steps may be timed and which may have their memory measured: unrecorded steps (recording
    costs time and memory of its own; its hooks still fire there, a flag check per module), timed after
    the warm-up. Only steps whose optimizer step ran count (a GradScaler skips some), and memory only
    after one already ran, so that the optimizer's state exists. On a CPU memory is measured under the
    profiler, which slows the step: one such step is profiled and not timed."""

    steps: int
    timed: frozenset[int]
    memory: frozenset[int]
    profiled: bool
    timing: str

    @classmethod
    def of(cls, steps: int, every: int | None, warmup: int, device: torch.device) -> _Plan:
        unrecorded = [i for i in range(steps) if every is None or i % every != 0]
        clean = len(unrecorded) >= 2  # a memory step and a timed one, neither recorded
        candidates = unrecorded if clean else list(range(steps))
        memory = [i for i in candidates if i >= 1]
        timed = [i for i in candidates if i >= warmup] or memory
        profiled = device.type != "cuda"
        what = "steps"
        if every is not None and clean:
            what = "unrecorded steps (mpdiag's hooks fire there, recording nothing)"
        timing = f"median over the {what} from step {timed[0]} on whose optimizer step ran"
        if profiled:
            timing += ", but the one profiled for memory"
        if not clean and every is not None:
            timing += " (every step was recorded, so the times include mpdiag's recording)"
        if device.type == "cuda":
            timing += ", CUDA-synchronised"
        return cls(steps, frozenset(timed), frozenset(memory), profiled, timing)


@dataclass
class _Finished:
    """A training done: its result, its distance to fp32's weights, and (fp32's only) the weights."""

    job: _Job
    result: PrecisionResult
    distance: float
    params: dict[str, torch.Tensor] = field(default_factory=dict)


class _Training:
    """One copy of the model in training in one precision: its optimizer, scaler, recording, random stream,
    and what is measured of each step."""

    def __init__(self, job: _Job, setup: _Setup, stack: contextlib.ExitStack) -> None:
        self.job, self.setup, self.spec = job, setup, job.spec
        self.model = _copy(setup.model, setup.device, self.spec.weights)
        self.optimizer = _optimizer(setup.make_optimizer, self.model)
        self.scaler = _grad_scaler(setup.device, setup.grad_scaler) if self.spec.scaled else None
        self.recording: Recording | None = None
        if setup.diagnose is not None and self.recorded:
            with matmul_precision(self.spec.matmuls):  # the run's environment: this copy's own flags
                self.recording = stack.enter_context(
                    Recording(self.model, optimizer=self.optimizer, scaler=self.scaler, **setup.diagnose)
                )
        stack.callback(self.model.register_forward_pre_hook(self._check_autocast).remove)
        self.optimizer_steps = 0
        stack.callback(self.optimizer.register_step_post_hook(self._count_step).remove)
        self.rng = job.start
        self.starts = [job.start]  # the random state each step started from
        self.losses: list[torch.Tensor] = []
        self.skipped: list[int] = []
        self.step_times: dict[int, float] = {}
        self.memory = StepMemory(setup.device)
        self.memory_of_a_full_step = False  # a measured step whose optimizer step ran

    #: Recorded with mpdiag (when diagnose=), timed and measured; the yardstick is none of these.
    recorded = True

    def _count_step(self, *args: Any) -> None:
        self.optimizer_steps += 1

    def _check_autocast(self, module: nn.Module, args: Any) -> None:
        found = autocast_dtype(self.setup.device.type)
        wanted = str(self.spec.autocast).replace("torch.", "") if self.spec.autocast is not None else None
        if found != wanted:
            raise MpdiagError(
                f"autocast ({found or 'off'}) was not what {self.spec.name} sets ({wanted or 'off'}) in the "
                "model's forward: loss_fn or the model applies autocast itself; remove it there (compare "
                "sets each precision's own)"
            )

    def _measures_memory(self, index: int) -> bool:
        if not self.recorded or index not in self.setup.plan.memory or self.optimizer_steps == 0:
            return False  # before any optimizer step ran, there is no optimizer state to count
        return not (self.setup.plan.profiled and self.memory_of_a_full_step)  # a CUDA peak costs nothing

    def step(self, index: int) -> None:
        setup = self.setup
        set_rng_state(self.rng)
        if self.recording is not None:
            self.recording.begin_step(index)  # closes a step the GradScaler skipped, untimed
        batch = _prepared(setup.batches[self.job.order[index]], setup.device, self.spec.weights)
        measuring = self._measures_memory(index)
        steps_before = self.optimizer_steps
        with matmul_precision(self.spec.matmuls):
            self.optimizer.zero_grad()
            with self.memory.measuring(index, self.model, self.optimizer) if measuring else contextlib.nullcontext():
                _synchronize(setup.device)
                started = time.perf_counter()
                loss = self._train_on(batch)
                _synchronize(setup.device)
                seconds = time.perf_counter() - started
        self.rng = rng_state()
        self.starts.append(self.rng)
        ran = self.optimizer_steps > steps_before
        if not ran:
            self.skipped.append(index)
        if measuring:
            self.memory.keep(ran)  # a skipped step's peak lacks the optimizer's update
            self.memory_of_a_full_step |= ran
        profiled = measuring and setup.plan.profiled
        if self.recorded and ran and index in setup.plan.timed and not profiled:
            self.step_times[index] = seconds
        self.losses.append(loss.detach())
        if setup.progress is not None:
            setup.progress(self.job.label, index + 1, setup.plan.steps, float(loss.detach()))

    def _train_on(self, batch: Any) -> torch.Tensor:
        autocast = self.spec.autocast
        with torch.autocast(self.setup.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = self.setup.loss_fn(self.model, batch)
        _check_loss(loss)
        if not loss.requires_grad:
            raise MpdiagError(
                "loss_fn's loss does not require grad (detached, or computed under no_grad): nothing to train"
            )
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss

    def reported_losses(self) -> list[float]:
        return _floats(self.losses)

    def finish(self, reference: dict[str, torch.Tensor] | None) -> _Finished:
        run: Run | None = None
        if self.recording is not None:
            self.recording.close()  # a last step the GradScaler skipped is recorded now
            run = self.recording.run
        params = {name: p.detach().float().clone() for name, p in self.model.named_parameters()}
        times = list(self.step_times.values())
        result = PrecisionResult(
            precision=self.spec.name,
            losses=self.reported_losses(),
            skipped_steps=self.skipped,
            step_time=statistics.median(times) if times else math.nan,
            step_times=dict(self.step_times),
            peak_memory=self.memory.peak,
            memory_steps=tuple(self.memory.steps),
            run=run,
            notes=_notes(self.spec, self.setup.device),
            step_time_spread=_relative_spread(times),
        )
        distance = _distance(params, reference) if reference is not None else 0.0
        return _Finished(self.job, result, distance, params if self.job.label == REFERENCE else {})


class _Yardstick(_Training):
    """The second fp32 copy, trained on the batches in another order with other random draws. Before each
    of its steps, its loss on fp32's batch of that step with fp32's dropout masks: the two losses differ
    only by where the two trajectories have got to (a training loss would differ by the batches too,
    which fp32 and every precision share). Neither recorded, timed nor measured."""

    recorded = False

    def __init__(
        self, job: _Job, setup: _Setup, stack: contextlib.ExitStack, fp32_starts: list[dict[str, Any]]
    ) -> None:
        super().__init__(job, setup, stack)
        self.fp32_starts = fp32_starts  # in lock-step, fp32 has finished step i - 1 when this begins step i
        self.on_fp32s_batches: list[torch.Tensor] = []

    def step(self, index: int) -> None:
        batch = _prepared(self.setup.batches[index], self.setup.device, None)
        # buffers (BatchNorm's running statistics), .grad and the random state are left as they were
        with preserved(self.model, start_from=self.fp32_starts[index]) as rerun, torch.no_grad():
            with matmul_precision("ieee"):
                loss = rerun(lambda: self.setup.loss_fn(self.model, batch))
        _check_loss(loss)
        self.on_fp32s_batches.append(loss.detach())
        super().step(index)

    def reported_losses(self) -> list[float]:
        return _floats(self.on_fp32s_batches)


def _floats(losses: list[torch.Tensor]) -> list[float]:
    """Every step's loss as a float, with one host sync; fp64 holds every floating dtype exactly."""
    return torch.stack([loss.double() for loss in losses]).tolist()


def _relative_spread(times: list[float]) -> float:
    """The interquartile range of the step times over their median (NaN with fewer than 4)."""
    if len(times) < 4:
        return math.nan
    q1, median, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / median if median > 0 else math.nan


def _train(jobs: list[_Job], setup: _Setup, interleave: bool) -> list[_Finished]:
    """Run every job, fp32's result first (the others' distances are to its weights). In lock-step,
    every training has finished step i - 1 before any begins step i; one after another, fp32 trains
    first (the yardstick reads the random state of its every step)."""
    finished: list[_Finished] = []
    fp32_starts: list[list[dict[str, Any]]] = []  # the random state of fp32's every step, once it trains

    def start(job: _Job, stack: contextlib.ExitStack) -> _Training:
        if job.yardstick:
            return _Yardstick(job, setup, stack, fp32_starts[0])
        training = _Training(job, setup, stack)
        if job.label == REFERENCE:
            fp32_starts.append(training.starts)
        return training

    def reference() -> dict[str, torch.Tensor] | None:
        return finished[0].params if finished else None

    if interleave:
        with contextlib.ExitStack() as stack:
            trainings = [start(job, stack) for job in jobs]
            for index in range(setup.plan.steps):
                for training in _rotated(trainings, index):
                    training.step(index)
            for training in trainings:
                finished.append(training.finish(reference()))
        return finished
    for job in jobs:
        with contextlib.ExitStack() as stack:
            training = start(job, stack)
            for index in range(setup.plan.steps):
                training.step(index)
            finished.append(training.finish(reference()))
        del training  # one copy in memory at a time (fp32's random states stay for the yardstick)
    return finished


def _comparison(finished: list[_Finished], setup: _Setup, noise_run: bool) -> Comparison:
    ref = finished[0].result
    window = window_for(setup.plan.steps)
    yardstick = next((f for f in finished if f.job.yardstick), None)
    noise = None
    if noise_run and yardstick is not None:
        noise = noise_band(ref.losses, yardstick.result.losses, window, param_distance=yardstick.distance)
        if not any(noise.band):  # one batch repeated, no dropout: the reordered run is fp32 itself
            noise = step_noise_band(ref.losses, window, why=IDENTICAL_YARDSTICK)
    if noise is None:
        noise = step_noise_band(ref.losses, window)
    results = {REFERENCE: ref}
    for f in finished[1:]:
        if not f.job.yardstick:
            judged = convergence(f.result.losses, ref.losses, noise, param_distance=f.distance)
            results[f.result.precision] = dataclasses.replace(f.result, convergence=judged)
    return Comparison(
        results=results,
        noise=noise,
        device=str(setup.device),
        steps=setup.plan.steps,
        timing=setup.plan.timing,
        memory=_memory_sentence(setup),
    )


def _memory_sentence(setup: _Setup) -> str:
    which = "one step" if setup.plan.profiled else "the highest of the steps"
    which += " after the first optimizer step, whose own optimizer step ran (unrecorded where there are such steps)"
    return (
        f"{which}: parameters, buffers and optimizer state live at the step's start plus the most the "
        f"step's own allocations rose above them (activations, gradients, temporaries), from "
        f"{METHODS['cuda' if setup.device.type == 'cuda' else 'cpu']}; not the batch or anything else the "
        "process holds"
    )


def _distance(params: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """||params - reference|| / ||reference|| over all parameters together (fp64 sums)."""
    diff = ref = 0.0
    for name, p in params.items():
        r = reference[name]
        diff += float((p.double() - r.double()).square().sum())
        ref += float(r.double().square().sum())
    return (diff / ref) ** 0.5 if ref > 0 else 0.0


def _rotated(trainings: list[_Training], index: int) -> list[_Training]:
    """Who goes first changes every step: caches and the machine's slow moments fall on all alike."""
    k = index % len(trainings)
    return trainings[k:] + trainings[:k]


def _notes(spec: _Spec, device: torch.device) -> tuple[str, ...]:
    if spec.matmuls == "tf32" and not tf32_changes_matmuls(device):
        return (
            f"no TF32 matmuls on this {device.type} (a probe matmul in TF32 mode gave fp32's bits): it trained as fp32",
        )
    if spec.weights is not None:
        return ("weights, optimizer state and floating inputs in bf16, no fp32 master copy",)
    return ()


# -- arguments -----------------------------------------------------------------------------------------


def _check_arguments(model: object, loss_fn: object, make_optimizer: object, warmup: object) -> None:
    if not isinstance(model, nn.Module):
        raise MpdiagError(f"compare expects a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise MpdiagError(f"loss_fn must be a function loss_fn(model, batch) -> loss, got {type(loss_fn).__name__}")
    if not callable(make_optimizer):
        raise MpdiagError(
            "make_optimizer must be a function of the parameters that returns a new optimizer, for example "
            f"lambda params: torch.optim.AdamW(params, lr=1e-3); got {type(make_optimizer).__name__}"
        )
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise MpdiagError(f"warmup must be a number of steps (0 or more), got {warmup!r}")
    if diagnosed(model):
        raise MpdiagError(
            "this model has a Diagnosis attached, and a copy of it would carry its hooks: close it first "
            "(diag.close() or leave its with-block); compare records each copy itself (diagnose=True)"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise MpdiagError("compare trains the model, and it has no parameter that requires grad")
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()} - {"torch.float32"})
    if dtypes:
        raise MpdiagError(
            f"compare starts every precision from fp32 weights, and this model has {', '.join(dtypes)} "
            "parameters: compare a copy converted with copy.deepcopy(model).float()"
        )


def _specs(precisions: Sequence[str]) -> list[_Spec]:
    if isinstance(precisions, str):
        precisions = (precisions,)
    unknown = [p for p in precisions if p not in _SPECS]
    if unknown or not precisions:
        raise MpdiagError(f"precisions must be among {', '.join(PRECISIONS)}; got {list(precisions)!r}")
    chosen = [REFERENCE, *precisions]
    return [_SPECS[p] for p in dict.fromkeys(chosen)]  # fp32 first, each once


def _take(batches: Iterable[Any], steps: int | None) -> list[Any]:
    """The batches of every step, taken once: each precision must see the same ones."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < _MIN_STEPS):
        raise MpdiagError(f"steps must be an int of at least {_MIN_STEPS}, got {steps!r}")
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable):
        raise MpdiagError(
            "batches must be an iterable of batches (a list, a DataLoader, a generator); "
            f"got {type(batches).__name__} (for one batch repeated, pass [batch] with steps=N)"
        )
    if steps is None and not isinstance(batches, Sized):
        raise MpdiagError(
            f"batches ({type(batches).__name__}) has no length and may never end: pass steps=, the number of "
            "steps to train each precision"
        )
    taken: list[Any] = []
    source = iter(batches)
    while steps is None or len(taken) < steps:
        try:
            taken.append(next(source))
        except StopIteration:
            if steps is None or not taken:
                break
            if iter(batches) is batches:  # an iterator, used up: there is no second pass
                raise MpdiagError(
                    f"batches ran out after {len(taken)} of steps={steps}; pass fewer steps, or a list "
                    "(which is gone through again)"
                ) from None
            source = iter(batches)
    if len(taken) < _MIN_STEPS:
        raise MpdiagError(
            f"compare needs at least {_MIN_STEPS} steps (a warm-up, a step whose memory is measured, a timed "
            f"one); batches gave {len(taken)}: pass more batches, or steps= to go through them again"
        )
    return taken


def _diagnose_options(diagnose: bool | Mapping[str, Any]) -> dict[str, Any] | None:
    if diagnose is False:
        return None
    if diagnose is True:
        return {"every": _DEFAULT_EVERY}
    if not isinstance(diagnose, Mapping):
        raise MpdiagError(f"diagnose must be True, False or a dict of diagnose() options, got {diagnose!r}")
    unknown = sorted(set(diagnose) - set(_DIAGNOSE_OPTIONS))
    if unknown:
        raise MpdiagError(
            f"diagnose= takes {', '.join(_DIAGNOSE_OPTIONS)} (each copy gets its own optimizer and scaler); "
            f"got {', '.join(unknown)}"
        )
    return {"every": _DEFAULT_EVERY, **diagnose}


def _device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    chosen = torch.device(device) if device is not None else next(model.parameters()).device
    if chosen.type not in ("cpu", "cuda"):
        raise MpdiagError(f"compare measures time, memory and random state on a CPU or a CUDA GPU; got {chosen.type!r}")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise MpdiagError("device='cuda' was asked for, but this torch sees no CUDA GPU")
        torch.cuda.init()  # so that the random state every copy starts from holds CUDA's too
    return chosen


def _another_order(steps: int) -> list[int]:
    """The yardstick's order of the same batches: a fixed shuffle, never the identity."""
    order = torch.randperm(steps, generator=torch.Generator().manual_seed(0)).tolist()
    return order if order != list(range(steps)) else order[1:] + order[:1]


def _other_random_state(start: dict[str, Any]) -> dict[str, Any]:
    """A random state unlike ``start``, the same on every call: the yardstick draws other dropout masks."""
    torch.manual_seed(torch.initial_seed() + 1)
    other = rng_state()
    set_rng_state(start)
    return other


# -- one training's pieces -----------------------------------------------------------------------------


def _copy(model: nn.Module, device: torch.device, weights: torch.dtype | None) -> nn.Module:
    try:
        copied = copy.deepcopy(model)
    except Exception as err:
        raise MpdiagError(
            f"compare trains a copy.deepcopy of the model per precision, and this model cannot be copied "
            f"({type(err).__name__}: {err})"
        ) from err
    copied = copied.to(device)
    return copied.to(weights) if weights is not None else copied


def _optimizer(make_optimizer: MakeOptimizer, model: nn.Module) -> torch.optim.Optimizer:
    optimizer = make_optimizer(model.parameters())
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise MpdiagError(f"make_optimizer must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise MpdiagError("compare calls optimizer.step() without a closure, as most training does; LBFGS needs one")
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for group in optimizer.param_groups for p in group["params"]):
        raise MpdiagError(
            "make_optimizer must build its optimizer over the parameters it is given (each copy of the model "
            "gets its own); this one holds other parameters (the original model's?)"
        )
    return optimizer


def _grad_scaler(device: torch.device, options: dict[str, Any]) -> Any:
    try:
        if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
            return torch.amp.GradScaler(device.type, **options)
        if device.type == "cuda":
            return torch.cuda.amp.GradScaler(**options)
    except TypeError as err:
        raise MpdiagError(
            f"grad_scaler must be a dict of torch.amp.GradScaler's arguments (init_scale, growth_factor, "
            f"backoff_factor, growth_interval): {err}"
        ) from err
    raise MpdiagError("fp16 on a CPU needs torch.amp.GradScaler (torch >= 2.3); compare bf16 instead")


def _prepared(batch: Any, device: torch.device, weights: torch.dtype | None) -> Any:
    """The batch on the training's device; for pure low-precision weights, its floating tensors in their dtype."""

    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            x = x.to(device)
            return x.to(weights) if weights is not None and x.is_floating_point() else x
        if isinstance(x, Mapping):  # a dict-like pytree does not know (BatchEncoding): a new one, never .to()
            moved = {k: tree_map(move, v) for k, v in x.items()}  # (which would move the user's own in place)
            try:
                return type(x)(moved)  # type: ignore[call-arg]
            except TypeError:
                return moved
        return x

    return tree_map(move, batch)


def _check_loss(loss: object) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        shape = f" of shape {tuple(loss.shape)} and dtype {loss.dtype}" if isinstance(loss, torch.Tensor) else ""
        raise MpdiagError(f"loss_fn must return a scalar floating loss tensor, got a {type(loss).__name__}{shape}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
