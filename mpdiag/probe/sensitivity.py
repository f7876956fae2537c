"""Measure what low precision does to each layer of a model on one batch, and which layers to keep in fp32.

``sensitivity(model, loss_fn, batch, dtype)`` runs the batch forward (no backward, no optimizer):

1. an fp32 reference pass (autocast off, TF32 off for matmuls and convolutions), keeping each module's
   inputs, outputs and the random state it started from;
2. per module, the module alone under autocast on its fp32 inputs, from the same random state (its
   **local error**: the error that module itself adds);
3. the whole model under autocast from the same random state (the **propagated error** of each
   module's output, and the loss's).

``Sensitivity.keep_fp32(tolerance)`` then searches the fewest modules to keep in fp32, verifying each
candidate set with one more forward pass under ``mpdiag.keep_fp32``.

Cost: one forward of the model for the reference, one for the autocast pass, and one run of each
module alone, about one forward per level of module nesting; memory for a copy of every module's
inputs and outputs. The model is left as found: parameters are never written, buffers (BatchNorm's
running statistics) and ``.grad`` are restored, the random state too; dropout draws the same masks in
every pass; an attached Diagnosis records none of it.

Examples:
    >>> import torch, mpdiag
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    >>> sens = mpdiag.sensitivity(model, lambda m, x: m(x).square().mean(), torch.randn(4, 8), torch.bfloat16)
    >>> sorted(sens.local), sens.leaves
    (['0', '1'], ('0', '1'))
    >>> sens.keep_fp32(tolerance=0.05).names
    ()
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from mpdiag.core import formats
from mpdiag.core.errors import MpdiagError
from mpdiag.core.sensitivity import LayerError, Sensitivity, relative
from mpdiag.probe._fp8 import Fp8Matmuls
from mpdiag.probe._matmul_precision import matmul_precision
from mpdiag.probe._rerun import preserved, rng_state, set_rng_state
from mpdiag.probe.keep_fp32 import eager_module, keep_fp32, transformers_line
from mpdiag.record import autocast_dtype, floating_tensors

__all__ = ["sensitivity"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]

#: The low precisions autocast runs, by the names Sensitivity reports.
_AUTOCAST_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def sensitivity(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    dtype: torch.dtype | str = torch.float16,
    *,
    device_type: str | None = None,
) -> Sensitivity:
    """Local and propagated error of every module of ``model`` in ``dtype`` on ``batch``.

    Args:
        model: the model, in the mode (train/eval) its training runs in, with fp32 parameters.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss, forward included; it must not apply
            autocast itself (the passes choose the precision).
        batch: whatever ``loss_fn`` takes.
        dtype: ``torch.float16`` / ``"fp16"`` or ``torch.bfloat16`` / ``"bf16"`` (real autocast), or
            ``"fp8_e4m3"`` / ``"fp8_e5m2"``: bf16 autocast with the linear layers and matmuls simulated
            as fp8 GEMMs with per-tensor scaling (``mpdiag.probe._fp8`` says exactly what).
        device_type: the autocast device type; by default that of the model's parameters.
    """
    if not isinstance(model, nn.Module):
        raise MpdiagError(f"sensitivity expects a torch.nn.Module, got {type(model).__name__}")
    model = eager_module(model)
    low = _precision(dtype)
    _check_fp32_weights(model)
    device_type = device_type or _device_type_of(model)
    names = {module: name for name, module in model.named_modules()}
    leaves = [name for name, module in model.named_modules() if name and not any(True for _ in module.children())]
    start = rng_state()
    with preserved(model) as rerun, torch.no_grad(), matmul_precision("ieee"), _eager():
        reference = _Capture(names, keep_inputs=True, device_type=device_type)
        with reference.hooks(model), torch.autocast(device_type, enabled=False):
            loss_fp32 = _loss(rerun, model, loss_fn, batch)
        _check_reference(reference, loss_fp32)
        local, skipped = rerun(lambda: _local_errors(reference, device_type, low))  # buffers restored after
        propagated = _Capture(names, compare_with=reference)
        with propagated.hooks(model), low.running(device_type):
            loss_low = _loss(rerun, model, loss_fn, batch)

    weights = _fingerprint(model)
    finite_in_fp32 = reference.finite_outputs()

    def verify(kept: Sequence[str]) -> tuple[float, bool]:
        if _fingerprint(model) != weights:
            raise MpdiagError(
                "the model's parameters changed since sensitivity() measured it (training went on?); "
                "measure again with mpdiag.sensitivity before searching"
            )
        check = _Capture(names, finite_only=True, finite_in_fp32=finite_in_fp32)
        # from the random state the measurement started from: dropout draws the same masks
        with preserved(model, start_from=start) as again, torch.no_grad(), matmul_precision("ieee"), _eager():
            with keep_fp32(model, kept), check.hooks(model), low.running(device_type):
                loss = _loss(again, model, loss_fn, batch)
        return relative(loss, loss_fp32), check.all_finite and math.isfinite(loss)

    in_order = [names[m] for m in reference.order]
    return Sensitivity(
        dtype=low.name,
        device_type=device_type,
        local={n: local[n] for n in in_order if n in local},
        propagated={n: e for n in in_order if (e := propagated.error(n)) is not None},
        leaves=tuple(n for n in in_order if n in leaves),
        loss_fp32=loss_fp32,
        loss_low=loss_low,
        first_nonfinite=propagated.first_nonfinite,
        skipped=skipped,
        passes=2 + len(local),
        # transformers loads weights in fp16 or bf16, never in fp8: no line for the fp8 simulation
        transformers_line_for=None if low.fp8 else lambda kept: transformers_line(model, kept, low.autocast),
        verify=verify,
    )


@dataclass(frozen=True)
class _Precision:
    """The low precision of the passes: autocast's dtype, and the fp8 format its matmuls simulate."""

    name: str
    autocast: torch.dtype
    fp8: torch.dtype | None = None

    @contextlib.contextmanager
    def running(self, device_type: str) -> Iterator[None]:
        with torch.autocast(device_type, dtype=self.autocast):
            if self.fp8 is None:
                yield
            else:
                with Fp8Matmuls(self.fp8, device_type):
                    yield


def _precision(dtype: torch.dtype | str) -> _Precision:
    if dtype in _AUTOCAST_DTYPES:
        return _Precision(_AUTOCAST_DTYPES[dtype], dtype)
    try:
        fmt = formats.get(dtype)
    except MpdiagError:
        fmt = None
    if fmt is not None and fmt.dtype in _AUTOCAST_DTYPES:
        return _Precision(_AUTOCAST_DTYPES[fmt.dtype], fmt.dtype)
    if fmt is not None and fmt.dtype is not None and fmt.dtype.itemsize == 1:
        return _Precision(fmt.name, torch.bfloat16, fmt.dtype)  # fp8 recipes run the rest in bf16
    raise MpdiagError(
        "sensitivity measures fp16 or bf16 under autocast, or simulated fp8 matmuls: torch.float16, "
        f"torch.bfloat16, 'fp16', 'bf16', 'fp8_e4m3' or 'fp8_e5m2'; got {dtype!r}"
    )


@contextlib.contextmanager
def _eager() -> Iterator[None]:
    """Every forward eager while measuring: a module compiled in place (``model.compile()``) would run
    its graph, past the hooks that see each module."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if set_stance is not None:
        with set_stance("force_eager"):
            yield
        return
    from torch._dynamo import config as dynamo_config  # torch < 2.6: dynamo's own switch

    with dynamo_config.patch(disable=True):
        yield


def _check_fp32_weights(model: nn.Module) -> None:
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()} - {"torch.float32"})
    if dtypes:
        raise MpdiagError(
            f"sensitivity needs fp32 parameters (autocast training keeps fp32 weights), and this model has "
            f"{', '.join(dtypes)} ones: measure a copy converted with copy.deepcopy(model).float()"
        )


def _check_reference(reference: _Capture, loss: float) -> None:
    if reference.autocast_inside:
        raise MpdiagError(
            f"autocast ({reference.autocast_inside}) was on inside the fp32 reference pass: loss_fn or the model "
            "applies autocast itself; remove it there (sensitivity chooses the precision of each pass)"
        )
    if not math.isfinite(loss):
        raise MpdiagError(
            f"the loss is {loss} in fp32 already, so no precision can be compared with it; "
            "mpdiag.trace_nonfinite(model, loss_fn, batch) finds the operation that produced it"
        )


def _fingerprint(model: nn.Module) -> list[tuple[int, int]]:
    """What changes when a parameter is written: its storage and its version counter."""
    return [(p.data_ptr(), p._version) for p in model.parameters()]


def _device_type_of(model: nn.Module) -> str:
    for p in model.parameters():
        return p.device.type
    return "cpu"


def _loss(rerun: Callable[[Callable[[], Any]], Any], model: nn.Module, loss_fn: LossFn, batch: Any) -> float:
    loss = rerun(lambda: loss_fn(model, batch))
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""
        raise MpdiagError(f"loss_fn must return a scalar loss tensor, got a {type(loss).__name__}{shape}")
    return float(loss.detach().double())


@dataclass
class _Call:
    """One call of a module in the reference pass: what went in, what came out, the random state first."""

    args: Any
    kwargs: Any
    rng: dict[str, Any]
    outputs: list[torch.Tensor] = field(default_factory=list)


class _Sums:
    """Sums of squares over a module's outputs: the signal, the error, how many elements were compared
    and whether the low-precision output went non-finite where fp32's is finite."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.compared = 0
        self.nonfinite = False

    def add(self, low: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> None:
        # In fp32: the low-precision values widen exactly, their difference to fp32's is exact to an fp32
        # rounding (far below the error measured), and the dot products accumulate blockwise. fp64 copies
        # of GPT-2's logits would cost more than the forward. A power-of-two scale keeps the squares in
        # fp32's range (a tensor of 1e19 would overflow them); the sums are kept in Python floats (fp64).
        for a, b in zip(low, ref):
            if a.shape != b.shape:
                continue
            a, b = a.float().reshape(-1), b.float().reshape(-1)
            if not bool(torch.isfinite(b).all()):  # where fp32 itself is not finite there is nothing to compare
                keep = torch.isfinite(b)
                a, b = a[keep], b[keep]
            if not b.numel():
                continue
            self.compared += b.numel()
            if not bool(torch.isfinite(a).all()):
                self.nonfinite = True
                continue
            diff = a - b
            top = max(float(b.abs().max()), float(diff.abs().max()))
            scale = 2.0 ** -math.floor(math.log2(top)) if top > 0 else 1.0
            b, diff = b * scale, diff * scale
            self.signal += float(torch.dot(b, b)) / scale**2
            self.noise += float(torch.dot(diff, diff)) / scale**2

    def error(self, name: str) -> LayerError | None:
        """The module's error; None when no element could be compared (no floating output)."""
        if self.compared == 0:
            return None
        if self.nonfinite or not math.isfinite(self.noise):
            return LayerError(name, math.inf, -math.inf, True)
        if self.noise == 0:
            return LayerError(name, 0.0, math.inf, False)
        rel = math.sqrt(self.noise / self.signal) if self.signal else math.inf
        sqnr = 10 * math.log10(self.signal / self.noise) if self.signal else -math.inf
        return LayerError(name, rel, sqnr, False)


class _Capture:
    """Forward hooks on every module of one pass: keep the calls (reference), compare each output with
    the reference's (propagated), or only check that every output is finite (verification)."""

    def __init__(
        self,
        names: dict[nn.Module, str],
        *,
        keep_inputs: bool = False,
        compare_with: _Capture | None = None,
        finite_only: bool = False,
        finite_in_fp32: dict[tuple[nn.Module, int], list[bool]] | None = None,
        device_type: str = "cpu",
    ) -> None:
        self.finite_in_fp32 = finite_in_fp32 or {}
        self.names, self.device_type = names, device_type
        self.autocast_inside: str | None = None  # the reference pass: an autocast dtype seen inside it
        self.keep_inputs, self.reference, self.finite_only = keep_inputs, compare_with, finite_only
        self.calls: dict[nn.Module, list[_Call]] = {}
        self.order: list[nn.Module] = []  # modules in the order their first call finished
        self.sums: dict[str, _Sums] = {}
        self.seen: dict[nn.Module, int] = {}
        self.all_finite = True
        self.first_nonfinite: str | None = None  # comparing: the first module whose output went non-finite
        self._copies: dict[tuple[int, int], tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}

    @contextlib.contextmanager
    def hooks(self, model: nn.Module) -> Iterator[None]:
        handles = []
        for module in self.names:
            if self.keep_inputs:
                handles.append(module.register_forward_pre_hook(self._before, with_kwargs=True))
            handles.append(module.register_forward_hook(self._after))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _before(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.autocast_inside = self.autocast_inside or autocast_dtype(self.device_type)
        self.calls.setdefault(module, []).append(_Call(_snapshot(args), _snapshot(kwargs), rng_state()))

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        originals = [t for t in floating_tensors(output) if t.is_floating_point()]
        outputs = [t.detach() for t in originals]
        index = self.seen.get(module, 0)
        self.seen[module] = index + 1
        if self.finite_only:  # non-finite only where fp32's output was finite (a mask's -inf is no failure)
            expected = self.finite_in_fp32.get((module, index), [])
            for j, t in enumerate(outputs):
                if (j >= len(expected) or expected[j]) and not bool(torch.isfinite(t).all()):
                    self.all_finite = False
            return
        if index == 0:
            self.order.append(module)
        if self.keep_inputs:
            self.calls[module][index].outputs = [self._copy(t) for t in originals]
        elif self.reference is not None:
            ref_calls = self.reference.calls.get(module, [])
            if index < len(ref_calls):
                sums = self.sums.setdefault(self.names[module], _Sums())
                sums.add(outputs, ref_calls[index].outputs)
                if sums.nonfinite and self.first_nonfinite is None:
                    self.first_nonfinite = self.names[module]

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        # A tensor several modules return (a head's logits are the model's, a Sequential's its last
        # child's) is copied once. Weakly held: the original may be freed, and its id reused.
        key = (id(t), t._version)
        held = self._copies.get(key)
        if held is None or held[0]() is not t:
            held = self._copies[key] = (weakref.ref(t), t.detach().clone())
        return held[1]

    def finite_outputs(self) -> dict[tuple[nn.Module, int], list[bool]]:
        """For each call of the reference pass, whether each of its outputs was finite."""
        return {
            (module, i): [bool(torch.isfinite(t).all()) for t in call.outputs]
            for module, calls in self.calls.items()
            for i, call in enumerate(calls)
        }

    def error(self, name: str) -> LayerError | None:
        sums = self.sums.get(name)
        return None if sums is None else sums.error(name)


def _snapshot(tree: Any) -> Any:
    """A copy of a module's inputs that later in-place updates cannot reach: tensors cloned (detached),
    other objects deep-copied where they allow it (a transformers cache grows as layers run)."""
    return tree_map(_copied, tree)


def _copied(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return leaf.detach().clone()
    try:
        return copy.deepcopy(leaf)
    except Exception:  # noqa: BLE001 - an object that cannot be copied is passed as it is
        return leaf


def _local_errors(
    reference: _Capture, device_type: str, low: _Precision
) -> tuple[dict[str, LayerError], dict[str, str]]:
    """Each module (the root aside) run alone under autocast on each of its reference inputs."""
    errors: dict[str, LayerError] = {}
    skipped: dict[str, str] = {}
    for module in reference.order:
        name = reference.names[module]
        if not name:
            continue  # the root alone is the propagated pass
        sums = _Sums()
        try:
            for call in reference.calls[module]:
                set_rng_state(call.rng)
                with low.running(device_type):
                    output = module(*_snapshot(call.args), **_snapshot(call.kwargs))
                sums.add([t for t in floating_tensors(output) if t.is_floating_point()], call.outputs)
        except Exception as err:  # noqa: BLE001 - a module that cannot run alone is reported, not fatal
            skipped[name] = f"{type(err).__name__}: {err}"
            continue
        error = sums.error(name)
        if error is None:
            skipped[name] = "no floating output to compare"
        else:
            errors[name] = error
    return errors, skipped
