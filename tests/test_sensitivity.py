"""Precision sensitivity and keep_fp32, against real autocast on models with a known fragile layer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fragile_models import Classifier, OverflowingBlock, batch, classification_loss
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import mpdiag
from mpdiag.core.errors import MpdiagError
from mpdiag.probe._fp8 import Fp8Matmuls, fake_quantize, scale_for
from mpdiag.probe.keep_fp32 import transformers_line


class OffsetProjection(nn.Linear):
    """A linear layer fed its input plus a large offset, whose bias takes the offset's image away again:
    in fp32 the output is ``weight @ x``; in bf16 the offset input keeps 8 bits and x's detail is lost.
    (Subtracting nearly equal large values, inside one layer.)"""

    def __init__(self, offset: float = 4096.0) -> None:
        super().__init__(64, 64)
        self.offset = offset
        with torch.no_grad():
            self.bias.copy_(-offset * self.weight.sum(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + self.offset)


def loss_under(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype | None) -> float:
    """The loss with real autocast in ``dtype`` (None: fp32), computed here, apart from mpdiag's passes."""
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        return float(classification_loss(model, data))


def test_keep_fp32_names_the_projection_that_overflows_fp16() -> None:
    model, data = Classifier(OverflowingBlock()), batch()
    assert not math.isfinite(loss_under(model, data, torch.float16))  # the failure users bring

    sens = mpdiag.sensitivity(model, classification_loss, data, torch.float16)
    assert sens.local["block.wo"].nonfinite and sens.first_nonfinite == "block.wo"
    assert [e.name for e in sens.fragile(None) if e.nonfinite] == ["block.wo"]  # of the leaves
    assert sens.local["block"].nonfinite  # the block holding it, run alone, too
    answer = sens.keep_fp32(tolerance=1e-3)
    assert answer.names == ("block.wo",) and answer.passes >= 2

    with mpdiag.keep_fp32(model, answer.names):
        kept = loss_under(model, data, torch.float16)
    fp32 = loss_under(model, data, None)
    assert abs(kept - fp32) / fp32 <= 1e-3
    assert answer.loss_error == pytest.approx(abs(kept - fp32) / fp32, rel=1e-6)
    assert "block.wo" in str(sens) and "mpdiag.keep_fp32(model, ['block.wo'])" in str(answer)


def test_keep_fp32_names_the_layer_that_loses_its_signal_to_bf16() -> None:
    model, data = Classifier(OffsetProjection()), batch()
    sens = mpdiag.sensitivity(model, classification_loss, data, "bf16")
    assert sens.fragile(1)[0].name == "block"
    assert sens.local["block"].rel_error > 0.1  # the signal is gone, not just rounded
    assert sens.loss_error > 0.01
    answer = sens.keep_fp32(tolerance=0.01)
    assert answer.names == ("block",)
    with mpdiag.keep_fp32(model, ["block"]):
        kept = loss_under(model, data, torch.bfloat16)
    assert abs(kept - loss_under(model, data, None)) / loss_under(model, data, None) <= 0.01


def test_no_set_short_of_everything_is_said_so() -> None:
    # The overflow happens in the loss function itself, outside every module: no module in fp32 helps.
    model, data = Classifier(nn.Identity()), batch()
    big = torch.full((10, 10), 1e5)

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return (model(batch[0]) @ big).sum() * 0 + classification_loss(model, batch)

    answer = mpdiag.sensitivity(model, loss, data, torch.float16).keep_fp32()
    assert answer.names is None and not answer.found
    assert "no set of modules short of every leaf" in str(answer)


def test_gpt2_needs_nothing_in_bf16_and_its_matmuls_err_as_much_as_a_cast() -> None:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config)  # train mode: dropout on, as in training
    ids = torch.randint(0, 512, (4, 64))

    def loss(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return m(input_ids=ids, labels=ids).loss

    x = torch.randn(1 << 16)
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        noise = x.to(dtype).float() - x
        cast_sqnr = 10 * math.log10(float(x.square().sum() / noise.square().sum()))  # the real cast's
        sens = mpdiag.sensitivity(model, loss, ids, dtype)
        matmuls = [e for n, e in sens.local.items() if n.endswith(("c_attn", "c_fc", "mlp.c_proj"))]
        assert len(matmuls) == 3 * config.n_layer
        # inputs and output each rounded once: a few dB under one cast, never far from it
        for e in matmuls:
            assert cast_sqnr - 8 <= e.sqnr_db <= cast_sqnr + 3, (name, e)
        if dtype is torch.bfloat16:
            assert sens.keep_fp32(tolerance=0.01).names == ()
            assert sens.loss_error < 0.01


def test_the_model_is_left_as_found() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 1))
    x = torch.randn(16, 8)
    model(x).sum().backward()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    with mpdiag.diagnose(model) as diag:
        sens = mpdiag.sensitivity(model, lambda m, b: m(b).square().mean(), x, torch.bfloat16)
        sens.keep_fp32()
    assert diag.run.steps == []  # an attached diagnosis recorded none of the passes
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)
    # dropout drew the same mask in every pass: its output differs from fp32 only by rounding
    assert sens.propagated["2"].rel_error < 0.02


def test_keep_fp32_runs_modules_in_fp32_and_restores_them() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    forward = model[1].forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with mpdiag.keep_fp32(model, ["1"]):
            assert model[0](torch.ones(1, 4)).dtype == torch.bfloat16
            assert model(torch.ones(1, 4)).dtype == torch.float32
        assert model(torch.ones(1, 4)).dtype == torch.bfloat16
    assert "forward" not in model[1].__dict__ and model[1].forward == forward


def test_keep_fp32_keeps_a_forward_patched_on_the_instance() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    calls = []
    inner = model[0].forward

    def patched(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.dtype)
        return inner(x)

    model[0].forward = patched
    with torch.autocast("cpu", dtype=torch.bfloat16), mpdiag.keep_fp32(model, ["0"]):
        model(torch.ones(1, 4, dtype=torch.bfloat16))
    assert calls == [torch.float32] and model[0].forward is patched


@pytest.mark.parametrize(
    ("names", "message"),
    [(["nope"], "'nope' not a module"), ("0", "not one string"), (["low"], "bfloat16 parameters")],
)
def test_keep_fp32_refuses_what_it_cannot_do(names: object, message: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model.add_module("low", nn.Linear(4, 4).bfloat16())
    with pytest.raises(MpdiagError, match=message), mpdiag.keep_fp32(model, names):  # type: ignore[arg-type]
        pass


def test_bad_arguments_get_clear_errors() -> None:
    model = nn.Linear(4, 1)
    with pytest.raises(MpdiagError, match="fp16 or bf16"):
        mpdiag.sensitivity(model, lambda m, x: m(x).sum(), torch.ones(2, 4), torch.float32)
    with pytest.raises(MpdiagError, match="scalar loss"):
        mpdiag.sensitivity(model, lambda m, x: m(x), torch.ones(2, 4), "fp16")
    with pytest.raises(MpdiagError, match="torch.nn.Module"):
        mpdiag.sensitivity(object(), lambda m, x: x, None)  # type: ignore[arg-type]
    sens = mpdiag.sensitivity(model, lambda m, x: m(x).sum(), torch.ones(2, 4), "fp16")
    with pytest.raises(MpdiagError, match="tolerance above 0"):
        sens.keep_fp32(tolerance=0)


def test_the_report_shows_the_layers_and_the_answer(tmp_path) -> None:  # noqa: ANN001
    model, data = Classifier(OverflowingBlock()), batch()
    with mpdiag.diagnose(model) as diag:
        classification_loss(model, data).backward()
    sens = mpdiag.sensitivity(model, classification_loss, data, torch.float16)
    sens.keep_fp32(tolerance=1e-3)
    out = mpdiag.report(diag.run, tmp_path, sensitivity=sens)
    page = out.html.read_text()
    assert 'id="precision"' in page and "block.wo" in page
    assert "with mpdiag.keep_fp32(model, [&#39;block.wo&#39;]):" in page
    assert out.figures["sensitivity"].read_bytes().startswith(b"\x89PNG")
    assert "keep in fp32 for fp16: block.wo" in str(sens)
    # without a sensitivity there is no such section, and an earlier report's figure is removed
    again = mpdiag.report(diag.run, tmp_path)
    assert "sensitivity" not in again.figures and not (tmp_path / "sensitivity.png").exists()
    assert 'id="precision"' not in again.html.read_text()


# -- simulated fp8 --------------------------------------------------------------------------------
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("fp8", FP8, ids=str)
@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=64))
def test_fake_quantize_is_the_real_cast_of_the_scaled_tensor(fp8: torch.dtype, values: list[float]) -> None:
    x = torch.tensor(values)
    q, scale = fake_quantize(x, fp8), scale_for(x, fp8)
    amax, fmax = float(x.abs().max()), torch.finfo(fp8).max
    assert math.log2(scale).is_integer()
    assert amax == 0 or amax * scale <= fmax  # never past the format's max
    assert amax == 0 or amax * scale > fmax / 2 or scale == 2.0**126  # at the top of its range (fp32 allowing)
    assert torch.equal(q * scale, (x * scale).to(fp8).float())  # torch's own cast, exactly scaled


@pytest.mark.parametrize("fp8", FP8, ids=str)
def test_simulated_linear_is_an_fp8_gemm_with_bf16_output(fp8: torch.dtype) -> None:
    layer, x = nn.Linear(32, 16), torch.randn(8, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Fp8Matmuls(fp8, "cpu"):
        out = layer(x)
        matmul = x @ layer.weight.T
    expected = F.linear(fake_quantize(x, fp8), fake_quantize(layer.weight, fp8), layer.bias).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    assert torch.equal(matmul, (fake_quantize(x, fp8) @ fake_quantize(layer.weight.T, fp8)).bfloat16())
    # where autocast is off (keep_fp32, the reference pass) nothing is simulated
    model = nn.Sequential(layer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Fp8Matmuls(fp8, "cpu"):
        with mpdiag.keep_fp32(model, ["0"]):
            kept = model(x)
    assert torch.equal(kept, layer(x).detach())


class OutlierProjection(nn.Linear):
    """A linear layer fed one input feature 300,000 times larger than the rest, which it ignores (a zero
    weight column): the outlier features of large language models. bf16 rounds each value on its own
    and keeps 8 bits of every feature; fp8 with one scale for the whole input leaves the others a few
    levels at most, and they are the whole output."""

    def __init__(self) -> None:
        super().__init__(64, 64)
        self.boost = nn.Parameter(torch.ones(64), requires_grad=False)
        with torch.no_grad():
            self.boost[0] = 3e5
            self.weight[:, 0] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.boost)


def test_fp8_matmuls_err_as_much_as_a_cast_and_keep_fp32_names_the_outlier_layer() -> None:
    model, data = Classifier(nn.Sequential(nn.Linear(64, 64), nn.ReLU())), batch()
    x = torch.randn(1 << 16)
    for fp8, name in ((torch.float8_e4m3fn, "fp8_e4m3"), (torch.float8_e5m2, "fp8_e5m2")):
        noise = fake_quantize(x, fp8) - x
        cast_sqnr = 10 * math.log10(float(x.square().sum() / noise.square().sum()))
        sens = mpdiag.sensitivity(model, classification_loss, data, name)
        assert sens.dtype == name
        for layer in ("inp", "block.0", "head"):  # both operands rounded: a few dB under one cast
            assert cast_sqnr - 6 <= sens.local[layer].sqnr_db <= cast_sqnr + 1, (name, layer, sens.local[layer])

    outliers = nn.Sequential(OutlierProjection(), nn.ReLU())  # exact in fp32 once the projection is

    def energy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return model(batch[0]).square().mean()

    features = (torch.randn(16, 64), None)
    assert mpdiag.sensitivity(outliers, energy, features, "bf16").loss_error < 0.01  # bf16 keeps every feature
    sens = mpdiag.sensitivity(outliers, energy, features, "fp8_e4m3")
    assert sens.fragile(1)[0].name == "0" and sens.local["0"].rel_error > 0.5
    assert sens.loss_error > 0.1
    answer = sens.keep_fp32(tolerance=0.01)
    assert answer.names == ("0",) and answer.loss_error == 0.0


def test_the_transformers_line_keeps_those_weights_in_fp32_when_loaded_in_fp16(tmp_path) -> None:  # noqa: ANN001
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=128, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    kept = ["transformer.h.1.mlp.c_proj"]
    model = transformers.GPT2LMHeadModel(config)
    line = transformers_line(model, kept, torch.float16)
    assert line == (
        "GPT2LMHeadModel._keep_in_fp32_modules = [*(GPT2LMHeadModel._keep_in_fp32_modules or []), "
        "'transformer.h.1.mlp.c_proj']"
    )
    assert transformers_line(model, kept, torch.bfloat16).startswith("GPT2LMHeadModel._keep_in_fp32_modules_strict")
    assert transformers_line(nn.Linear(2, 2), ["x"]) is None

    class Patched(transformers.GPT2LMHeadModel):  # the line, applied: what a user adds to the class
        pass

    exec(line.replace("GPT2LMHeadModel", "Patched"), {"Patched": Patched})
    loaded = Patched.from_pretrained(tmp_path, dtype=torch.float16)
    dtypes = {name: p.dtype for name, p in loaded.named_parameters()}
    assert {d for n, d in dtypes.items() if n.startswith(kept[0] + ".")} == {torch.float32}
    assert dtypes["transformer.h.0.mlp.c_proj.weight"] == torch.float16


def test_global_precision_flags_are_restored_also_after_an_error() -> None:
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high")
    try:
        model = nn.Linear(4, 1)
        mpdiag.sensitivity(model, lambda m, x: m(x).sum(), torch.ones(2, 4), "bf16")
        assert torch.get_float32_matmul_precision() == "high"

        def failing(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("the user's loss broke")

        with pytest.raises(RuntimeError, match="loss broke"):
            mpdiag.sensitivity(model, failing, torch.ones(2, 4), "bf16")
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("high", before[1])
    finally:
        torch.set_float32_matmul_precision(before[0])


@pytest.mark.parametrize("how", ["torch.compile", "in place"])
def test_a_compiled_model_is_measured_eagerly_with_its_own_names(how: str) -> None:
    model, data = Classifier(OverflowingBlock()), batch()
    if how == "torch.compile":
        compiled = torch.compile(model, backend="eager")
    else:
        compiled = model
        compiled.compile(backend="eager")
    sens = mpdiag.sensitivity(compiled, classification_loss, data, torch.float16)
    assert sens.first_nonfinite == "block.wo" and "block.wo" in sens.local
    answer = sens.keep_fp32(tolerance=1e-3)
    assert answer.names == ("block.wo",)
    with mpdiag.keep_fp32(compiled, answer.names), torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert math.isfinite(float(classification_loss(compiled, data)))


class NeedsItsParent(nn.Linear):
    """A leaf that refuses to run outside its parent's forward (state the parent sets), and overflows."""

    inside = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.inside:
            raise RuntimeError("called outside its parent")
        return super().forward(x)


class Parent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wo = NeedsItsParent(64, 64)
        with torch.no_grad():
            self.wo.weight.mul_(1e5)
        self.norm = nn.LayerNorm(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.wo.inside = True
        try:
            return self.norm(self.wo(x))
        finally:
            self.wo.inside = False


def test_a_leaf_that_cannot_run_alone_is_still_a_candidate() -> None:
    model, data = Classifier(Parent()), batch()
    sens = mpdiag.sensitivity(model, classification_loss, data, torch.float16)
    assert "called outside its parent" in sens.skipped["block.wo"]
    assert sens.first_nonfinite == "block.wo" and sens.candidates()[0] == "block.wo"
    assert sens.keep_fp32(tolerance=1e-3).names == ("block.wo",)


def test_what_cannot_be_measured_is_refused_with_what_to_do() -> None:
    data = batch()
    broken = Classifier(nn.Identity())
    with torch.no_grad():
        broken.head.bias[0] = math.nan
    with pytest.raises(MpdiagError, match="in fp32 already.*trace_nonfinite"):
        mpdiag.sensitivity(broken, classification_loss, data, torch.float16)
    with pytest.raises(MpdiagError, match="fp32 parameters.*torch.bfloat16"):
        mpdiag.sensitivity(Classifier(nn.Identity()).bfloat16(), classification_loss, data, torch.float16)

    def autocast_inside(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return classification_loss(model, batch)

    with pytest.raises(MpdiagError, match="autocast .*bfloat16.* was on inside the fp32 reference"):
        mpdiag.sensitivity(Classifier(nn.Identity()), autocast_inside, data, torch.float16)
    with pytest.raises(MpdiagError, match="names=None"), mpdiag.keep_fp32(broken, None):  # type: ignore[arg-type]
        pass
    sens = mpdiag.sensitivity(Classifier(nn.Identity()), classification_loss, data, torch.float16)
    with pytest.raises(MpdiagError, match="tolerance above 0"):
        sens.keep_fp32(tolerance="0.01")  # type: ignore[arg-type]


# -- found in review: each a wrong answer before ------------------------------------------------
def test_the_search_draws_the_same_dropout_masks_whenever_it_runs() -> None:
    model = nn.Sequential(nn.Linear(16, 64), nn.Dropout(0.5), nn.Linear(64, 1))
    x = torch.randn(32, 16)
    sens = mpdiag.sensitivity(model, lambda m, b: m(b).square().mean(), x, torch.bfloat16)
    torch.rand(10)  # the user's code moves the random state on before searching
    answer = sens.keep_fp32(tolerance=0.01)
    assert answer.names == () and answer.loss_error == pytest.approx(sens.loss_error, rel=1e-6)
    with torch.no_grad():
        model[0].weight.mul_(2)  # training went on
    with pytest.raises(MpdiagError, match="parameters changed since sensitivity"):
        sens.keep_fp32(tolerance=0.02)


class CausalScores(nn.Module):
    """Scores with -inf above the diagonal (a causal mask), as attention computes them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x @ x.transpose(-1, -2)
        mask = torch.triu(torch.ones(scores.shape[-2:], dtype=torch.bool), diagonal=1)
        return scores.masked_fill(mask, -math.inf)


def test_an_inf_that_fp32_has_too_is_no_failure() -> None:
    model = nn.Sequential(nn.Linear(8, 8), CausalScores(), nn.Softmax(dim=-1))
    x = torch.randn(4, 6, 8)
    sens = mpdiag.sensitivity(model, lambda m, b: m(b).square().mean(), x, torch.bfloat16)
    assert sens.first_nonfinite is None
    assert sens.keep_fp32(tolerance=0.05).names == ()


class ScoresInTheParent(nn.Module):
    """Attention whose scores (q @ k^T, in the parent's own forward) pass fp16's max: no leaf holds them."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.o = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        with torch.no_grad():
            self.q.weight.mul_(300.0)
            self.k.weight.mul_(300.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = (self.q(x) @ self.k(x).transpose(-1, -2)).softmax(dim=-1)
        return self.o(scores @ x)


def test_an_overflow_between_children_is_answered_with_their_parent() -> None:
    model, data = Classifier(ScoresInTheParent()), batch()
    sens = mpdiag.sensitivity(model, classification_loss, data, torch.float16)
    assert not math.isfinite(sens.loss_error)
    answer = sens.keep_fp32(tolerance=0.01)
    assert answer.names == ("block",)


def test_modules_without_floating_outputs_are_not_reported_exact() -> None:
    class Router(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.argmax(dim=-1)

    model = nn.Sequential(nn.Linear(8, 4), Router())
    sens = mpdiag.sensitivity(model, lambda m, b: m(b).float().mean(), torch.randn(4, 8), torch.bfloat16)
    assert "1" not in sens.local and "no floating output" in sens.skipped["1"]


def test_errors_of_huge_values_are_measured_not_overflowed() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight.mul_(1e18)
    sens = mpdiag.sensitivity(model, lambda m, b: m(b).mean(), torch.randn(4, 8), torch.bfloat16)
    assert 1e-4 < sens.local["0"].rel_error < 0.1  # bf16's rounding, not 0 from fp32 squares overflowing


def test_torch_s_newer_precision_settings_are_honoured_and_restored() -> None:
    matmul = torch.backends.cuda.matmul
    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("this torch has only the older TF32 settings")
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"  # the setting torch >= 2.9 recommends; the legacy getters then raise
    try:
        mpdiag.sensitivity(nn.Linear(4, 1), lambda m, x: m(x).sum(), torch.ones(2, 4), "bf16")
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


def test_integer_and_fp64_matmuls_are_left_as_autocast_leaves_them() -> None:
    i, d = torch.arange(4).reshape(2, 2), torch.randn(2, 2, dtype=torch.float64)
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Fp8Matmuls(torch.float8_e4m3fn, "cpu"):
        assert (i @ i).dtype == torch.int64 and torch.equal(i @ i, torch.tensor([[2, 3], [6, 11]]))
        assert (d @ d).dtype == torch.float64
        einsum = torch.einsum("ij,jk->ik", a, b)
    e4m3 = torch.float8_e4m3fn
    assert torch.equal(einsum, (fake_quantize(a, e4m3) @ fake_quantize(b, e4m3)).bfloat16())
