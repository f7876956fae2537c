"""The transformers Trainer: ``Trainer(..., callbacks=[MpdiagCallback()])``.

The callback attaches when training begins, once the Trainer has prepared the model and the optimizer
(accelerate's wrapper, whose GradScaler it follows when the Trainer uses one), and records one step per
optimizer step: with ``gradient_accumulation_steps=N`` a recorded step holds the N micro-batches of its
update. Steps are numbered as the Trainer numbers them in its logs: the step that makes ``global_step``
120 is mpdiag's step 120 (the first is 1), also with ``every=`` and after resuming from a checkpoint.
It detaches when training ends or raises, and leaves the Run on ``callback.run``.

Example (a tiny GPT-2 from a config, random weights, nothing downloaded):
    >>> import tempfile, torch, transformers
    >>> from mpdiag.integrations.transformers import MpdiagCallback
    >>> _ = transformers.logging.set_verbosity_error()
    >>> config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=8)
    >>> data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 32, (8, 8))]
    >>> args = transformers.TrainingArguments(
    ...     tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4, use_cpu=True, report_to=[],
    ...     disable_tqdm=True,
    ... )
    >>> callback = MpdiagCallback(formats=("fp16", "bf16"))
    >>> model = transformers.GPT2LMHeadModel(config)
    >>> trainer = transformers.Trainer(model, args, train_dataset=data, callbacks=[callback])
    >>> trainer.remove_callback(transformers.PrinterCallback)  # quiet, for this example
    >>> _ = trainer.train()
    >>> callback.run.steps
    [1, 2]
"""

from __future__ import annotations

import functools
import sys
import types
import warnings
from typing import Any

import torch
from torch import nn

from mpdiag.core.errors import AttachError, MpdiagWarning
from mpdiag.integrations._session import CallbackResults, TrainingSession, missing

try:
    import transformers
except ImportError as error:  # pragma: no cover - exercised in a process without it
    raise missing("transformers", __name__, "pip install 'mpdiag[transformers]'", error) from error

__all__ = ["MpdiagCallback"]


class MpdiagCallback(CallbackResults, transformers.TrainerCallback):
    """Records the Trainer's training with ``mpdiag.diagnose``.

    Args:
        **options: diagnose's own (``formats``, ``every``, ``include``, ``exclude``, ``on_nonfinite``,
            ``run_file``), and ``report_dir`` (write the HTML report there when training ends) and
            ``tensorboard`` (a log dir: every recorded step is written there as it closes, see
            ``mpdiag.sinks.TensorBoard``). Under torch.distributed every rank records and only rank 0
            writes the run file, the report and the logs. A later ``train()`` with the same callback
            starts its run file anew.
    """

    # -- the Trainer's events -------------------------------------------------------------------------
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._detach_when_training_raises(_calling_trainer(self))  # before train(): every call is guarded

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if model is None:
            raise RuntimeError("the Trainer called on_train_begin without its model")  # never, by its contract
        trainer = _calling_trainer(self)
        if trainer is None:
            _trainer_not_found()
        elif self._detach_when_training_raises(trainer):  # only the next train() call is guarded
            warnings.warn(
                "mpdiag: MpdiagCallback was added after the Trainer was made (trainer.add_callback): if this "
                "training raises, mpdiag's hooks stay on the model until callback.close(); pass it as "
                "Trainer(..., callbacks=[MpdiagCallback()]) to have them removed for you",
                MpdiagWarning,
                stacklevel=2,
            )
        # Under DDP the Trainer hands callbacks the model inside the wrapper; mpdiag needs the wrapper to
        # tell parameters every rank holds alike from per-rank activations.
        wrapped = getattr(trainer, "model_wrapped", None)
        if isinstance(wrapped, nn.parallel.DistributedDataParallel) and wrapped.module is model:
            model = wrapped
        # accelerate's optimizer wrapper: diagnose finds the optimizer inside and follows its GradScaler
        self._session.attach(model, optimizer, None, first_step=state.global_step + 1)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The update this step makes takes global_step to global_step + 1, the number its logs carry.
        self._session.begin(state.global_step + 1)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._session.finish()

    def _detach_when_training_raises(self, trainer: Any) -> bool:
        """The Trainer has no event for an exception: ``trainer.train`` is wrapped, on this instance, so
        that a training that raises still removes every hook (the exception goes on unchanged). True
        when the wrapping was made now (so that the training running now is not guarded)."""
        if trainer is None:
            return False
        if _guarded_by(trainer.train, self._session):
            return False
        train = trainer.train
        session = self._session

        @functools.wraps(train)
        def train_then_detach(*args: Any, **kwargs: Any) -> Any:
            try:
                return train(*args, **kwargs)
            except BaseException as error:
                session.finish(error)
                raise

        train_then_detach._mpdiag_session = session  # type: ignore[attr-defined]
        trainer.train = train_then_detach
        return True


def _trainer_not_found() -> None:
    """The callback was called by something other than a Trainer's callback handler (or by a Trainer
    whose call stack mpdiag does not know): without the Trainer, DDP's wrapper and a raise go unseen."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise AttachError(
            "MpdiagCallback could not find the Trainer calling it, and torch.distributed is initialised: "
            "without the Trainer's model_wrapped it cannot tell parameters DDP keeps alike from per-rank "
            "values; attach mpdiag.diagnose(trainer.model_wrapped, optimizer=trainer.optimizer) yourself"
        )
    warnings.warn(
        "mpdiag: MpdiagCallback could not find the Trainer calling it: if this training raises, mpdiag's "
        "hooks stay on the model until callback.close()",
        MpdiagWarning,
        stacklevel=3,
    )


def _guarded_by(train: Any, session: TrainingSession) -> bool:
    """Whether ``train`` (maybe wrapped by several callbacks in turn) already finishes ``session``."""
    while train is not None:
        if getattr(train, "_mpdiag_session", None) is session:
            return True
        train = getattr(train, "__wrapped__", None)
    return False


def _calling_trainer(callback: MpdiagCallback) -> Any:
    """The Trainer whose callback handler is calling ``callback`` now: a few frames up the stack, since
    callbacks are given the model and the optimizer but not the Trainer (its ``model_wrapped`` and
    ``train`` are needed). None when it is not found (a callback called some other way)."""
    frame: types.FrameType | None = sys._getframe(2)
    for _ in range(_FRAMES):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, transformers.Trainer) and callback in candidate.callback_handler.callbacks:
            return candidate
        frame = frame.f_back
    return None


_FRAMES = 8  # Trainer.__init__ / _inner_training_loop -> CallbackHandler.on_* -> call_event -> the callback
