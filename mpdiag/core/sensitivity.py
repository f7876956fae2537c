"""Per-layer precision sensitivity as plain data, and the search for the fewest layers to keep in fp32.

``mpdiag.sensitivity`` (``mpdiag.probe.sensitivity``) measures; this module holds what it returns:
``LayerError`` (how far one module's output is from fp32's), ``Sensitivity`` (local and propagated
errors of every module, the loss's error) and ``KeepFp32`` (the answer of ``Sensitivity.keep_fp32``).
The search runs the model again to verify each candidate set, through a function the probe hands over
(``Verify``); everything else here is arithmetic on the measured numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from mpdiag.core.errors import MpdiagError
from mpdiag.core.text import display_name

__all__ = ["LayerError", "KeepFp32", "Sensitivity", "Verify"]

#: Runs the model in low precision with the named modules in fp32: (the loss's relative error, whether
#: the loss and every module output stayed finite).
Verify = Callable[[Sequence[str]], tuple[float, bool]]

DEFAULT_TOLERANCE = 0.01


@dataclass(frozen=True)
class LayerError:
    """How far a module's low-precision output is from its fp32 output (all its floating outputs, all
    the calls of one forward, taken together).

    Attributes:
        name: the module's name in ``model.named_modules()``.
        rel_error: ``||low - fp32|| / ||fp32||`` (L2 norms, in fp64); inf where ``nonfinite``.
        sqnr_db: signal to quantisation-noise ratio, ``10 log10(||fp32||^2 / ||low - fp32||^2)``: about
            6 dB per mantissa bit kept; inf where the outputs are equal, -inf where ``nonfinite``.
        nonfinite: the low-precision output holds NaN or inf where the fp32 output is finite.
    """

    name: str
    rel_error: float
    sqnr_db: float
    nonfinite: bool

    @property
    def label(self) -> str:
        return display_name(self.name)

    def describe(self) -> str:
        if self.nonfinite:
            return "non-finite"
        return f"{self.rel_error:.2e} ({self.sqnr_db:.0f} dB)"


@dataclass(frozen=True)
class KeepFp32:
    """The answer of ``Sensitivity.keep_fp32``.

    Attributes:
        names: the modules to keep in fp32, in forward order (empty: nothing needed); None when no set
            short of every leaf module kept the loss within ``tolerance``.
        tolerance: the loss's relative error allowed.
        loss_error: the loss's relative error with ``names`` in fp32 (with every leaf in fp32 where
            ``names`` is None), measured by running the model.
        passes: how many runs of the whole model the search took (each a forward pass of the batch).
        dtype: the low precision ("fp16", "bf16").
        transformers_line: for a transformers model, the class attribute with the same effect at load time.
    """

    names: tuple[str, ...] | None
    tolerance: float
    loss_error: float
    passes: int
    dtype: str
    transformers_line: str | None = None

    @property
    def found(self) -> bool:
        return self.names is not None

    def code(self) -> str:
        """The line that applies the answer around the training step."""
        names = list(self.names or ())
        return f"with mpdiag.keep_fp32(model, {names!r}):"

    def __str__(self) -> str:
        runs = f"{self.passes} run{'s' if self.passes != 1 else ''} of the model"
        within = f"loss error {self.loss_error:.2e}, tolerance {self.tolerance:g}; {runs}"
        if self.names is None:
            remedy = "train this model in fp32" + (", or raise the tolerance" if math.isfinite(self.loss_error) else "")
            return (
                f"no set of modules short of every leaf keeps the loss within tolerance in {self.dtype} "
                f"({within}): {remedy}"
            )
        if not self.names:
            return f"nothing needs fp32 in {self.dtype} ({within})"
        lines = [f"keep in fp32 for {self.dtype}: {', '.join(display_name(n) for n in self.names)} ({within})"]
        lines.append(f"  {self.code()}")
        if self.transformers_line:
            lines.append(f"  or, for a transformers model loaded in {self.dtype}: {self.transformers_line}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Sensitivity:
    """What low precision does to each module of a model on one batch (``mpdiag.sensitivity``).

    Attributes:
        dtype: the low precision measured ("fp16", "bf16").
        device_type: the device type autocast ran for.
        local: per module (forward order), its **local error**: the module alone run in low precision
            on the exact input it received in the fp32 pass. Which layer is itself fragile.
        propagated: per module, its output's error with the whole model under autocast: the error it
            inherits and adds.
        first_nonfinite: the first module (in the order outputs were produced) whose output under
            autocast held NaN/inf where fp32's was finite; None if none did.
        leaves: the modules without children, in forward order: the candidates ``keep_fp32`` prefers.
        loss_fp32, loss_low: the loss of the fp32 pass and of the autocast pass.
        skipped: modules whose local error could not be measured, with the reason.
        passes: runs the measurement took: the fp32 and the autocast forward, and one per module run
            alone.
        transformers_line_for, verify: what the probe hands over to write the transformers line and
            to run a candidate set (not compared, not part of the data).
    """

    dtype: str
    device_type: str
    local: Mapping[str, LayerError]
    propagated: Mapping[str, LayerError]
    leaves: tuple[str, ...]
    loss_fp32: float
    loss_low: float
    first_nonfinite: str | None = None
    skipped: Mapping[str, str] = field(default_factory=dict)
    passes: int = 0
    transformers_line_for: Callable[[Sequence[str]], str | None] | None = field(default=None, compare=False, repr=False)
    verify: Verify | None = field(default=None, compare=False, repr=False)
    #: The answers ``keep_fp32`` found, by tolerance, in the order asked (the report shows them).
    answers: dict[float, KeepFp32] = field(default_factory=dict, compare=False, repr=False)

    @property
    def loss_error(self) -> float:
        """The loss's relative error under autocast (inf when the low-precision loss is not finite)."""
        return relative(self.loss_low, self.loss_fp32)

    def fragile(self, n: int | None = 10) -> list[LayerError]:
        """The leaf modules by local error, worst first (non-finite ones before all others)."""
        ranked = sorted(
            (self.local[name] for name in self.leaves if name in self.local),
            key=lambda e: (not e.nonfinite, -e.rel_error),
        )
        return ranked if n is None else ranked[:n]

    def candidates(self) -> list[str]:
        """The leaf modules in the order ``keep_fp32`` tries them: the first one whose output went
        non-finite under autocast, then by local error (``fragile``), then those that could not run
        alone (``skipped``), by propagated error."""
        order = [self.first_nonfinite] if self.first_nonfinite in self.leaves else []
        order += [e.name for e in self.fragile(None)]
        unmeasured = [n for n in self.leaves if n in self.skipped]
        order += sorted(unmeasured, key=lambda n: -self.propagated[n].rel_error if n in self.propagated else 0.0)
        return list(dict.fromkeys(order))

    def keep_fp32(self, tolerance: float = DEFAULT_TOLERANCE) -> KeepFp32:
        """The fewest modules found that, kept in fp32 with the rest in low precision, keep the loss's
        relative error within ``tolerance`` and every output finite.

        Greedy from the measured errors, each candidate verified by running the model: leaf modules are
        added in the order of ``candidates`` until a run passes, then each one added before the last is
        dropped again if the run passes without it. When no set of leaves passes, the modules around
        the first one that went non-finite are tried alone, innermost first (an error made in a
        container's own forward, between its children). One pass for the empty set, at most one
        per leaf while adding and one per member while pruning.
        """
        if self.verify is None:
            raise MpdiagError("this Sensitivity has no model to verify with (it was loaded, not measured)")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
            raise MpdiagError(f"keep_fp32 expects a tolerance above 0 (a relative loss error), got {tolerance!r}")
        passes = 0

        def passing(names: Sequence[str]) -> tuple[bool, float]:
            nonlocal passes
            passes += 1
            assert self.verify is not None
            error, finite = self.verify(names)
            return finite and error <= tolerance, error

        ok, error = passing(())
        if ok:
            return self._answer((), tolerance, error, passes)
        chosen: list[str] = []
        for name in self.candidates():
            chosen.append(name)
            ok, error = passing(chosen)
            if ok:
                break
        else:
            # No set of leaves works: the error may be made in a container's own forward, between its
            # children (attention scores computed in the parent). Try the containers around the first
            # module that went non-finite, innermost first.
            for name in self._enclosing(self.first_nonfinite):
                ok, trial_error = passing([name])
                if ok:
                    return self._answer((name,), tolerance, trial_error, passes)
            return self._answer(None, tolerance, error, passes)
        for name in reversed(chosen[:-1]):  # the last one added made it pass; the others may not be needed
            trial = [n for n in chosen if n != name]
            ok, trial_error = passing(trial)
            if ok:
                chosen, error = trial, trial_error
        return self._answer(tuple(chosen), tolerance, error, passes)

    def _enclosing(self, name: str | None) -> list[str]:
        """The modules around ``name`` (not the model itself), innermost first."""
        if not name:
            return []
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]

    def _answer(self, names: tuple[str, ...] | None, tolerance: float, error: float, passes: int) -> KeepFp32:
        order = list(dict.fromkeys([*self.propagated, *self.local, *self.leaves]))
        in_order = None if names is None else tuple(n for n in order if n in names)
        line = self.transformers_line_for(in_order) if in_order and self.transformers_line_for else None
        answer = self.answers[tolerance] = KeepFp32(in_order, tolerance, error, passes, self.dtype, line)
        return answer

    def __str__(self) -> str:
        lines = [
            f"precision sensitivity, {self.dtype} on {self.device_type}: loss {self.loss_fp32:.6g} in fp32, "
            f"{self.loss_low:.6g} in {self.dtype} (relative error {self.loss_error:.2e}); "
            f"2 forward passes and {self.passes - 2} modules run alone",
        ]
        if self.first_nonfinite is not None:
            lines.append(f"first non-finite output under autocast: {display_name(self.first_nonfinite)}")
        worst = self.fragile(8)
        if worst:
            width = max(len(e.label) for e in worst)
            lines.append(f"most fragile layers ({'local error':>24} {'propagated error':>24}):")
            for e in worst:
                prop = self.propagated.get(e.name)
                shown = prop.describe() if prop is not None else "-"
                lines.append(f"  {e.label:<{width}} {e.describe():>24} {shown:>24}")
        if self.skipped:
            lines.append(f"not measured alone: {', '.join(display_name(n) for n in self.skipped)}")
        lines.extend(str(answer) for answer in self.answers.values())
        if not self.answers:
            lines.append("which to keep in fp32: sens.keep_fp32(tolerance=...) runs the search")
        return "\n".join(lines)


def relative(value: float, reference: float) -> float:
    """``|value - reference| / |reference|`` (absolute where the reference is 0; inf where not finite)."""
    if not math.isfinite(value):
        return math.inf
    return abs(value - reference) / (abs(reference) or 1.0)
