"""Recording: hooks on a live model that accumulate statistics on the device and close them per step.

Imports ``mpdiag.core`` only. The session object is ``recording.Recording``; the kernels behind it are
``_accumulate`` (any device, torch ops) and ``_cpu_kernel`` (CPU tensors, compiled with numba).

What the probes (``mpdiag.probe``: re-runs of a batch on the live model) need from recording is exported
here, and they import nothing else of it: pausing every recording attached to a model, the tensors in a
module's output, the tag that names the module behind an autograd node, the check that autocast
can run a dtype on a device, and the autocast dtype active now (the fp8 simulation runs where it is on);
and, for the probes that train copies of a model (``compare``), the session itself, ``Recording``, and
whether a model is being recorded already (a copy would carry its hooks).
"""

from mpdiag.record.environment import autocast_dtype, check_autocast
from mpdiag.record.hooks import floating_tensors
from mpdiag.record.nodes import MODULE_KEY, claim_nodes
from mpdiag.record.recording import Recording, diagnosed, paused

__all__ = [
    "Recording",
    "diagnosed",
    "paused",
    "floating_tensors",
    "claim_nodes",
    "MODULE_KEY",
    "check_autocast",
    "autocast_dtype",
]
