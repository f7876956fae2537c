"""mpdiag: numerical-stability diagnostics for PyTorch mixed-precision training.

Attach ``diagnose`` to a model, train, read per-layer statistics from ``diag.run`` and write the
HTML report with ``diag.report(out_dir)``.
"""

from mpdiag import _moved, sinks
from mpdiag.analysis import Analysis, analyse
from mpdiag.analysis.grad_scaler import GradScalerSimulation, simulate_grad_scaler
from mpdiag.analysis.scaling import LossScaleAdvice, ScaleOutcome, advise
from mpdiag.analysis.verdict import Level, Verdict, scaled_underflow, verdicts
from mpdiag.core import formats
from mpdiag.core.casting import classify, round_to
from mpdiag.core.comparison import Comparison, Convergence, NoiseBand, PrecisionResult
from mpdiag.core.errors import MpdiagError, MpdiagWarning
from mpdiag.core.events import AnomalyRecord, NonFiniteError, NonFiniteEvent, NonFiniteOrigin
from mpdiag.core.run import Kind, Run, Site
from mpdiag.core.sensitivity import KeepFp32, LayerError, Sensitivity
from mpdiag.core.stats import TensorStats
from mpdiag.core.version import __version__ as __version__  # re-exported, as the alias tells linters
from mpdiag.diagnose import Diagnosis, diagnose
from mpdiag.integrations.tensorboard import to_tensorboard
from mpdiag.io.runfile import RunFileError, load
from mpdiag.probe.compare import compare
from mpdiag.probe.keep_fp32 import keep_fp32
from mpdiag.probe.replay import replay_loss_scale
from mpdiag.probe.sensitivity import sensitivity
from mpdiag.probe.trace import trace_nonfinite
from mpdiag.record._accumulate import tensor_stats
from mpdiag.render import Report, report
from mpdiag.render.terminal import summary

__all__ = [
    "diagnose",
    "Diagnosis",
    "Run",
    "Site",
    "Kind",
    "TensorStats",
    "tensor_stats",
    "formats",
    "classify",
    "round_to",
    "analyse",
    "Analysis",
    "advise",
    "LossScaleAdvice",
    "ScaleOutcome",
    "GradScalerSimulation",
    "verdicts",
    "Verdict",
    "Level",
    "scaled_underflow",
    "summary",
    "AnomalyRecord",
    "simulate_grad_scaler",
    "replay_loss_scale",
    "NonFiniteEvent",
    "NonFiniteError",
    "trace_nonfinite",
    "NonFiniteOrigin",
    "sensitivity",
    "Sensitivity",
    "LayerError",
    "KeepFp32",
    "keep_fp32",
    "compare",
    "Comparison",
    "PrecisionResult",
    "Convergence",
    "NoiseBand",
    "report",
    "Report",
    "load",
    "to_tensorboard",
    "sinks",
    "RunFileError",
    "MpdiagError",
    "MpdiagWarning",
]

_moved.install()


def __getattr__(name: str) -> object:
    """``mpdiag.scaling`` and the other module paths of mpdiag 0.1 (see ``mpdiag._moved``)."""
    module = _moved.moved_module(name)
    if module is None:
        raise AttributeError(f"module 'mpdiag' has no attribute {name!r}")
    return module
