"""Sites: where tensors are observed (a module or parameter, by name) and what was observed there."""

from __future__ import annotations

import enum
from typing import NamedTuple

from mpdiag.core.errors import MpdiagError
from mpdiag.core.text import display_name

__all__ = ["Kind", "Site"]


class Kind(str, enum.Enum):
    """What was observed at a site."""

    ACTIVATION = "activation"  # floating tensors in a module's output
    ACTIVATION_GRAD = "activation_grad"  # the gradient arriving at those outputs in backward
    PARAM = "param"  # a parameter's values when the step closed
    PARAM_GRAD = "param_grad"  # a parameter's gradient as backward left it
    # a tensor of the optimizer's state for a parameter, after the step: "<parameter>.<state key>"
    OPTIMIZER_STATE = "optimizer_state"
    # the change the optimizer's step made to a parameter: the new value minus the old, exactly (in fp64)
    UPDATE = "update"

    @classmethod
    def parse(cls, value: str | Kind) -> Kind:
        try:
            return cls(value)
        except ValueError:
            raise MpdiagError(
                f"unknown site kind {value!r}; expected one of {', '.join(k.value for k in cls)}"
            ) from None

    @property
    def is_gradient(self) -> bool:
        """A gradient (of an activation or a parameter): what loss scaling multiplies."""
        return self in (Kind.ACTIVATION_GRAD, Kind.PARAM_GRAD)

    @property
    def is_optimizer(self) -> bool:
        """Seen in the optimizer's step (its state, the updates): no value the model computes with."""
        return self in (Kind.OPTIMIZER_STATE, Kind.UPDATE)

    def __str__(self) -> str:
        return self.value


class Site(NamedTuple):
    """A place where tensors are observed: a module or parameter name and what was observed there."""

    name: str
    kind: Kind

    @property
    def label(self) -> str:
        """How the site is named to people: 'blocks.0.attn (activation_grad)'."""
        return f"{display_name(self.name)} ({self.kind.value})"
