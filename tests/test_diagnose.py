"""diagnose(): what it records, when steps close, and that observing never changes training."""

from __future__ import annotations

import dataclasses
import gc
import math
import warnings
import weakref
from collections import namedtuple

import pytest
import torch
from host_reads import CountHostReads
from torch import nn

import mpdiag
import mpdiag.io.runfile
import mpdiag.record.anomaly
from mpdiag import Kind
from mpdiag.core.errors import AttachError, MpdiagError, UnknownFormatError
from mpdiag.record import _accumulate
from mpdiag.record._accumulate import tensor_stats
from mpdiag.record.recording import paused
from mpdiag.toy import TinyTransformerLM, lm_loss, synthetic_batches


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def train_step(model: nn.Module, x: torch.Tensor, diag: mpdiag.Diagnosis | None = None) -> torch.Tensor:
    loss = model(x).pow(2).mean()
    loss.backward()
    if diag is not None:
        diag.step()
    return loss


# -- what is recorded -----------------------------------------------------------------------------------
def test_records_every_module_and_parameter() -> None:
    model = TinyTransformerLM(vocab_size=32, d_model=16, n_heads=2, n_layers=1, seq_len=8)
    tokens, targets = next(synthetic_batches(batch_size=2, seq_len=8, vocab_size=32))
    with mpdiag.diagnose(model) as diag:
        lm_loss(model(tokens), targets).backward()
    run = diag.run  # close() recorded the step in progress
    assert run.steps == [0]
    names = {s.name for s in run.sites if s.kind is Kind.ACTIVATION}
    assert names == {n for n, m in model.named_modules() if not isinstance(m, nn.ModuleList)}  # never called
    params = {n for n, _ in model.named_parameters()}
    assert {s.name for s in run.sites if s.kind is Kind.PARAM} == params
    assert {s.name for s in run.sites if s.kind is Kind.PARAM_GRAD} == params
    # every module whose output requires grad sees a gradient; token embeddings' output does too
    assert {s.name for s in run.sites if s.kind is Kind.ACTIVATION_GRAD} == names


def test_statistics_are_those_of_the_real_tensors() -> None:
    model = mlp()
    x = torch.randn(4, 6)
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, out):
            out.retain_grad()
            seen[name] = out

        return hook

    for name, module in model.named_children():
        module.register_forward_hook(keep(name))
    with mpdiag.diagnose(model) as diag:
        train_step(model, x, diag)
    run = diag.run
    assert set(seen) == {"0", "1", "2"}  # the loops below check every layer, not none
    for name, out in seen.items():
        assert run.stats(name, "activation", step=0) == tensor_stats(out.detach())
        assert run.stats(name, "activation_grad", step=0) == tensor_stats(out.grad)
    for name, p in model.named_parameters():
        assert run.stats(name, "param", step=0) == tensor_stats(p.detach())
        assert run.stats(name, "param_grad", step=0) == tensor_stats(p.grad)


@dataclasses.dataclass
class Output:
    hidden: torch.Tensor
    extra: dict


Pair = namedtuple("Pair", ["a", "b"])


class Structured(nn.Module):
    def forward(self, x: torch.Tensor):
        return Output(hidden=x * 2, extra={"pair": Pair(x + 1, torch.arange(3)), "list": [x.double(), "text", None]})


def test_all_floating_leaves_of_structured_outputs() -> None:
    model = Structured()
    x = torch.randn(3, 4, requires_grad=True)
    with mpdiag.diagnose(model) as diag:
        out = model(x)
        (out.hidden.sum() + out.extra["pair"].a.sum() + out.extra["list"][0].sum()).backward()
        diag.step()
    act = diag.run.stats("", "activation")
    assert act.numel == 3 * 12 and act.calls == 3  # the int tensor and the string are not floating values
    assert act.dtypes == {"float32", "float64"}
    assert diag.run.stats("", "activation_grad").numel == 3 * 12


def test_a_module_called_twice_accumulates() -> None:
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, nn.Tanh(), layer)  # shared: named_modules() lists it once, as "0"
    with mpdiag.diagnose(model) as diag:
        train_step(model, torch.randn(2, 4), diag)
    stats = diag.run.stats("0", "activation", step=0)
    assert stats.calls == 2 and stats.numel == 16
    assert diag.run.stats("0", "activation_grad", step=0).calls == 2


def test_include_and_exclude_select_modules_by_glob() -> None:
    model = TinyTransformerLM(vocab_size=32, d_model=16, n_heads=2, n_layers=2, seq_len=8)
    tokens, targets = next(synthetic_batches(batch_size=2, seq_len=8, vocab_size=32))
    with mpdiag.diagnose(model, include="blocks.*.mlp*", exclude=["*.1"]) as diag:
        lm_loss(model(tokens), targets).backward()
    names = {s.name for s in diag.run.sites}
    assert {s.name for s in diag.run.sites if s.kind is Kind.ACTIVATION} == {
        "blocks.0.mlp",
        "blocks.0.mlp.0",
        "blocks.0.mlp.2",
        "blocks.1.mlp",
        "blocks.1.mlp.0",
        "blocks.1.mlp.2",
    }
    assert "blocks.0.mlp.0.weight" in names and "blocks.0.ln1.weight" not in names


def test_formats_are_validated_and_tracked() -> None:
    model = mlp()
    with mpdiag.diagnose(model, formats=["half", torch.bfloat16, "e4m3", "fp16"]) as diag:
        train_step(model, torch.randn(2, 6), diag)
    assert diag.run.formats == ("fp16", "bf16", "fp8_e4m3")
    with pytest.raises(UnknownFormatError, match="unknown numeric format 'fp7'; expected one of .*fp8_e5m2"):
        mpdiag.diagnose(mlp(), formats=["fp7"])


# -- steps ---------------------------------------------------------------------------------------------
def test_every_n_records_one_step_in_n() -> None:
    model = mlp()
    with mpdiag.diagnose(model, every=3) as diag:
        for i in range(7):
            assert diag.recording == (i % 3 == 0)
            train_step(model, torch.randn(2, 6), diag)
    assert diag.run.steps == [0, 3, 6]


def test_optimizer_closes_steps_and_records_grads_before_the_update() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = []
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 6)).pow(2).mean().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.step()
            for n in before:
                assert diag.run.stats(n, "param", step=diag.step_index - 1) == tensor_stats(before[n])
    assert diag.run.steps == [0, 1, 2]
    for step, g in enumerate(grads):
        for n, grad in g.items():
            assert diag.run.stats(n, "param_grad", step=step) == tensor_stats(grad)


def test_gradient_accumulation_is_one_step_with_the_accumulated_gradient() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        for _ in range(2):
            opt.zero_grad()
            for _ in range(3):  # micro-batches
                model(torch.randn(4, 6)).pow(2).mean().backward()
            final = model[0].weight.grad.clone()
            opt.step()
    assert diag.run.steps == [0, 1]
    assert diag.run.stats("0", "activation", step=1).calls == 3
    assert diag.run.stats("0.weight", "param_grad", step=1) == tensor_stats(final)


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler('cpu') needs torch >= 2.3")
def test_a_step_that_grad_scaler_skips_still_closes() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    inputs = [torch.randn(4, 6), torch.full((4, 6), 1e38), torch.randn(4, 6)]  # step 1 overflows
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        for x in inputs:
            opt.zero_grad()
            scaler.scale(model(x).pow(2).mean()).backward()
            scaler.step(opt)
            scaler.update()
    assert scaler.get_scale() == 2.0**3  # the real scaler did skip a step
    assert diag.run.steps == [0, 1, 2]
    assert diag.run.stats("0.weight", "param_grad", step=1).nonfinite > 0
    assert diag.run.stats("0.weight", "param_grad", step=2).nonfinite == 0


@pytest.mark.parametrize("order", ["zero_grad first", "forward first, zero_grad(set_to_none=False)"])
def test_a_skipped_step_closes_when_the_scaler_updates_whatever_the_order(order: str) -> None:
    # Lightning's closure runs forward, then zero_grad, then backward: at the next forward the gradients
    # of the skipped step are still there, as they are with zero_grad(set_to_none=False). The scaler's
    # update() is what says the step is over.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    inputs = [torch.randn(4, 6), torch.full((4, 6), 1e38), torch.randn(4, 6)]  # step 1 overflows
    with mpdiag.diagnose(model, optimizer=opt, scaler=scaler) as diag:
        for x in inputs:
            if order == "zero_grad first":
                opt.zero_grad()
            loss = model(x).pow(2).mean()
            if order != "zero_grad first":
                opt.zero_grad(set_to_none=False)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert diag.run.steps == [0, 1, 2]
    assert [diag.run.stats("0", "activation", step=s).calls for s in diag.run.steps] == [1, 1, 1]
    assert diag.run.loss_scales == {0: 16.0, 1: 16.0, 2: 8.0}


def test_skipped_steps_without_scaler_and_with_zeroed_gradients_are_warned_about() -> None:
    # Without scaler=, a skipped step is seen to end only when the gradients are set to None; zeroed in
    # place they look like gradient accumulation, so the steps merge: mpdiag says so and what to pass.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    with pytest.warns(mpdiag.MpdiagWarning, match=r"pass it as diagnose\(\.\.\., scaler=\)"):
        with mpdiag.diagnose(model, optimizer=opt):
            for _ in range(3):
                opt.zero_grad(set_to_none=False)
                scaler.scale(model(torch.full((4, 6), 1e38)).pow(2).mean()).backward()  # every step overflows
                scaler.step(opt)
                scaler.update()


def _closure_training(use_closure: bool, accumulate: int = 1) -> tuple[mpdiag.Run, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [torch.randn(4, 6) for _ in range(3 * accumulate)]
    weights_used = []
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        for step in range(3):
            micro = batches[step * accumulate : (step + 1) * accumulate]
            weights_used.append(model[0].weight.detach().clone())
            opt.zero_grad()
            for x in micro[:-1]:  # as Lightning does: all but the last micro-batch before step()
                model(x).pow(2).mean().backward()

            def closure(x: torch.Tensor = micro[-1]) -> torch.Tensor:
                loss = model(x).pow(2).mean()
                loss.backward()
                return loss

            if use_closure:
                opt.step(closure)
            else:
                closure()
                opt.step()
    return diag.run, weights_used


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_closure_step_records_the_same_as_a_plain_step(accumulate: int) -> None:
    with_closure, weights = _closure_training(True, accumulate)
    plain, _ = _closure_training(False, accumulate)
    assert with_closure.steps == plain.steps == [0, 1, 2]
    for step in with_closure.steps:  # that step's forward and backward, with the weights that forward used
        assert with_closure.stats("0", "activation", step=step).calls == accumulate
        assert with_closure.stats("0.weight", "param", step=step) == tensor_stats(weights[step])
        assert with_closure.records[step] == plain.records[step]


def test_lbfgs_evaluates_its_closure_many_times_within_one_recorded_step() -> None:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=4)
    x = torch.randn(8, 6)
    evaluations = []

    def closure() -> torch.Tensor:
        opt.zero_grad()  # inside the step: this does not end it
        loss = model(x).pow(2).mean()
        loss.backward()
        evaluations.append(1)
        return loss

    with mpdiag.diagnose(model, optimizer=opt) as diag:
        for _ in range(2):
            before = model[0].weight.detach().clone()
            opt.step(closure)
            assert diag.run.stats("0.weight", "param", step=diag.step_index - 1) == tensor_stats(before)
    assert diag.run.steps == [0, 1] and len(evaluations) > 2
    assert sum(diag.run.stats("0", "activation", step=s).calls for s in diag.run.steps) == len(evaluations)


def test_wrapped_optimizers_are_unwrapped_and_their_scaler_followed() -> None:
    class Wrapper(torch.optim.Optimizer):  # as accelerate's: a subclass that never ran Optimizer.__init__
        def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
            self.optimizer, self.scaler = optimizer, scaler

        def step(self, closure: object = None) -> None:
            self.scaler.step(self.optimizer)
            self.scaler.update()

    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**3)
    wrapped = Wrapper(inner, scaler)
    with mpdiag.diagnose(model, optimizer=wrapped) as diag:
        for _ in range(2):
            inner.zero_grad()
            scaler.scale(model(torch.randn(2, 6)).sum()).backward()
            wrapped.step()
    assert diag.run.steps == [0, 1] and diag.run.loss_scales == {0: 8.0, 1: 8.0}
    with pytest.raises(AttachError, match=r"\.optimizer"):
        mpdiag.diagnose(model, optimizer=object())  # type: ignore[arg-type]


def test_training_that_never_closes_a_step_is_warned_about_once() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(mpdiag.MpdiagWarning, match=r"optimizer=.*diag\.step\(\)") as caught:
        with mpdiag.diagnose(model):
            for _ in range(4):
                opt.zero_grad()
                model(torch.randn(2, 6)).sum().backward()
                opt.step()
    assert len([w for w in caught if issubclass(w.category, mpdiag.MpdiagWarning)]) == 1


@pytest.mark.parametrize("zero_grad", ["set_to_none", "zeros"])
def test_no_warning_when_steps_are_closed_by_hand_or_gradients_accumulate(zero_grad: str) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mpdiag.MpdiagWarning)
        with mpdiag.diagnose(model) as diag:
            for _ in range(3):
                opt.zero_grad(set_to_none=zero_grad == "set_to_none")
                for _ in range(2):  # accumulation: two forwards in one step, the weights unchanged
                    model(torch.randn(2, 6)).sum().backward()
                opt.step()
                diag.step()
    assert diag.run.steps == [0, 1, 2]


def test_autocast_applied_inside_forward_is_recorded() -> None:
    class AutocastInside(nn.Module):  # what accelerate and the HF Trainer do to a prepared model
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.net(x).float()

    model = AutocastInside()
    with mpdiag.diagnose(model) as diag:
        model(torch.randn(2, 6)).sum().backward()
    assert diag.run.meta["environment"]["autocast_dtype"] == "bfloat16"


def test_close_records_the_step_in_progress_and_step_after_close_raises() -> None:
    model = mlp()
    diag = mpdiag.diagnose(model)
    train_step(model, torch.randn(2, 6))
    diag.close()
    diag.close()  # idempotent
    assert diag.run.steps == [0]
    with pytest.raises(MpdiagError, match=r"closed; attach a new one with mpdiag.diagnose\(model\)"):
        diag.step()


def test_steps_numbered_by_a_training_loop() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mpdiag.diagnose(model, optimizer=opt, every=5) as diag:
        diag.begin_step(118)  # resumed from a checkpoint at step 117, say
        for step in range(118, 126):
            diag.begin_step(step)
            diag.begin_step(step)  # again within the step: nothing happens
            opt.zero_grad()
            train_step(model, torch.randn(2, 6))
            opt.step()
    assert diag.run.steps == [120, 125]  # every=5 counts the loop's numbers


def test_begin_step_closes_a_step_left_open_and_never_goes_back() -> None:
    model = mlp()
    with mpdiag.diagnose(model) as diag:
        diag.begin_step(3)
        train_step(model, torch.randn(2, 6))  # no optimizer: nothing closes this step but begin_step
        diag.begin_step(4)
        assert diag.run.steps == [3]
        with pytest.raises(MpdiagError, match=r"begin_step\(2\) would go back"):
            diag.begin_step(2)
        with pytest.raises(MpdiagError, match="expects the step's number as an int"):
            diag.begin_step(4.0)  # type: ignore[arg-type]


# -- attaching and detaching ---------------------------------------------------------------------------
def _hook_count(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    count = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    count += sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())
    return count + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


def test_every_hook_is_removed_on_exit_even_when_the_body_raises() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _hook_count(model, opt)
    with pytest.raises(ValueError, match="boom"):
        with mpdiag.diagnose(model, optimizer=opt):
            assert _hook_count(model, opt) > before
            raise ValueError("boom")
    assert _hook_count(model, opt) == before
    mpdiag.diagnose(model).close()  # can attach again once closed


_ATTACH_STEPS = [
    (nn.Module, "register_forward_hook"),
    (nn.Module, "register_forward_pre_hook"),
    (torch.Tensor, "register_post_accumulate_grad_hook"),
    (torch.optim.Optimizer, "register_step_pre_hook"),
    (torch.optim.Optimizer, "register_step_post_hook"),
    (mpdiag.record.anomaly.AnomalyWatch, "install"),
]


def _failing_at(n: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the n-th call of any attach step raise (n = -1: count the calls and let them all through)."""
    calls = [0]
    for owner, name in _ATTACH_STEPS:
        original = getattr(owner, name)

        def step(*args: object, _original=original, **kwargs: object) -> object:
            calls[0] += 1
            if calls[0] - 1 == n:
                raise RuntimeError("attach step failed")
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, step)
    # the run file's first write is its metadata, in RunWriter.__init__: make that a countable step too
    original_init = mpdiag.io.runfile.RunWriter.__init__

    def init(self: object, *args: object, **kwargs: object) -> None:
        calls[0] += 1
        if calls[0] - 1 == n:
            raise mpdiag.RunFileError("cannot create run file")
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(mpdiag.io.runfile.RunWriter, "__init__", init)
    return calls


def test_a_failed_attach_leaves_the_model_exactly_as_it_was(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before, showwarning, filters = _hook_count(model, opt), warnings.showwarning, list(warnings.filters)
    with monkeypatch.context() as patch:
        steps = _failing_at(-1, patch)
        mpdiag.diagnose(model, optimizer=opt, run_file=tmp_path / "counted.mpdiag").close()
    assert steps[0] > 10  # every hook, the run file and the anomaly watch
    for n in range(steps[0]):
        path = tmp_path / f"attach-{n}.mpdiag"
        with monkeypatch.context() as patch:
            _failing_at(n, patch)
            # the failure itself reaches the caller, not one of the clean-up after it
            with pytest.raises(
                MpdiagError if n == 0 else RuntimeError,
                match="cannot create run file" if n == 0 else "attach step failed",
            ):
                mpdiag.diagnose(model, optimizer=opt, run_file=path)
        assert _hook_count(model, opt) == before, f"attach step {n} left hooks behind"
        assert not path.exists() and warnings.showwarning is showwarning and warnings.filters == filters
        model(torch.randn(2, 6)).sum().backward()  # nothing is observing any more
        with mpdiag.diagnose(model) as diag:  # and the model is not claimed
            pass
        assert diag.run.steps == []


@pytest.mark.parametrize("target", [torch.randn(3), [nn.Linear(2, 2)], "model", None])
def test_only_modules_can_be_diagnosed(target: object) -> None:
    with pytest.raises(AttachError, match=r"diagnose\(\) expects a torch.nn.Module, got .*; pass the model itself"):
        mpdiag.diagnose(target)  # type: ignore[arg-type]


def test_a_second_diagnosis_of_the_same_model_is_refused() -> None:
    model = mlp()
    with mpdiag.diagnose(model):
        with pytest.raises(AttachError, match="already being diagnosed"):
            mpdiag.diagnose(model)
        with pytest.raises(AttachError, match="as module '0'"):
            mpdiag.diagnose(model[0])


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"every": 0}, "every must be a positive integer"),
        ({"every": 1.5}, "every must be a positive integer"),
        ({"every": True}, "every must be a positive integer"),
        ({"include": "nothing*"}, r"select none of the model's modules; module names look like \['', '0', '1', '2'\]"),
        ({"include": [3]}, r"include expects glob strings such as 'blocks.\*.mlp', got \[3\]"),
        ({"optimizer": "sgd"}, "optimizer must be a torch.optim.Optimizer, .* got str"),
        ({"formats": []}, "expected at least one format to track"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs: dict, says: str) -> None:
    with pytest.raises(MpdiagError, match=says):
        mpdiag.diagnose(mlp(), **kwargs)


# -- observing never changes training ---------------------------------------------------------------------
class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _train(diagnosed: bool, autocast: bool, every: int = 1) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    model = WithBatchNorm()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    diag = mpdiag.diagnose(model, optimizer=opt, every=every) if diagnosed else None
    losses = []
    for _ in range(4):
        opt.zero_grad()
        x = torch.randn(16, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    if diag is not None:
        diag.close()
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
@pytest.mark.parametrize("every", [1, 2])
def test_training_is_bit_identical_with_and_without_diagnose(autocast: bool, every: int) -> None:
    plain_losses, plain_state = _train(False, autocast)
    losses, state = _train(True, autocast, every)
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, losses))
    assert all(torch.equal(plain_state[k], state[k]) for k in plain_state)  # params and batch-norm buffers


def test_dtypes_under_autocast_are_recorded() -> None:
    model = mlp()
    with mpdiag.diagnose(model) as diag:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(2, 6)).float().sum().backward()
        diag.step()
    assert diag.run.stats("0", "activation").dtypes == {"bfloat16"}
    assert diag.run.stats("0", "activation_grad").dtypes == {"bfloat16"}
    assert diag.run.stats("0.weight", "param_grad").dtypes == {"float32"}


def test_nothing_the_model_produced_is_kept_alive() -> None:
    model = mlp()
    with mpdiag.diagnose(model) as diag:
        out = model(torch.randn(4, 6))
        loss = out.pow(2).mean()
        loss.backward()
        refs = [weakref.ref(out), weakref.ref(loss), weakref.ref(model[0].weight.grad)]
        model.zero_grad(set_to_none=True)
        del out, loss
        diag.step()
        gc.collect()
        assert all(r() is None for r in refs)


@pytest.mark.parametrize("cpu_kernel", [False, True], ids=["torch-ops", "cpu-kernel"])
def test_no_host_reads_before_the_step_closes(cpu_kernel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if cpu_kernel and not _accumulate.use_cpu_kernel():
        pytest.skip("numba is not installed")
    monkeypatch.setattr(_accumulate, "use_cpu_kernel", lambda: cpu_kernel)
    model = TinyTransformerLM(vocab_size=32, d_model=16, n_heads=2, n_layers=1, seq_len=8)
    tokens, targets = next(synthetic_batches(batch_size=2, seq_len=8, vocab_size=32))
    # The first tensor of a dtype that a process measures builds that dtype's bucket layout from mpdiag's
    # own host-side constants, once: build it here, so that the count does not depend on the tests before.
    tensor_stats(torch.ones(1))
    with mpdiag.diagnose(model) as diag:
        with CountHostReads() as mode:
            lm_loss(model(tokens), targets).backward()
        assert mode.reads == 0
        # the device path's ops ran under the mode, so it saw everything they did; the kernel ran none of them
        assert ("aten.bucketize" in mode.ops) != cpu_kernel
        diag.step()
    assert diag.run.stats("head", "activation_grad", step=0).numel == 2 * 8 * 32


def test_forward_under_inference_mode_then_training() -> None:
    model = mlp()
    with mpdiag.diagnose(model) as diag:
        with torch.inference_mode():
            model(torch.randn(2, 6))  # before any training: recorded (inference is what is diagnosed)
        train_step(model, torch.randn(2, 6), diag)
    assert diag.run.stats("0", "activation", step=0).calls == 2


@pytest.mark.parametrize("evaluate", ["no_grad", "inference_mode"])
def test_evaluation_forwards_of_the_whole_model_are_not_training(evaluate: str) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    context = torch.no_grad if evaluate == "no_grad" else torch.inference_mode
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 6)).pow(2).mean().backward()
            opt.step()
            with context():  # evaluation after each step, as the HF Trainer and Lightning do
                model(torch.randn(8, 6))
    assert diag.run.steps == [0, 1, 2]  # and no fourth step made of the last evaluation
    assert [diag.run.stats("0", "activation", step=s).calls for s in diag.run.steps] == [1, 1, 1]


def test_mpdiags_own_re_runs_do_not_count_as_training_seen() -> None:
    model = mlp()
    with mpdiag.diagnose(model) as diag, torch.no_grad():
        model(torch.randn(4, 6))
        with torch.enable_grad(), paused(model):  # as replay and trace do
            model(torch.randn(4, 6)).sum().backward()
        model(torch.randn(4, 6))  # still inference being diagnosed, not evaluation after training
    assert diag.run.stats("2", "activation").calls == 2


def test_forwards_without_autograd_are_recorded_where_no_training_is_diagnosed() -> None:
    model = mlp()
    with mpdiag.diagnose(model) as diag, torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 6))
            diag.step()
    assert diag.run.steps == [0, 1] and diag.run.stats("2", "activation").calls == 2


def test_nonfinite_values_are_counted_not_fatal() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with mpdiag.diagnose(model) as diag:
        model(torch.tensor([[math.inf, 1.0]])).sum().backward()
        diag.step()
    s = diag.run.stats("0", "activation", step=0)
    assert s.nonfinite == 2


@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"), reason="torch < 2.9: no per-backend settings")
def test_a_run_records_the_per_backend_precision_settings_where_the_legacy_flags_cannot_be_read() -> None:
    """Once torch >= 2.9's settings differ per backend, reading cudnn.allow_tf32 raises; attaching must not."""
    from mpdiag.probe._matmul_precision import matmul_precision

    # Setting one backend's and back does not give the legacy getters back: the context restores them all.
    with matmul_precision("ieee"):
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"  # conv and rnn now differ
        with pytest.raises(RuntimeError):
            torch.backends.cudnn.allow_tf32  # noqa: B018 - the legacy getter refuses
        model = nn.Linear(2, 2)
        with mpdiag.diagnose(model) as diag:
            model(torch.randn(1, 2)).sum().backward()
        env = diag.run.meta["environment"]
        assert env["cudnn_allow_tf32"] is None and env["fp32_precision"]["cudnn_conv"] == "tf32"
