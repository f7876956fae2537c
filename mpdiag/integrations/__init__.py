"""Where users already train and look: the transformers Trainer, Lightning, TensorBoard.

Each integration imports its library only when it is itself imported (``import mpdiag`` imports
none of them), and says which extra to install when the library is missing:

- ``mpdiag.integrations.transformers.MpdiagCallback``: a ``transformers.TrainerCallback``
  (``mpdiag[transformers]``);
- ``mpdiag.integrations.lightning.MpdiagCallback``: a ``lightning.pytorch.Callback``
  (``mpdiag[lightning]``; ``mpdiag.integrations.pytorch_lightning`` for the older package name);
- ``mpdiag.integrations.tensorboard``: the ``TensorBoard`` sink and ``to_tensorboard``
  (``mpdiag[tensorboard]``), also at ``mpdiag.sinks.TensorBoard`` and ``mpdiag.to_tensorboard``.
"""
