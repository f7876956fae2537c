"""mpdiag on the stacks people train with: transformers models, gradient checkpointing, a GradScaler
that skips steps, accelerate, Lightning, torch.compile. Each test states an invariant a user would
state, and checks it with the real library (models from configs, random weights, nothing downloaded)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from models import image_batches, lm_loss, sites_that_differ, small_convnet, tiny_gpt2, token_batches, train_gpt2
from torch import nn
from torch_support import cpu_fp16_autocast

import mpdiag
import mpdiag.record.hooks
from mpdiag.analysis.verdict import skips_verdict, verdicts


# -- the loss inside the model or outside it ------------------------------------------------------------
@pytest.mark.parametrize("with_scaler", [False, True])
def test_loss_inside_or_outside_the_model_gives_the_same_advice(with_scaler: bool) -> None:
    def train(inside: bool) -> mpdiag.Run:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if with_scaler else None
        return train_gpt2(inside=inside, scaler=scaler)[0]

    inside, outside = train(True), train(False)
    # The loss the model returns is not recorded, nor the seed of backward (1, or the loss scale) that
    # reaches it: it is no layer's gradient. Everything else is the same tensors.
    assert inside.stats("", "activation_grad") == outside.stats("", "activation_grad")  # d loss / d logits
    assert sites_that_differ(inside, outside) == []
    for fmt in ("fp16", "bf16"):
        a, b = mpdiag.advise(inside, fmt), mpdiag.advise(outside, fmt)
        assert (a.recommended, a.window, a.limiting_sites) == (b.recommended, b.window, b.limiting_sites)
        assert a.overflow_limiter  # a layer, never the root's seed
        assert mpdiag.simulate_grad_scaler(inside, fmt) == mpdiag.simulate_grad_scaler(outside, fmt)
    assert [v.sentence for v in verdicts(inside)] == [v.sentence for v in verdicts(outside)]


def test_generate_and_evaluation_between_steps_are_not_recorded() -> None:
    model = tiny_gpt2(pad_token_id=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        for ids in token_batches(3):
            opt.zero_grad()
            lm_loss(model, ids).backward()
            opt.step()
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)  # no_grad inside, several forwards
            model.train()
    run = diag.run
    assert run.steps == [0, 1, 2]
    assert {run.stats("transformer.h.0.mlp.c_fc", "activation", step=s).calls for s in run.steps} == {1}


def test_an_encoder_decoder_generating_between_steps_adds_no_step() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=32,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
    )
    model = transformers.T5ForConditionalGeneration(config)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ids = torch.randint(2, 32, (2, 6))
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        for _ in range(2):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            model.generate(ids, max_new_tokens=2, do_sample=False)  # runs the encoder on its own, no grad
    run = diag.run
    assert run.steps == [0, 1]
    assert (
        run.records[0][mpdiag.Site("encoder.block.0", mpdiag.Kind.ACTIVATION)]
        == run.records[1][mpdiag.Site("encoder.block.0", mpdiag.Kind.ACTIVATION)]
    )  # same batch, lr 0: same values


# -- gradient checkpointing -----------------------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_records_the_same_statistics(reentrant: bool) -> None:
    forwards = []

    def checkpoint(model: nn.Module) -> None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        mlp = model.transformer.h[0].mlp
        forward = mlp.forward  # counted beneath the module's hooks: recomputation may run without them
        mlp.forward = lambda *args, **kwargs: (forwards.append(1), forward(*args, **kwargs))[1]

    plain = train_gpt2()[0]
    checkpointed = train_gpt2(prepare=checkpoint)[0]
    assert len(forwards) == 2 * 3  # checkpointing is on: each of the 3 steps' forwards runs again in backward
    assert plain.sites and sites_that_differ(plain, checkpointed) == []


@pytest.mark.parametrize("reentrant", [True, False])
def test_torch_utils_checkpoint_records_the_same_statistics(reentrant: bool) -> None:
    class Blocks(nn.Module):
        def __init__(self, checkpointed: bool) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Dropout(0.1)) for _ in range(3))
            self.checkpointed = checkpointed

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                if self.checkpointed:
                    x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=reentrant)
                else:
                    x = block(x)
            return x

    def train(checkpointed: bool) -> mpdiag.Run:
        torch.manual_seed(0)
        model = Blocks(checkpointed)
        x = torch.randn(4, 8, requires_grad=True)  # reentrant checkpointing needs an input that requires grad
        with mpdiag.diagnose(model) as diag:
            for _ in range(2):
                model(x).pow(2).mean().backward()
                diag.step()
        return diag.run

    plain, checkpointed = train(False), train(True)
    assert plain.stats("blocks.0.0", "activation").calls == 2
    assert sites_that_differ(plain, checkpointed) == []


# -- a GradScaler that skips steps ------------------------------------------------------------------------
def test_a_grad_scaler_that_skips_steps_is_followed_not_called_nan() -> None:
    if not cpu_fp16_autocast():
        pytest.skip("this torch has no fp16 autocast on CPU")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # far too large: the first steps overflow
    run, real = train_gpt2(steps=30, scaler=scaler, autocast=torch.float16)
    real_skips = [step for step, skipped in enumerate(real) if skipped]
    assert len(real_skips) > 5 and len(real_skips) < len(real)
    sim = mpdiag.simulate_grad_scaler(run)  # from the run's own scaler settings, as recorded
    assert sim.scales[0] == 2.0**40 and sim.skipped_steps == real_skips
    adv = mpdiag.advise(run, "fp16")
    assert adv.skipped_steps == tuple(real_skips) and adv.nonfinite_steps == ()
    # What a skip says: its scale overflowed, and so does every larger one. Below it, only finite values count.
    for step in real_skips:
        assert adv.at(run.loss_scale(step)).overflow and adv.at(2 * run.loss_scale(step)).overflow
    assert not adv.at(1.0).overflow and adv.recommended < min(run.loss_scale(s) for s in real_skips)
    overflowing = [o.overflow for o in adv.curve()]
    assert overflowing == sorted(overflowing)  # one wall: no overflow below it, overflow from it on
    for v in verdicts(run):  # inf the scaler skipped is not NaN/inf of the model: nothing is demoted for it
        assert "NaN/inf" not in v.sentence
    assert next(v for v in verdicts(run) if v.fmt == "bf16").level == "ok"
    assert f"skipped {len(real_skips)} of 30" in skips_verdict(run)


def test_bf16_needs_no_loss_scale_and_is_told_so() -> None:
    run = train_gpt2()[0]
    adv = mpdiag.advise(run, "bf16")
    assert adv.at(1.0).underflow == 0 and adv.recommended == 1.0
    assert "recommended scale 2^0" in str(adv)


# -- wrapped optimizers and closures ---------------------------------------------------------------------
def test_accelerate_optimizer_steps_align_with_its_accumulation_and_autocast() -> None:
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = accelerator.prepare(model, opt)
    assert not isinstance(opt, torch.optim.Optimizer) or "_optimizer_step_pre_hooks" not in vars(opt)
    weights_before = []
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        for i, ids in enumerate(token_batches(6)):
            if i % 2 == 0:  # the first micro-batch of an optimizer step
                weights_before.append(model.lm_head.weight.detach().clone())
            with accelerator.accumulate(model):
                accelerator.backward(lm_loss(model, ids))
                opt.step()
                opt.zero_grad()
    run = diag.run
    assert run.steps == [0, 1, 2]  # six micro-batches, three optimizer steps
    assert {run.stats("transformer.h.0.mlp.c_fc", "activation", step=s).calls for s in run.steps} == {2}
    for step, weights in enumerate(weights_before):  # tied to the token embedding, recorded under its name
        assert run.stats("transformer.wte.weight", "param", step=step) == mpdiag.tensor_stats(weights, run.formats)
    # accelerate applies autocast inside forward: the environment says what the activations were in
    assert run.meta["environment"]["autocast_dtype"] == "bfloat16"
    assert "bfloat16" in run.stats("transformer.h.0.mlp.c_fc", "activation").dtypes


class _Lit:
    """A LightningModule around a small MLP, built lazily so the tests import without Lightning."""

    @staticmethod
    def make(precision_scaler_seen: list[object]) -> object:
        lightning = pytest.importorskip("lightning")

        class Module(lightning.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
                self.seen_weights: list[torch.Tensor] = []

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net(x)

            def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
                self.seen_weights.append(self.net[0].weight.detach().clone())
                x, y = batch
                return (self(x) - y).pow(2).mean()

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Module()


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_closures_record_one_step_per_optimizer_step(accumulate: int) -> None:
    lightning = pytest.importorskip("lightning")
    torch.manual_seed(0)
    module = _Lit.make([])
    data = torch.utils.data.TensorDataset(torch.randn(24, 6), torch.randn(24, 1))
    holder: dict[str, mpdiag.Diagnosis] = {}

    class Attach(lightning.Callback):
        def on_train_start(self, trainer: object, pl_module: nn.Module) -> None:
            holder["diag"] = mpdiag.diagnose(pl_module, optimizer=trainer.optimizers[0])  # type: ignore[attr-defined]

        def on_train_end(self, trainer: object, pl_module: nn.Module) -> None:
            holder["diag"].close()

    trainer = lightning.Trainer(
        max_steps=3,
        accumulate_grad_batches=accumulate,
        callbacks=[Attach()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    run = holder["diag"].run
    assert run.steps == [0, 1, 2]
    for step in run.steps:  # each recorded step holds its own micro-batches, with the weights they used
        assert run.stats("net.0", "activation", step=step).calls == accumulate
        used = module.seen_weights[step * accumulate]  # type: ignore[attr-defined]
        assert run.stats("net.0.weight", "param", step=step) == mpdiag.tensor_stats(used, run.formats)


# -- torch.compile ---------------------------------------------------------------------------------------
def _train_convnet(order: str, backend: str | None = None) -> mpdiag.Run:
    torch.manual_seed(0)
    model = small_convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run_model: nn.Module = model
    if order == "compile, then diagnose":
        run_model = torch.compile(model, backend=backend)
    diag = mpdiag.diagnose(model, optimizer=opt)
    if order == "diagnose, then compile":
        run_model = torch.compile(model, backend=backend)
    elif order == "model.compile()":
        model.compile(backend=backend)
    with diag:
        for x, y in image_batches(3):
            opt.zero_grad()
            nn.functional.cross_entropy(run_model(x), y).backward()
            opt.step()
    return diag.run


ORDERS = ["compile, then diagnose", "diagnose, then compile", "model.compile()"]


@pytest.mark.parametrize("order", ORDERS)
def test_compiled_training_records_exactly_what_eager_records(order: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch._dynamo.reset()
    eager = _train_convnet("eager")
    traced = []  # whether dynamo was tracing when a tensor was measured: it must never be
    measure = mpdiag.record.hooks.measure

    def watched(*args: object, **kwargs: object) -> object:
        traced.append(torch.compiler.is_compiling())
        return measure(*args, **kwargs)

    monkeypatch.setattr(mpdiag.record.hooks, "measure", watched)
    # aot_eager traces forward and backward as torch.compile does but runs them with eager kernels, so
    # the values are the same bit for bit and what is recorded must be too.
    compiled = _train_convnet(order, backend="aot_eager")
    assert compiled.steps == eager.steps == [0, 1, 2]
    assert sites_that_differ(eager, compiled) == []
    # Recording stays out of dynamo's way (where it traced into the numba kernel, it crashed in it)
    assert traced and not any(traced)


def test_steps_left_unrecorded_compile_with_one_graph_break_only() -> None:
    torch.manual_seed(0)
    model = small_convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    compiled = torch.compile(model, backend="aot_eager")
    batches = list(image_batches(3))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        opt.step()

    with mpdiag.diagnose(model, optimizer=opt, every=2) as diag:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        step(*batches[0])  # recorded: the hook bodies run eagerly, at graph breaks
        assert sum(torch._dynamo.utils.counters["graph_break"].values()) > 0
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        step(*batches[1])  # not recorded: the hooks only read a flag, traced into the graph
        breaks = torch._dynamo.utils.counters["graph_break"]
        # one break is left, before the model's forward begins: where the step boundary is checked
        assert sum(breaks.values()) == 1 and "Recording._before_model_forward" in next(iter(breaks))
        step(*batches[2])
    assert diag.run.steps == [0, 2]


def test_attaching_after_the_first_compiled_call_is_warned_about() -> None:
    torch._dynamo.reset()
    model = small_convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    compiled = torch.compile(model, backend="aot_eager")
    batches = list(image_batches(2))
    nn.functional.cross_entropy(compiled(batches[0][0]), batches[0][1]).backward()  # compiled without hooks
    with pytest.warns(mpdiag.MpdiagWarning, match="attach before the first compiled call"):
        with mpdiag.diagnose(model, optimizer=opt):
            opt.zero_grad()
            nn.functional.cross_entropy(compiled(batches[1][0]), batches[1][1]).backward()
            opt.step()


def test_a_compiled_part_called_before_attaching_is_warned_about_though_the_root_ran_eagerly() -> None:
    torch._dynamo.reset()
    body = torch.compile(small_convnet(), backend="aot_eager")
    model = nn.Sequential(body)  # an eager root calling a compiled model, as wrappers do
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = list(image_batches(2))
    nn.functional.cross_entropy(model(batches[0][0]), batches[0][1]).backward()  # compiled without hooks
    with pytest.warns(mpdiag.MpdiagWarning, match="attach before the first compiled call"):
        with mpdiag.diagnose(model, optimizer=opt) as diag:
            opt.zero_grad()
            nn.functional.cross_entropy(model(batches[1][0]), batches[1][1]).backward()
            opt.step()
    assert {s.name for s in diag.run.sites if s.kind is mpdiag.Kind.ACTIVATION} == {""}  # the root's alone


def test_importing_mpdiag_leaves_dynamo_unimported() -> None:
    # Dynamo costs about a second to import: the marks on the hooks are applied when a diagnosis attaches.
    code = "import sys, mpdiag; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_fullgraph_compilation_is_refused_with_a_reason_that_says_what_to_do() -> None:
    torch._dynamo.reset()
    model = small_convnet()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with mpdiag.diagnose(model):
        with pytest.raises(Exception, match="compile without fullgraph=True while mpdiag.diagnose"):
            compiled(next(image_batches(1))[0])


@pytest.mark.slow
def test_inductor_compiled_training_records_every_site() -> None:
    torch._dynamo.reset()
    eager = _train_convnet("eager")
    compiled = _train_convnet("diagnose, then compile", backend="inductor")
    assert set(compiled.sites) == set(eager.sites)  # gradients may arrive in another order
    for site in eager.sites:  # inductor's kernels round differently: same tensors, nearly the same values
        a, b = eager.stats(*site), compiled.stats(*site)
        assert (a.numel, a.calls, a.nonfinite) == (b.numel, b.calls, b.nonfinite)
        assert b.amax == pytest.approx(a.amax, rel=1e-3, abs=1e-6)
