"""Destinations for every recorded step as it closes: ``diagnose(model, sinks=[...])``.

- ``Sink``: the protocol a sink implements (``mpdiag.record.sinks``);
- ``RunFile``: the SQLite run file (``mpdiag.io.runfile.RunFileSink``; ``run_file=path`` makes one);
- ``TensorBoard``: TensorBoard event files, live (``mpdiag.integrations.tensorboard``).

Example:
    >>> import os, tempfile, torch, mpdiag
    >>> path = os.path.join(tempfile.mkdtemp(), "run.mpdiag")
    >>> model = torch.nn.Linear(4, 2)
    >>> with mpdiag.diagnose(model, sinks=[mpdiag.sinks.RunFile(path)]) as diag:
    ...     model(torch.randn(3, 4)).sum().backward()
    >>> mpdiag.load(path).steps
    [0]
"""

from mpdiag.integrations.tensorboard import TensorBoard
from mpdiag.io.runfile import RunFileSink as RunFile
from mpdiag.record.sinks import Sink

__all__ = ["Sink", "RunFile", "TensorBoard"]
