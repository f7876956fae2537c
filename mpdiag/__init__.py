"""mpdiag: numerical-stability diagnostics for PyTorch mixed-precision training.

Attach ``diagnose`` to a model, train, read per-layer statistics from ``diag.run`` and write the
HTML report with ``diag.report(out_dir)``.
"""

from mpdiag.core import formats
from mpdiag.core.casting import classify, round_to
from mpdiag.diagnose import Diagnosis, diagnose
from mpdiag.core.errors import MpdiagError, MpdiagWarning
from mpdiag.analyse.grad_scaler import simulate_grad_scaler
from mpdiag.core.events import NonFiniteError, NonFiniteEvent
from mpdiag.render import Report, report
from mpdiag.probe.replay import replay_loss_scale
from mpdiag.core.run import Kind, Run, Site
from mpdiag.io.runfile import RunFileError, load
from mpdiag.analyse.scaling import advise
from mpdiag.core.stats import TensorStats
from mpdiag.record._accumulate import tensor_stats
from mpdiag.core.events import NonFiniteOrigin
from mpdiag.probe.trace import trace_nonfinite
from mpdiag.core.version import __version__

__all__ = ["diagnose", "Diagnosis", "Run", "Site", "Kind", "TensorStats", "tensor_stats", "formats", "classify", "round_to",
           "advise", "simulate_grad_scaler", "replay_loss_scale", "NonFiniteEvent", "NonFiniteError",
           "trace_nonfinite", "NonFiniteOrigin", "report", "Report",
           "load", "RunFileError", "MpdiagError", "MpdiagWarning"]
