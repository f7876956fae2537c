"""Recording: hooks on a live model that accumulate statistics on the device and close them per step.

Imports ``mpdiag.core`` only. The session object is ``recording.Recording``; the kernels behind it are
``_accumulate`` (any device, torch ops) and ``_cpu_kernel`` (CPU tensors, compiled with numba).
"""
