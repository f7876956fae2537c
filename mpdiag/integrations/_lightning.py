"""The Lightning callback's body, shared by ``lightning.pytorch`` and the older ``pytorch_lightning``
package: each Trainer accepts only callbacks of its own package's Callback class, so each of
``mpdiag.integrations.lightning`` and ``mpdiag.integrations.pytorch_lightning`` makes its own class
from this one."""

from __future__ import annotations

from typing import Any

from torch import nn

from mpdiag.integrations._session import CallbackResults

__all__ = ["LightningHooks", "DOC"]

DOC = """Records a Lightning Trainer's training with ``mpdiag.diagnose``: ``Trainer(callbacks=[MpdiagCallback()])``.

It attaches when training starts (the strategy has set up the model and the optimizer) and records one
step per optimizer step: with ``accumulate_grad_batches=N`` a recorded step holds the N micro-batches of
its update, whether Lightning runs them in the optimizer's closure or before it. Under
``precision="16-mixed"`` it follows the precision plugin's GradScaler. Steps are numbered as Lightning
numbers them in its logs (from 0; ``trainer.global_step`` with one optimizer), also after resuming from
a checkpoint; ``every=N`` records the steps that ``log_every_n_steps=N`` logs (N-1, 2N-1, ...). It
detaches when training ends or raises, and leaves the Run on ``callback.run``. With several optimizers
(manual optimization), a step is a training batch; its parameters and gradients are observed when it
closes (a gradient a later backward of the batch added to is recorded with that addition).

Args:
    **options: diagnose's own (``formats``, ``every``, ``include``, ``exclude``, ``on_nonfinite``,
        ``run_file``), and ``report_dir`` (write the HTML report there when training ends) and
        ``tensorboard`` (a log dir: every recorded step is written there as it closes, see
        ``mpdiag.sinks.TensorBoard``). Under the ddp strategies every rank records and only rank 0 writes
        the run file, the report and the logs.
"""


class LightningHooks(CallbackResults):
    """The hooks of a Lightning ``Callback``; mixed into each package's own Callback class."""

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        optimizers = list(trainer.optimizers)
        first = _logged_step(trainer)
        self._session.attach(
            _observed_model(trainer, pl_module),
            optimizers[0] if len(optimizers) == 1 else None,
            getattr(trainer.precision_plugin, "scaler", None),
            first_step=first,
            record_first=self._logged_with_every(first),
        )

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        # Within one accumulation the number stays the same: only the first micro-batch begins a step.
        step = _logged_step(trainer)
        self._session.begin(step, record=self._logged_with_every(step))

    def _logged_with_every(self, step: int) -> bool:
        """Lightning logs step s when (s + 1) % log_every_n_steps == 0: ``every=N`` records the steps
        that ``log_every_n_steps=N`` logs (N-1, 2N-1, ...), so that the two line up."""
        return (step + 1) % self._session.every == 0

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._session.finish()

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        self._session.finish(exception)


def _logged_step(trainer: Any) -> int:
    """The step number Lightning's loggers give the batch in progress: the count of batches whose
    optimizers stepped (``global_step`` counts every optimizer's steps: with two, it goes up by two)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    stepped = getattr(loop, "_batches_that_stepped", None)
    return int(stepped) if isinstance(stepped, int) else int(trainer.global_step)


def _observed_model(trainer: Any, pl_module: nn.Module) -> nn.Module:
    """The LightningModule, or under a ddp strategy the DistributedDataParallel around it: mpdiag needs
    the wrapper to tell parameters every rank holds alike from per-rank activations (Lightning's own
    wrapper level, ``_forward_module``, is left out of names)."""
    wrapped = getattr(trainer.strategy, "model", None)
    if isinstance(wrapped, nn.parallel.DistributedDataParallel) and any(m is pl_module for m in wrapped.modules()):
        return wrapped
    return pl_module
