"""The device path on a GPU: same statistics as on the CPU, no host reads in hooks, fp16 autocast.

Skipped where no CUDA GPU exists (CI has none); run on a GPU machine with `python -m pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import pytest
import torch
from fragile_models import Classifier, OverflowingBlock, batch, classification_loss
from host_reads import CountHostReads
from torch import nn

import mpdiag
from mpdiag.record._accumulate import tensor_stats

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_statistics_on_the_gpu_equal_those_on_the_cpu(dtype: torch.dtype) -> None:
    x = (torch.randn(1 << 16, dtype=torch.float64) * torch.logspace(-40, 40, 1 << 16, dtype=torch.float64)).to(dtype)
    x[::101] = float("nan")
    x[1::103] = float("inf")
    x[2::107] = 0.0
    assert tensor_stats(x.cuda()) == tensor_stats(x)


def test_diagnose_under_fp16_autocast_on_the_gpu_reads_the_host_once_per_step() -> None:
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.cuda.amp.GradScaler()
    # The first tensor of a dtype that a process measures builds that dtype's bucket layout from mpdiag's
    # own host-side constants, once: build them here, so that the count does not depend on the tests before.
    for dtype in (torch.float16, torch.float32):
        tensor_stats(torch.ones(1, dtype=dtype, device="cuda"))
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        for _ in range(3):
            opt.zero_grad()
            with CountHostReads() as mode, torch.autocast("cuda", dtype=torch.float16):
                loss = model(torch.randn(32, 64, device="cuda")).float().pow(2).mean()
            assert mode.reads == 0
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    run = diag.run
    assert run.steps == [0, 1, 2]
    assert run.stats("0", "activation").dtypes == {"float16"}
    assert run.stats("0.weight", "param").dtypes == {"float32"}


def test_sensitivity_on_the_gpu_names_the_projection_that_overflows_fp16() -> None:
    model = Classifier(OverflowingBlock()).cuda()
    data = tuple(t.cuda() for t in batch())
    before = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    sens = mpdiag.sensitivity(model, classification_loss, data, torch.float16)
    assert sens.device_type == "cuda" and sens.first_nonfinite == "block.wo"
    assert sens.keep_fp32(tolerance=1e-3).names == ("block.wo",)
    assert (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32) == before
    # bf16 and simulated fp8 run too; cuBLAS's fp16 GEMMs round once more than a cast, not much more
    assert all(e.sqnr_db > 60 for n, e in sens.local.items() if n in ("inp", "head"))
    for dtype in (torch.bfloat16, "fp8_e4m3"):
        assert mpdiag.sensitivity(model, classification_loss, data, dtype).first_nonfinite is None


class _ActivationHeavy(nn.Module):
    """0.5 MB of weights, 8 MB per hidden activation at 8192 rows: activations dominate peak memory."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
            nn.Linear(256, 8),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_compare_on_the_gpu_measures_bf16s_smaller_activations_and_restores_the_flags() -> None:
    torch.manual_seed(0)
    model = _ActivationHeavy().cuda()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8192, 64, generator=g), torch.randn(8192, 8, generator=g)) for _ in range(8)]
    flags = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    cmp = mpdiag.compare(
        model,
        lambda m, b: nn.functional.mse_loss(m(b[0]).float(), b[1]),
        batches,  # on the CPU: compare moves each to the model's device
        make_optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
        precisions=("tf32", "bf16", "fp16", "bf16-pure"),
    )
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == flags
    fp32, bf16 = cmp.results["fp32"], cmp.results["bf16"]
    params = sum(p.numel() * 4 for p in model.parameters())
    assert fp32.peak_memory >= 4 * params  # weights, gradients, Adam's two moments
    assert bf16.peak_memory < 0.8 * fp32.peak_memory  # bf16 activations are half as large
    assert cmp.results["bf16-pure"].peak_memory < bf16.peak_memory
    assert set(fp32.memory_steps) == {1, 3, 5, 7}  # every unrecorded step: the allocator's peak costs nothing
    assert all(r.step_time > 0 for r in cmp.results.values()) and "CUDA-synchronised" in cmp.timing
    if torch.cuda.get_device_capability()[0] >= 8:  # Ampere and later have TF32 tensor cores
        assert not cmp.results["tf32"].notes and cmp.results["tf32"].losses != fp32.losses
    print(cmp)


def test_update_counts_on_the_gpu_equal_those_on_the_cpu_and_read_nothing() -> None:
    from mpdiag.record._updates import count_update, decode, second_moments, stall_formats

    torch.manual_seed(0)
    model = nn.Linear(512, 512).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-6, fused=True)
    model(torch.randn(64, 512, device="cuda")).pow(2).mean().backward()
    before = {p: p.detach().clone() for p in model.parameters()}
    opt.step()
    stall = stall_formats(torch.float32, ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2"))
    moments = dict(second_moments(opt))
    for p in model.parameters():
        update = p.detach().double() - before[p].double()
        with CountHostReads() as mode:
            on_gpu = count_update(before[p], update, p.grad, stall, moments[p])
        assert mode.reads == 0
        v, bound = moments[p]
        on_cpu = count_update(before[p].cpu(), update.cpu(), p.grad.cpu(), stall, (v.cpu(), bound.cpu()))
        assert decode("p", "float32", stall, on_gpu.cpu().numpy()) == decode("p", "float32", stall, on_cpu.numpy())


def test_update_stats_of_a_gpu_run_in_bf16_count_what_it_lost() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10)).cuda().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lost = {}
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        opt.zero_grad()
        model(torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)).float().pow(2).mean().backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        lost = {n: int(((p.grad != 0) & (p.detach() == before[n])).sum()) for n, p in model.named_parameters()}
    assert {n: diag.run.update_stats(n, 0).lost for n in lost} == lost
