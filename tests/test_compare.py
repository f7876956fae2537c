"""mpdiag.compare: each precision's column is exactly what a plain loop in that precision gives, the
user's model and every global flag are left as found, and the memory and convergence figures mean what
they say."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from models import lm_loss, tiny_gpt2, token_batches
from torch import nn

import mpdiag
from mpdiag.analysis.convergence import convergence, noise_band, step_noise_band
from mpdiag.core.errors import MpdiagError
from mpdiag.probe._matmul_precision import matmul_precision
from mpdiag.probe._memory import state_bytes

STEPS = 8


def _mlp(seed: int = 0, width: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, width), nn.GELU(), nn.Dropout(0.2), nn.Linear(width, 4))


def _batches(n: int = STEPS, rows: int = 32, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 16, generator=g), torch.randn(rows, 4, generator=g)) for _ in range(n)]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x).float(), y.float())


def _adam(params):  # noqa: ANN001, ANN202
    return torch.optim.Adam(params, lr=1e-2)


def _plain_loop(model, batches, autocast=None, scaler=None, weights=None):  # noqa: ANN001, ANN202
    """The loop a user would write for one precision, on a copy, from the comparison's random state."""
    model = copy.deepcopy(model)
    torch.manual_seed(SEED)
    if weights is not None:
        model = model.to(weights)
    opt = _adam(model.parameters())
    losses, skipped = [], []
    for step, (x, y) in enumerate(batches):
        if weights is not None:
            x, y = x.to(weights), y.to(weights)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = _loss(model, (x, y))
        if scaler is not None:
            before = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if scaler.get_scale() < before:  # GradScaler's rule: a found inf halves the scale, skips the step
                skipped.append(step)
        else:
            loss.backward()
            opt.step()
        losses.append(loss.item())
    return losses, skipped


SEED = 123  # the random state compare() and the plain loops start from


@pytest.fixture(scope="module")
def comparison() -> mpdiag.Comparison:
    model = _mlp()
    torch.manual_seed(SEED)
    return mpdiag.compare(
        model,
        _loss,
        _batches(),
        make_optimizer=_adam,
        precisions=("fp32", "tf32", "bf16", "fp16", "bf16-pure"),
        grad_scaler={"init_scale": 2.0**22},  # too large for the first steps: the GradScaler skips them
    )


def test_each_column_is_bit_for_bit_the_plain_loop_of_its_precision(comparison) -> None:  # noqa: ANN001
    model, batches = _mlp(), _batches()
    results = comparison.results
    assert results["fp32"].losses == _plain_loop(model, batches)[0]
    assert results["bf16"].losses == _plain_loop(model, batches, autocast=torch.bfloat16)[0]
    assert results["bf16-pure"].losses == _plain_loop(model, batches, weights=torch.bfloat16)[0]
    losses, skipped = _plain_loop(
        model, batches, autocast=torch.float16, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**22)
    )
    assert results["fp16"].losses == losses
    assert results["fp16"].skipped_steps == skipped
    assert 2 <= len(skipped) < STEPS - 3  # 2^22 overflows fp16 until the scaler has halved it enough
    assert all(not r.skipped_steps for p, r in results.items() if p != "fp16")


def test_the_band_is_where_a_reordered_fp32_training_got_to_on_fp32s_own_batches(comparison) -> None:  # noqa: ANN001
    """The yardstick's loss is taken on fp32's batch with fp32's dropout masks: at step 0, from the same
    weights, it is fp32's loss exactly, and the band opens from 0 as the trajectories part."""
    noise, fp32 = comparison.noise, comparison.results["fp32"].losses
    assert noise.losses is not None and noise.losses[0] == fp32[0] and noise.band[0] == 0
    assert noise.losses[1:] != tuple(fp32[1:]) and max(noise.band) > 0
    assert noise.param_distance is not None and noise.param_distance > 0


def test_tf32_on_a_cpu_says_it_ran_as_fp32_and_did(comparison) -> None:  # noqa: ANN001
    tf32 = comparison.results["tf32"]
    assert tf32.losses == comparison.results["fp32"].losses
    assert any("trained as fp32" in note for note in tf32.notes)
    assert "trained as fp32" in comparison.line("tf32")


def test_the_copies_are_recorded_one_step_in_two_and_timed_on_the_others(comparison) -> None:  # noqa: ANN001
    for precision, result in comparison.results.items():
        assert result.run is not None
        assert result.run.steps == [0, 2, 4, 6], precision
        assert result.step_times and all(step % 2 == 1 and step >= 2 for step in result.step_times)
        assert not set(result.step_times) & set(result.memory_steps)  # a profiled step is not timed
        assert result.step_time == statistics.median(result.step_times.values())
    fp16 = comparison.results["fp16"].run
    assert fp16 is not None and fp16.loss_scales  # the GradScaler's scale is known to the analyses


def test_skipped_steps_are_neither_timed_nor_the_ones_whose_memory_counts(comparison) -> None:  # noqa: ANN001
    fp16 = comparison.results["fp16"]
    first_ran = min(set(range(STEPS)) - set(fp16.skipped_steps))
    assert fp16.memory_steps and min(fp16.memory_steps) > first_ran  # the optimizer's state exists by then
    assert not set(fp16.memory_steps) & set(fp16.skipped_steps)
    assert fp16.step_times and not set(fp16.step_times) & set(fp16.skipped_steps)


def test_a_precision_whose_every_step_was_skipped_did_not_train() -> None:
    cmp = mpdiag.compare(
        _mlp(), _loss, _batches(), make_optimizer=_adam, precisions=("fp16",), grad_scaler={"init_scale": 2.0**60}
    )
    fp16 = cmp.results["fp16"]
    assert fp16.skipped_steps == list(range(STEPS)) and not fp16.step_times and fp16.peak_memory == 0
    assert "did not train: the GradScaler skipped all 8 steps" in cmp.line("fp16")


def test_the_summary_has_a_line_per_precision_with_what_was_measured(comparison) -> None:  # noqa: ANN001
    text = str(comparison)
    for precision in comparison.results:
        assert comparison.line(precision) in text
    ref = comparison.results["fp32"]
    for precision, result in comparison.results.items():
        if precision == "fp32":
            continue
        ratio = ref.step_time / result.step_time
        word = "as fast" if abs(ratio - 1) < 0.03 else ("faster" if ratio > 1 else "slower")
        assert word in comparison.line(precision)
        assert ("less" if result.peak_memory < ref.peak_memory else "more") in comparison.line(precision) or (
            abs(result.peak_memory / ref.peak_memory - 1) < 0.005
        )
    assert "of 8 steps skipped by the GradScaler" in comparison.line("fp16")


def test_lock_step_and_one_after_another_train_the_same(comparison) -> None:  # noqa: ANN001
    model = _mlp()
    torch.manual_seed(SEED)
    apart = mpdiag.compare(
        model, _loss, _batches(), make_optimizer=_adam, precisions=("bf16",), interleave=False, diagnose=False
    )
    assert apart.results["fp32"].losses == comparison.results["fp32"].losses
    assert apart.results["bf16"].losses == comparison.results["bf16"].losses
    assert apart.noise.band == comparison.noise.band
    assert apart.results["bf16"].run is None
    assert apart.results["bf16"].convergence == comparison.results["bf16"].convergence


def test_the_model_the_random_state_and_the_flags_are_left_as_found() -> None:
    model = _mlp()
    model(torch.randn(2, 16)).sum().backward()  # .grad present, as mid-training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    mpdiag.compare(model, _loss, _batches(), make_optimizer=_adam, precisions=("tf32", "bf16"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training
    with mpdiag.diagnose(model):  # no recording of a copy is left claiming anything
        pass


def _fp32_precisions() -> list[str]:
    b = torch.backends
    return [
        o.fp32_precision for o in (b, b.cuda.matmul, b.cudnn, b.cudnn.conv, b.mkldnn, b.mkldnn.matmul, b.mkldnn.conv)
    ]


@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"), reason="torch < 2.9: no per-backend settings")
def test_flags_are_restored_after_training_raised() -> None:
    calls = {"n": 0}

    def failing(model, batch):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 9:  # the third step of the lock-step's third training
            raise RuntimeError("boom")
        return _loss(model, batch)

    # Setting one backend's and back does not give the legacy getters back: the context restores them all.
    with matmul_precision("ieee"):
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        model = _mlp()
        flags, rng = _fp32_precisions(), torch.get_rng_state()
        with pytest.raises(RuntimeError, match="boom"):
            mpdiag.compare(model, failing, _batches(), make_optimizer=_adam, precisions=("tf32", "bf16"))
        assert _fp32_precisions() == flags
        assert torch.equal(rng, torch.get_rng_state())
        assert not torch.is_autocast_enabled("cpu")


def test_matmul_precision_sets_every_backend_and_restores_it() -> None:
    before = _fp32_precisions()
    with matmul_precision("tf32"):
        assert set(_fp32_precisions()) == {"tf32"}
    with pytest.raises(ValueError), matmul_precision("ieee"):
        assert set(_fp32_precisions()) == {"ieee"}
        raise ValueError
    assert _fp32_precisions() == before


class _Wide(nn.Module):
    """Activations dominate on large batches: 4 layers of width 256 (0.5 MB of weights; 4 MB per
    activation at 4096 rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 256)
        self.hidden = nn.ModuleList(nn.Linear(256, 256, bias=False) for _ in range(2))
        self.out = nn.Linear(256, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp(x))
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


def test_peak_memory_holds_the_training_state_and_grows_with_the_activations() -> None:
    torch.manual_seed(0)
    model = _Wide()
    small, large = (
        mpdiag.compare(model, _loss, _batches(rows=rows), make_optimizer=_adam, precisions=("fp32",), diagnose=False)
        for rows in (512, 4096)
    )
    copy_ = copy.deepcopy(model)
    opt = _adam(copy_.parameters())
    _loss(copy_, _batches(1)[0]).backward()
    opt.step()  # parameters, gradients and Adam's two moments: 4x the parameters
    assert state_bytes(copy_, opt) >= 4 * sum(p.numel() * 4 for p in model.parameters())
    assert small.results["fp32"].peak_memory >= state_bytes(copy_, opt)
    # 3584 more rows: each keeps at least its 3 hidden activations of 256 fp32 values for backward
    grown = large.results["fp32"].peak_memory - small.results["fp32"].peak_memory
    assert grown >= 3584 * 3 * 256 * 4


def test_convergence_is_judged_against_the_noise_band() -> None:
    fp32 = [3.0 - 0.1 * t for t in range(10)]
    other = [v + (0.05 if t % 2 else -0.05) for t, v in enumerate(fp32)]
    noise = noise_band(fp32, other, window=3)
    assert noise.band == pytest.approx([0.05] * 10)
    same = convergence(fp32, fp32, noise, param_distance=0.0)
    assert same.within_noise and same.first_outside is None and same.final_change == 0
    close = convergence([v + 0.04 for v in fp32], fp32, noise, param_distance=0.0)
    assert close.within_noise and close.difference == pytest.approx([0.8] * 10)
    drifting = convergence([v + 0.02 * t for t, v in enumerate(fp32)], fp32, noise, param_distance=0.0)
    assert drifting.first_outside == 4 and not drifting.within_noise  # RMS of 0.04, 0.06, 0.08 > 0.05
    assert "departs from fp32 from step 4" in drifting.describe()
    excursion = [v + (0.2 if t == 5 else 0.0) for t, v in enumerate(fp32)]
    back = convergence(excursion, fp32, noise, param_distance=0.0)
    assert back.within_noise and back.first_outside is None and back.outside_share == pytest.approx(0.3)
    diverged = convergence([*fp32[:6], math.nan, math.nan, math.nan, math.nan], fp32, noise, param_distance=1.0)
    assert diverged.diverged_at == 6 and diverged.first_outside == 6 and not diverged.within_noise
    assert "diverges at step 6" in diverged.describe()


def test_without_a_second_run_the_band_is_fp32s_step_to_step_change() -> None:
    band = step_noise_band([1.0, 1.0 + math.sqrt(2), 1.0], window=3).band
    assert band == pytest.approx([1.0, 1.0, 1.0])
    cmp = mpdiag.compare(_mlp(), _loss, _batches(), make_optimizer=_adam, precisions=("bf16",), noise_run=False)
    assert cmp.noise.losses is None and "step-to-step" in cmp.noise.how
    assert cmp.noise.band == step_noise_band(cmp.results["fp32"].losses).band


def test_loss_inside_a_transformers_model_trains_each_precision() -> None:
    """A real GPT-2 from a config, its loss computed inside the model from ``labels=``."""
    model = tiny_gpt2()
    cmp = mpdiag.compare(
        model,
        lambda m, ids: lm_loss(m, ids, inside=True),
        token_batches(6),
        make_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        precisions=("bf16", "fp16"),
    )
    assert set(cmp.results) == {"fp32", "bf16", "fp16"}
    assert all(len(r.losses) == 6 and all(map(math.isfinite, r.losses)) for r in cmp.results.values())
    bf16 = cmp.results["bf16"]
    assert bf16.convergence is not None and bf16.convergence.param_distance > 0
    assert bf16.run is not None and any(s.kind == "activation" for s in bf16.run.sites)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precisions": ("fp8",)}, "precisions must be among"),
        ({"steps": 3}, "steps must be an int of at least 4"),
        ({"diagnose": {"optimizer": None}}, "diagnose= takes"),
        ({"grad_scaler": {"scale": 2.0}}, "grad_scaler must be a dict of torch.amp.GradScaler's arguments"),
        ({"make_optimizer": lambda p: torch.optim.SGD(_mlp().parameters(), lr=0.1)}, "over the parameters it is given"),
        ({"make_optimizer": lambda p: None}, "must return a torch.optim.Optimizer"),
        ({"warmup": -1}, "warmup must be"),
        ({"warmup": 7}, "warmup=7 leaves no step of 8 to time"),
        ({"make_optimizer": lambda p: torch.optim.LBFGS(p)}, "LBFGS needs one"),
        ({"device": "meta"}, "on a CPU or a CUDA GPU; got 'meta'"),
    ],
)
def test_bad_arguments_say_what_was_expected(kwargs, message) -> None:  # noqa: ANN001
    arguments = {"make_optimizer": _adam, "precisions": ("fp16",), **kwargs}
    with pytest.raises(MpdiagError, match=message):
        mpdiag.compare(_mlp(), _loss, _batches(), **arguments)


def test_bad_models_batches_and_losses_say_what_to_do() -> None:
    with pytest.raises(MpdiagError, match="batches ran out after 5 of steps=8"):
        mpdiag.compare(_mlp(), _loss, iter(_batches(5)), make_optimizer=_adam, steps=8)
    short = mpdiag.compare(_mlp(), _loss, _batches(4), make_optimizer=_adam, steps=8, precisions=("bf16",))
    assert len(short.results["bf16"].losses) == 8  # a list is gone through again
    with pytest.raises(MpdiagError, match="at least 4 steps"):
        mpdiag.compare(_mlp(), _loss, _batches(2), make_optimizer=_adam)
    with pytest.raises(MpdiagError, match="an iterable of batches"):
        mpdiag.compare(_mlp(), _loss, torch.randn(8, 16), make_optimizer=_adam)
    with pytest.raises(MpdiagError, match="scalar floating loss tensor, got a Tensor of shape \\(32, 4\\)"):
        mpdiag.compare(_mlp(), lambda m, b: m(b[0]), _batches(), make_optimizer=_adam)
    with pytest.raises(MpdiagError, match="starts every precision from fp32 weights"):
        mpdiag.compare(_mlp().to(torch.bfloat16), _loss, _batches(), make_optimizer=_adam)
    model = _mlp()
    with mpdiag.diagnose(model), pytest.raises(MpdiagError, match="close it first"):
        mpdiag.compare(model, _loss, _batches(), make_optimizer=_adam)
    with pytest.raises(MpdiagError, match="has no length and may never end: pass steps="):
        mpdiag.compare(_mlp(), _loss, (b for b in _batches()), make_optimizer=_adam)
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(MpdiagError, match="no parameter that requires grad"):
        mpdiag.compare(frozen, _loss, _batches(), make_optimizer=_adam)
    with pytest.raises(MpdiagError, match="does not require grad"):
        mpdiag.compare(_mlp(), lambda m, b: _loss(m, b).detach(), _batches(), make_optimizer=_adam)


def test_autocast_applied_by_the_loss_function_itself_is_refused() -> None:
    def autocasting(model, batch):  # noqa: ANN001, ANN202
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _loss(model, batch)

    with pytest.raises(MpdiagError, match=r"autocast \(bfloat16\) was not what fp32 sets \(off\)"):
        mpdiag.compare(_mlp(), autocasting, _batches(), make_optimizer=_adam, precisions=("bf16",))


def test_one_batch_repeated_without_dropout_falls_back_to_the_step_to_step_band() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))  # no dropout: nothing random
    cmp = mpdiag.compare(model, _loss, _batches(1), steps=8, make_optimizer=_adam, precisions=("bf16",))
    assert "came out identical to fp32" in cmp.noise.how and "step-to-step" in cmp.noise.how
    assert any(cmp.noise.band) and cmp.noise.losses is None


def test_a_loss_that_reaches_zero_or_goes_negative_gets_an_absolute_final_difference() -> None:
    fp32 = [1.0, 0.5, 0.0, -0.5, -1.0, -1.0]
    noise = noise_band(fp32, [1.0, 0.6, 0.1, -0.4, -0.9, -1.1], window=3)
    judged = convergence([1.0, 0.5, 0.1, -0.4, -0.5, -0.5], fp32, noise, param_distance=0.0)
    assert math.isnan(judged.final_change) and judged.final_difference == pytest.approx(11 / 30)  # last 3 steps
    assert "final loss +0.3667 (absolute)" in judged.describe()


def test_a_dict_like_batch_is_copied_not_moved_or_cast_in_place() -> None:
    transformers = pytest.importorskip("transformers")

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(16, 4)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.linear(pixel_values)

    torch.manual_seed(0)
    batches = [transformers.BatchEncoding({"pixel_values": torch.randn(8, 16)}) for _ in range(6)]
    originals = [b["pixel_values"] for b in batches]
    cmp = mpdiag.compare(
        Model(), lambda m, b: m(**b).float().square().mean(), batches, make_optimizer=_adam, precisions=("bf16-pure",)
    )
    assert all(math.isfinite(v) for v in cmp.results["bf16-pure"].losses)  # the bf16 model got bf16 inputs
    assert all(b["pixel_values"] is t and t.dtype == torch.float32 for b, t in zip(batches, originals))
