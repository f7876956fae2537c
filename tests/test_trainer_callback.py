"""The transformers Trainer with ``MpdiagCallback``, for real: tiny GPT-2 models from configs, on the CPU,
a few steps. Each test states what a Trainer user would expect of one line added to ``callbacks=``."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from attached import no_hooks_left
from models import SEQ, VOCAB, tiny_gpt2
from tensorboard_logs import read_logs

import mpdiag
import mpdiag.io.runfile

transformers = pytest.importorskip("transformers")
from mpdiag.integrations.transformers import MpdiagCallback  # noqa: E402

pytestmark = pytest.mark.slow
BATCH = 4


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 48

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


class Witness(transformers.TrainerCallback):
    """What the Trainer itself did: the weights each optimizer step's forward used, the steps it logged."""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}
        self.logged: list[int] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.weights[state.global_step + 1] = model.transformer.h[0].mlp.c_fc.weight.detach().clone()

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if "loss" in logs:
            self.logged.append(state.global_step)


def trainer(
    tmp_path: Path, callbacks: list, model: torch.nn.Module | None = None, eval_dataset: Any = None, **args: Any
) -> Any:
    settings = {
        "max_steps": 3,
        "per_device_train_batch_size": BATCH,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        **args,
    }
    made = transformers.Trainer(
        model=model if model is not None else tiny_gpt2(),
        args=transformers.TrainingArguments(output_dir=str(tmp_path / "out"), **settings),
        train_dataset=Tokens(),
        eval_dataset=eval_dataset,
        callbacks=callbacks,
    )
    made.remove_callback(transformers.PrinterCallback)
    return made


@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_recorded_step_per_optimizer_step_numbered_as_the_trainer_logs_them(
    accumulate: int, tmp_path: Path
) -> None:
    callback, witness = MpdiagCallback(), Witness()
    model = tiny_gpt2()
    trainer(tmp_path, [witness, callback], model, gradient_accumulation_steps=accumulate).train()
    run = callback.run
    assert run.steps == witness.logged == [1, 2, 3]  # mpdiag's step N is the step N of the Trainer's logs
    for step in run.steps:
        mlp = run.stats("transformer.h.0.mlp.c_fc", "activation", step=step)
        assert (mlp.calls, mlp.numel) == (accumulate, accumulate * BATCH * SEQ * 4 * 32)  # all micro-batches
        used = mpdiag.tensor_stats(witness.weights[step], run.formats)
        assert run.stats("transformer.h.0.mlp.c_fc.weight", "param", step=step) == used  # before the update
        assert run.stats("transformer.h.0.mlp.c_fc.weight", "param_grad", step=step).numel == used.numel
    assert callback.diagnosis is None and no_hooks_left(model)


def test_bf16_mixed_precision_is_recorded_as_bf16(tmp_path: Path) -> None:
    callback = MpdiagCallback()
    trainer(tmp_path, [callback], bf16=True, max_steps=2).train()
    run = callback.run
    assert run.meta["environment"]["autocast_dtype"] == "bfloat16"  # applied by accelerate inside forward
    assert "bfloat16" in run.stats("transformer.h.0.mlp.c_fc", "activation").dtypes


def test_every_and_resuming_keep_the_trainers_numbers(tmp_path: Path) -> None:
    first = MpdiagCallback(every=2)
    trainer(tmp_path, [first], max_steps=4, save_strategy="steps", save_steps=2).train()
    assert first.run.steps == [2, 4]
    resumed, witness = MpdiagCallback(), Witness()
    trainer(tmp_path, [witness, resumed], max_steps=4).train(resume_from_checkpoint=str(tmp_path / "out/checkpoint-2"))
    assert resumed.run.steps == witness.logged == [3, 4]


def test_training_again_starts_the_run_file_anew_and_resumed_logs_show_each_step_once(tmp_path: Path) -> None:
    callback = MpdiagCallback(run_file=tmp_path / "run.mpdiag", tensorboard=tmp_path / "tb")
    made = trainer(tmp_path, [callback], max_steps=3, save_strategy="steps", save_steps=2)
    made.train()
    assert mpdiag.load(tmp_path / "run.mpdiag").steps == [1, 2, 3]
    made.train(resume_from_checkpoint=str(tmp_path / "out/checkpoint-2"))  # steps 3 and 4, step 3 again
    assert made.state.global_step == 3 and mpdiag.load(tmp_path / "run.mpdiag").steps == [3]
    logs = read_logs(tmp_path / "tb")  # fails on a step shown twice
    assert set(logs["scalars"]["range/activation/transformer.h.0.mlp.c_fc/log2_amax"]) == {1, 2, 3}


def test_the_report_and_the_tensorboard_logs_are_written_when_asked(tmp_path: Path) -> None:
    callback = MpdiagCallback(report_dir=tmp_path / "report", tensorboard=tmp_path / "tb", run_file=tmp_path / "r.mpd")
    trainer(tmp_path, [callback]).train()
    assert callback.report is not None and (tmp_path / "report" / "report.html").exists()
    logs = read_logs(tmp_path / "tb")
    assert set(logs["scalars"]["range/activation/transformer.h.0.mlp.c_fc/log2_amax"]) == {1, 2, 3}
    assert mpdiag.load(tmp_path / "r.mpd").steps == [1, 2, 3]


def test_a_training_that_raises_leaves_no_hook_and_keeps_what_was_recorded(tmp_path: Path) -> None:
    class BreakAWeight(transformers.TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if state.global_step == 1:
                with torch.no_grad():
                    model.transformer.h[0].mlp.c_fc.weight[0, 0] = math.inf

    model = tiny_gpt2()
    callback = MpdiagCallback(on_nonfinite="raise", report_dir=tmp_path / "report")
    with pytest.raises(mpdiag.NonFiniteError, match="non-finite") as raised:
        trainer(tmp_path, [BreakAWeight(), callback], model).train()
    assert raised.value.event.step == 2 and raised.value.event.name == "transformer.h.0.mlp.c_fc.weight"
    assert no_hooks_left(model) and callback.diagnosis is None
    assert callback.run.steps == [1, 2] and callback.run.first_nonfinite().step == 2
    assert (tmp_path / "report" / "report.html").exists()  # what led to the NaN, written though training raised
    with mpdiag.diagnose(model):  # the model is free again
        pass


def test_the_trainings_own_exception_reaches_the_user_whatever_detaching_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class OutOfMemory(transformers.TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:
                raise MemoryError("the batch did not fit")

    def disk_full(self: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mpdiag.io.runfile.RunFileSink, "close", disk_full)
    model = tiny_gpt2()
    with pytest.raises(MemoryError, match="did not fit"):
        trainer(tmp_path, [OutOfMemory(), MpdiagCallback(run_file=tmp_path / "run.mpdiag")], model).train()
    assert no_hooks_left(model)


def test_a_grad_scaler_is_followed_and_the_steps_it_skips_are_steps(tmp_path: Path) -> None:
    from torch_support import cpu_fp16_autocast

    if not cpu_fp16_autocast():
        pytest.skip("fp16 autocast on the CPU needs torch >= 2.3")
    callback, witness = MpdiagCallback(), Witness()
    made = trainer(tmp_path, [witness, callback], fp16=True, max_steps=4, max_grad_norm=0.0)
    # accelerate turns fp16 autocast on and makes a GradScaler only on accelerators: on this CPU, both as
    # it does on a GPU (before the Trainer prepares the model and the optimizer, in train())
    made.accelerator.native_amp = True
    made.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    made.train()
    run = callback.run
    assert run.steps == witness.logged == [1, 2, 3, 4]
    scales = [run.loss_scales[s] for s in run.steps]
    assert scales[0] == 2.0**60 and scales == sorted(scales, reverse=True) and scales[-1] < scales[0]
    skipped = [s for s in run.steps if any(e.kind.is_gradient for e in run.events.get(s, ()))]
    assert skipped  # at 2^60 fp16 gradients overflow: the scaler skipped those updates and backed off
    assert run.meta["environment"]["autocast_dtype"] == "float16"


def test_evaluation_is_never_counted_in_a_step_also_before_the_first(tmp_path: Path) -> None:
    callback = MpdiagCallback()
    trainer(
        tmp_path, [callback], eval_dataset=Tokens(), eval_strategy="steps", eval_steps=2, eval_on_start=True
    ).train()
    run = callback.run
    assert run.steps == [1, 2, 3]
    assert [run.stats("transformer.h.0.mlp.c_fc", "activation", step=s).calls for s in run.steps] == [1, 1, 1]


def test_a_callback_added_after_the_trainer_was_made_says_what_raising_would_leave(tmp_path: Path) -> None:
    made, callback = trainer(tmp_path, []), MpdiagCallback()
    made.add_callback(callback)
    with pytest.warns(mpdiag.MpdiagWarning, match="callback.close"):
        made.train()
    assert callback.run.steps == [1, 2, 3]


def test_bad_options_are_refused_when_the_callback_is_made(tmp_path: Path) -> None:
    with pytest.raises(mpdiag.MpdiagError, match="unknown option.*every.*report_dir.*tensorboard"):
        MpdiagCallback(evry=2)
    with pytest.raises(mpdiag.MpdiagError, match="format"):
        MpdiagCallback(formats="fp17")
    with pytest.raises(mpdiag.MpdiagError, match="every must be a positive integer"):
        MpdiagCallback(every=0)
    with pytest.raises(mpdiag.MpdiagError, match="on_nonfinite must be one of"):
        MpdiagCallback(on_nonfinite="ignore")
    with pytest.raises(mpdiag.MpdiagError, match="include expects glob strings"):
        MpdiagCallback(include=3)
    (tmp_path / "old.mpdiag").write_bytes(b"")
    with pytest.raises(mpdiag.RunFileError, match="already exists"):
        MpdiagCallback(run_file=tmp_path / "old.mpdiag")


def test_two_callbacks_on_one_trainer_are_told_apart_from_a_bug(tmp_path: Path) -> None:
    model = tiny_gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error", mpdiag.MpdiagWarning
        )  # both were given to the Trainer: both guard train(), neither warns
        with pytest.raises(mpdiag.MpdiagError, match="two mpdiag callbacks on one trainer"):
            trainer(tmp_path, [MpdiagCallback(), MpdiagCallback()], model).train()
    assert no_hooks_left(model)


def test_neither_integration_is_imported_by_mpdiag_and_a_missing_library_names_its_extra() -> None:
    code = (
        "import sys, mpdiag\n"
        "assert not {'transformers', 'lightning', 'pytorch_lightning', 'tensorboard'} & set(sys.modules), sys.modules\n"
        "sys.modules['transformers'] = None\n"
        "try:\n"
        "    import mpdiag.integrations.transformers\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'mpdiag[transformers]'" in done.stdout
