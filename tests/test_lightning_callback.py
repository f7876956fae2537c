"""Lightning with ``MpdiagCallback``, for real: a small LightningModule on the CPU, a few steps. Each test
states what a Lightning user would expect of one line added to ``callbacks=``."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from attached import no_hooks_left
from tensorboard_logs import read_logs
from torch import nn

import mpdiag

lightning = pytest.importorskip("lightning")
from mpdiag.integrations.lightning import MpdiagCallback  # noqa: E402

pytestmark = pytest.mark.slow
BATCH = 4


class Regression(lightning.LightningModule):
    """A small MLP; it keeps the weights each training_step's forward used and the steps Lightning logged."""

    def __init__(self, optimizer: str = "sgd", fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        self.optimizer, self.fail_at = optimizer, fail_at
        self.weights: list[torch.Tensor] = []
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls > self.fail_at:
            raise RuntimeError("the data loader gave a bad batch")
        self.weights.append(self.net[0].weight.detach().clone())
        x, y = batch
        loss = (self(x) - y).pow(2).mean()
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Steps(lightning.pytorch.loggers.Logger):
    """A logger that keeps the steps Lightning logged the training loss at."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[int] = []

    name, version = "steps", 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "loss" in metrics and step is not None:
            self.logged.append(step)

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


def fit(module: Regression, callbacks: list, ckpt_path: str | None = None, **options: Any) -> Steps:
    logger = Steps()
    settings = {
        "max_steps": 3,
        "logger": logger,
        "log_every_n_steps": 1,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
        **options,
    }
    data = torch.utils.data.TensorDataset(torch.randn(48, 6), torch.randn(48, 1))
    trainer = lightning.Trainer(callbacks=callbacks, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on data loader workers
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=BATCH), ckpt_path=ckpt_path)
    return logger


@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_recorded_step_per_optimizer_step_with_the_weights_its_forward_used(accumulate: int) -> None:
    module, callback = Regression(), MpdiagCallback()
    logger = fit(module, [callback], accumulate_grad_batches=accumulate, precision="bf16-mixed")
    run = callback.run
    assert run.steps == logger.logged == [0, 1, 2]  # numbered as Lightning logs them
    for step in run.steps:
        first = run.stats("net.0", "activation", step=step)
        assert (first.calls, first.numel) == (accumulate, accumulate * BATCH * 16)  # every micro-batch
        used = module.weights[step * accumulate]
        assert run.stats("net.0.weight", "param", step=step) == mpdiag.tensor_stats(used, run.formats)
    assert run.meta["environment"]["autocast_dtype"] == "bfloat16"
    assert "bfloat16" in run.stats("net.0", "activation").dtypes
    assert callback.diagnosis is None and no_hooks_left(module)


def test_a_closure_that_runs_many_times_is_one_step() -> None:
    module, callback = Regression("lbfgs"), MpdiagCallback()
    fit(module, [callback], max_steps=2)
    assert callback.run.steps == [0, 1]
    assert {callback.run.stats("net.0", "activation", step=s).calls for s in (0, 1)} == {4}  # LBFGS's iterations


def test_16_mixed_follows_the_precision_plugins_grad_scaler() -> None:
    from torch_support import cpu_fp16_autocast

    if not cpu_fp16_autocast():
        pytest.skip("fp16 autocast on the CPU needs torch >= 2.3")
    from lightning.pytorch.plugins.precision import MixedPrecision

    # Lightning makes a GradScaler for 16-mixed on accelerators; on this CPU the plugin is given one
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**70)
    module, callback = Regression(), MpdiagCallback()
    logger = fit(module, [callback], max_steps=4, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    run = callback.run
    assert run.steps == logger.logged == [0, 1, 2, 3]
    assert run.meta["environment"]["autocast_dtype"] == "float16"
    scales = [run.loss_scales[s] for s in run.steps]
    assert scales[0] == 2.0**70 and scales[-1] < scales[0]  # steps skipped and backed off, each a step


def test_every_and_resuming_keep_lightnings_numbers(tmp_path: Path) -> None:
    first = MpdiagCallback(every=2)
    checkpoint = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    logger = fit(Regression(), [first, checkpoint], max_steps=4, enable_checkpointing=True, log_every_n_steps=2)
    assert first.run.steps == logger.logged == [1, 3]  # every=N records what log_every_n_steps=N logs
    resumed = MpdiagCallback()
    saved = sorted(tmp_path.glob("*step=2.ckpt"))
    logger = fit(Regression(), [resumed], max_steps=4, ckpt_path=str(saved[0]))
    assert resumed.run.steps == logger.logged == [2, 3]


def test_a_training_that_raises_leaves_no_hook_and_writes_what_was_asked(tmp_path: Path) -> None:
    module = Regression(fail_at=2)
    callback = MpdiagCallback(report_dir=tmp_path / "report", tensorboard=tmp_path / "tb")
    with pytest.raises(RuntimeError, match="bad batch"):
        fit(module, [callback])
    assert no_hooks_left(module) and callback.diagnosis is None
    # the step in progress when it raised is kept: its parameters, observed as the optimizer step began
    # (Lightning's closure runs inside it); its forward never ran
    assert callback.run.steps == [0, 1, 2]
    assert mpdiag.Kind.PARAM in {s.kind for s in callback.run.records[2]}
    assert not any(s.kind is mpdiag.Kind.ACTIVATION for s in callback.run.records[2])
    assert (tmp_path / "report" / "report.html").exists()
    assert set(read_logs(tmp_path / "tb")["scalars"]["range/param/net.0.weight/log2_amax"]) == {0, 1, 2}


class TwoOptimizers(lightning.LightningModule):
    """Manual optimization with two optimizers (a GAN's shape): global_step goes up by two per batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.first, self.second = nn.Linear(6, 6), nn.Linear(6, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        for optimizer, loss in zip(
            self.optimizers(), (lambda: self.first(x).pow(2).mean(), lambda: (self.second(x) - y).pow(2).mean())
        ):
            optimizer.zero_grad()
            value = loss()
            self.manual_backward(value)
            optimizer.step()
        self.log("loss", value)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.first.parameters(), lr=0.1), torch.optim.SGD(self.second.parameters(), lr=0.1)]


def test_with_two_optimizers_a_batch_is_a_step_numbered_as_lightning_logs_it() -> None:
    callback = MpdiagCallback()
    logger = fit(TwoOptimizers(), [callback], max_steps=6)  # max_steps counts both optimizers' steps
    run = callback.run
    assert run.steps == logger.logged == [0, 1, 2]
    assert {run.stats("first", "activation", step=s).calls for s in run.steps} == {1}


def test_the_older_pytorch_lightning_package_takes_its_own_callback() -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from mpdiag.integrations.pytorch_lightning import MpdiagCallback as OlderCallback

    assert isinstance(OlderCallback(), pl.Callback) and not isinstance(OlderCallback(), lightning.Callback)


def test_a_missing_lightning_names_its_extra() -> None:
    code = (
        "import sys\nsys.modules['lightning'] = sys.modules['lightning.pytorch'] = None\n"
        "try:\n    import mpdiag.integrations.lightning\nexcept ImportError as error:\n    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'mpdiag[lightning]'" in done.stdout
