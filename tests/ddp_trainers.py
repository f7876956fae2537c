"""Two-process CPU (gloo) trainings with the trainer callbacks, run as scripts the way their users run
them: ``torchrun --nproc-per-node 2 ddp_trainers.py transformers OUT`` for the transformers Trainer,
``python ddp_trainers.py lightning OUT`` for Lightning's ddp strategy (which starts the other rank
itself). Each rank pickles what its callback recorded into OUT, for tests/test_trainer_ddp.py."""

from __future__ import annotations

import os
import pickle
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

STEPS, BATCH, WORLD = 3, 4, 2


def options(out: Path) -> dict:
    # every rank is given the same paths: only rank 0 may write them (the report's rank-0 rule is the
    # run file's, tested in test_distributed; rendering it here would only add seconds)
    return {"run_file": out / "run.mpdiag", "tensorboard": out / "tb"}


def save(out: Path, rank: int, callback: object, **facts: object) -> None:
    result = {"run": callback.run, **facts}  # type: ignore[attr-defined]
    (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def transformers_trainer(out: Path) -> None:
    import transformers

    from mpdiag.integrations.transformers import MpdiagCallback

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=8)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 32, (STEPS * BATCH * WORLD, 8))]
    args = transformers.TrainingArguments(
        str(out / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    callback = MpdiagCallback(**options(out))
    trainer = transformers.Trainer(transformers.GPT2LMHeadModel(config), args, train_dataset=data, callbacks=[callback])
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()
    wrapped = isinstance(trainer.model_wrapped, nn.parallel.DistributedDataParallel)
    save(out, trainer.args.process_index, callback, ddp=wrapped)


def lightning_trainer(out: Path) -> None:
    import lightning

    from mpdiag.integrations.lightning import MpdiagCallback

    class Regression(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return (self.net(x) - y).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(STEPS * BATCH * WORLD, 6), torch.randn(STEPS * BATCH * WORLD, 1))
    callback = MpdiagCallback(**options(out))
    trainer = lightning.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Regression(), torch.utils.data.DataLoader(data, batch_size=BATCH))
    save(out, trainer.global_rank, callback)


if __name__ == "__main__":
    which, out_dir = sys.argv[1], Path(sys.argv[2])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    {"transformers": transformers_trainer, "lightning": lightning_trainer}[which](out_dir)
