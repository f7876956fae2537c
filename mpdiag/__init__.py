"""mpdiag: numerical-stability diagnostics for PyTorch mixed-precision training.

Attach ``diagnose`` to a model, train, read per-layer statistics from ``diag.run`` and write the
HTML report with ``diag.report(out_dir)``.
"""

from mpdiag import formats
from mpdiag.casting import classify, round_to
from mpdiag.diagnose import Diagnosis, diagnose
from mpdiag.errors import MpdiagError, MpdiagWarning
from mpdiag.grad_scaler import simulate_grad_scaler
from mpdiag.nonfinite import NonFiniteError, NonFiniteEvent
from mpdiag.render import Report, report
from mpdiag.replay import replay_loss_scale
from mpdiag.run import Kind, Run, Site
from mpdiag.runfile import RunFileError, load
from mpdiag.scaling import advise
from mpdiag.stats import TensorStats
from mpdiag.trace import NonFiniteOrigin, trace_nonfinite

__all__ = ["diagnose", "Diagnosis", "Run", "Site", "Kind", "TensorStats", "formats", "classify", "round_to",
           "advise", "simulate_grad_scaler", "replay_loss_scale", "NonFiniteEvent", "NonFiniteError",
           "trace_nonfinite", "NonFiniteOrigin", "report", "Report",
           "load", "RunFileError", "MpdiagError", "MpdiagWarning"]
__version__ = "0.1.0"
